"""Traffic replay: what the router's cache does with a stream of re-asks and near-misses.

Per domain (the router partitions its cache by decision) every original is asked first and cached
with its answer id; then re-asks (the original's answer id) and near-misses (each its own answer id)
arrive in a seeded order. A lookup takes its nearest cached entry by cosine; it hits when that
similarity reaches the embedding threshold and, with a verifier, the verifier's score of (query,
cached query) reaches the verifier threshold. A hit is right when the entry's answer id is the
query's. **A miss is cached** with its own answer id, as a cache stores the fresh LLM answer.

**Rival check** (with the verifier, ``traffic.rival_window``): when the next-nearest cached entry
also reaches the embedding threshold and lies within the window (in cosine) behind the nearest, the
embedding cannot tell which of two cached questions the query repeats, and the lookup misses without
asking the verifier. This is where a re-ask lands between its original and the original's cached
near-miss, and where the verifier is least reliable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cachelora.calibration import POOLED
from cachelora.traffic import NEAR_MISS, ORIGINAL, REASK, AnswerGroup, Lookup, stream

Verifier = Callable[[list[tuple[str, str]]], np.ndarray]  # (query, cached query) pairs -> scores
EMBEDDING_GRID = np.round(np.arange(0.30, 1.0001, 0.02), 4)
# shipped_thresholds: the embedding thresholds the router ships (eval.json: natural-dev calibrated), alone
EMBEDDING, WITH_VERIFIER, SHIPPED = "embedding", "with_verifier", "shipped_thresholds"
VERIFIER_GRID = np.round(np.r_[np.arange(0.1, 0.9, 0.04), 0.9, 0.95, 0.98], 4)


@dataclass
class Outcome:
    """Per non-original lookup: its kind, whether its nearest entry reached the embedding threshold
    (a candidate), whether it then missed for a rival (the verifier reads the other candidates),
    whether it hit, whether the hit was right, and its answer group (the unit a bootstrap draws)."""

    kind: np.ndarray
    candidate: np.ndarray
    rival: np.ndarray
    hit: np.ndarray
    right: np.ndarray
    group: np.ndarray


@dataclass
class TrafficReplay:
    """One domain's stream with every pairwise cosine, and the verifier's scores as they are needed."""

    lookups: list[Lookup]
    sims: np.ndarray
    verifier: Verifier | None = None
    rival_window: float | None = None  # with the verifier (None: no rival check)
    scores: dict[tuple[int, int], float] = field(default_factory=dict)
    nearest_first: list[list[int]] = field(default_factory=list)  # per lookup: earlier texts, nearest first

    def __post_init__(self) -> None:
        self.nearest_first = [
            [int(j) for j in np.argsort(-self.sims[i, :i], kind="stable")] for i in range(len(self.lookups))
        ]

    @classmethod
    def of(
        cls,
        groups: list[AnswerGroup],
        vectors: dict[str, np.ndarray],
        seed: str,
        verifier: Verifier | None = None,
        rival_window: float | None = None,
    ) -> TrafficReplay:
        lookups = stream(groups, seed)
        matrix = np.stack([vectors[lk.text] for lk in lookups])
        replay = cls(lookups, matrix @ matrix.T, verifier, rival_window)
        if verifier is not None:
            replay._score_candidates()
        return replay

    def _score_candidates(self) -> None:
        """Verifier scores, in one batch, of every pair a replay on the grids can ask about: a lookup's
        nearest cached entry is one of its earlier texts up to the nearest original (originals are
        always cached), and only one at or above the lowest grid threshold is ever a candidate."""
        first = sum(lk.kind == ORIGINAL for lk in self.lookups)
        pairs = []
        for i in range(first, len(self.lookups)):
            for j in self.nearest_first[i]:
                if self.sims[i, j] < EMBEDDING_GRID[0]:
                    break
                pairs.append((i, j))
                if j < first:
                    break
        self._score(pairs)

    def _score_of(self, i: int, j: int) -> float:
        if (i, j) not in self.scores:
            self._score([(i, j)])
        return self.scores[(i, j)]

    def _score(self, pairs: list[tuple[int, int]]) -> None:
        missing = [p for p in dict.fromkeys(pairs) if p not in self.scores]
        if missing and self.verifier is not None:
            values = self.verifier([(self.lookups[i].text, self.lookups[j].text) for i, j in missing])
            self.scores.update({p: float(v) for p, v in zip(missing, values, strict=True)})

    def run(self, threshold: float, verifier_threshold: float | None = None) -> Outcome:
        """Replay the stream at these thresholds (``verifier_threshold`` None: the embedding alone)."""
        use_verifier = verifier_threshold is not None and self.verifier is not None
        first = sum(lk.kind == ORIGINAL for lk in self.lookups)
        cached = [i < first for i in range(len(self.lookups))]
        kinds, candidates, rivals, hits, rights = [], [], [], [], []
        for i in range(first, len(self.lookups)):
            in_cache = (j for j in self.nearest_first[i] if cached[j])  # the cache now, nearest first
            j = next(in_cache)
            hit = bool(self.sims[i, j] >= threshold)
            candidates.append(hit)
            rival = False
            if hit and use_verifier:
                if self.rival_window is not None:
                    k = next(in_cache, None)
                    rival = k is not None and self.sims[i, k] >= max(threshold, self.sims[i, j] - self.rival_window)
                hit = not rival and self._score_of(i, j) >= verifier_threshold
            rivals.append(rival)
            kinds.append(self.lookups[i].kind)
            hits.append(hit)
            rights.append(hit and self.lookups[j].answer_id == self.lookups[i].answer_id)
            if not hit:
                cached[i] = True
        return Outcome(
            np.array(kinds),
            np.array(candidates, dtype=bool),
            np.array(rivals, dtype=bool),
            np.array(hits, dtype=bool),
            np.array(rights, dtype=bool),
            np.array([lk.group_id for lk in self.lookups[first:]]),
        )


def figures(outcome: Outcome, near_miss_share: float | None) -> dict[str, Any]:
    """Re-ask hit rate (right hits / re-asks), near-miss wrong-hit rate (hits / near-misses), hit
    precision (right hits / hits; 1 when nothing hits), and the hit precision a cache would have if
    ``near_miss_share`` of its repeat traffic were near-misses: (1-π)·r / ((1-π)·(r + r_wrong) + π·w)
    (left out when ``near_miss_share`` is None)."""
    reask, near = outcome.kind == REASK, outcome.kind == NEAR_MISS
    hits, right = int(outcome.hit.sum()), int(outcome.right.sum())
    r = float(outcome.right[reask].mean()) if reask.any() else 0.0
    r_wrong = float((outcome.hit & ~outcome.right)[reask].mean()) if reask.any() else 0.0
    w = float(outcome.hit[near].mean()) if near.any() else 0.0
    out = {
        "reasks": int(reask.sum()),
        "near_misses": int(near.sum()),
        "reask_hit_rate": round(r, 6),
        "reask_wrong_hit_rate": round(r_wrong, 6),
        "near_miss_wrong_hit_rate": round(w, 6),
        "hit_precision": round(right / hits, 6) if hits else 1.0,
        "hits": hits,
        "right_hits": right,
        "candidates": int(outcome.candidate.sum()),
        "candidate_share": round(float(outcome.candidate.mean()), 6) if len(outcome.kind) else 0.0,
        "rival_misses": int(outcome.rival.sum()),
        "verified_share": round(float((outcome.candidate & ~outcome.rival).mean()), 6) if len(outcome.kind) else 0.0,
    }
    if near_miss_share is not None:
        pi = near_miss_share
        served = (1 - pi) * (r + r_wrong) + pi * w
        out["precision_at_near_miss_share"] = round((1 - pi) * r / served, 6) if served else 1.0
    return out


def calibrate(
    replays: list[TrafficReplay], target_precision: float, with_verifier: bool
) -> tuple[float, float | None, dict[str, Any]]:
    """The setting that answers the most re-asks while hit precision (over every replay's lookups:
    one domain, or several partitions pooled) stays >= ``target_precision``; ties go to the higher
    thresholds. Without a feasible setting: a threshold above every similarity (nothing hits)."""
    best: tuple[tuple[float, float, float], float, float | None] | None = None
    for v in VERIFIER_GRID if with_verifier else [None]:
        for t in EMBEDDING_GRID:
            runs = [r.run(float(t), None if v is None else float(v)) for r in replays]
            hits = sum(int(o.hit.sum()) for o in runs)
            right = sum(int(o.right.sum()) for o in runs)
            if not hits or right / hits < target_precision:
                continue
            reasks = sum(int((o.kind == REASK).sum()) for o in runs)
            key = (right / reasks, float(t), -1.0 if v is None else float(v))
            if best is None or key > best[0]:
                best = (key, float(t), None if v is None else float(v))
    if best is None:
        return float(np.nextafter(1.0, 2.0)), (1.0 if with_verifier else None), {"feasible": False}
    return best[1], best[2], {"feasible": True}


def pooled(outcomes: list[Outcome]) -> Outcome:
    """Every domain's lookups together (each domain replayed in its own partition)."""
    fields = ("kind", "candidate", "rival", "hit", "right", "group")
    return Outcome(*(np.concatenate([getattr(o, f) for o in outcomes]) for f in fields))


