import json

import pytest

from cachelora.corpus import Original, corpus_triplets, hashed_split, read_corpus
from cachelora.errors import CacheloraError
from cachelora.generation import generate_offline
from cachelora.lexicon import Lexicon
from cachelora.splitting import SplitPlan, check_unseen, route_rows, unseen_check
from cachelora.triplets import normalise
from tests.conftest import TINY_LEXICON, tiny_params

PARAMS = tiny_params()
LINE = {
    "domain": "medical",
    "topic": "high blood pressure",
    "query": "can I take ibuprofen with high blood pressure",
    "paraphrases": ["advil ok with hypertension?", "is ibuprofen safe if my bp is high", "nsaids and high bp"],
    "negatives": ["can I take ibuprofen with low blood pressure", "why does my blood pressure spike at night"],
}


def plan_for(lexicon=TINY_LEXICON):
    return SplitPlan.of({"medical": Lexicon.model_validate(lexicon)}, PARAMS.split)


def original(**changes):
    fields = {**LINE, **changes}
    return Original(
        "medical", fields["topic"], fields["query"], tuple(fields["paraphrases"]), tuple(fields["negatives"])
    )


def write(tmp_path, *rows):
    path = tmp_path / "medical.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_reads_originals(tmp_path):
    assert read_corpus(write(tmp_path, LINE, LINE), "medical") == [original(), original()]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"query": " "}, ":2: query: must be a non-empty string"),
        ({"paraphrases": "one text"}, ":2: paraphrases: must be a non-empty list of non-empty strings"),
        ({"negatives": []}, ":2: negatives: must be a non-empty list of non-empty strings"),
        ({"domain": "law"}, ":2: domain: 'law' in the medical corpus"),
    ],
)
def test_a_malformed_original_names_its_line_and_key(tmp_path, change, message):
    path = write(tmp_path, LINE, {**LINE, **change})
    with pytest.raises(CacheloraError, match=str(path) + message):
        read_corpus(path, "medical")


def test_each_original_gives_its_pairings_in_the_upstream_shape():
    rows = corpus_triplets([original()], 6, 1, plan_for(), PARAMS.split)
    assert len(rows) == 6  # 3 paraphrases x 2 negatives
    assert {(r["anchor"], r["negative"]) for r in rows} == {
        (p, n) for p in LINE["paraphrases"] for n in LINE["negatives"]
    }
    assert {r["positive"] for r in rows} == {LINE["query"]} and len({r["source_id"] for r in rows}) == 1
    fewer = corpus_triplets([original()], 4, 1, plan_for(), PARAMS.split)
    assert len(fewer) == 4 and fewer == corpus_triplets([original()], 4, 1, plan_for(), PARAMS.split)


def test_an_alias_puts_the_original_in_its_lexicon_topics_split():
    plan = plan_for()
    rows = corpus_triplets([original()], 6, 1, plan, PARAMS.split)
    assert {r["topic"] for r in rows} == {"hypertension"}
    assert {r["split"] for r in rows} == {plan.topics[("medical", "hypertension")]}


def test_an_unknown_topic_gets_the_same_split_in_every_domain():
    split = hashed_split("Tinnitus ", PARAMS.split)
    assert all(hashed_split(name, PARAMS.split) == split for name in ("tinnitus", "TINNITUS", "tinnitus?"))
    splits = {hashed_split(f"topic {i}", PARAMS.split) for i in range(200)}
    assert splits == {"train", "val", "test"}
    rows = corpus_triplets([original(topic="tinnitus")], 6, 1, plan_for(), PARAMS.split)
    assert {r["split"] for r in rows} == {split}


def test_a_pairing_phrased_as_another_splits_template_is_left_out():
    plan = plan_for()
    split = plan.topics[("medical", "hypertension")]
    other = next(t for t, s in plan.templates.items() if s != split and "symptoms" in t)
    templated = other.replace("topic", "hypertension")
    rows = corpus_triplets([original(paraphrases=[templated, *LINE["paraphrases"][1:]])], 6, 1, plan, PARAMS.split)
    assert len(rows) == 4 and templated not in {normalise(r["anchor"]) for r in rows}


def test_lexicon_and_corpus_rows_together_cross_no_split_line():
    """The split stage's unseen check, on the offline backend's rows with a corpus beside them."""
    lexicon = Lexicon.model_validate(TINY_LEXICON)
    plan = plan_for()
    originals = [
        original(),
        original(topic="asthma", query="inhaler before running?", paraphrases=["do i use my inhaler pre run"]),
        original(topic="tinnitus", query="why do my ears ring after a concert"),
    ]
    rows = generate_offline(PARAMS, "medical", {"medical": lexicon})
    rows += corpus_triplets(originals, 6, 1, plan, PARAMS.split)
    splits = route_rows(rows, PARAMS.split, "medical", plan)
    assert check_unseen("medical", unseen_check("medical", {"medical": splits}, plan)) == {
        "cross_split_topics": 0,
        "cross_split_templates": 0,
    }
