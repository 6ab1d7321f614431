import numpy as np
import pytest

from cachelora.errors import CacheloraError
from cachelora.evaluation import (
    ALL,
    Scored,
    Scores,
    calibrated_thresholds,
    decision,
    group_bootstrap,
    max_f1_threshold,
    models_metrics,
    operating_points,
    pipeline_sets,
    pr_curve,
    reference_loaders,
    triplet_metrics,
)
from cachelora.records import write_jsonl
from cachelora.replay import Replay
from tests.conftest import tiny_params, tiny_rows


def scores(pos, neg, groups=None):
    return Scores(np.array(pos, dtype=float), np.array(neg, dtype=float), None if groups is None else np.array(groups))


def test_scores_from_vectors_and_groups():
    vectors = {"a": np.array([1.0, 0.0]), "p": np.array([0.6, 0.8]), "n": np.array([0.0, 1.0])}
    rows = [
        {"anchor": "a", "positive": "p", "negative": "n", "topic": "Asthma"},
        {"anchor": "a", "positive": "p", "negative": "n"},
    ]
    s = Scores.of(rows, vectors)
    assert s.pos.tolist() == [pytest.approx(0.6)] * 2 and s.neg.tolist() == [0.0, 0.0]
    assert s.groups.tolist() == ["topic:asthma", "row:1"]


def test_decision_counts():
    s = scores([0.9, 0.8, 0.4, 0.7], [0.85, 0.2, 0.3, 0.1])
    d = decision(s, 0.75)  # hits: pos 0.9, 0.8 ; neg 0.85
    assert d["precision"] == pytest.approx(2 / 3, abs=1e-6)
    assert d["recall"] == 0.5
    assert d["false_hit_rate"] == 0.25


def test_max_f1_threshold_separates_a_separable_set():
    s = scores([0.9, 0.8, 0.85], [0.5, 0.6, 0.4])
    t = max_f1_threshold(s)
    assert 0.6 < t <= 0.8 and decision(s, t)["f1"] == 1.0


def test_triplet_metrics_against_baseline():
    base = scores([0.6, 0.6, 0.6, 0.6], [0.5, 0.5, 0.7, 0.5])  # margins .1 .1 -.1 .1 -> mean .05
    better = scores([0.7, 0.7, 0.7, 0.7], [0.5, 0.5, 0.6, 0.5])  # margins .2 .2 .1 .2 -> mean .175
    m = triplet_metrics(better, base, resamples=200, seed=0)
    assert m["margin"] == pytest.approx(0.175) and m["margin_delta"] == pytest.approx(0.125)
    assert m["margin_gain_pct"] == pytest.approx(250.0)
    assert m["triplet_accuracy"] == 1.0
    assert m["margin_gain_pct_ci_low"] <= m["margin_gain_pct"] <= m["margin_gain_pct_ci_high"]


def test_one_row_is_too_few():
    with pytest.raises(CacheloraError, match="too few"):
        triplet_metrics(scores([0.9], [0.1]), scores([0.9], [0.1]), 100, 0)


def test_paired_bootstrap_gives_a_constant_shift_a_zero_width_interval():
    """Every triplet gains the same: a paired interval of the gain has no width; an unpaired one would."""
    rng = np.random.default_rng(0)
    pos, neg = rng.uniform(0.3, 0.9, 60), rng.uniform(0.1, 0.7, 60)
    groups = [f"t{i % 12}" for i in range(60)]
    base, shifted = scores(pos, neg, groups), scores(pos + 0.05, neg, groups)
    m = triplet_metrics(shifted, base, resamples=1000, seed=1)
    assert m["margin_delta"] == pytest.approx(0.05)
    assert m["margin_delta_ci_high"] - m["margin_delta_ci_low"] < 1e-9


