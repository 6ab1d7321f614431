"""End to end through DVC, in a temp copy of the repo with tiny params (minutes, not seconds)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cachelora.headline import count_numbers

REPO = Path(__file__).resolve().parents[1]
TRAINED = ("medical", "law", "programming", "psychology", "multi", "verifier")  # each with a DVCLive log
pytestmark = pytest.mark.slow

TINY = {
    # No corpus: its ~300 originals per domain made every tiny train and evaluate minutes long (corpus
    # reading, placement and contamination are covered in test_corpus.py, test_generation.py).
    "generate": {"triplets_per_domain": 40, "corpus": None},
    "validate": {"min_rows": 10, "max_bad_fraction": 0.25},
    "train": {
        "batch_size": 8,
        "max_seq_length": 24,
        "epochs": 1,
        "lr": 1e-3,
        "device": "cpu",
        # Distillation off, as by default: the teacher stage then writes an empty file without loading a
        # model (a teacher's vectors reaching the loss are tested in tests/test_distillation.py).
        "distill": {"teacher": "all-MiniLM-L6-v2", "weight": 0.0, "batch_size": 64},
    },
    "lora": {"rank": 4, "alpha": 8},
    "evaluate": {"bootstrap": 100, "reference_models": ["all-MiniLM-L6-v2"], "cost_repeats": 1},
    # A one-layer verifier on a few hundred pairs, and 4 answer groups per traffic file (shrink_traffic).
    "verifier": {"layers": 1, "max_pairs": 200, "batch_size": 16},
    "traffic": {"min_groups": 4},
}


def run(cwd: Path, *args: str, check: bool = True, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "CACHELORA_LOG_LEVEL": "WARNING",
    }
    env |= extra or {}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def shrink_natural(repo: Path, per_domain: int = 12) -> None:
    """Keep the first ``per_domain`` rows of each domain in the natural sets: evaluate scores them with
    every model, and the full sets made each tiny evaluate a minute long (their figures are not checked)."""
    for name in ("dev", "test"):
        path = repo / "data" / "natural" / f"{name}.jsonl"
        kept, counts = [], {}
        for line in path.read_text().splitlines():
            domain = json.loads(line)["domain"]
            counts[domain] = counts.get(domain, 0) + 1
            if counts[domain] <= per_domain:
                kept.append(line)
        path.write_text("\n".join(kept) + "\n")


def shrink_traffic(repo: Path, groups: int = 4) -> None:
    """Keep the first ``groups`` answer groups of each traffic file (the traffic stage replays every model)."""
    for path in sorted((repo / "data" / "natural" / "traffic").glob("*/*.jsonl")):
        path.write_text("\n".join(path.read_text().splitlines()[:groups]) + "\n")


def set_params(repo: Path, changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working tree's tracked and unignored files, as a fresh git repo with tiny params."""
    root = tmp_path_factory.mktemp("repo")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "dvc.lock").unlink(missing_ok=True)
    set_params(root, TINY)
    shrink_natural(root)
    shrink_traffic(root)
    run(root, "git", "init", "-q")
    run(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    run(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny")
    return root


@pytest.fixture
def pipeline(repo: Path) -> Path:
    """The tiny repo with every stage run (a no-op when an earlier test already ran them)."""
    run(repo, "dvc", "repro")
    return repo


def locked_md5s(repo: Path, prefix: str) -> dict[str, str]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        out["path"]: out["md5"]
        for stage in lock["stages"].values()
        for out in stage.get("outs", [])
        if out["path"].startswith(prefix)
    }


def test_data_stages_are_reproducible_and_leak_free(repo):
    run(repo, "dvc", "repro", "split")
    first = locked_md5s(repo, "data/")
    assert len(first) == 4 * 4  # triplets, validated, quarantine, splits per domain
    run(repo, "dvc", "repro", "-f", "split")
    assert locked_md5s(repo, "data/") == first
    for domain in ("medical", "law", "programming", "psychology"):
        split = json.loads((repo / f"metrics/split/{domain}.json").read_text())
        assert split["unseen"] == {"cross_split_topics": 0, "cross_split_templates": 0}
        assert split["dropped_overlap"] == {"train": 0, "val": 0} and min(split["rows"].values()) > 0


def test_a_topic_placed_across_splits_fails_the_split_stage(repo):
    run(repo, "dvc", "repro", "split")
    validated = repo / "data/validated/psychology.jsonl"
    original = validated.read_text()
    train = [json.loads(x) for x in (repo / "data/splits/psychology/train.jsonl").read_text().splitlines()]
    shared = train[0]
    # a test row (its phrasings are test templates) renamed to a train topic: only the topic crosses
    row = next(
        r for r in map(json.loads, original.splitlines()) if r.get("split") == "test" and "near_miss_of" not in r
    )
    row.update(topic=shared["topic"], negative_topic=shared["topic"])
    validated.write_text(original + json.dumps(row) + "\n")
    try:
        proc = run(repo, "python", "stages/split.py", "--domain", "psychology", check=False)
        assert proc.returncode == 1
        expected = "split psychology: 1 topics in train and in val/test across domains (must be 0)"
        assert expected in proc.stderr, proc.stderr
    finally:
        validated.write_text(original)


def test_injected_bad_rows_go_to_quarantine_and_nothing_is_lost(repo):
    source = repo / "data/triplets/medical.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    bad = [dict(rows[0], negative=rows[0]["anchor"]), dict(rows[1], anchor="[insert paraphrase here]")]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows + bad))
    try:
        run(repo, "python", "stages/validate.py", "--domain", "medical")
        quarantined = [json.loads(x) for x in (repo / "data/quarantine/medical.jsonl").read_text().splitlines()]
        passed = (repo / "data/validated/medical.jsonl").read_text().splitlines()
        assert len(passed) + len(quarantined) == len(rows) + 2
        reasons = {r["anchor"]: r["reasons"] for r in quarantined}
        assert "texts_not_distinct" in reasons[rows[0]["anchor"]]
        assert "placeholder:anchor" in reasons["[insert paraphrase here]"]
    finally:
        run(
            repo,
            "dvc",
            "checkout",
            "-f",
            "data/triplets/medical.jsonl",
            "data/validated/medical.jsonl",
            "data/quarantine/medical.jsonl",
        )


def test_bad_params_fail_the_stage_with_one_line(repo):
    params = (repo / "params.yaml").read_text()
    try:
        set_params(repo, {"split": {"train": 0.9}})
        proc = run(repo, "python", "stages/split.py", "--domain", "medical", check=False)
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last == "error: params.yaml: split: train + val + test must sum to 1 (got 1.2)"
    finally:
        (repo / "params.yaml").write_text(params)


def test_full_pipeline_noop_experiment_and_metrics_diff(repo):
    run(repo, "dvc", "repro")
    for name in ("medical", "law", "programming", "psychology", "multi", "merged"):
        assert (repo / f"models/{name}/adapter_model.safetensors").is_file()
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert {"baseline", "medical", "multi", "merged", "deploy"} <= set(metrics)
    assert metrics["contamination"] == {
        "natural_test_in_train": 0,
        "natural_test_in_corpus": 0,
        "natural_test_in_val": 0,
        "natural_test_in_natural_dev": 0,
    }
    deploy = metrics["deploy"]
    assert deploy["threshold"] == metrics[deploy["model"]]["calibrated"]["all"]["threshold"]
    assert deploy["natural_test"] == {
        k: metrics[deploy["model"]]["natural_test"]["all"]["replay_calibrated"][k]
        for k in ("threshold", "hit_rate", "hit_precision", "false_hit_rate")
    }
    for figure in ("margin_gain", "replay", "pr_curves", "cost_quality"):
        assert (repo / f"metrics/figures/{figure}.png").stat().st_size > 1000
    reference = "all-MiniLM-L6-v2"  # TINY's stand-in for all-mpnet-base-v2
    assert reference in metrics and set(metrics["references"]) == {reference}
    assert metrics["deploy"]["model"] != reference
    cost = json.loads((repo / "metrics/cost.json").read_text())
    assert set(cost["models"]) == {"baseline", deploy["model"], reference}
    assert all(m["parameters"] == 22_713_216 for m in cost["models"].values())  # adapters merged, as served
    assert "Cost against quality" in (repo / "RESULTS.md").read_text()
    trained = json.loads((repo / "models/multi/training_info.json").read_text())
    assert trained["teacher"] is None  # TINY's distill weight is 0
    curve = json.loads((repo / "metrics/plots/replay/natural_test.json").read_text())
    assert {row["model"] for row in curve} == {
        "baseline",
        "medical",
        "law",
        "programming",
        "psychology",
        "multi",
        "merged",
        reference,
    }
    assert next(row for row in curve if row["model"] == "merged")["hit_rate"] == 1.0  # threshold 0: every lookup hits

    again = run(repo, "dvc", "repro")
    assert "Running stage" not in again.stdout

    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "rank 4")
    exp = run(repo, "dvc", "exp", "run", "-S", "lora.rank=16")
    ran = {line.split("'")[1] for line in exp.stdout.splitlines() if line.startswith("Running stage")}
    assert ran and all(
        s.startswith(("check_params", "train@", "merge", "evaluate", "traffic", "report")) for s in ran
    ), ran
    assert "train_verifier" not in ran  # the verifier does not depend on the embedding's LoRA
    assert not any(s.startswith(("generate", "validate", "split")) for s in ran)
    assert json.loads((repo / "models/medical/adapter_config.json").read_text())["r"] == 16

    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "rank 16")
    diff = json.loads(run(repo, "dvc", "metrics", "diff", "HEAD~1", "--json").stdout)
    results = (repo / "RESULTS.md").read_text()
    assert "+uncommitted" in results  # the experiment ran on params not yet committed
    failed = run(repo, "cachelora", "verify", check=False)
    assert failed.returncode == 1 and "generated from inputs not committed" in failed.stdout
    run(repo, "dvc", "repro", "-f", "report")  # now the inputs are committed: name that commit
    run(repo, "git", "add", "-A")
    run(repo, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "report")
    assert set(diff) <= {"metrics/headline.json", *(f"metrics/train/{m}/metrics.json" for m in TRAINED)}
    assert diff["metrics/train/medical/metrics.json"]["loss"]["diff"]  # rank 16 trained another adapter
    shown = json.loads(run(repo, "dvc", "metrics", "show", "--json").stdout)
    (workspace,) = shown.values()
    assert 60 <= count_numbers(workspace["data"]) <= 100  # sized for a person
    headline = json.loads((repo / "metrics/headline.json").read_text())
    eval_json = json.loads((repo / "metrics/eval.json").read_text())
    deploy = eval_json["deploy"]["model"]
    assert headline["deploy_model"] == deploy
    for group in ("all", "law"):
        figures = headline["all"] if group == "all" else headline["domains"][group]
        for name, model in (("deploy", deploy), ("baseline", "baseline")):  # the figures at the shipped thresholds
            replay = eval_json[model]["natural_test"][group]["replay_calibrated"]
            assert figures["natural_hit_rate"][name] == replay["hit_rate"]
            assert figures["natural_hit_precision"][name] == replay["hit_precision"]


