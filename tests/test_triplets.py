import json

import pytest

from cachelora.errors import CacheloraError
from cachelora.triplets import normalise, read_triplets, stable_id


def test_normalise_folds_case_punctuation_and_space():
    assert normalise("  What IS   high-blood pressure?? ") == "what is high blood pressure"


def test_stable_id_depends_only_on_parts():
    assert stable_id("a", "b") == stable_id("a", "b") != stable_id("ab", "")


def test_missing_field_names_row_and_key(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"anchor": "a", "positive": "p", "negative": "n"})
        + "\n"
        + json.dumps({"anchor": "a", "positive": "p"})
        + "\n"
    )
    with pytest.raises(CacheloraError, match=r"t.jsonl:2: missing field 'negative'"):
        read_triplets(path)
