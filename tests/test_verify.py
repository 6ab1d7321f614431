import pytest
import torch
from safetensors.torch import save_file

from cachelora.verify import check_safetensors


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.arange(10, dtype=torch.float32)}, str(path))
    return path


def test_intact_file_passes(weights):
    assert check_safetensors(weights) is None


def test_six_byte_truncation_is_caught_with_sizes(weights):
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-6])
    assert check_safetensors(weights) == (
        f"{weights}: header and data offsets cover {size} bytes, file has {size - 6} (-6)"
    )


def test_stripped_carriage_returns_are_caught(weights):
    """What `* text eol=lf` did upstream: CR bytes removed from a binary file."""
    data = bytearray(weights.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    data[8 + header_len] = 13  # put a CR in the tensor data, then strip it like git did
    weights.write_bytes(bytes(data[: 8 + header_len]) + bytes(data[8 + header_len :]).replace(b"\r", b""))
    assert "header and data offsets cover" in check_safetensors(weights)


def test_garbage_is_named(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert check_safetensors(bad) == f"{bad}: header is not valid JSON"
    bad.write_bytes(b"abc")
    assert "too short" in check_safetensors(bad)


def test_check_lock_hashes_directories_like_dvc(tmp_path, monkeypatch):
    import hashlib

    from cachelora.verify import check_lock, dir_md5

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.json").write_text("{}")
    (tmp_path / "f.txt").write_text("x")
    listing = '[{"md5": "' + hashlib.md5(b"{}").hexdigest() + '", "relpath": "a.json"}]'
    assert dir_md5(tmp_path / "out") == hashlib.md5(listing.encode()).hexdigest() + ".dir"
    lock = tmp_path / "dvc.lock"
    outs = [{"path": "out", "md5": dir_md5(tmp_path / "out")}, {"path": "f.txt", "md5": hashlib.md5(b"x").hexdigest()}]
    lock.write_text(__import__("yaml").safe_dump({"schema": "2.0", "stages": {"s": {"outs": outs}}}))
    assert list(check_lock(lock)) == []
    (tmp_path / "out" / "b.json").write_text("[]")
    (tmp_path / "f.txt").unlink()
    problems = list(check_lock(lock))
    assert problems[0].startswith("out: directory md5") and "file detail needs the DVC cache" in problems[0]
    assert problems[1].startswith("f.txt: missing")


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A RESULTS.md whose header and one citation match what is 'here', every other check stubbed."""
    import cachelora.base_model
    import cachelora.verify as verify

    monkeypatch.chdir(tmp_path)
    locked = {"models/medical": "m1", "models/multi": "m2", "models/merged": "m3", "metrics/eval.json": "e1"}
    monkeypatch.setattr(verify, "locked_outputs", lambda: dict(locked))
    monkeypatch.setattr(verify, "params_digest", lambda: "ab" * 32)
    monkeypatch.setattr(verify, "check_commit", lambda *a: iter(()))
    monkeypatch.setattr(cachelora.base_model, "model_sha256", lambda name: "cd" * 32)
    lines = [
        f"| base model | `all-MiniLM-L6-v2` sha256 `{'cd' * 32}` |",
        f"| params.yaml | sha256 `{'ab' * 32}` |",
        "| inputs (data, code) at git commit | `abc123` |",
        *(f"| `{model}` | md5 `{md5}` (dvc.lock) |" for model, md5 in locked.items() if model.startswith("models/")),
        "",
        "Source: `metrics/eval.json` (md5 `e1`); each cell is the JSON key named by its row and column.",
    ]
    path = tmp_path / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_header_and_citations_that_match_pass(results):
    from cachelora.verify import check_header
    from tests.conftest import tiny_params

    assert list(check_header(tiny_params(), results)) == []


def test_a_source_citation_that_differs_from_the_lock_fails(results):
    from cachelora.verify import check_header
    from tests.conftest import tiny_params

    results.write_text(results.read_text().replace("(md5 `e1`)", "(md5 `stale`)"))
    assert list(check_header(tiny_params(), results)) == [
        f"{results}:8: metrics/eval.json md5 stale differs from dvc.lock e1"
    ]


@pytest.mark.parametrize(
    ("stored", "fresh", "problem"),
    [
        ({"a": {"x": 1.0, "gone": 2.0}}, {"a": {"x": 1.0}}, "a.gone is not produced by re-evaluation"),
        ({"a": {"x": 1.0}}, {"a": {"x": 1.0, "new": 2.0}}, "a.new missing (re-evaluation produces it)"),
        ({"a": {"x": 1.0}}, {"a": {"x": 1.5}}, "a.x is 1.0, re-evaluation gives 1.5"),
        ({"a": {"m": "multi"}}, {"a": {"m": "merged"}}, "a.m is 'multi', re-evaluation gives 'merged'"),
    ],
)
def test_recompute_compares_eval_json_both_ways(tmp_path, monkeypatch, stored, fresh, problem):
    import cachelora.evaluation
    import cachelora.verify as verify
    from cachelora.records import write_json
    from tests.conftest import tiny_params

    write_json(tmp_path / "eval.json", stored)
    monkeypatch.setattr(verify, "EVAL", tmp_path / "eval.json")
    monkeypatch.setattr(cachelora.evaluation, "pipeline_metrics", lambda params: (fresh, None))
    failures = list(verify.check_recompute(tiny_params()))
    assert len(failures) == 1 and problem in failures[0]
