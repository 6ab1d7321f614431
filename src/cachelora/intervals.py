"""95 % intervals from a paired bootstrap that draws whole groups (topics, answer groups), and the
paired difference of two models' figures on the same lookups: what tells a change from noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def group_bootstrap(groups: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Weights (resamples x rows): how often each row's group was drawn, drawing whole groups."""
    names, index = np.unique(groups, return_inverse=True)
    draws = np.random.default_rng(seed).integers(0, len(names), size=(resamples, len(names)))
    counts = np.zeros((resamples, len(names)))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1)
    return counts[:, index]


def ci(samples: np.ndarray) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles (a resample where the figure is undefined is left out)."""
    low, high = np.nanpercentile(samples, [2.5, 97.5])
    return round(float(low), 6), round(float(high), 6)


@dataclass(frozen=True)
class Ratio:
    """A figure that is a ratio of per-lookup counts (right hits / re-asks, hits / lookups), and its
    value when nothing is counted (hit precision with no hit: 1, no wrong answer served)."""

    numerator: np.ndarray
    denominator: np.ndarray
    empty: float = 1.0

    def value(self, weights: np.ndarray | None = None) -> Any:
        """The figure (``weights`` None) or its value on each resample (a row of weights each)."""
        num, den = (
            (self.numerator.sum(), self.denominator.sum())
            if weights is None
            else (
                weights @ self.numerator,
                weights @ self.denominator,
            )
        )
        return np.where(den > 0, num / np.where(den > 0, den, 1), self.empty)


def paired(model: dict[str, Ratio], baseline: dict[str, Ratio], weights: np.ndarray) -> dict[str, dict[str, Any]]:
    """Each figure of ``model`` and ``baseline`` (the same lookups, in the same order) with its 95 %
    interval, and their difference with the interval of the difference, all from the same resamples
    (``weights``: :func:`group_bootstrap`'s)."""
    return {
        name: comparison(
            float(ratio.value()), float(baseline[name].value()), ratio.value(weights), baseline[name].value(weights)
        )
        for name, ratio in model.items()
    }


def comparison(
    model: float, baseline: float, model_samples: np.ndarray, baseline_samples: np.ndarray
) -> dict[str, float]:
    """Two figures, their difference, and the 95 % interval of each from paired resamples."""
    out: dict[str, float] = {}
    for key, value, samples in (
        ("model", model, model_samples),
        ("baseline", baseline, baseline_samples),
        ("diff", model - baseline, model_samples - baseline_samples),
    ):
        out[key] = round(value, 6)
        out[f"{key}_ci_low"], out[f"{key}_ci_high"] = ci(samples)
    return out
