import json

import pytest

from cachelora.errors import CacheloraError
from cachelora.records import atomic_dir, normalise, read_jsonl, read_triplets, stable_id, write_jsonl


def test_normalise_folds_case_punctuation_and_space():
    assert normalise("  What IS   high-blood pressure?? ") == "what is high blood pressure"


def test_stable_id_depends_only_on_parts():
    assert stable_id("a", "b") == stable_id("a", "b") != stable_id("ab", "")


def test_write_then_read_round_trip(tmp_path):
    rows = [{"anchor": "a1", "positive": "p1", "negative": "n1"}, {"anchor": "ä", "positive": "p", "negative": "n"}]
    assert write_jsonl(tmp_path / "x.jsonl", rows) == 2
    assert read_jsonl(tmp_path / "x.jsonl") == rows


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"anchor": "a"}\n\n{"anchor": \n')
    with pytest.raises(CacheloraError, match=r"bad.jsonl:3: malformed JSON"):
        read_jsonl(path)


def test_missing_field_names_row_and_key(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"anchor": "a", "positive": "p", "negative": "n"})
        + "\n"
        + json.dumps({"anchor": "a", "positive": "p"})
        + "\n"
    )
    with pytest.raises(CacheloraError, match=r"t.jsonl: row 2: missing field 'negative'"):
        read_triplets(path)


def test_failed_write_leaves_no_file(tmp_path):
    def rows():
        yield {"a": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(tmp_path / "out.jsonl", rows())
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "splits"
    with atomic_dir(target) as tmp:
        (tmp / "train.jsonl").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "train.jsonl").write_text("new")
        raise RuntimeError("interrupted")
    assert (target / "train.jsonl").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["splits"]
