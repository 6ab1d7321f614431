"""The verifier: what it trains on, that it trains at all, and that a plain CrossEncoder reloads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cachelora import verifier as V
from cachelora.lexicon import Lexicon
from cachelora.near_miss import with_near_misses
from cachelora.traffic import AnswerGroup
from tests.conftest import TINY_LEXICON, tiny_params, tiny_rows

RULES = {"swaps": {"negation": [["can", "can't"]]}, "qualifiers": {"population": ["in children", "in adults"]}}
ROWS = with_near_misses(tiny_rows(40), Lexicon.model_validate({**TINY_LEXICON, "near_misses": RULES}), 0.5, seed=3)
GROUPS = [
    AnswerGroup(
        "medical-train-001",
        "medical",
        "Can I take ibuprofen 400 mg after my wisdom tooth extraction?",
        ("ibuprofen after wisdom teeth out ok", "My dentist pulled two wisdom teeth today, is Advil fine for pain?"),
        (
            ("Can I take ibuprofen 400 mg before my wisdom tooth extraction?", "sibling"),
            ("Can I take ibuprofen 400 mg after my wisdom tooth extraction while pregnant?", "population"),
        ),
    ),
    AnswerGroup(
        "medical-train-002",
        "medical",
        "How long should I wait to swim after getting a tattoo on my arm?",
        ("swimming after new tattoo how many days", "got inked on my forearm saturday, when can i hit the pool"),
        (
            ("How long should I wait to swim after getting a tattoo removed from my arm?", "sibling"),
            ("How long should I wait to sunbathe after getting a tattoo on my arm?", "sibling"),
        ),
    ),
]


def test_pairs_are_reasks_against_negatives_and_near_misses_against_both_phrasings() -> None:
    near = [r for r in ROWS if "near_miss_of" in r]
    pairs = V.training_pairs(ROWS, max_pairs=0, seed=1)
    assert len(pairs) == 2 * len(ROWS) + len(near) and sum(label for *_, label in pairs) == len(ROWS)
    labels = {}
    for r in ROWS:
        labels[frozenset((r["anchor"], r["positive"]))] = 1
        labels[frozenset((r["anchor"], r["negative"]))] = 0
    for r in near:  # the near-miss of the anchor against the other phrasing: what a re-ask meets in a cache
        labels[frozenset((r["positive"], r["negative"]))] = 0
    assert {(frozenset((q, c)), label) for q, c, label in pairs} == set(labels.items())
    as_written = {(r["anchor"], r["positive"]) for r in ROWS} | {(r["anchor"], r["negative"]) for r in ROWS}
    as_written |= {(r["positive"], r["negative"]) for r in near}
    swapped = sum((q, c) not in as_written for q, c, _ in pairs)
    assert 0.25 * len(pairs) < swapped < 0.75 * len(pairs)  # both orders are seen
    few = V.training_pairs(ROWS, max_pairs=30, seed=1)
    assert 27 < len(few) <= 30 and set(few) <= set(pairs) | {(c, q, label) for q, c, label in pairs}


def test_traffic_groups_give_reasks_as_positives_and_near_misses_and_other_groups_as_negatives() -> None:
    pairs = V.group_pairs(GROUPS)
    labels = {frozenset((a, b)): label for a, b, label in pairs}
    assert len(labels) == len(pairs)  # no pair twice
    for g in GROUPS:
        asks = [g.original, *g.reasks]
        assert all(labels[frozenset((a, b))] == 1 for a in asks for b in asks if a != b)
        assert all(labels[frozenset((m, a))] == 0 for m, _ in g.near_misses for a in asks)
    crossing = [(a, b) for a, b, label in pairs if {a, b} - set(GROUPS[0].texts) and {a, b} - set(GROUPS[1].texts)]
    met = {a for pair in crossing for a in pair}
    assert all(t in met for g in GROUPS for t in g.texts[1:])  # every re-ask and near-miss meets another group
    assert all(labels[frozenset(p)] == 0 for p in crossing)
    assert sum(label for *_, label in pairs) == 2 * 3  # the three asks of each group, pairwise


def test_natural_pairs_are_all_kept_and_generated_ones_capped() -> None:
    natural = V.group_pairs(GROUPS)
    pairs = V.training_pairs(ROWS, max_pairs=30, seed=1, natural=natural)
    assert 27 + len(natural) < len(pairs) <= 30 + len(natural)
    seen = {frozenset((q, c)) for q, c, _ in pairs}
    assert all(frozenset((a, b)) in seen for a, b, _ in natural)


def test_the_verifier_learns_and_reloads_as_a_plain_cross_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short training run lowers the loss; the saved folder loads with sentence_transformers.CrossEncoder
    and scores exactly as the trained model."""
    from sentence_transformers.cross_encoder import CrossEncoder

    from cachelora.records import write_jsonl

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data" / "splits" / "medical" / "train.jsonl", ROWS)
    traffic = [
        {"group_id": g.group_id, "domain": g.domain, "original": g.original, "reasks": list(g.reasks),
         "near_misses": [{"text": t, "kind": k} for t, k in g.near_misses]}
        for g in GROUPS
    ]  # fmt: skip
    write_jsonl(tmp_path / "data" / "natural" / "traffic" / "train" / "medical.jsonl", traffic)
    params = tiny_params(
        verifier={"layers": 1, "max_pairs": 0, "batch_size": 16, "lr": 2e-4, "epochs": 3, "near_miss_fraction": 0},
        traffic={"min_groups": 2},
    )
    model, info, run, history = V.train_verifier(params)
    first, last = history[0]["loss"], np.mean([h["loss"] for h in history[-3:]])
    assert last < first and info["near_miss_rows"] > 0
    assert info["natural_pairs"] == len(V.group_pairs(GROUPS)) and info["pairs"] > 2 * len(ROWS) + info["natural_pairs"]
    assert "data/natural/traffic/train/medical.jsonl" in info["data"]
    probe = [(r["anchor"], r["positive"]) for r in ROWS[:4]]
    V.save_verifier(model, tmp_path / "verifier", info, probe)
    import json

    saved = json.loads((tmp_path / "verifier" / "training_info.json").read_text())
    assert saved == info and "wall_time_s" not in saved and run["wall_time_s"] > 0  # timings stay out of the folder
    plain = CrossEncoder(str(tmp_path / "verifier"), device="cpu")
    np.testing.assert_allclose(plain.predict(probe), V.scorer(model)(probe), atol=1e-5)


