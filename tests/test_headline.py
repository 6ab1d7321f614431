"""metrics/headline.json: every headline figure per domain and overall, under 100 numbers, and
RESULTS.md's verdict on a change since the last commit."""

from __future__ import annotations

from cachelora.headline import HEADLINE_NATURAL, HEADLINE_TRAFFIC, count_numbers, headline
from cachelora.report import changes_since

DOMAINS = ["medical", "law", "programming", "psychology"]


def figure(model: float, baseline: float, low: float, high: float) -> dict[str, float]:
    return {
        "model": model,
        "model_ci_low": model - 0.05,
        "model_ci_high": model + 0.05,
        "baseline": baseline,
        "baseline_ci_low": baseline - 0.05,
        "baseline_ci_high": baseline + 0.05,
        "diff": round(model - baseline, 6),
        "diff_ci_low": low,
        "diff_ci_high": high,
    }


def blocks(names, model="multi"):
    groups = ["all", *DOMAINS]
    return {"model": model, "set": "test", **{g: {n: figure(0.6, 0.5, 0.02, 0.18) for n in names} for g in groups}}


def test_the_headline_holds_every_figure_for_both_models_in_under_100_numbers():
    out = headline({"headline": blocks(HEADLINE_NATURAL)}, {"headline": blocks(HEADLINE_TRAFFIC)}, DOMAINS)
    assert out["deploy_model"] == "multi"
    assert set(out["domains"]) == set(DOMAINS)
    for figures in [out["all"], *out["domains"].values()]:
        assert set(figures) == {*HEADLINE_NATURAL, *HEADLINE_TRAFFIC}
        for f in figures.values():
            assert (f["deploy"], f["baseline"], f["deploy_ci95"]) == (0.6, 0.5, "[0.550, 0.650]")
            assert f["diff_ci95"] == "+0.100 [0.020, 0.180], beyond noise"
    assert out["all"]["reask_hit_rate"]["diff"] == 0.1 and "diff" not in out["domains"]["law"]["reask_hit_rate"]
    assert count_numbers(out) == 2 * 6 * 5 + 6 <= 100


def test_a_difference_whose_interval_holds_zero_is_within_noise():
    natural = blocks(HEADLINE_NATURAL)
    natural["all"]["natural_hit_rate"] = figure(0.6, 0.58, -0.03, 0.07)
    out = headline({"headline": natural}, {"headline": blocks(HEADLINE_TRAFFIC)}, DOMAINS)
    assert out["all"]["natural_hit_rate"]["diff_ci95"].endswith("within noise")


def test_a_change_since_the_last_commit_is_beyond_noise_only_outside_this_runs_interval():
    now = headline({"headline": blocks(HEADLINE_NATURAL)}, {"headline": blocks(HEADLINE_TRAFFIC)}, DOMAINS)
    then = {"deploy_model": "baseline", "all": {name: {"deploy": 0.62} for name in now["all"]}}
    then["all"]["reask_hit_rate"]["deploy"] = 0.3  # outside [0.55, 0.65]
    then["all"]["natural_ap"]["deploy"] = 0.6  # the same
    rows = {line.split(" | ")[0].lstrip("| "): line for line in changes_since(then, now) if line.startswith("| ")}
    assert rows["traffic test re-ask hit rate (with verifier)"].endswith("| beyond noise |")
    assert rows["natural test hit rate"].endswith("| within noise |")
    assert rows["natural test AP"].endswith("| none |")
    assert "then: `baseline`; now: `multi`" in "\n".join(changes_since(then, now))
    assert "holds no" in changes_since(None, now)[2]
