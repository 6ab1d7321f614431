import numpy as np
import pytest

from cachelora.calibration import precision_lower_bound
from cachelora.replay import Replay


def unit(*xs):
    v = np.array(xs, dtype=float)
    return v / np.linalg.norm(v)


VECTORS = {
    "a1": unit(1, 0, 0),
    "p1": unit(0.9, 0.1, 0),  # a1's positive: close
    "n1": unit(0.7, 0.7, 0),
    "a2": unit(0, 1, 0),
    "p2": unit(0, 0.2, 1),  # a2's positive: far
    "n2": unit(0.1, 1, 0),  # a2's negative: close -> a wrong hit
}
ROWS = [
    {"anchor": "a1", "positive": "p1", "negative": "n1", "source_id": "s1", "negative_source_id": "x1"},
    {"anchor": "a2", "positive": "p2", "negative": "n2", "source_id": "s2", "negative_source_id": "x2"},
]


def test_lookup_takes_the_nearest_cached_text_and_is_judged_by_meaning():
    replay = Replay.of(ROWS, VECTORS)
    assert replay.correct.tolist() == [True, False]
    at = replay.at(0.5)
    assert at["hit_rate"] == 1.0 and at["hit_precision"] == 0.5 and at["false_hit_rate"] == 0.5
    top1 = float(VECTORS["a1"] @ VECTORS["p1"])
    assert replay.at(top1 + 1e-6)["hit_rate"] == 0.5  # only a2's (wrong) neighbour is closer


def test_a_text_of_the_same_original_query_is_a_correct_hit():
    rows = [dict(ROWS[0]), dict(ROWS[1], negative_source_id="s2")]  # n2 asks a2's question after all
    assert Replay.of(rows, VECTORS).correct.tolist() == [True, True]


def test_without_ids_only_the_own_positive_is_correct():
    rows = [{k: r[k] for k in ("anchor", "positive", "negative")} for r in ROWS]
    assert Replay.of(rows, VECTORS).correct.tolist() == [True, False]


def test_operating_point_is_the_lowest_threshold_reaching_the_target():
    replay = Replay(np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]), np.array([True, True, False, True, True, False]))
    # precision as the threshold falls: 1, 1, 2/3, 3/4, 4/5, 4/6
    assert replay.operating_point(0.75) == 0.5
    assert replay.operating_point(0.7) == 0.5
    assert replay.operating_point(0.81) == 0.8
    assert replay.at(replay.operating_point(0.95))["hit_precision"] >= 0.95


def test_ties_enter_together():
    replay = Replay(np.array([0.9, 0.7, 0.7]), np.array([True, True, False]))
    assert replay.operating_point(0.9) == pytest.approx(0.9)  # 0.7 would admit the wrong hit too


def test_unreachable_target_hits_nothing():
    replay = Replay(np.array([0.9, 0.8]), np.array([False, False]))
    assert replay.at(replay.operating_point(0.95))["hit_rate"] == 0.0


def test_the_certified_threshold_needs_the_bound_not_the_point_precision():
    """70 right hits above 0.8, then 30 more lookups with 1 wrong: the point precision at 0.5 is 0.99,
    but only where the Clopper-Pearson bound reaches 0.95 is certified (59 right hits at least)."""
    top1 = np.r_[np.linspace(0.95, 0.81, 70), np.linspace(0.79, 0.5, 30)]
    correct = np.ones(100, dtype=bool)
    correct[75] = False
    replay = Replay(top1, correct)
    found = replay.certified_threshold(0.95)
    assert found["certified"] and found["precision_lower_bound"] >= 0.95
    assert found["hits"] >= 59 and found["threshold"] == pytest.approx(top1[found["hits"] - 1])
    assert replay.operating_point(0.95) < found["threshold"] or found["threshold"] == top1.min()
    few = Replay(top1[:40], correct[:40])  # 40 right hits cannot certify 0.95
    assert not few.certified_threshold(0.95)["certified"] and few.certified_threshold(0.95)["threshold"] > top1.max()
    assert replay.counts(0.8) == (70, 70)


def test_a_certified_threshold_is_plain_json():
    import json

    found = Replay(np.linspace(0.99, 0.5, 80), np.ones(80, dtype=bool)).certified_threshold(0.95)
    assert json.loads(json.dumps(found)) == found


def test_an_uncertified_threshold_says_how_close_the_best_one_came():
    """Wrong hits at the top (near-misses worded like the query): nothing certifies, and ``best`` is the
    highest bound any threshold reached, with its counts, while the shipped threshold hits nothing."""
    top1 = np.linspace(0.99, 0.5, 200)
    correct = np.ones(200, dtype=bool)
    correct[[0, 2, 5, 9, 14, 20]] = False
    found = Replay(top1, correct).certified_threshold(0.95)
    assert not found["certified"] and found["hits"] == 0 and found["threshold"] > top1.max()
    bounds = [precision_lower_bound(int(correct[: k + 1].sum()), k + 1) for k in range(200)]
    best = int(np.argmax(bounds))
    assert found["best"] == {
        "threshold": float(top1[best]),
        "right_hits": int(correct[: best + 1].sum()),
        "hits": best + 1,
        "precision_lower_bound": round(bounds[best], 6),
    }
    assert 0.9 < found["best"]["precision_lower_bound"] < 0.95
