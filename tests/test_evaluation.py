import numpy as np
import pytest

from cachelora.evaluation import Scores, decision, pr_curve, select_thresholds, threshold_curve, triplet_metrics


def scores(pos, neg):
    return Scores(np.array(pos, dtype=float), np.array(neg, dtype=float))


def test_scores_from_vectors():
    vectors = {"a": np.array([1.0, 0.0]), "p": np.array([0.6, 0.8]), "n": np.array([0.0, 1.0])}
    s = Scores.of([{"anchor": "a", "positive": "p", "negative": "n"}], vectors)
    assert s.pos.tolist() == [pytest.approx(0.6)] and s.neg.tolist() == [0.0]


def test_decision_counts():
    s = scores([0.9, 0.8, 0.4, 0.7], [0.85, 0.2, 0.3, 0.1])
    d = decision(s, 0.75)  # hits: pos 0.9, 0.8 ; neg 0.85
    assert d["precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert d["recall"] == 0.5
    assert d["false_hit_rate"] == 0.25
    assert d["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5), abs=1e-6)


def test_thresholds_separate_a_separable_set():
    s = scores([0.9, 0.8, 0.85], [0.5, 0.6, 0.4])
    t = select_thresholds(s, target_precision=0.9)
    assert 0.6 < t["max_f1"] <= 0.8 and decision(s, t["max_f1"])["f1"] == 1.0
    assert decision(s, t["target_precision"])["precision"] >= 0.9


def test_unreachable_target_precision_hits_nothing():
    s = scores([0.5, 0.5], [0.9, 0.9])
    t = select_thresholds(s, target_precision=0.99)
    assert decision(s, t["target_precision"])["recall"] == 0.0


def test_triplet_metrics_against_baseline():
    base = scores([0.6, 0.6, 0.6, 0.6], [0.5, 0.5, 0.7, 0.5])  # margins .1 .1 -.1 .1 -> mean .05
    better = scores([0.7, 0.7, 0.7, 0.7], [0.5, 0.5, 0.6, 0.5])  # margins .2 .2 .1 .2 -> mean .175
    m = triplet_metrics(better, base, {"max_f1": 0.65}, resamples=200, seed=0)
    assert m["margin"] == pytest.approx(0.175)
    assert m["margin_gain_pct"] == pytest.approx(250.0)
    assert m["triplet_accuracy"] == 1.0
    assert m["margin_gain_pct_ci_low"] <= m["margin_gain_pct"] <= m["margin_gain_pct_ci_high"]
    assert m["at_max_f1"]["in_sample"] == 0
    same = triplet_metrics(base, base, {"max_f1": 0.65}, resamples=200, seed=0, in_sample=True)
    assert same["margin_gain_pct"] == 0 and same["triplet_accuracy"] == 0.75 and same["at_max_f1"]["in_sample"] == 1


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(0)
    a, b = scores(rng.random(50), rng.random(50)), scores(rng.random(50), rng.random(50))
    assert triplet_metrics(a, b, {"x": 0.5}, 300, 7) == triplet_metrics(a, b, {"x": 0.5}, 300, 7)


def test_curves_have_grid_length():
    s = scores([0.9, 0.7], [0.3, 0.75])
    assert len(threshold_curve(s)["f1"]) == len(pr_curve(s)) == 51
    assert pr_curve(s)[0] == 1.0