def test_pair_quality_reads_auc_overall_and_on_near_misses() -> None:
    class Oracle:
        """Scores 1 for a row's positive, 0 for its negative: a perfect verifier."""

        def predict(self, pairs, batch_size, show_progress_bar):
            positives = {(r["anchor"], r["positive"]) for r in ROWS}
            return np.array([1.0 if p in positives else 0.0 for p in pairs])

    from cachelora.verifier_model import scorer

    quality = V.pair_quality(scorer(Oracle()), ROWS)
    near = sum("near_miss_of" in r for r in ROWS)
    assert quality == {"rows": len(ROWS), "near_miss_rows": near, "roc_auc": 1.0, "near_miss_roc_auc": 1.0}


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_the_verifier_learns_the_near_miss_edits_generate_would_have_made(seed_dir, monkeypatch, fraction) -> None:
    """With no lexicon near-misses in the splits (``generate.near_miss_fraction: 0``), the verifier's
    rows get exactly the edits generate draws at ``verifier.near_miss_fraction``, and its pairs hold
    them as negatives; a row that already holds a near-miss keeps it."""
    import cachelora.lexicon as lexicon_module
    from cachelora.generation import generate_offline

    lexicons = {"medical": Lexicon.model_validate({**TINY_LEXICON, "near_misses": RULES})}
    monkeypatch.setattr(lexicon_module, "load_lexicons", lambda domains, seed_dir: lexicons)
    generate = {"seed": 1, "triplets_per_domain": 60, "corpus": None}
    plain = generate_offline(tiny_params(generate={**generate, "near_miss_fraction": 0.0}), "medical", lexicons)
    edited = generate_offline(tiny_params(generate={**generate, "near_miss_fraction": fraction}), "medical", lexicons)
    params = tiny_params(generate={**generate, "near_miss_fraction": 0.0}, verifier={"near_miss_fraction": fraction})
    assert not any("near_miss_of" in r for r in plain)
    rows = V.with_verifier_near_misses(plain, params)
    assert rows == edited and sum("near_miss_of" in r for r in rows) >= 20
    negatives = {(a, b) for a, b, label in V.training_pairs(rows, 0, 1) if label == 0}
    assert all({(r["anchor"], r["negative"]), (r["negative"], r["anchor"])} & negatives
               for r in rows if "near_miss_of" in r)  # fmt: skip
    assert V.with_verifier_near_misses(edited, params) == edited  # already edited: kept
    off = tiny_params(verifier={"near_miss_fraction": 0.0})
    assert V.with_verifier_near_misses(plain, off) == plain


def test_a_scorer_reads_each_distinct_pair_once() -> None:
    from cachelora.verifier_model import scorer

    class Counting:
        def __init__(self) -> None:
            self.asked: list[list[tuple[str, str]]] = []

        def predict(self, pairs, batch_size, show_progress_bar):
            self.asked.append(list(pairs))
            return [len(a) + len(b) / 10 for a, b in pairs]

    model = Counting()
    score = scorer(model)
    assert score([("a", "bb"), ("a", "bb"), ("c", "d")]).tolist() == [1.2, 1.2, 1.1]
    assert score([("c", "d"), ("e", "f")]).tolist() == [1.1, 1.1]
    assert score([]).shape == (0,)
    assert model.asked == [[("a", "bb"), ("c", "d")], [("e", "f")]]


def test_nearest_other_group_is_the_most_word_sharing_text_ties_to_the_larger() -> None:
    """The sparse product picks what a plain ``max`` over every other group's text picks, ties included."""
    import random

    from cachelora.traffic import words

    rng = random.Random(3)
    vocabulary = ["dose", "child", "ibuprofen", "tenant", "lease", "python", "repo", "sleep", "panic", "can"]
    groups = []
    for g in range(12):
        texts = sorted({" ".join(rng.sample(vocabulary, rng.randint(1, 4))) + f" q{g}" for _ in range(4)})
        misses = tuple((t, "dose") for t in texts[2:])
        groups.append(AnswerGroup(f"g{g}", "medical", texts[0], tuple(texts[1:2]), misses))
    owner = {t: g.group_id for g in groups for t in g.texts}

    def jaccard(a: str, b: str) -> float:
        return len(words(a) & words(b)) / len(words(a) | words(b))

    def brute(text: str) -> str:
        return max((t for t in owner if owner[t] != owner[text]), key=lambda t: (jaccard(text, t), t))

    nearest = V.nearest_other_group(groups)
    assert nearest == {t: brute(t) for t in owner}
    scores = {t: [jaccard(t, o) for o in owner if owner[o] != owner[t]] for t in owner}
    tied = [t for t in owner if scores[t].count(jaccard(t, nearest[t])) > 1]
    assert tied, "the data must hold ties for the tie-break to be tested"
