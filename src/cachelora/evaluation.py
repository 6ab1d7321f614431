"""Honest metrics for triplets: similarity margins with paired-bootstrap CIs, and the cache decision.

A cache hits when cos(query, cached query) >= threshold: (anchor, positive) pairs should hit,
(anchor, negative) pairs must not. Thresholds are chosen on one set (val) and reported on
another (test); a threshold chosen on the set it is reported on is marked ``in_sample``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from cachelora import paths
from cachelora.params import MULTI, Params
from cachelora.records import TEXT_FIELDS, read_triplets, write_json

BASELINE = "baseline"
MACRO_KEYS = ("margin", "margin_gain_pct", "triplet_accuracy", "average_precision")
GRID = np.round(np.linspace(0.0, 1.0, 51), 4)


@dataclass(frozen=True)
class Scores:
    """cos(anchor, positive) and cos(anchor, negative), one pair per triplet."""

    pos: np.ndarray
    neg: np.ndarray

    @classmethod
    def of(cls, rows: list[dict[str, Any]], vectors: dict[str, np.ndarray]) -> Scores:
        anchors = np.stack([vectors[r["anchor"]] for r in rows])
        pos = np.einsum("ij,ij->i", anchors, np.stack([vectors[r["positive"]] for r in rows]))
        neg = np.einsum("ij,ij->i", anchors, np.stack([vectors[r["negative"]] for r in rows]))
        return cls(pos.astype(np.float64), neg.astype(np.float64))

    @property
    def labels_and_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """The cache view: label 1 for should-hit pairs, 0 for must-not-hit pairs."""
        labels = np.concatenate([np.ones_like(self.pos), np.zeros_like(self.neg)])
        return labels, np.concatenate([self.pos, self.neg])


def select_thresholds(scores: Scores, target_precision: float) -> dict[str, float]:
    """``max_f1``: the threshold with the best F1; ``target_precision``: the lowest reaching the target."""
    labels, values = scores.labels_and_scores
    precision, recall, thresholds = precision_recall_curve(labels, values)
    precision, recall = precision[:-1], recall[:-1]
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    reaching = np.flatnonzero(precision >= target_precision)
    return {
        "max_f1": float(thresholds[int(np.argmax(f1))]),
        "target_precision": float(thresholds[reaching[0]]) if reaching.size else float(values.max() + 1e-6),
    }


def decision(scores: Scores, threshold: float) -> dict[str, float]:
    """precision, recall, f1 and false_hit_rate of 'hit when cos >= threshold'."""
    tp = int((scores.pos >= threshold).sum())
    fp = int((scores.neg >= threshold).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / len(scores.pos)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": round(threshold, 6),
        "precision": round(precision, 6),
        "recall": round(recall, 6),
        "f1": round(f1, 6),
        "false_hit_rate": round(fp / len(scores.neg), 6),
    }


def _ci(samples: np.ndarray) -> tuple[float, float]:
    low, high = np.nanpercentile(samples, [2.5, 97.5])  # a resample can have a zero baseline margin
    return round(float(low), 6), round(float(high), 6)


def triplet_metrics(
    scores: Scores,
    baseline: Scores,
    thresholds: dict[str, float],
    resamples: int,
    seed: int,
    in_sample: bool = False,
    chosen_on: Scores | None = None,
) -> dict[str, Any]:
    """Every metric DESIGN.md names, for one model on one set of triplets.

    ``chosen_on`` is the set the thresholds were chosen on (val): its precision and recall at each
    threshold are reported beside the ones measured here.
    """
    margins, base_margins = scores.pos - scores.neg, baseline.pos - baseline.neg
    correct = (scores.pos > scores.neg).astype(np.float64)
    idx = np.random.default_rng(seed).integers(0, len(margins), size=(resamples, len(margins)))
    base_means = base_margins[idx].mean(axis=1)
    gains = (margins[idx].mean(axis=1) - base_means) / np.where(base_means != 0, base_means, np.nan) * 100
    base_margin = float(base_margins.mean())
    gain = (float(margins.mean()) - base_margin) / base_margin * 100 if base_margin else float("nan")
    labels, values = scores.labels_and_scores
    gain_low, gain_high = _ci(gains)
    acc_low, acc_high = _ci(correct[idx].mean(axis=1))
    return {
        "triplets": len(margins),
        "pos_sim": round(float(scores.pos.mean()), 6),
        "neg_sim": round(float(scores.neg.mean()), 6),
        "margin": round(float(margins.mean()), 6),
        "margin_gain_pct": round(gain, 6),
        "margin_gain_pct_ci_low": gain_low,
        "margin_gain_pct_ci_high": gain_high,
        "triplet_accuracy": round(float(correct.mean()), 6),
        "triplet_accuracy_ci_low": acc_low,
        "triplet_accuracy_ci_high": acc_high,
        "average_precision": round(float(average_precision_score(labels, values)), 6),
        "roc_auc": round(float(roc_auc_score(labels, values)), 6),
        **{f"at_{name}": _at(scores, t, in_sample, chosen_on) for name, t in thresholds.items()},
    }


def _at(scores: Scores, threshold: float, in_sample: bool, chosen_on: Scores | None) -> dict[str, float]:
    result = {**decision(scores, threshold), "in_sample": int(in_sample)}
    if chosen_on is not None:
        on_val = decision(chosen_on, threshold)
        result.update(val_precision=on_val["precision"], val_recall=on_val["recall"])
    return result


def threshold_curve(scores: Scores) -> dict[str, list[float]]:
    """precision, recall and F1 at each threshold of a fixed grid (for plots)."""
    rows = [decision(scores, float(t)) for t in GRID]
    return {key: [row[key] for row in rows] for key in ("precision", "recall", "f1")}


def pr_curve(scores: Scores, recall_grid: np.ndarray = GRID) -> list[float]:
    """Interpolated precision (best precision at recall >= r) on a fixed recall grid."""
    labels, values = scores.labels_and_scores
    precision, recall, _ = precision_recall_curve(labels, values)
    return [round(float(precision[recall >= r].max()), 6) for r in recall_grid]


def domain_entries(eval_metrics: dict[str, Any], model: str) -> dict[str, dict[str, Any]]:
    """A model's per-domain entries in eval.json (``macro`` and other non-domain keys left out)."""
    entries = eval_metrics.get(model) or {}
    return {d: m for d, m in entries.items() if isinstance(m, dict) and "at_max_f1" in m}