def test_exp_show_recipe_fits_200_columns_and_ctrl_c_is_undone_by_dvc_checkout(pipeline):
    """README's `dvc exp show` recipe, on two experiments: the headline and the changed params of each
    within 200 columns, nothing elided; and after DVC removed a stage's outputs (as it does before running
    the stage, so a Ctrl-C leaves them gone), `dvc checkout` puts them back as dvc.lock records them."""
    run(pipeline, "git", "add", "-A")
    run(
        pipeline,
        "git",
        "-c",
        "user.email=t@t",
        "-c",
        "user.name=t",
        "commit",
        "-qm",
        "before experiments",
        "--allow-empty",
    )
    for name, change in (("share20", "traffic.near_miss_share=0.2"), ("share30", "traffic.near_miss_share=0.3")):
        run(pipeline, "dvc", "exp", "run", "-n", name, "-S", change)
    run(pipeline, "git", "checkout", "--", "params.yaml")
    recipe = re.search(r"^dvc exp show .*$", (REPO / "README.md").read_text(), re.MULTILINE)
    assert recipe, "README gives no `dvc exp show` recipe"
    table = run(pipeline, *shlex.split(recipe.group(0)), "--no-pager", extra={"COLUMNS": "200"}).stdout
    lines = [line.rstrip() for line in table.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 200 and "…" not in table, table
    header = lines[1]
    for column in (
        "deploy_model",
        "all.reask_hit_rate.deploy",
        "all.near_miss_hit_rate.deploy",
        "traffic.near_miss_share",
    ):
        assert column in header, header
    assert "lora.rank" not in header  # unchanged params stay out
    assert "[share20]" in table and "[share30]" in table

    before = locked_md5s(pipeline, "models/")
    shutil.rmtree(pipeline / "models" / "medical")
    run(pipeline, "dvc", "checkout")
    assert (
        locked_md5s(pipeline, "models/") == before and (pipeline / "models/medical/adapter_model.safetensors").is_file()
    )
    assert json.loads(run(pipeline, "dvc", "status", "train@medical", "--json").stdout) == {}


def test_invalid_params_fail_before_any_output_is_deleted(pipeline):
    repo = pipeline
    params = (repo / "params.yaml").read_text()
    kept = [
        p
        for p in (
            *repo.glob("models/*/adapter_model.safetensors"),
            *repo.glob("metrics/**/*.json"),
            repo / "RESULTS.md",
        )
    ]
    before = {p: p.read_bytes() for p in kept}
    try:
        set_params(repo, {"lora": {"rank": -1}, "evaluate": {"bootstrap": 200}})
        proc = run(repo, "dvc", "repro", check=False)
        assert proc.returncode != 0
        assert "error: params.yaml: lora.rank: Input should be greater than 0" in proc.stderr + proc.stdout
        assert {p: p.read_bytes() for p in kept if p.exists()} == before and all(p.exists() for p in kept)
    finally:
        (repo / "params.yaml").write_text(params)
    assert "Running stage" not in run(repo, "dvc", "repro").stdout.replace("Running stage 'check_params'", "")


def test_report_cites_and_verify_catches_each_corruption(pipeline):
    repo = pipeline
    results = (repo / "RESULTS.md").read_text()
    assert "metrics/eval.json" in results and "sha256" in results
    readme = (repo / "README.md").read_text()
    assert "| medical |" in readme.split("<!-- results:begin -->")[1]
    assert "verify: OK" in run(repo, "cachelora", "verify").stdout

    weights = repo / "models/law/adapter_model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-6])
    merged_row = next(line for line in results.splitlines() if line.startswith("| merged |"))
    cells = merged_row.split(" | ")
    cells[2] = "9.9999"
    (repo / "RESULTS.md").write_text(results.replace(merged_row, " | ".join(cells), 1))
    headline_row = next(line for line in readme.splitlines() if line.startswith("| law | merged |"))
    (repo / "README.md").write_text(readme.replace(headline_row, "| law | merged |", 1))
    readme_line = readme.splitlines().index(headline_row) + 1
    info_path = repo / "models/psychology/training_info.json"
    info = json.loads(info_path.read_text())
    info["base_model"]["sha256"] = "0" * 64
    info_path.write_text(json.dumps(info))
    (repo / "data/splits/medical/test.jsonl").write_text("")
    (repo / "data/quarantine/law.jsonl").unlink()
    try:
        proc = run(repo, "cachelora", "verify", check=False)
        assert proc.returncode == 1
        fails = [line for line in proc.stdout.splitlines() if line.startswith("FAIL ")]
        text = "\n".join(fails)
        assert f"cover {size} bytes, file has {size - 6} (-6)" in text
        assert "models/law/adapter_model.safetensors: md5" in text
        assert "RESULTS.md:" in text and "is 9.9999 here" in text
        cells_expected = len(headline_row.strip("|").split("|"))
        assert f"README.md:{readme_line}: row 'law / merged' has 2 cells, expected {cells_expected}" in text
        assert "adapter was trained on 000000000000" in text
        assert "data/splits/medical/test.jsonl: md5" in text
        assert "data/quarantine/law.jsonl: missing" in text
    finally:
        run(repo, "dvc", "checkout", "-f")
        (repo / "RESULTS.md").write_text(results)
        (repo / "README.md").write_text(readme)
    recomputed = run(repo, "cachelora", "verify", "--recompute")
    assert "verify: OK" in recomputed.stdout and "re-evaluation within" in recomputed.stdout


def test_verify_catches_a_stale_lock_a_stale_header_and_a_missing_model(pipeline):
    """Inputs changed after the run (params, code), a model directory gone: each named, all reported."""
    repo = pipeline
    params, evaluation = (repo / "params.yaml").read_text(), (repo / "src/cachelora/replay.py").read_text()
    results = (repo / "RESULTS.md").read_text()
    multi = repo / "models/multi"
    shutil.move(multi, repo / "multi.bak")
    set_params(repo, {"evaluate": {"bootstrap": 150}})
    (repo / "src/cachelora/replay.py").write_text(evaluation + "\n# edited\n")
    (repo / "RESULTS.md").write_text(results.replace("md5 `", "md5 `0", 1))
    try:
        proc = run(repo, "cachelora", "verify", check=False)
        text = proc.stdout
        assert proc.returncode == 1, text
        assert "dvc.lock: stage 'evaluate': deps params.yaml: evaluate modified (`dvc status`)" in text
        assert "dvc.lock: stage 'evaluate': deps src/cachelora/replay.py: modified (`dvc status`)" in text
        assert "models/multi: model directory missing" in text
        assert "params digest" in text and "differs from params.yaml now" in text
        assert "inputs changed since commit" in text
        assert "differs from dvc.lock" in text  # the corrupted model md5 in the header
    finally:
        (repo / "params.yaml").write_text(params)
        (repo / "src/cachelora/replay.py").write_text(evaluation)
        (repo / "RESULTS.md").write_text(results)
        shutil.move(repo / "multi.bak", multi)
    assert "verify: OK" in run(repo, "cachelora", "verify").stdout


def test_exported_model_matches_base_plus_adapter(pipeline):
    repo = pipeline
    run(repo, "cachelora", "export", "--model", "merged", "--out", "exported")
    config = json.loads((repo / "exported/cache_config.json").read_text())
    assert config["dimension"] == 384 and config["normalize"] and config["pooling"] == "mean"
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    shipped = config["thresholds"]["global"]  # calibrated on natural dev, with the guarantee and its figures
    calibrated = metrics["merged"]["calibrated"]
    assert shipped["threshold"] == calibrated["all"]["threshold"] and shipped["guarantee"] == calibrated["all"]
    assert (
        shipped["natural_test"]["hit_precision"]
        == metrics["merged"]["natural_test"]["all"]["replay_calibrated"]["hit_precision"]
    )
    assert config["thresholds"]["per_domain"]["law"]["threshold"] == calibrated["law"]["threshold"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "semantic_router.yaml"} <= set(config["checksums"])
    router_text = (repo / "exported/semantic_router.yaml").read_text()
    assert f"natural_test precision {shipped['natural_test']['hit_precision']:.3f}" in router_text
    assert "at 95% confidence" in router_text  # each threshold's guarantee, in the router's comments
    router = yaml.safe_load(router_text)
    assert router["global"]["stores"]["response_cache"]["similarity_threshold"] == round(shipped["threshold"], 4)
    plugin = router["routing"]["decisions"][0]["plugins"][0]
    assert plugin["type"] == "response_cache" and plugin["configuration"]["enabled"] is True

    default = run(repo, "cachelora", "export", "--out", "deployed").stdout
    deployed = json.loads((repo / "deployed/cache_config.json").read_text())
    assert deployed["model"] == metrics["deploy"]["model"] and deployed["deploy_choice"]
    assert deployed["thresholds"]["global"]["threshold"] == metrics["deploy"]["threshold"]
    assert f"exported {metrics['deploy']['model']} to deployed" in default
    traffic = json.loads((repo / "metrics/traffic.json").read_text())
    assert traffic["shipped"]["model"] == metrics["deploy"]["model"]
    chosen_by = metrics["deploy"]["ranking"][metrics["deploy"]["model"]]  # evaluate's traffic-dev replay that chose it
    assert metrics["deploy"]["chosen_on"] == "traffic_dev" and chosen_by == max(metrics["deploy"]["ranking"].values())
    assert chosen_by == traffic["shipped"]["dev"]["all"]["reask_hit_rate"]  # = what the traffic stage measures
    alone = traffic["models"][metrics["deploy"]["model"]]["shipped_thresholds"]["test"]["law"]
    law = deployed["thresholds"]["per_domain"]["law"]["router_alone_traffic_test"]
    assert law["near_miss_wrong_hit_rate"] == alone["near_miss_wrong_hit_rate"]
    verifier = deployed["verifier"]
    assert verifier["per_domain"] == {
        d: traffic["shipped"]["settings"][d]["verifier_threshold"] for d in verifier["per_domain"]
    }
    assert verifier["traffic_test"] == traffic["shipped"]["test"]
    assert (config["verifier"] is None) == (metrics["deploy"]["model"] != "merged")  # shipped with deploy's model only
    scores = run(repo, "python", "-c", "from sentence_transformers.cross_encoder import CrossEncoder; "
                 "print(CrossEncoder('deployed/verifier').predict([('a b c', 'a b d')])[0])").stdout  # fmt: skip
    assert 0.0 <= float(scores.strip().splitlines()[-1]) <= 1.0
    check = (
        "import sys, numpy as np\n"
        "from sentence_transformers import SentenceTransformer\n"
        "from cachelora.adapters import load_adapter_model\n"
        "texts = ['symptoms of asthma in children', 'how do I file for divorce', 'git rebase vs merge']\n"
        "a = SentenceTransformer('exported').encode(texts)\n"
        "b = load_adapter_model('models/merged').encode(texts)\n"
        "print(float(np.abs(a - b).max()))\n"
    )
    diff = float(run(repo, "python", "-c", check).stdout.strip().splitlines()[-1])
    assert diff < 1e-5


def release_agrees_with_itself(release: Path) -> None:
    """The exported model is the one the release's eval.json deployed, at its calibrated thresholds; its verifier
    block is the release's traffic.json shipped setting with its figures; RESULTS.md's headline names it;
    every exported file has the checksum cache_config.json records."""
    config = json.loads((release / "model/cache_config.json").read_text())
    evaluated = json.loads((release / "metrics/eval.json").read_text())
    traffic = json.loads((release / "metrics/traffic.json").read_text())
    model = evaluated["deploy"]["model"]
    assert config["model"] == model and config["deploy_choice"] is True
    assert config["thresholds"]["global"]["threshold"] == evaluated[model]["calibrated"]["all"]["threshold"]
    assert config["thresholds"]["global"]["guarantee"] == evaluated["deploy"]["guarantee"]["all"]
    assert traffic["shipped"]["model"] == model and config["verifier"]["traffic_test"] == traffic["shipped"]["test"]
    settings = traffic["shipped"]["settings"]
    assert config["verifier"]["per_domain"] == {d: s["verifier_threshold"] for d, s in settings.items() if d != "all"}
    assert f"the shipped cache ({model} + verifier" in (release / "RESULTS.md").read_text()
    for name, sha in config["checksums"].items():
        assert hashlib.sha256((release / "model" / name).read_bytes()).hexdigest() == sha, name


def test_push_wipe_pull_verify_then_publish_and_fetch(pipeline):
    import boto3

    from tests.conftest import S3_DUMMY_CREDENTIALS, LoopbackS3

    repo = pipeline
    url = "s3://cachelora/releases/v1"
    with LoopbackS3(repo) as endpoint:
        run(repo, "dvc", "push")
        outputs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        shutil.rmtree(repo / ".dvc/cache")
        for stage in outputs.values():
            for out in stage.get("outs", []):
                target = repo / out["path"]
                if out["path"].startswith(("data/", "models/")):  # metrics and RESULTS.md are git-tracked
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
        run(repo, "dvc", "pull")
        assert "in sync" in run(repo, "dvc", "status", "-c").stdout
        assert "verify: OK" in run(repo, "cachelora", "verify").stdout

        published = run(repo, "cachelora", "publish", "--to", url).stdout
        assert "published" in published
        digest = published.split("manifest sha256: ", 1)[1].split()[0]
        record = json.loads((repo / "releases.json").read_text())[url]
        assert record["manifest_sha256"] == digest and record["files"] > 0 and record["bytes"] > 0
        again = run(repo, "cachelora", "publish", "--to", url, check=False)
        assert again.returncode == 1 and "never overwritten" in again.stderr

        run(repo, "cachelora", "fetch", "--from", url, "--to", "fetched")  # digest from releases.json
        assert hashlib.sha256((repo / "fetched/manifest.json").read_bytes()).hexdigest() == digest
        manifest = json.loads((repo / "fetched/manifest.json").read_text())
        names = {entry["path"] for entry in manifest["files"]}
        expected = {"RESULTS.md", "dvc.lock", "model/cache_config.json", "adapters/merged/adapter_model.safetensors"}
        assert expected <= names
        run(repo, "cachelora", "fetch", "--from", url, "--to", "fetched-by-digest", "--sha256", digest)
        release_agrees_with_itself(repo / "fetched")

        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_DUMMY_CREDENTIALS["access_key_id"],
            aws_secret_access_key=S3_DUMMY_CREDENTIALS["secret_access_key"],
        )
        client.put_object(Bucket="cachelora", Key="releases/v1/RESULTS.md", Body=b"# tampered\n")
        before = set(repo.iterdir())
        tampered = run(repo, "cachelora", "fetch", "--from", url, "--to", "tampered", check=False)
        assert tampered.returncode == 1
        assert tampered.stderr.strip().splitlines()[-1].startswith(f"error: {url}/RESULTS.md: size mismatch")
        assert set(repo.iterdir()) == before  # no tampered/, no temp dir
