"""Paired bootstrap intervals: whole groups drawn, the same resamples for both models, and the
headline's traffic figures counted as the replay counts them."""

from __future__ import annotations

import numpy as np
import pytest

from cachelora.intervals import Ratio, group_bootstrap, paired
from cachelora.traffic import AnswerGroup
from cachelora.traffic_evaluation import outcome_ratios, traffic_headline
from cachelora.traffic_replay import TrafficReplay, figures, traffic_replays
from tests.conftest import tiny_params

GROUPS = np.repeat(np.arange(20).astype(str), 5)  # 20 groups of 5 lookups


def test_a_model_against_itself_differs_by_exactly_zero():
    hits = np.random.default_rng(0).random(100) < 0.5
    ratio = {"hit_rate": Ratio(hits.astype(float), np.ones(100))}
    out = paired(ratio, ratio, group_bootstrap(GROUPS, 200, 1))["hit_rate"]
    assert out["diff"] == out["diff_ci_low"] == out["diff_ci_high"] == 0.0
    assert out["model_ci_low"] < out["model"] == round(hits.mean(), 6) < out["model_ci_high"]


def test_the_pairing_narrows_the_difference_below_each_figures_own_interval():
    """Two models that share most of their hits: each rate varies a lot between resamples, their
    difference little. Unpaired resamples (another seed for one model) would widen it."""
    rng = np.random.default_rng(0)
    group_rate = np.repeat(rng.random(20), 5)  # hit rates vary by group: wide intervals
    base = rng.random(100) < group_rate
    better = base | (rng.random(100) < 0.1)  # a few more hits, none lost
    out = paired(
        {"hit_rate": Ratio(better.astype(float), np.ones(100))},
        {"hit_rate": Ratio(base.astype(float), np.ones(100))},
        group_bootstrap(GROUPS, 1000, 3),
    )["hit_rate"]
    width = lambda key: out[f"{key}_ci_high"] - out[f"{key}_ci_low"]  # noqa: E731
    assert out["diff_ci_low"] >= 0 and width("diff") < 0.5 * width("model")


def test_whole_groups_are_drawn():
    weights = group_bootstrap(GROUPS, 50, 0)
    by_group = weights.reshape(50, 20, 5)
    assert (by_group == by_group[:, :, :1]).all()  # a group's lookups are drawn together


def test_a_ratio_with_nothing_counted_takes_its_empty_value():
    none = Ratio(np.zeros(4), np.zeros(4))
    assert none.value() == 1.0 and Ratio(np.zeros(4), np.zeros(4), empty=0.0).value() == 0.0


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=float)
    return v / np.linalg.norm(v)


def test_headline_traffic_figures_are_what_the_replay_reports():
    """The bootstrap's ratios give the replay's own figures: right hits over re-asks, hits over
    near-misses (a near-miss hitting its original counted as a wrong hit), right hits over hits."""
    rng = np.random.default_rng(4)
    groups, vectors = [], {}
    for g in range(6):
        texts = [f"o{g}", f"r{g}a", f"r{g}b", f"n{g}"]
        groups.append(AnswerGroup(f"g{g}", "medical", texts[0], (texts[1], texts[2]), ((texts[3], "number"),)))
        centre = rng.normal(size=8)
        for t in texts:
            vectors[t] = unit(*(centre + rng.normal(scale=0.6, size=8)))
    replay = TrafficReplay.of(groups, vectors, "seed")
    outcome = replay.run(0.5)
    f = figures(outcome, 0.1)
    ratios = outcome_ratios(outcome)
    assert float(ratios["reask_hit_rate"].value()) == pytest.approx(f["reask_hit_rate"], abs=1e-6)
    assert float(ratios["near_miss_hit_rate"].value()) == pytest.approx(f["near_miss_wrong_hit_rate"], abs=1e-6)
    assert float(ratios["traffic_hit_precision"].value()) == pytest.approx(f["hit_precision"], abs=1e-6)
    assert f["near_miss_wrong_hit_rate"] > 0 and 0 < f["reask_hit_rate"] < 1  # the check is not trivial

    params = tiny_params(evaluate={"reference_models": [], "bootstrap": 100})
    replays = traffic_replays(vectors, {"test": {"medical": groups}}, params.traffic.seed, None)["test"]
    settings = {"medical": {"threshold": 0.5, "verifier_threshold": None}}
    strict = {"medical": {"threshold": 0.99, "verifier_threshold": None}}
    headline = traffic_headline(replays, settings, replays, strict, params.evaluate)
    assert headline["all"]["reask_hit_rate"]["model"] == pytest.approx(f["reask_hit_rate"], abs=1e-6)
    assert headline["medical"]["reask_hit_rate"]["baseline"] == 0.0  # nothing reaches 0.99
