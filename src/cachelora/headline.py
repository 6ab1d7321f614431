"""metrics/headline.json: the figures `dvc metrics show`, `dvc metrics diff` and `dvc exp show` list,
sized for a person (under 100 numbers).

Per domain and for all domains together, the deploy model and the baseline, each at the settings it
ships: natural test hit rate, hit precision and AP (``eval.json``'s headline block), and traffic test
re-ask hit rate, near-miss wrong-hit rate and hit precision with the verifier (``traffic.json``'s).
Each figure carries its 95 % interval, and the deploy-minus-baseline difference its paired-bootstrap
interval, as text; the difference itself is a number for all domains together. The full detail stays
in eval.json and traffic.json.
"""

from __future__ import annotations

from typing import Any

from cachelora.evaluation import ALL

HEADLINE_NATURAL = ("natural_hit_rate", "natural_hit_precision", "natural_ap")  # eval.json: headline
HEADLINE_TRAFFIC = ("reask_hit_rate", "near_miss_hit_rate", "traffic_hit_precision")  # traffic.json: headline


def interval(figure: dict[str, float], key: str) -> str:
    return f"[{figure[f'{key}_ci_low']:.3f}, {figure[f'{key}_ci_high']:.3f}]"


def noise(low: float, high: float) -> str:
    """Whether a difference's 95 % interval excludes 0."""
    return "within noise" if low <= 0 <= high else "beyond noise"


def headline(eval_metrics: dict[str, Any], traffic_metrics: dict[str, Any], domains: list[str]) -> dict[str, Any]:
    """The headline figures (see the module docstring): ``all.<figure>.<deploy|baseline|...>`` for all
    domains together, ``domains.<domain>.<figure>...`` per domain (so one regex drops them all)."""
    blocks = {name: eval_metrics["headline"] for name in HEADLINE_NATURAL} | {
        name: traffic_metrics["headline"] for name in HEADLINE_TRAFFIC
    }
    out: dict[str, Any] = {"deploy_model": eval_metrics["headline"]["model"], ALL: {}, "domains": {}}
    for group in [ALL, *domains]:
        figures = out[ALL] if group == ALL else out["domains"].setdefault(group, {})
        for name, block in blocks.items():
            f = block[group][name]
            entry: dict[str, Any] = {
                "deploy": f["model"],
                "baseline": f["baseline"],
                "deploy_ci95": interval(f, "model"),
                "baseline_ci95": interval(f, "baseline"),
                "diff_ci95": f"{f['diff']:+.3f} {interval(f, 'diff')}, {noise(f['diff_ci_low'], f['diff_ci_high'])}",
            }
            if group == ALL:
                entry["diff"] = f["diff"]
            figures[name] = entry
    return out


def count_numbers(data: Any) -> int:
    """How many numbers (not strings or booleans) a metrics file holds: what `dvc metrics show` lists."""
    if isinstance(data, dict):
        return sum(count_numbers(v) for v in data.values())
    if isinstance(data, list):
        return sum(count_numbers(v) for v in data)
    return int(isinstance(data, int | float) and not isinstance(data, bool))