def test_bootstrap_draws_whole_groups():
    """Rows of one topic move together: resampling topics gives a much wider interval than rows would."""
    rng = np.random.default_rng(0)
    topic_effect = np.repeat(rng.normal(0, 0.2, 10), 30)  # 10 topics x 30 rows
    pos, neg = 0.6 + topic_effect + rng.normal(0, 0.01, 300), np.full(300, 0.4)
    base = scores(np.full(300, 0.5), neg)
    grouped = triplet_metrics(scores(pos, neg, np.repeat([f"t{i}" for i in range(10)], 30)), base, 1000, 1)
    rows = triplet_metrics(scores(pos, neg, [f"r{i}" for i in range(300)]), base, 1000, 1)
    width = lambda m: m["margin_delta_ci_high"] - m["margin_delta_ci_low"]  # noqa: E731
    assert width(grouped) > 3 * width(rows)
    weights = group_bootstrap(np.repeat(["a", "b"], [2, 3]), 50, 0)
    assert all(len(set(w[:2])) == 1 and len(set(w[2:])) == 1 for w in weights)


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(0)
    a, b = scores(rng.random(50), rng.random(50)), scores(rng.random(50), rng.random(50))
    assert triplet_metrics(a, b, 300, 7) == triplet_metrics(a, b, 300, 7)
    assert triplet_metrics(a, b, 300, 7) != triplet_metrics(a, b, 300, 8)


def scored(val_top1, test_top1, correct):
    pair = scores([0.8, 0.7, 0.6, 0.5], [0.4, 0.5, 0.3, 0.6])
    return {
        "val": {ALL: Scored(pair, Replay(np.array(val_top1), np.array(correct)))},
        "test": {ALL: Scored(pair, Replay(np.array(test_top1), np.array(correct)))},
    }


def test_thresholds_come_from_val_never_from_test():
    """Val and test differ: the reported test figures are at val's operating point, not test's own."""
    correct = [True, True, False, True]
    models = {"baseline": scored([0.9, 0.8, 0.7, 0.6], [0.6, 0.5, 0.4, 0.3], correct)}
    result = models_metrics(models, target_precision=0.95, resamples=100, seed=0)
    val_point = Replay(np.array([0.9, 0.8, 0.7, 0.6]), np.array(correct)).operating_point(0.95)
    test_point = Replay(np.array([0.6, 0.5, 0.4, 0.3]), np.array(correct)).operating_point(0.95)
    assert val_point != test_point
    test = result["baseline"]["test"][ALL]
    assert test["replay"]["threshold"] == val_point and test["replay"]["in_sample"] == 0
    assert test["replay"]["hit_rate"] == 0.0  # no test lookup reaches val's threshold
    assert result["baseline"]["val"][ALL]["threshold"] == val_point
    assert result["deploy"]["model"] == "baseline" and result["deploy"]["threshold"] == val_point
    assert result["deploy"]["test"]["hit_rate"] == test["replay"]["hit_rate"]


@pytest.mark.parametrize(("target", "expected"), [(0.95, 0.6), (0.9, 0.35), (0.85, 0.05)])
def test_operating_points_are_chosen_at_the_target_precision_given(target, expected):
    """Twenty lookups, nearest first (1.0, 0.95, ...), wrong at the 10th, 15th and 20th: precision
    holds 0.95 down to the 9th (0.6), 0.9 down to the 14th (13/14; 0.35), 0.85 down to the 20th."""
    top1 = np.round(1.0 - 0.05 * np.arange(20), 4)
    correct = np.array([i not in (9, 14, 19) for i in range(20)])
    pair = scores([0.8, 0.7], [0.4, 0.5])
    chosen = operating_points({ALL: Scored(pair, Replay(top1, correct))}, target)
    assert chosen[ALL]["replay"] == pytest.approx(expected)


def test_deploy_picks_the_best_val_hit_rate_at_its_own_operating_point():
    correct = [True, True, True, False]
    models = {
        "baseline": scored([0.9, 0.8, 0.75, 0.7], [0.9, 0.8, 0.7, 0.6], correct),
        "merged": scored([0.9, 0.85, 0.8, 0.2], [0.9, 0.8, 0.7, 0.6], correct),
    }
    result = models_metrics(models, target_precision=0.95, resamples=100, seed=0)
    assert result["baseline"]["val"][ALL]["hit_rate"] == 0.75 and result["merged"]["val"][ALL]["hit_rate"] == 0.75
    assert result["deploy"]["model"] == "baseline"  # a tie keeps the earlier (simpler) model
    models["merged"] = scored([0.9, 0.85, 0.8, 0.8], [0.9, 0.8, 0.7, 0.6], [True, True, True, True])
    assert models_metrics(models, 0.95, 100, 0)["deploy"]["model"] == "merged"