def traffic_vectors(
    model: Any, sets: dict[str, dict[str, list[AnswerGroup]]], batch_size: int, name: str
) -> dict[str, np.ndarray]:
    """Every text's vector from ``model``, each set encoded alone: a set's batches, and so its vectors,
    do not depend on the other sets replayed beside it (evaluate replays traffic dev alone)."""
    from cachelora.base_model import encode_unique

    vectors: dict[str, np.ndarray] = {}
    for s, by_domain in sets.items():
        texts = [t for groups in by_domain.values() for g in groups for t in g.texts]
        vectors |= encode_unique(model, texts, batch_size, desc=f"traffic {s} {name}")
    return vectors


def traffic_replays(
    vectors: dict[str, np.ndarray],
    sets: dict[str, dict[str, list[AnswerGroup]]],
    seed: int,
    verifier: Verifier | None,
    rival_window: float | None = None,
) -> dict[str, dict[str, TrafficReplay]]:
    """One model's replay of each set's domains (each a partition of its own), the stream seeded
    (``traffic.seed``) per set and domain; with the verifier, the rival check at ``rival_window``
    (None: without)."""
    return {
        s: {
            d: TrafficReplay.of(groups, vectors, f"{seed}:{s}:{d}", verifier, rival_window)
            for d, groups in by_domain.items()
        }
        for s, by_domain in sets.items()
    }


