import pytest

from cachelora.errors import CacheloraError
from cachelora.generation import OfflineGenerator
from cachelora.lexicon import load_lexicon
from cachelora.records import normalise
from cachelora.splitting import split_rows, texts_of
from tests.conftest import tiny_params

SPLIT = tiny_params().split


@pytest.fixture
def rows(seed_dir):
    return OfflineGenerator(load_lexicon("medical", seed_dir), 1, 0.3).generate(60)


def test_groups_never_cross_splits(rows):
    splits, _ = split_rows(rows, SPLIT, "medical")
    topics = {name: {r["topic"] for r in part} for name, part in splits.items()}
    assert not topics["train"] & topics["test"] and not topics["train"] & topics["val"]
    assert not topics["val"] & topics["test"]


def test_no_test_text_in_train_and_nothing_duplicated(rows):
    splits, metrics = split_rows(rows, SPLIT, "medical")
    assert metrics["leakage"] == 0
    assert not texts_of(splits["test"]) & texts_of(splits["train"])
    kept = sum(metrics["rows"].values()) + sum(metrics["dropped_overlap"].values())
    assert kept == len(rows)


def test_sibling_negatives_crossing_splits_are_dropped_from_train(rows):
    splits, metrics = split_rows(rows, SPLIT, "medical")
    test_texts = texts_of(splits["test"])
    crossing = [
        r
        for r in rows
        if r["topic"] not in {t["topic"] for t in splits["test"]} and normalise(r["negative"]) in test_texts
    ]
    assert metrics["dropped_overlap"]["train"] + metrics["dropped_overlap"]["val"] >= len(crossing) > 0


def test_seeded(rows):
    assert split_rows(rows, SPLIT, "medical") == split_rows(rows, SPLIT, "medical")
    other = tiny_params(split={"seed": 2, "train": 0.6, "val": 0.2, "test": 0.2}).split
    assert split_rows(rows, SPLIT, "medical")[0] != split_rows(rows, other, "medical")[0]


def test_user_rows_group_by_source_id_when_no_topic():
    rows = [
        {
            "anchor": f"question {i} variant a",
            "positive": f"question {i} original",
            "negative": f"other question {i}",
            "source_id": f"s{i % 10}",
        }
        for i in range(40)
    ]
    splits, metrics = split_rows(rows, SPLIT, "user")
    assert metrics["leakage"] == 0
    ids = {name: {r["source_id"] for r in part} for name, part in splits.items()}
    assert not ids["train"] & ids["test"]


def test_too_few_groups_fail_clearly():
    rows = [{"anchor": "a question", "positive": "the question", "negative": "another one", "source_id": "only"}]
    with pytest.raises(CacheloraError, match=r"split.(val|test) is empty"):
        split_rows(rows, SPLIT, "tiny")
