import json

import pytest
from click.testing import CliRunner

from cachelora.cli import main
from cachelora.records import write_jsonl
from tests.conftest import tiny_rows


def run(*args):
    return CliRunner().invoke(main, ["evaluate", *map(str, args)])


def test_evaluate_any_triplet_file_with_an_adapter(tiny_adapter, tmp_path):
    rows = [{k: r[k] for k in ("anchor", "positive", "negative")} for r in tiny_rows(20, seed=9)]
    write_jsonl(tmp_path / "mine.jsonl", rows)
    result = run("--triplets", tmp_path / "mine.jsonl", "--adapter", tiny_adapter, "--json", tmp_path / "out.json")
    assert result.exit_code == 0, result.output
    assert "(in-sample)" in result.output and "baseline" in result.output and "medical" in result.output
    out = json.loads((tmp_path / "out.json").read_text())
    assert set(out) == {"baseline", "medical"}
    assert out["baseline"]["all"]["margin_gain_pct"] == 0
    replay = out["medical"]["all"]["replay"]
    assert replay["in_sample"] == 1 and replay["lookups"] == 20 and replay["hit_precision"] >= 0.95


def test_per_domain_groups_and_fixed_threshold(tmp_path):
    rows = tiny_rows(20, seed=9)
    rows[:10] = [dict(r, domain="law") for r in rows[:10]]
    write_jsonl(tmp_path / "mine.jsonl", rows)
    result = run("--triplets", tmp_path / "mine.jsonl", "--threshold", 0.7, "--json", tmp_path / "o.json")
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "o.json").read_text())["baseline"]
    assert {"law", "medical", "all", "macro"} == set(out)
    assert out["law"]["replay"]["threshold"] == 0.7 and "(in-sample)" not in result.output
    assert out["all"]["replay"]["lookups"] == 20


@pytest.mark.parametrize(
    "flag, value",
    [
        *(("--threshold", value) for value in ("2", "-1.5", "nan", "inf", "high")),
        ("--target-precision", "nan"),
        ("--target-precision", "0"),
        ("--bootstrap", "0"),
        ("--bootstrap", "-5"),
        ("--seed", "-1"),
        ("--min-rows", "0"),
    ],
)
def test_flags_out_of_range_are_refused_before_any_work(tmp_path, flag, value):
    write_jsonl(tmp_path / "mine.jsonl", tiny_rows(10))
    result = run("--triplets", tmp_path / "mine.jsonl", flag, value)
    assert result.exit_code == 2 and flag in result.output and "Traceback" not in result.output


def test_json_at_a_directory_is_refused(tmp_path):
    write_jsonl(tmp_path / "mine.jsonl", tiny_rows(10))
    result = run("--triplets", tmp_path / "mine.jsonl", "--threshold", 0.5, "--json", tmp_path)
    assert result.exit_code == 1 and "is a directory" in result.output


@pytest.mark.parametrize(
    "bad, says",
    [
        ("NaN", "NaN is not a number JSON allows"),
        ("Infinity", "Infinity is not a number JSON allows"),
        ('"0.7"', "baseline.val.all.threshold: '0.7' is not a cosine"),
        ("2", "baseline.val.all.threshold: 2 is not a cosine"),
    ],
)
def test_thresholds_from_a_non_cosine_is_refused(tmp_path, bad, says):
    write_jsonl(tmp_path / "mine.jsonl", tiny_rows(10))
    (tmp_path / "eval.json").write_text('{"baseline": {"val": {"all": {"threshold": ' + bad + "}}}}")
    result = run("--triplets", tmp_path / "mine.jsonl", "--thresholds-from", tmp_path / "eval.json")
    assert result.exit_code == 1 and "eval.json" in result.output and says in result.output


@pytest.mark.parametrize("names", [["baseline"], ["same", "same"]])
def test_adapters_named_baseline_or_twice_are_refused(tmp_path, names):
    write_jsonl(tmp_path / "mine.jsonl", tiny_rows(10))
    flags = [x for i, n in enumerate(names) for x in ("--adapter", tmp_path / str(i) / n)]
    result = run("--triplets", tmp_path / "mine.jsonl", *flags)
    assert result.exit_code == 1 and names[-1] in result.output and "Traceback" not in result.output


def test_thresholds_from_eval_json_must_know_the_model(tmp_path):
    write_jsonl(tmp_path / "mine.jsonl", tiny_rows(10))
    (tmp_path / "eval.json").write_text(json.dumps({"merged": {}}))
    result = run("--triplets", tmp_path / "mine.jsonl", "--thresholds-from", tmp_path / "eval.json")
    assert result.exit_code == 1
    assert "eval.json: no thresholds for model 'baseline' (use --threshold)" in result.output


