"""Thresholds with a stated guarantee, calibrated on labelled traffic (a user's own log).

A log is a list of queries in the order a cache saw them, each with the answer it needs (an answer
id, or the earlier query it duplicates) and optionally a domain (the router's partition). Replayed
as the router caches, per domain: each query looks up its nearest cached query; it hits when the
cosine reaches the threshold; the hit is right when both need the same answer; a miss is cached.
For each domain, and for all domains pooled, the shipped threshold is the lowest on a grid whose
one-sided Clopper-Pearson lower bound on hit precision (right hits out of hits) reaches the target
at the stated confidence. With every hit right the bound is (1 - confidence)^(1/hits): 0.95 at 95 %
needs at least 59 right hits. A domain that cannot certify takes the pooled threshold, and says so.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cachelora.errors import CacheloraError
from cachelora.records import read_jsonl_lines

CONFIDENCE = 0.95
GRID = np.round(np.arange(0.30, 1.0, 0.01), 2)
POOLED = "all"


def precision_lower_bound(right: int, hits: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower bound on a precision of ``right`` out of ``hits`` (0 with no hit)."""
    from scipy.stats import beta

    if hits <= 0 or right <= 0:
        return 0.0
    return float(beta.ppf(1 - confidence, right, hits - right + 1))


def right_hits_needed(target: float, confidence: float = CONFIDENCE) -> int:
    """The fewest hits, all right, whose lower bound reaches ``target``: (1 - confidence)^(1/n) >= target."""
    return math.ceil(math.log(1 - confidence) / math.log(target))


@dataclass(frozen=True)
class Query:
    """One labelled query of a log: its text, the answer it needs, its partition, and its line."""

    text: str
    answer: str
    domain: str
    line: int


def read_log(path: Path) -> list[Query]:
    """A labelled log (JSONL or CSV): ``query``, then ``answer_id`` or ``duplicate_of`` (the ``id`` or
    line number of an earlier query it repeats), and an optional ``domain``. Errors name file and line."""
    if not path.is_file():
        raise CacheloraError(f"{path}: file not found")
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = [(i, row) for i, row in enumerate(csv.DictReader(handle), 2)]
    else:
        rows = read_jsonl_lines(path)
    queries: list[Query] = []
    answer_of: dict[str, str] = {}
    for line, row in rows:
        where = f"{path}:{line}"
        text = row.get("query")
        if not isinstance(text, str) or not text.strip():
            raise CacheloraError(f"{where}: 'query' must be a non-empty string")
        answer, duplicate = row.get("answer_id"), row.get("duplicate_of")
        if answer not in (None, ""):
            answer = str(answer)
        elif duplicate not in (None, ""):
            if str(duplicate) not in answer_of:
                raise CacheloraError(f"{where}: duplicate_of '{duplicate}' names no earlier query (its id or line)")
            answer = answer_of[str(duplicate)]
        else:
            answer = f"line:{line}"  # a query of its own: the first to need its answer
        domain = row.get("domain") or POOLED
        if not isinstance(domain, str):
            raise CacheloraError(f"{where}: 'domain' must be a string")
        answer_of[str(line)] = answer
        if row.get("id") not in (None, ""):
            answer_of[str(row["id"])] = answer
        queries.append(Query(text.strip(), answer, domain, line))
    if not queries:
        raise CacheloraError(f"{path}: no queries")
    return queries