def test_pr_curve_has_grid_length():
    s = scores([0.9, 0.7], [0.3, 0.75])
    assert len(pr_curve(s)) == 101 and pr_curve(s)[0] == 1.0


def with_natural(by_set, dev_top1, test_top1, correct):
    pair = scores([0.8, 0.7, 0.6, 0.5], [0.4, 0.5, 0.3, 0.6])
    by_set["natural_dev"] = {ALL: Scored(pair, Replay(np.array(dev_top1), np.array(correct)))}
    by_set["natural_test"] = {ALL: Scored(pair, Replay(np.array(test_top1), np.array(correct)))}
    return by_set


def test_natural_test_is_also_replayed_at_the_natural_dev_operating_point():
    correct = [True, True, False, True]
    by_set = with_natural(scored([0.9, 0.8, 0.7, 0.6], [0.9] * 4, correct), [0.5, 0.4, 0.3, 0.2], [0.45] * 4, correct)
    result = models_metrics({"baseline": by_set}, 0.95, 100, 0)["baseline"]
    dev_point = Replay(np.array([0.5, 0.4, 0.3, 0.2]), np.array(correct)).operating_point(0.95)
    natural = result["natural_test"][ALL]
    assert natural["replay"]["threshold"] == result["val"][ALL]["threshold"]  # the val-chosen one, as before
    assert natural["replay_natural_op"]["threshold"] == dev_point and natural["replay_natural_op"]["in_sample"] == 0
    assert natural["replay_natural_op"]["hit_rate"] == 1.0 and natural["replay"]["hit_rate"] == 0.0
    assert result["natural_dev"][ALL]["replay_natural_op"]["in_sample"] == 1
    assert "replay_natural_op" not in result["test"][ALL]


def test_deploy_on_natural_dev_picks_the_best_natural_dev_hit_rate_and_never_reads_a_test_set():
    correct = [True, True, True, False]
    models = {  # baseline wins on val (0.75 against 0.25), multi on natural dev (0.75 against 0)
        "baseline": with_natural(
            scored([0.9, 0.8, 0.75, 0.7], [0.1] * 4, correct), [0.9, 0.2, 0.2, 0.95], [0.9] * 4, correct
        ),
        "multi": with_natural(
            scored([0.9, 0.8, 0.2, 0.85], [0.1] * 4, correct), [0.9, 0.8, 0.75, 0.7], [0.1] * 4, correct
        ),
    }
    on_val = models_metrics(models, 0.95, 100, 0)
    on_natural = models_metrics(models, 0.95, 100, 0, deploy_on="natural_dev")
    assert [on_val[m]["val"][ALL]["hit_rate"] for m in models] == [0.75, 0.25]
    assert [on_val[m]["natural_dev"][ALL]["replay_natural_op"]["hit_rate"] for m in models] == [0.0, 0.75]
    assert on_val["deploy"]["model"] == "baseline" and on_val["deploy"]["chosen_on"] == "val"
    assert on_natural["deploy"]["model"] == "multi" and on_natural["deploy"]["chosen_on"] == "natural_dev"
    # Shipped: natural dev's calibrated threshold (4 lookups certify nothing: above every lookup, nothing hits)
    assert on_natural["deploy"]["threshold"] == on_natural["multi"]["calibrated"][ALL]["threshold"] > 0.9
    assert not on_natural["deploy"]["guarantee"][ALL]["certified"]
    assert on_natural["deploy"]["natural_dev"]["hit_rate"] == 0.0
    # Test sets that favour the other model change nothing.
    for name, top1 in (("baseline", [0.99] * 4), ("multi", [0.0] * 4)):
        for set_name in ("test", "natural_test"):
            pair = models[name][set_name][ALL].scores
            models[name][set_name] = {ALL: Scored(pair, Replay(np.array(top1), np.array([True] * 4)))}
    assert models_metrics(models, 0.95, 100, 0, deploy_on="natural_dev")["deploy"]["model"] == "multi"


def traffic_dev(rate: float, test_rate: float) -> dict:
    """A model's traffic replay with the verifier: its dev re-ask hit rate, and a test one (never read)."""
    return {"settings": {}, "dev": {ALL: {"reask_hit_rate": rate}}, "test": {ALL: {"reask_hit_rate": test_rate}}}