def test_thresholds_from_eval_json_per_domain_and_global_for_all(tmp_path):
    rows = tiny_rows(20, seed=9)
    rows[:10] = [dict(r, domain="law") for r in rows[:10]]
    write_jsonl(tmp_path / "mine.jsonl", rows)
    val = {"law": {"threshold": 0.5}, "medical": {"threshold": 0.7}, "all": {"threshold": 0.65}}
    test = {"law": {"at_max_f1": {"threshold": 0.45}}}
    (tmp_path / "eval.json").write_text(json.dumps({"baseline": {"val": val, "test": test}}))
    args = ("--triplets", tmp_path / "mine.jsonl", "--thresholds-from", tmp_path / "eval.json")
    result = run(*args, "--json", tmp_path / "o.json")
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "o.json").read_text())["baseline"]
    assert out["law"]["replay"]["threshold"] == 0.5 and out["law"]["at_max_f1"]["threshold"] == 0.45
    assert out["medical"]["replay"]["threshold"] == 0.7 and out["medical"]["at_max_f1"]["threshold"] == 0.7
    assert out["all"]["replay"]["threshold"] == 0.65 and out["all"]["replay"]["in_sample"] == 0


def test_missing_field_names_file_and_row(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"anchor": "a b c", "positive": "d e f"}\n')
    result = run("--triplets", tmp_path / "bad.jsonl")
    assert result.exit_code == 1
    assert "bad.jsonl:1: missing field 'negative'" in result.output


def test_adapter_trained_on_other_base_is_refused(tiny_adapter, tmp_path):
    import shutil

    other = shutil.copytree(tiny_adapter, tmp_path / "other")
    info = json.loads((other / "training_info.json").read_text())
    info["base_model"]["sha256"] = "1" * 64
    (other / "training_info.json").write_text(json.dumps(info))
    write_jsonl(tmp_path / "mine.jsonl", tiny_rows(10))
    result = run("--triplets", tmp_path / "mine.jsonl", "--adapter", other)
    assert result.exit_code == 1 and "trained on base 'all-MiniLM-L6-v2' (111111111111…)" in result.output


@pytest.mark.parametrize(("key", "value"), [("hidden_act", "relu"), ("num_hidden_layers", 3)])
def test_a_base_whose_config_was_edited_is_not_the_adapters_base(tiny_adapter, tmp_path, key, value):
    """Same weights, another computation: the adapter is refused (the base's digest covers config.json)."""
    import shutil

    from cachelora.base_model import resolve_base

    base = shutil.copytree(resolve_base("all-MiniLM-L6-v2"), tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, key: value}))
    write_jsonl(tmp_path / "mine.jsonl", tiny_rows(10))
    result = run("--triplets", tmp_path / "mine.jsonl", "--adapter", tiny_adapter, "--base", base)
    assert result.exit_code == 1 and f"not '{base}'" in result.output and "Traceback" not in result.output


def test_too_few_rows_and_copied_texts_are_refused_with_their_lines(tmp_path):
    rows = tiny_rows(10)
    write_jsonl(tmp_path / "one.jsonl", rows[:1])
    result = run("--triplets", tmp_path / "one.jsonl")
    assert result.exit_code == 1 and "one.jsonl: 1 rows, fewer than evaluate.min_rows (5)" in result.output
    copied = [
        *rows[:3],
        dict(rows[3], anchor=rows[3]["positive"]),
        rows[4],
        dict(rows[5], negative=rows[5]["positive"]),
    ]
    (tmp_path / "copied.jsonl").write_text(
        "\n".join(json.dumps(r) for r in copied[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in copied[2:]) + "\n"
    )
    result = run("--triplets", tmp_path / "copied.jsonl")
    assert result.exit_code == 1
    assert "copied.jsonl: line(s) 5, 7: anchor, positive and negative must be three different texts" in result.output


def test_publish_and_export_default_to_the_deploy_model() -> None:
    """A release ships what RESULTS.md calls deploy: no command defaults to another model."""
    from cachelora import cli

    for command in (cli.publish, cli.export):
        model = next(p for p in command.params if p.name == "model_name")
        assert model.default is None, command.name


def test_publish_refuses_what_verify_fails_before_building_anything(monkeypatch):
    import cachelora.releases
    import cachelora.verify

    built = []
    monkeypatch.setattr(cachelora.verify, "verify", lambda params: (["models/multi: partial model directory"], 6))
    monkeypatch.setattr(cachelora.releases, "build_release", lambda *a: built.append(a))
    result = CliRunner().invoke(main, ["publish", "--to", "s3://cachelora/releases/v9"])
    assert result.exit_code == 1 and built == []
    assert "publish refused: verify found 1 problem(s), first: models/multi: partial model directory" in result.output


def test_version_and_a_fast_help():
    import subprocess
    import sys

    from cachelora import cli, evaluation

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("cachelora, version ")
    assert cli.ALL == evaluation.ALL
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, cachelora.cli; print('sklearn' in sys.modules, 'torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.split() == ["False", "False"]  # --help does not wait for the evaluation stack


def test_a_nan_id_in_the_triplets_is_refused_with_its_line(tmp_path):
    rows = tiny_rows(10)
    write_jsonl(tmp_path / "mine.jsonl", rows)
    lines = (tmp_path / "mine.jsonl").read_text().splitlines()
    lines[3] = lines[3].replace('"source_id": ', '"source_id": NaN, "was": ', 1)
    (tmp_path / "mine.jsonl").write_text("\n".join(lines) + "\n")
    result = run("--triplets", tmp_path / "mine.jsonl", "--threshold", 0.5)
    assert result.exit_code == 1 and "mine.jsonl:4: malformed JSON (NaN is not a number JSON allows)" in result.output