@dataclass
class LogReplay:
    """One partition of a log: every pairwise cosine and each query's answer, in log order."""

    sims: np.ndarray
    answers: list[str]

    @classmethod
    def of(cls, queries: list[Query], vectors: dict[str, np.ndarray]) -> LogReplay:
        matrix = np.stack([vectors[q.text] for q in queries])
        return cls(matrix @ matrix.T, [q.answer for q in queries])

    @property
    def reasks(self) -> int:
        """Queries whose answer an earlier query already needed: the ones a cache could answer."""
        seen: set[str] = set()
        count = 0
        for answer in self.answers:
            count += answer in seen
            seen.add(answer)
        return count

    def run(self, threshold: float) -> tuple[int, int]:
        """(right hits, hits) at ``threshold``: each query takes its nearest cached query; misses are cached."""
        cached: list[int] = []
        right = hits = 0
        for i, answer in enumerate(self.answers):
            if cached:
                j = cached[int(np.argmax(self.sims[i, cached]))]
                if self.sims[i, j] >= threshold:
                    hits += 1
                    right += self.answers[j] == answer
                    continue
            cached.append(i)
        return right, hits


def certify(points: dict[float, tuple[int, int]], target: float, confidence: float) -> dict[str, Any]:
    """The lowest threshold whose lower bound reaches ``target``, with its counts and bound; or the
    best bound found when none does (``certified`` False)."""
    best: dict[str, Any] | None = None
    for t in sorted(points, reverse=True):
        right, hits = points[t]
        bound = precision_lower_bound(right, hits, confidence)
        entry = {"threshold": t, "right_hits": right, "hits": hits, "precision_lower_bound": round(bound, 6)}
        if bound >= target:
            best = {**entry, "certified": True}
        elif best is None or (not best["certified"] and bound > best["precision_lower_bound"]):
            best = {**entry, "certified": False}
    assert best is not None
    return best


def fallback(threshold: float, right: int, hits: int, why: str, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """A partition that cannot certify the target alone: the pooled ``threshold``, with this
    partition's own counts and bound there, marked uncertified and ``fallback`` ``why``."""
    return {
        "threshold": threshold,
        "right_hits": right,
        "hits": hits,
        "precision_lower_bound": round(precision_lower_bound(right, hits, confidence), 6),
        "certified": False,
        "fallback": why,
    }


def calibrate_log(
    queries: list[Query],
    vectors: dict[str, np.ndarray],
    target: float,
    confidence: float = CONFIDENCE,
    source: str = "the log",
) -> dict[str, Any]:
    """Per domain and pooled: the calibrated threshold (a domain that cannot certify takes the pooled
    one, marked ``fallback``). A log whose re-asks are too few to certify ``target`` even with every
    hit right, or where no threshold certifies it, is refused."""
    domains = sorted({q.domain for q in queries})
    replays = {d: LogReplay.of([q for q in queries if q.domain == d], vectors) for d in domains}
    reasks = sum(r.reasks for r in replays.values())
    needed = right_hits_needed(target, confidence)
    if reasks < needed:
        raise CacheloraError(
            f"{source}: {reasks} labelled re-asks; certifying hit precision {target} at {confidence:.0%} confidence"
            f" needs at least {needed} (every hit right; more if any is wrong)"
        )
    runs = {d: {float(t): r.run(float(t)) for t in GRID} for d, r in replays.items()}
    pooled_points = {t: tuple(sum(runs[d][t][k] for d in domains) for k in (0, 1)) for t in runs[domains[0]]}
    pooled = certify(pooled_points, target, confidence)
    if not pooled["certified"]:
        raise CacheloraError(
            f"{source}: no threshold certifies hit precision {target} at {confidence:.0%} confidence (best lower"
            f" bound {pooled['precision_lower_bound']:.3f} at {pooled['threshold']:.2f}); label more re-asks"
        )
    per_domain = {}
    for d in [d for d in domains if d != POOLED]:  # queries without a domain count in the pooled threshold only
        found = certify(runs[d], target, confidence)
        if not found["certified"]:
            why = "pooled: this domain's re-asks cannot certify the target alone"
            found = fallback(pooled["threshold"], *runs[d][pooled["threshold"]], why, confidence)
        per_domain[d] = {**found, "lookups": len(replays[d].answers), "reasks": replays[d].reasks}
    return {
        "target_precision": target,
        "confidence": confidence,
        "pooled": {**pooled, "lookups": len(queries), "reasks": reasks},
        "per_domain": per_domain,
    }