def test_deploy_on_traffic_dev_picks_the_most_traffic_dev_reasks_and_never_reads_a_test_set():
    correct = [True, True, True, False]
    models = {  # baseline wins on val and natural dev; multi answers more traffic-dev re-asks
        "baseline": with_natural(scored([0.9, 0.8, 0.75, 0.7], [0.1] * 4, correct), [0.9] * 4, [0.9] * 4, correct),
        "multi": with_natural(scored([0.9, 0.8, 0.2, 0.85], [0.1] * 4, correct), [0.1] * 4, [0.1] * 4, correct),
    }
    traffic = {"baseline": traffic_dev(0.30, 0.90), "multi": traffic_dev(0.45, 0.10)}
    result = models_metrics(models, 0.95, 100, 0, deploy_on="traffic_dev", traffic_dev=traffic)
    assert result["deploy"]["model"] == "multi" and result["deploy"]["chosen_on"] == "traffic_dev"
    assert result["deploy"]["ranking"] == {"baseline": 0.30, "multi": 0.45}
    assert result["multi"]["traffic_dev"] == traffic["multi"]  # the figures that chose it, kept per model
    assert models_metrics(models, 0.95, 100, 0, deploy_on="natural_dev")["deploy"]["model"] == "baseline"
    traffic["baseline"] = traffic_dev(0.45, 0.0)  # a tie goes to val's hit rate (baseline's 0.75)
    assert models_metrics(models, 0.95, 100, 0, deploy_on="traffic_dev", traffic_dev=traffic)["deploy"]["model"] == (
        "baseline"
    )


def test_a_reference_model_is_scored_but_never_deployed():
    models = {
        "baseline": scored([0.9, 0.8, 0.75, 0.7], [0.9, 0.8, 0.7, 0.6], [True, True, True, False]),
        "big": scored([0.9, 0.9, 0.9, 0.9], [0.9, 0.8, 0.7, 0.6], [True] * 4),
    }
    result = models_metrics(models, 0.95, 100, 0, references=("big",))
    assert result["big"]["val"][ALL]["hit_rate"] == 1.0 > result["baseline"]["val"][ALL]["hit_rate"]
    assert result["deploy"]["model"] == "baseline"
    assert models_metrics(models, 0.95, 100, 0)["deploy"]["model"] == "big"


def test_reference_names_must_not_clash_with_pipeline_models():
    with pytest.raises(CacheloraError, match=r"evaluate.reference_models: 'merged' is a pipeline model's name"):
        reference_loaders(tiny_params(evaluate={"reference_models": ["merged"]}))
    with pytest.raises(CacheloraError, match=r"'models/big.v2' is a pipeline model's name or has a '\.'"):
        reference_loaders(tiny_params(evaluate={"reference_models": ["models/big.v2"]}))
    assert list(reference_loaders(tiny_params(evaluate={"reference_models": ["all-mpnet-base-v2"]}))) == [
        "all-mpnet-base-v2"
    ]


def test_a_large_split_is_scored_on_a_seeded_sample_of_max_triplets_per_domain(tmp_path, monkeypatch):
    """val/test over evaluate.max_triplets_per_domain are sampled (seeded, file order); natural sets never."""
    monkeypatch.chdir(tmp_path)
    rows = tiny_rows(60)
    for split in ("val", "test"):
        write_jsonl(f"data/splits/medical/{split}.jsonl", rows)
    for split in ("dev", "test"):
        write_jsonl(f"data/natural/{split}.jsonl", [{**r, "domain": "medical"} for r in rows[:30]])

    def sets(limit, seed=42):
        evaluate = {"reference_models": [], "max_triplets_per_domain": limit, "seed": seed}
        return pipeline_sets(tiny_params(evaluate=evaluate))

    sampled = sets(25)
    val, test = sampled["val"]["medical"], sampled["test"]["medical"]
    assert len(val) == len(test) == 25 and val != test  # each split its own draw
    assert [rows.index(r) for r in val] == sorted(rows.index(r) for r in val)
    assert sets(25) == sampled and sets(25, seed=7)["val"]["medical"] != val
    assert len(sampled["natural_test"]["medical"]) == 30
    assert sets(0)["val"]["medical"] == rows == sets(60)["test"]["medical"]