def replay_model(
    replays: dict[str, dict[str, TrafficReplay]],
    target_precision: float,
    near_miss_share: float | None,
    verifier: Verifier | None,
    shipped: dict[str, float] | None,
    pooled_setting: bool = False,
) -> dict[str, Any]:
    """One model's figures on both sets: at dev-chosen settings without and with the verifier, and at
    the embedding thresholds it ships to the router (when given: natural-dev calibrated, else val's).
    ``pooled_setting`` also chooses one setting for every domain together (``all``: the shipped
    model's global threshold). ``near_miss_share``: :func:`figures`' (None: that figure is left out)."""
    result: dict[str, Any] = {}
    modes = [EMBEDDING] + ([WITH_VERIFIER] if verifier is not None else [])
    for mode in modes:
        settings = {}
        for d, replay in [*replays["dev"].items(), *([(POOLED, None)] if pooled_setting else [])]:
            chosen = [replay] if replay is not None else list(replays["dev"].values())
            t, v, found = calibrate(chosen, target_precision, mode == WITH_VERIFIER)
            settings[d] = {"threshold": round(t, 6), "verifier_threshold": v, **found}
        result[mode] = _at(replays, settings, near_miss_share)
    if shipped is not None:
        settings = {d: {"threshold": shipped[d], "verifier_threshold": None} for d in [*replays["dev"], POOLED]}
        result[SHIPPED] = _at(replays, settings, near_miss_share)
    return result


def _at(
    replays: dict[str, dict[str, TrafficReplay]], settings: dict[str, dict[str, Any]], share: float | None
) -> dict[str, Any]:
    """Per domain: its settings and each set's figures at them; ``all`` pools every domain's lookups."""
    out: dict[str, Any] = {"settings": settings}
    for s, by_domain in replays.items():
        outcomes = {d: r.run(settings[d]["threshold"], settings[d]["verifier_threshold"]) for d, r in by_domain.items()}
        out[s] = {d: figures(o, share) for d, o in outcomes.items()}
        out[s][POOLED] = figures(pooled(list(outcomes.values())), share)
    return out
