"""Near-miss edits: the words stay, the answer changes; seeded; in the row's own split; in the loss."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cachelora.lexicon import Lexicon
from cachelora.near_miss import NEAR_MISS, candidate_edits, near_miss_of, with_near_misses
from cachelora.quality import check_triplets
from cachelora.traffic import shared_words
from cachelora.triplets import normalise
from tests.conftest import TINY_LEXICON, tiny_params, tiny_rows

RULES = {
    "swaps": {"negation": [["can", "can't"], ["with", "without"]], "role": [["increase", "decrease"]]},
    "qualifiers": {"population": ["in children", "during pregnancy"]},
}
LEXICON = Lexicon.model_validate({**TINY_LEXICON, "near_misses": RULES})


def test_each_kind_of_edit_changes_the_text_and_keeps_its_words() -> None:
    edits = candidate_edits("Can I exercise with asthma if I am 40?", LEXICON)
    kinds = {kind for kind, _ in edits}
    assert kinds == {"negation", "number", "population", "sibling"}
    assert ("negation", "Can't I exercise with asthma if I am 40?") in edits
    assert ("negation", "Can I exercise without asthma if I am 40?") in edits
    assert ("number", "Can I exercise with asthma if I am 80?") in edits
    assert ("population", "Can I exercise with asthma if I am 40 in children?") in edits
    assert ("sibling", "Can I exercise with pneumonia if I am 40?") in edits  # same group: lungs
    original = "Can I exercise with asthma if I am 40?"
    assert all(normalise(e) != normalise(original) and shared_words(original, e) >= 0.6 for _, e in edits)


def test_a_swap_matches_whole_words_only() -> None:
    assert not [e for k, e in candidate_edits("why can't I sleep with migraine", LEXICON) if "can't't" in e]
    assert ("negation", "why can I sleep with migraine") in candidate_edits("why can't I sleep with migraine", LEXICON)
    assert not any(k == "role" for k, _ in candidate_edits("increased thirst with migraine", LEXICON))


def test_the_draw_is_seeded() -> None:
    text = "Can I exercise with asthma?"
    assert near_miss_of(text, LEXICON, random.Random(3)) == near_miss_of(text, LEXICON, random.Random(3))
    drawn = {near_miss_of(text, LEXICON, random.Random(s)) for s in range(40)}
    assert len({kind for kind, _ in drawn}) >= 3


def test_a_share_of_rows_gets_a_near_miss_negative_of_its_anchor() -> None:
    rows = tiny_rows(60)
    edited = with_near_misses(rows, LEXICON, 0.5, seed=7)
    assert edited == with_near_misses(rows, LEXICON, 0.5, seed=7)
    near = [r for r in edited if r.get("negative_kind", "").startswith(NEAR_MISS)]
    assert 15 <= len(near) <= 45
    for row in near:
        assert row["near_miss_of"] == "anchor" and normalise(row["negative"]) != normalise(row["anchor"])
        if not row["negative_kind"].endswith("sibling"):  # a multi-word topic name swapped out drops more words
            assert shared_words(row["anchor"], row["negative"]) >= 0.6
    assert len({r["id"] for r in edited}) == len(edited)
    untouched = [r for r in edited if r not in near]
    assert all(r in rows for r in untouched)


def test_sibling_edits_stay_in_the_rows_split() -> None:
    """A sibling edit names only a topic of the row's own split: no text crosses the held-out line."""
    from cachelora.splitting import SplitPlan

    plan = SplitPlan.of({"medical": LEXICON}, tiny_params().split)
    rows = [
        {"id": str(i), "domain": "medical", "anchor": f"{t['name']} question {i}", "positive": "p", "negative": "n",
         "split": plan.topics[("medical", t["name"])]}
        for i, t in enumerate(TINY_LEXICON["topics"])
    ]  # fmt: skip
    for row in with_near_misses(rows * 20, LEXICON, 1.0, seed=1, plan=plan):
        if row.get("negative_kind") == f"{NEAR_MISS}:sibling":
            named = [t["name"] for t in TINY_LEXICON["topics"] if t["name"] in row["negative"]]
            assert all(plan.topics[("medical", n)] == row["split"] for n in named), row


def test_validation_quarantines_an_edit_that_changed_nothing_and_skips_the_paraphrase_check() -> None:
    rows = with_near_misses(tiny_rows(30), LEXICON, 1.0, seed=2)
    rows[0] = {**rows[0], "negative": rows[0]["anchor"] + " "}  # an "edit" equal after normalising
    rows[0]["negative"] = rows[0]["negative"].strip().upper()
    neg_sim = np.full(len(rows), 0.99)  # near-misses sit close to their anchor by design
    report = check_triplets(rows, tiny_params(validate={"min_rows": 5, "max_bad_fraction": 0.5}).validate_,
                            "medical", neg_sim, "x.jsonl")  # fmt: skip
    assert [q["reasons"] for q in report.quarantined] == [["texts_not_distinct", "near_miss_unchanged"]]


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_generation_applies_the_fraction(seed_dir, fraction: float) -> None:
    from cachelora.generation import generate_offline
    from cachelora.lexicon import load_lexicons

    lexicons = {"medical": Lexicon.model_validate({**load_lexicons(["medical"], seed_dir)["medical"].model_dump(),
                                                   "near_misses": RULES})}  # fmt: skip
    params = tiny_params(
        generate={"seed": 1, "triplets_per_domain": 60, "corpus": None, "near_miss_fraction": fraction}
    )
    rows = generate_offline(params, "medical", lexicons)
    near = [r for r in rows if "near_miss_of" in r]
    assert (len(near) == 0) if fraction == 0 else (len(near) >= 55)


def test_near_miss_negatives_reach_the_loss(tmp_path, monkeypatch) -> None:
    """Generated near-miss rows go through the train split into MultipleNegativesRankingLoss's
    hard-negative column, and that column gets a gradient."""
    import cachelora.training as training
    from cachelora.records import write_jsonl
    from tests.conftest import tiny_model_params

    rows = with_near_misses(tiny_rows(24), LEXICON, 1.0, seed=5)
    near = {r["negative"] for r in rows if "near_miss_of" in r}
    assert len(near) >= 20
    path = tmp_path / "train.jsonl"
    write_jsonl(path, rows)
    seen: set[str] = set()
    graded: list[float] = []
    embed = training.embed_columns

    def recorded(model, tokens, batch):
        seen.update(row["negative"] for row in batch)
        columns = embed(model, tokens, batch)
        columns[2].retain_grad()
        graded.append(columns[2])
        return columns

    monkeypatch.setattr(training, "embed_columns", recorded)
    training.train_model("medical", tiny_model_params(), [path])
    assert near <= seen
    assert all(c.grad is not None and float(c.grad.abs().sum()) > 0 for c in graded)