@pytest.mark.parametrize("source", ["train", "corpus", "val", "natural_dev"])
def test_natural_test_sharing_a_text_with_what_trains_or_chooses_is_refused(tmp_path, monkeypatch, source):
    """Each place a natural test text could have been seen is looked at: a copy in any one is counted."""
    from cachelora import paths
    from cachelora.evaluation import contamination

    monkeypatch.chdir(tmp_path)
    rows = tiny_rows(12, seed=4)
    natural_test = [dict(r, domain="medical") for r in rows[:4]]
    copied = dict(rows[8], anchor=natural_test[0]["positive"].upper())  # normalised equal
    write_jsonl(paths.split_file("medical", "train"), [copied if source == "train" else rows[8]])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    query = copied["anchor"] if source == "corpus" else "a corpus question nobody asks"
    original = {"domain": "medical", "topic": "t", "query": query, "paraphrases": ["p 1", "p 2", "p 3"]}
    write_jsonl(corpus / "medical.jsonl", [dict(original, negatives=["n 1", "n 2"])])
    params = tiny_params(generate={"corpus": str(corpus)})
    sets = {
        "val": {ALL: [copied if source == "val" else rows[9]]},
        "natural_dev": {ALL: [copied if source == "natural_dev" else rows[10]]},
        "natural_test": {ALL: natural_test},
    }
    with pytest.raises(CacheloraError, match=rf"natural_test_in_{source}': 1"):
        contamination(params, sets)
    sets = {"val": {ALL: [rows[9]]}, "natural_dev": {ALL: [rows[10]]}, "natural_test": {ALL: natural_test}}
    write_jsonl(paths.split_file("medical", "train"), [rows[8]])
    if source != "corpus":
        assert set(contamination(params, sets).values()) == {0}


def test_a_domain_that_cannot_certify_takes_the_pooled_threshold_and_says_so():
    def scored(n: int) -> Scored:
        return Scored(Scores(np.zeros(n), np.zeros(n)), Replay(np.linspace(0.95, 0.6, n), np.ones(n, dtype=bool)))

    # "all" pools the domains' own caches (as the router partitions them), not the cross-domain cache,
    # where every hit here is wrong
    cross_domain = Scored(
        Scores(np.zeros(100), np.zeros(100)), Replay(np.linspace(0.95, 0.6, 100), np.zeros(100, bool))
    )
    found = calibrated_thresholds({"medical": scored(80), "law": scored(20), "all": cross_domain}, 0.95)
    assert found["medical"]["certified"] and found["all"]["certified"] and not found["law"]["certified"]
    assert found["all"]["hits"] == 100
    assert found["law"]["threshold"] == found["all"]["threshold"] and found["law"]["fallback"] == "all"
    assert found["law"]["hits"] == 20  # law's own counts at the pooled threshold
    assert found["law"]["best"]["hits"] == 20 and found["law"]["best"]["precision_lower_bound"] < 0.95  # alone


def test_hindsight_is_natural_tests_own_operating_point_and_chooses_nothing():
    """The yardstick: natural test's in-sample operating point, beside the shipped (natural-dev) threshold;
    a natural test set that favours a lower threshold moves the yardstick, never what ships."""
    correct = [True, True, True, False]
    by_set = with_natural(scored([0.9, 0.8, 0.75, 0.7], [0.1] * 4, correct), [0.9] * 4, [0.9, 0.8, 0.7, 0.6], correct)
    result = models_metrics({"baseline": by_set}, 0.95, 100, 0)
    deploy = result["deploy"]
    yardstick = Replay(np.array([0.9, 0.8, 0.7, 0.6]), np.array(correct)).operating_point(0.95)
    assert deploy["hindsight"][ALL]["threshold"] == yardstick == 0.7
    assert deploy["hindsight"][ALL]["hit_rate"] == 0.75 and deploy["hindsight"][ALL]["in_sample"] == 1
    assert deploy["natural_test"]["hit_rate"] == 0.0 and deploy["hindsight"][ALL]["shipped_share"] == 0.0
    by_set["natural_test"][ALL] = Scored(
        by_set["natural_test"][ALL].scores, Replay(np.array([0.3] * 4), np.array([True] * 4))
    )
    moved = models_metrics({"baseline": by_set}, 0.95, 100, 0)["deploy"]
    assert moved["hindsight"][ALL]["threshold"] == 0.3 and moved["threshold"] == deploy["threshold"]
