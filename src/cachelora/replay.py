"""Cache replay: what a semantic cache does with a set of triplets (docs/metrics.md, "Cache replay").

The cache holds every positive and negative of the set, each text once. Each anchor is a lookup
that takes its nearest cached entry by cosine; it hits when that similarity reaches the
threshold, and the hit is correct when the entry means what the anchor means: a text of the same
original query (same ``source_id``), or, for rows without ids, the anchor's own positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cachelora.calibration import CONFIDENCE, certify

GRID = np.round(np.linspace(0.0, 1.0, 101), 4)
BEST_KEYS = ("threshold", "right_hits", "hits", "precision_lower_bound")


@dataclass(frozen=True)
class Replay:
    """Per lookup: the similarity of its nearest cached entry and whether that entry is right."""

    top1: np.ndarray
    correct: np.ndarray

    @classmethod
    def of(cls, rows: list[dict[str, Any]], vectors: dict[str, np.ndarray]) -> Replay:
        meaning: dict[str, set[str]] = {}
        for i, row in enumerate(rows):
            own = f"row:{i}"
            meaning.setdefault(row["positive"], set()).update({own, _source(row, "source_id")})
            meaning.setdefault(row["negative"], set()).add(_source(row, "negative_source_id"))
        cached = sorted(meaning)
        matrix = np.stack([vectors[text] for text in cached])
        anchors = np.stack([vectors[row["anchor"]] for row in rows])
        sims = anchors @ matrix.T
        nearest = sims.argmax(axis=1)
        correct = [
            bool({f"row:{i}", _source(row, "source_id")} & meaning[cached[j]])
            for i, (row, j) in enumerate(zip(rows, nearest, strict=True))
        ]
        return cls(sims[np.arange(len(rows)), nearest].astype(np.float64), np.array(correct))

    def at(self, threshold: float) -> dict[str, float]:
        """hit_rate, hit_precision (1 when nothing hits: no wrong answer served) and false_hit_rate."""
        hits = self.top1 >= threshold
        right = int((hits & self.correct).sum())
        count = int(hits.sum())
        lookups = len(self.top1)
        return {
            "threshold": round(float(threshold), 6),
            "lookups": lookups,
            "hit_rate": round(count / lookups, 6),
            "hit_precision": round(right / count, 6) if count else 1.0,
            "false_hit_rate": round((count - right) / lookups, 6),
        }

    def operating_point(self, target_precision: float) -> float:
        """The lowest threshold whose hit precision reaches ``target_precision``.

        Lowering the threshold past a lookup's similarity adds that lookup as a hit; the answer is
        the lowest such similarity at which precision still holds (above every lookup when none does).
        """
        order = np.argsort(-self.top1, kind="stable")
        sims, right = self.top1[order], np.cumsum(self.correct[order])
        precision = right / np.arange(1, len(sims) + 1)
        last_of_tie = np.r_[sims[1:] != sims[:-1], True]  # a threshold admits every tied lookup at once
        ok = np.flatnonzero((precision >= target_precision) & last_of_tie)
        if ok.size:
            return float(sims[ok[-1]])
        return float(np.nextafter(sims[0], np.inf)) if sims.size else 1.0

    def counts(self, threshold: float) -> tuple[int, int]:
        """(right hits, hits) at ``threshold``."""
        hits = self.top1 >= threshold
        return int((hits & self.correct).sum()), int(hits.sum())

    def certified_threshold(self, target_precision: float, confidence: float = CONFIDENCE) -> dict[str, Any]:
        """The lowest threshold whose one-sided Clopper-Pearson lower bound on hit precision reaches
        ``target_precision`` (at ``confidence``), with its right hits, hits and bound; when none does,
        a threshold above every lookup (nothing hits), ``certified`` False and the ``best`` bound any
        threshold reached (how far the data is from the target)."""
        order = np.argsort(-self.top1, kind="stable")
        sims, right = self.top1[order], np.cumsum(self.correct[order])
        last_of_tie = np.r_[sims[1:] != sims[:-1], True]  # a threshold admits every tied lookup at once
        points = {float(sims[i]): (int(right[i]), int(i) + 1) for i in np.flatnonzero(last_of_tie)}
        found = certify(points, target_precision, confidence) if points else {"certified": False}
        if not found["certified"]:
            above = float(np.nextafter(sims[0], np.inf)) if sims.size else 1.0
            best = {k: found[k] for k in BEST_KEYS} if points else None
            nothing = {"threshold": above, "right_hits": 0, "hits": 0, "precision_lower_bound": 0.0}
            return {**nothing, "certified": False, "best": best}
        return found

    def curve(self, grid: np.ndarray = GRID) -> list[dict[str, float]]:
        """hit_rate and hit_precision at each threshold of a fixed grid (the plots)."""
        return [self.at(float(t)) for t in grid]


def _source(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    return f"id:{value}" if value else f"none:{id(row)}:{key}"
