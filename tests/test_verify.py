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