def macro(per_domain: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """Unweighted mean of ``keys`` over domains."""
    return {key: round(float(np.mean([m[key] for m in per_domain.values()])), 6) for key in keys}


def score_models(
    loaders: dict[str, Callable[[], Any]], sets: dict[str, list[dict[str, Any]]], batch_size: int
) -> dict[str, dict[str, Scores]]:
    """Scores of every model on every set; each model loads once and encodes each distinct text once."""
    from cachelora.base_model import encode_unique

    texts = [row[f] for rows in sets.values() for row in rows for f in TEXT_FIELDS]
    scores = {}
    for name, load in loaders.items():
        vectors = encode_unique(load(), texts, batch_size, desc=f"evaluate {name}")
        scores[name] = {key: Scores.of(rows, vectors) for key, rows in sets.items()}
    return scores


def model_loaders(base_model: str, adapters: dict[str, Path], device: str = "cpu") -> dict[str, Callable[[], Any]]:
    """Lazy loaders: ``baseline`` (the base model alone) first, then base + each adapter."""
    from cachelora.adapters import load_adapter_model
    from cachelora.base_model import load_base

    loaders: dict[str, Callable[[], Any]] = {BASELINE: partial(load_base, base_model, device)}
    for name, path in adapters.items():
        loaders[name] = partial(load_adapter_model, path, device)
    return loaders


def pipeline_evaluation(params: Params) -> dict[str, Any]:
    """Evaluate the pipeline's models and write eval.json, the plot data and the figures."""
    result, scores = pipeline_metrics(params)
    write_json(paths.METRICS_DIR / "eval.json", result)
    write_plots(scores, params.domains, result)
    return result


def pipeline_metrics(params: Params) -> tuple[dict[str, Any], dict[str, dict[str, Scores]]]:
    """Every pipeline model on every domain: thresholds chosen on val, metrics reported on test."""
    from cachelora.base_model import weights_sha256
    from cachelora.merging import MERGED

    ep = params.evaluate
    names = [*params.train_models, MERGED]
    loaders = model_loaders(params.base_model, {n: paths.model_dir(n) for n in names}, params.train.device)
    sets = {
        f"{domain}/{split}": read_triplets(paths.split_file(domain, split))
        for domain in params.domains
        for split in ("val", "test")
    }
    scores = score_models(loaders, sets, ep.batch_size)
    result: dict[str, Any] = {"base_model": {"name": params.base_model, "sha256": weights_sha256(params.base_model)}}
    for name, by_set in scores.items():
        per_domain = {
            domain: triplet_metrics(
                by_set[f"{domain}/test"],
                scores[BASELINE][f"{domain}/test"],
                select_thresholds(by_set[f"{domain}/val"], ep.target_precision),
                ep.bootstrap,
                ep.seed,
                chosen_on=by_set[f"{domain}/val"],
            )
            for domain in params.domains
        }
        result[name] = {**per_domain, "macro": macro(per_domain, MACRO_KEYS)}
    return result, scores


def write_plots(scores: dict[str, dict[str, Scores]], domains: list[str], result: dict[str, Any]) -> None:
    """DVC plot data (threshold and PR curves per domain) and the PNG figures."""
    from cachelora import figures

    pr: dict[str, dict[str, list[float]]] = {}
    for domain in domains:
        roles = {"baseline": BASELINE, "adapter": domain, "multi": MULTI, "merged": "merged"}
        test = {role: scores[name][f"{domain}/test"] for role, name in roles.items()}
        curves = {role: threshold_curve(s) for role, s in test.items()}
        write_json(
            paths.METRICS_DIR / "plots" / "threshold" / f"{domain}.json",
            [
                {"threshold": float(t), **{f"{role}_{k}": curve[k][i] for role, curve in curves.items() for k in curve}}
                for i, t in enumerate(GRID)
            ],
        )
        precision = {role: pr_curve(s) for role, s in test.items()}
        write_json(
            paths.METRICS_DIR / "plots" / "pr" / f"{domain}.json",
            [{"recall": float(r), **{role: p[i] for role, p in precision.items()}} for i, r in enumerate(GRID)],
        )
        pr[domain] = {roles[role]: p for role, p in precision.items()}
    figures.pr_curves(pr, GRID, paths.METRICS_DIR / "figures" / "pr_curves.png")
    models = [name for name in scores if name != BASELINE]
    figures.gain_heatmap(result, domains, models, paths.METRICS_DIR / "figures" / "margin_gain.png")
