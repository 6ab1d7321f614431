import json
from collections import Counter

import pytest

from cachelora.errors import CacheloraError
from cachelora.generation import OfflineGenerator, generate_domain
from cachelora.lexicon import load_lexicon
from cachelora.records import read_jsonl
from cachelora.triplets import normalise
from tests.conftest import tiny_params


def rows_for(seed_dir, seed=1, count=60, sibling=0.25):
    return OfflineGenerator(load_lexicon("medical", seed_dir), seed, sibling).generate(count)


def test_anchor_and_positive_phrase_one_concept_differently(seed_dir):
    for row in rows_for(seed_dir):
        assert normalise(row["anchor"]) != normalise(row["positive"])
        assert row["topic"] and row["aspect"]


def test_negative_changes_aspect_or_topic_never_both(seed_dir):
    kinds = Counter()
    for row in rows_for(seed_dir, sibling=0.3):
        same_topic = row["negative_topic"] == row["topic"]
        same_aspect = row["negative_aspect"] == row["aspect"]
        assert same_topic != same_aspect
        kinds["sibling" if same_aspect else "aspect"] += 1
    assert kinds["sibling"] > 0 and kinds["aspect"] > kinds["sibling"]


def test_sibling_fraction_zero_keeps_topic(seed_dir):
    assert all(r["negative_topic"] == r["topic"] for r in rows_for(seed_dir, sibling=0.0))


def test_aliases_are_used_across_anchor_and_positive(seed_dir):
    rows = [r for r in rows_for(seed_dir, count=100) if r["topic"] == "hypertension"]
    assert any("high blood pressure" in r["anchor"] + r["positive"] for r in rows)
    assert all(not ("high blood pressure" in r["anchor"] and "high blood pressure" in r["positive"]) for r in rows)


def test_same_seed_same_rows_other_seed_other_rows(seed_dir):
    assert rows_for(seed_dir, seed=3) == rows_for(seed_dir, seed=3)
    assert rows_for(seed_dir, seed=3) != rows_for(seed_dir, seed=4)


def test_rows_are_distinct_and_cover_every_concept(seed_dir):
    rows = rows_for(seed_dir, count=60)
    assert len({r["id"] for r in rows}) == 60
    assert len({(r["topic"], r["aspect"]) for r in rows}) == 6 * 3


def test_generate_domain_writes_jsonl(seed_dir, tmp_path):
    out = tmp_path / "data" / "triplets" / "medical.jsonl"
    assert generate_domain(tiny_params(), "medical", out, seed_dir) == 60
    rows = read_jsonl(out)
    assert rows[0]["generator"]["backend"] == "offline"
    assert {"id", "domain", "anchor", "positive", "negative", "source_id"} <= set(rows[0])


def test_the_offline_backend_adds_the_domains_corpus(seed_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    original = {
        "topic": "asthma",
        "query": "can I use my inhaler before running",
        "paraphrases": ["inhaler pre run ok?", "should i puff my inhaler before a jog", "albuterol before exercise"],
        "negatives": ["can I use my inhaler after running", "is asthma worse in cold weather"],
    }
    (corpus / "medical.jsonl").write_text(json.dumps(original) + "\n", encoding="utf-8")
    params = tiny_params(generate={"seed": 1, "triplets_per_domain": 60, "corpus": str(corpus)})
    out = tmp_path / "triplets.jsonl"
    assert generate_domain(params, "medical", out, seed_dir) == 60 + 6
    from_corpus = [r for r in read_jsonl(out) if r["generator"]["backend"] == "corpus"]
    assert {r["positive"] for r in from_corpus} == {original["query"]} and len(from_corpus) == 6
    (corpus / "medical.jsonl").unlink()
    with pytest.raises(CacheloraError, match=r"corpus/medical.jsonl: file not found"):
        generate_domain(params, "medical", out, seed_dir)
