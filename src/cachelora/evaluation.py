"""Honest metrics for triplets: cache replay at chosen thresholds, ranking quality, margins.

Thresholds are chosen on one set and reported on others, never on a test set: each model's operating
point on val, and the thresholds it ships, calibrated on the natural dev set (the lowest whose
one-sided 95 % Clopper-Pearson lower bound on hit precision reaches the target). A threshold chosen
on the set it is reported on is marked ``in_sample``. Confidence intervals come
from a paired bootstrap over whole groups (topics), the unit the split keeps apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
)

from cachelora import paths
from cachelora.calibration import fallback
from cachelora.errors import CacheloraError
from cachelora.intervals import Ratio, ci, comparison, group_bootstrap, paired
from cachelora.params import BASELINE, MERGED, MULTI, Params
from cachelora.records import read_jsonl_lines, write_json
from cachelora.replay import GRID, Replay
from cachelora.triplets import TEXT_FIELDS, normalise, read_triplets

ALL = "all"
MACRO_KEYS = ("margin", "margin_gain_pct", "triplet_accuracy", "average_precision")
REPORTED_SETS = ("test", "natural_dev", "natural_test")
CHOSEN_ON = "val"
# How a cache does on natural queries at a threshold chosen on natural ones: the natural dev set's
# operating point, reported on the natural test set (in-sample on natural dev itself).
NATURAL_CHOSEN_ON = "natural_dev"
TRAFFIC_DEV = "traffic_dev"  # deploy_on: traffic dev's re-ask hit rate with the verifier
NATURAL_OP = "replay_natural_op"
# The thresholds a cache ships: per domain the lowest natural-dev threshold whose one-sided 95 %
# Clopper-Pearson lower bound on hit precision reaches the target (else the pooled one), and every
# set's replay at exactly those.
CALIBRATED = "replay_calibrated"
HEADLINE_SET = "natural_test"


@dataclass(frozen=True)
class Scores:
    """cos(anchor, positive) and cos(anchor, negative), one pair per triplet, and its bootstrap group."""

    pos: np.ndarray
    neg: np.ndarray
    groups: np.ndarray | None = None

    @classmethod
    def of(cls, rows: list[dict[str, Any]], vectors: dict[str, np.ndarray]) -> Scores:
        anchors = np.stack([vectors[r["anchor"]] for r in rows])
        pos = np.einsum("ij,ij->i", anchors, np.stack([vectors[r["positive"]] for r in rows]))
        neg = np.einsum("ij,ij->i", anchors, np.stack([vectors[r["negative"]] for r in rows]))
        return cls(
            pos.astype(np.float64), neg.astype(np.float64), np.array([group_of(r, i) for i, r in enumerate(rows)])
        )

    @property
    def labels_and_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """The pair view: label 1 for should-hit pairs, 0 for must-not-hit pairs."""
        labels = np.concatenate([np.ones_like(self.pos), np.zeros_like(self.neg)])
        return labels, np.concatenate([self.pos, self.neg])


def group_of(row: dict[str, Any], index: int) -> str:
    """A row's bootstrap group: its topic (across domains), else its original query, else itself."""
    for key in ("topic_group", "topic"):
        if row.get(key):
            return f"topic:{normalise(str(row[key]))}"
    return f"source:{row['source_id']}" if row.get("source_id") else f"row:{index}"


def max_f1_threshold(scores: Scores) -> float:
    """The pair-view threshold with the best F1 (a secondary view beside the replay operating point)."""
    labels, values = scores.labels_and_scores
    precision, recall, thresholds = precision_recall_curve(labels, values)
    precision, recall = precision[:-1], recall[:-1]
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    return float(thresholds[int(np.argmax(f1))])


def decision(scores: Scores, threshold: float) -> dict[str, float]:
    """Pair view of 'hit when cos >= threshold': precision, recall, f1 and false_hit_rate."""
    labels, values = scores.labels_and_scores
    hits = (values >= threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, hits, average="binary", zero_division=0.0)
    return {
        "threshold": round(threshold, 6),
        "precision": round(float(precision), 6),
        "recall": round(float(recall), 6),
        "f1": round(float(f1), 6),
        "false_hit_rate": round(float((scores.neg >= threshold).mean()), 6),
    }


def triplet_metrics(scores: Scores, baseline: Scores, resamples: int, seed: int) -> dict[str, Any]:
    """Margins, accuracy and ranking quality of one model on one set, against the baseline on the
    same triplets; intervals from a paired bootstrap that draws whole groups."""
    if len(scores.pos) < 2:
        raise CacheloraError(f"{len(scores.pos)} triplet(s): too few to evaluate")
    margins, base_margins = scores.pos - scores.neg, baseline.pos - baseline.neg
    correct = (scores.pos > scores.neg).astype(np.float64)
    groups = scores.groups if scores.groups is not None else np.arange(len(margins)).astype(str)
    weights = group_bootstrap(groups, resamples, seed)
    sizes = weights.sum(axis=1)
    model_means, base_means = weights @ margins / sizes, weights @ base_margins / sizes
    gains = (model_means - base_means) / np.where(base_means != 0, base_means, np.nan) * 100
    base_margin = float(base_margins.mean())
    gain = (float(margins.mean()) - base_margin) / base_margin * 100 if base_margin else float("nan")
    labels, values = scores.labels_and_scores
    gain_low, gain_high = ci(gains)
    delta_low, delta_high = ci(model_means - base_means)
    acc_low, acc_high = ci(weights @ correct / sizes)
    return {
        "triplets": len(margins),
        "groups": len(np.unique(groups)),
        "pos_sim": round(float(scores.pos.mean()), 6),
        "neg_sim": round(float(scores.neg.mean()), 6),
        "margin": round(float(margins.mean()), 6),
        "margin_delta": round(float(margins.mean()) - base_margin, 6),
        "margin_delta_ci_low": delta_low,
        "margin_delta_ci_high": delta_high,
        "margin_gain_pct": round(gain, 6),
        "margin_gain_pct_ci_low": gain_low,
        "margin_gain_pct_ci_high": gain_high,
        "triplet_accuracy": round(float(correct.mean()), 6),
        "triplet_accuracy_ci_low": acc_low,
        "triplet_accuracy_ci_high": acc_high,
        "average_precision": round(float(average_precision_score(labels, values)), 6),
        "roc_auc": round(float(roc_auc_score(labels, values)), 6),
    }


def pr_curve(scores: Scores, recall_grid: np.ndarray = GRID) -> list[float]:
    """Interpolated precision (best precision at recall >= r) on a fixed recall grid."""
    labels, values = scores.labels_and_scores
    precision, recall, _ = precision_recall_curve(labels, values)
    return [round(float(precision[recall >= r].max()), 6) for r in recall_grid]


def macro(per_domain: dict[str, dict[str, Any]], keys: tuple[str, ...]) -> dict[str, float]:
    """Unweighted mean of ``keys`` over domains."""
    return {key: round(float(np.mean([m[key] for m in per_domain.values()])), 6) for key in keys}


# --- one model on named groups of rows -------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One model's pair scores and cache replay on one group of rows."""

    scores: Scores
    replay: Replay


def with_all(by_domain: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """Rows per domain plus ``all`` (every domain pooled: the cross-domain cache)."""
    return {**by_domain, ALL: [row for rows in by_domain.values() for row in rows]}


def score_models(
    loaders: dict[str, Callable[[], Any]], sets: dict[str, dict[str, list[dict[str, Any]]]], batch_size: int
) -> dict[str, dict[str, dict[str, Scored]]]:
    """model -> set -> group -> scores; each model loads once and encodes each distinct text once."""
    from cachelora.base_model import encode_unique

    texts = [row[f] for groups in sets.values() for rows in groups.values() for row in rows for f in TEXT_FIELDS]
    scored = {}
    for name, load in loaders.items():
        vectors = encode_unique(load(), texts, batch_size, desc=f"evaluate {name}")
        scored[name] = {
            set_name: {g: Scored(Scores.of(rows, vectors), Replay.of(rows, vectors)) for g, rows in groups.items()}
            for set_name, groups in sets.items()
        }
    return scored


def model_loaders(
    base_model: str, adapters: dict[str, Path], device: str = "cpu", max_seq_length: int | None = None
) -> dict[str, Callable[[], Any]]:
    """Lazy loaders: ``baseline`` (the base model alone, truncating at ``max_seq_length``: the window
    the adapters trained with; None: the model's own) first, then base + each adapter (its own window)."""
    from cachelora.adapters import load_served_model
    from cachelora.base_model import load_base

    loaders: dict[str, Callable[[], Any]] = {BASELINE: partial(load_base, base_model, device, max_seq_length)}
    for name, path in adapters.items():
        loaders[name] = partial(load_served_model, path, device)
    return loaders


def operating_points(val: dict[str, Scored], target_precision: float) -> dict[str, dict[str, float]]:
    """Per group: the replay threshold reaching ``target_precision`` on val, and the pair-view max-F1 one."""
    return {
        group: {"replay": s.replay.operating_point(target_precision), "max_f1": max_f1_threshold(s.scores)}
        for group, s in val.items()
    }


def report_set(
    model: dict[str, Scored],
    baseline: dict[str, Scored],
    thresholds: dict[str, dict[str, float]],
    resamples: int,
    seed: int,
    in_sample: bool = False,
    natural: dict[str, dict[str, float]] | None = None,
    natural_in_sample: bool = False,
    calibrated: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every metric of one model on one set's groups, at the given thresholds (a group without
    thresholds of its own takes ``all``'s); with ``natural`` (operating points chosen on the natural
    dev set), natural sets also get the replay at those (``replay_natural_op``); with ``calibrated``
    (the shipped thresholds), the replay at those (``replay_calibrated``, in-sample on natural dev)."""
    result: dict[str, Any] = {}
    for group, s in model.items():
        chosen = thresholds.get(group) or thresholds[ALL]
        result[group] = {
            **triplet_metrics(s.scores, baseline[group].scores, resamples, seed),
            "replay": {**s.replay.at(chosen["replay"]), "in_sample": int(in_sample)},
            "at_max_f1": {**decision(s.scores, chosen["max_f1"]), "in_sample": int(in_sample)},
        }
        if natural is not None:
            result[group][NATURAL_OP] = {**s.replay.at(natural[group]["replay"]), "in_sample": int(natural_in_sample)}
        if calibrated is not None:
            at = s.replay.at((calibrated.get(group) or calibrated[ALL])["threshold"])
            result[group][CALIBRATED] = {**at, "in_sample": int(natural_in_sample)}
    domains = {g: m for g, m in result.items() if g != ALL}
    if len(domains) > 1:
        result["macro"] = macro(domains, MACRO_KEYS)
    return result


# --- the pipeline ----------------------------------------------------------------------------------


def evaluation_rows(path: Path, min_rows: int, required: tuple[str, ...] = TEXT_FIELDS) -> list[dict[str, Any]]:
    """A triplet file fit to evaluate: at least ``min_rows`` rows, each with three different texts
    (a row failing that is refused with its line number: it would score as a sure hit or miss)."""
    rows = read_triplets(path, required)
    if len(rows) < min_rows:
        raise CacheloraError(f"{path}: {len(rows)} rows, fewer than evaluate.min_rows ({min_rows})")
    lines = [n for n, _ in read_jsonl_lines(path)]
    same = [lines[i] for i, row in enumerate(rows) if len({normalise(row[f]) for f in TEXT_FIELDS}) < len(TEXT_FIELDS)]
    if same:
        shown = ", ".join(map(str, same[:10])) + (", ..." if len(same) > 10 else "")
        raise CacheloraError(f"{path}: line(s) {shown}: anchor, positive and negative must be three different texts")
    return rows


def sample_rows(rows: list[dict[str, Any]], limit: int, seed: str) -> list[dict[str, Any]]:
    """A seeded sample of ``limit`` rows in file order (every row when ``limit`` is 0 or not below the count)."""
    if not limit or len(rows) <= limit:
        return rows
    return [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]


def natural_rows(path: Path, domains: list[str], min_rows: int) -> dict[str, list[dict[str, Any]]]:
    """A natural set's rows by domain (rows of domains params do not list are left out); every
    domain needs rows of its own."""
    by_domain: dict[str, list[dict[str, Any]]] = {d: [] for d in domains}
    for row in evaluation_rows(path, min_rows, (*TEXT_FIELDS, "domain")):
        if row["domain"] in by_domain:
            by_domain[row["domain"]].append(row)
    for domain, rows in by_domain.items():
        if len(rows) < 2:
            raise CacheloraError(f"{path}: {len(rows)} row(s) for domain '{domain}' (write natural queries for it)")
    return by_domain


def pipeline_sets(params: Params) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """set -> group -> rows: val and test splits and the natural dev and test sets, each with ``all``."""
    min_rows = params.evaluate.min_rows
    limit, seed = params.evaluate.max_triplets_per_domain, params.evaluate.seed
    sets = {
        split: with_all(
            {
                d: sample_rows(evaluation_rows(paths.split_file(d, split), min_rows), limit, f"{seed}:{d}:{split}")
                for d in params.domains
            }
        )
        for split in (CHOSEN_ON, "test")
    }
    for split in ("dev", "test"):
        sets[f"natural_{split}"] = with_all(natural_rows(paths.natural(split), params.domains, min_rows))
    return sets


def contamination(params: Params, sets: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, int]:
    """Natural test texts also found where training or choices could have seen them (must all be 0)."""
    from cachelora.splitting import texts_of

    seen = {
        "train": texts_of([r for d in params.domains for r in read_triplets(paths.split_file(d, "train"))]),
        "corpus": corpus_texts(params),
        "val": texts_of([r for rows in sets[CHOSEN_ON].values() for r in rows]),
        "natural_dev": texts_of([r for rows in sets["natural_dev"].values() for r in rows]),
    }
    natural_test = texts_of([r for rows in sets["natural_test"].values() for r in rows])
    counts = {f"natural_test_in_{name}": len(natural_test & texts) for name, texts in seen.items()}
    if any(counts.values()):
        raise CacheloraError(f"{paths.natural('test')}: shares text with data used to train or choose: {counts}")
    return counts


def corpus_texts(params: Params) -> set[str]:
    """Every normalised text of the curated corpus files (all splits: any of it may train or choose)."""
    from cachelora.corpus import read_corpus

    if not params.generate.corpus:
        return set()
    originals = [o for d in params.domains for o in read_corpus(Path(params.generate.corpus) / f"{d}.jsonl", d)]
    return {normalise(t) for o in originals for t in (o.query, *o.paraphrases, *o.negatives)}


def calibrated_thresholds(natural_dev: dict[str, Scored], target_precision: float) -> dict[str, dict[str, Any]]:
    """Per domain of natural dev: the lowest threshold whose one-sided 95 % Clopper-Pearson lower bound
    on cache-replay hit precision reaches ``target_precision``, with its counts and bound. ``all``: the
    same over every domain's lookups together, each domain replayed in its own cache as the router
    partitions them (the global threshold); a domain that cannot certify the target alone takes it
    (``fallback``, with the domain's own counts there, and the ``best`` bound it reached alone)."""
    domains = {g: s.replay for g, s in natural_dev.items() if g != ALL}
    partitions = list(domains.values()) or [natural_dev[ALL].replay]  # rows without domains: one cache
    pooled = Replay(
        np.concatenate([r.top1 for r in partitions]), np.concatenate([r.correct for r in partitions])
    ).certified_threshold(target_precision)
    found = {ALL: {**pooled, "pooled": "every domain's lookups, each domain in its own cache"}}
    for group, replay in domains.items():
        own = replay.certified_threshold(target_precision)
        if not own["certified"]:
            own = {**fallback(pooled["threshold"], *replay.counts(pooled["threshold"]), ALL), "best": own["best"]}
        found[group] = own
    return found


def replay_entry(model: dict[str, Any], set_name: str, group: str) -> dict[str, Any]:
    """A model's replay figures on one set and group of eval.json (val holds replay figures only)."""
    entry = model[set_name][group]
    return entry if set_name == CHOSEN_ON else entry["replay"]


def shipped_threshold(model: dict[str, Any], group: str) -> float:
    """The threshold a model ships for a group: natural-dev calibrated where natural dev was scored,
    else its val operating point."""
    return (model["calibrated"] if model.get("calibrated") else model[CHOSEN_ON])[group]["threshold"]


def shipped_entry(model: dict[str, Any], set_name: str, group: str) -> dict[str, Any]:
    """A model's replay on a reported set at the thresholds it ships (calibrated, else val's)."""
    entry = model[set_name][group]
    return entry[CALIBRATED] if CALIBRATED in entry else entry["replay"]


def own_point_hit_rate(entry: dict[str, Any], set_name: str) -> float:
    """A model's cross-domain cache hit rate on ``set_name`` at that set's own operating point."""
    return entry[CHOSEN_ON][ALL]["hit_rate"] if set_name == CHOSEN_ON else entry[set_name][ALL][NATURAL_OP]["hit_rate"]


def traffic_dev_rate(entry: dict[str, Any]) -> float:
    """A model's traffic-dev re-ask hit rate with the verifier, every domain at its dev-chosen setting."""
    return entry[TRAFFIC_DEV]["dev"][ALL]["reask_hit_rate"]


def choose_deploy(
    result: dict[str, Any], models: list[str], deploy_on: str = CHOSEN_ON, target_precision: float = 0.95
) -> dict[str, Any]:
    """The model with the best cross-domain cache hit rate on ``deploy_on``: at that set's own operating
    point (val, natural dev), or, on traffic dev, the re-ask hit rate of the cache with the verifier at
    the settings chosen there (ties: val's hit rate, then the earlier model); with the thresholds it
    ships and the figures measured at exactly those thresholds. It ships its natural-dev calibrated
    thresholds (a Clopper-Pearson bound on hit precision: ``guarantee``) where the natural dev set was
    scored, else its val ones."""

    def on_deploy_set(m: str) -> float:
        return traffic_dev_rate(result[m]) if deploy_on == TRAFFIC_DEV else own_point_hit_rate(result[m], deploy_on)

    best = max(models, key=lambda m: (on_deploy_set(m), own_point_hit_rate(result[m], CHOSEN_ON), -models.index(m)))
    entry = result[best]
    figures = ("threshold", "hit_rate", "hit_precision", "false_hit_rate")
    domains = [g for g in entry[CHOSEN_ON] if g != ALL]
    calibrated = entry.get("calibrated")
    if calibrated:
        sets = [name for name in REPORTED_SETS if name in entry]

        def at(set_name: str, group: str) -> dict[str, Any]:
            return {k: entry[set_name][group][CALIBRATED][k] for k in figures}

        shipped = {
            "thresholds_chosen_on": f"{NATURAL_CHOSEN_ON}: the lowest threshold whose one-sided 95 % Clopper-Pearson"
            f" lower bound on hit precision reaches {target_precision} (a domain that cannot certify it: all's)",
            "guarantee": calibrated,
        }
    else:
        sets = [name for name in (CHOSEN_ON, *REPORTED_SETS) if name in entry]

        def at(set_name: str, group: str) -> dict[str, Any]:
            return {k: replay_entry(entry, set_name, group)[k] for k in figures}

        shipped = {
            "thresholds_chosen_on": f"{CHOSEN_ON}: the lowest threshold whose hit precision reaches {target_precision}",
        }
    return {
        "model": best,
        "chosen_on": deploy_on,
        "ranking": {m: round(on_deploy_set(m), 6) for m in models},
        "threshold": shipped_threshold(entry, ALL),
        "per_domain_thresholds": {d: shipped_threshold(entry, d) for d in domains},
        **shipped,
        **{name: at(name, ALL) for name in sets},
        "per_domain": {d: {name: at(name, d) for name in sets if d in entry[name]} for d in domains},
    }


def pipeline_metrics(params: Params) -> tuple[dict[str, Any], dict[str, dict[str, dict[str, Scored]]]]:
    """Every pipeline model on every set: operating points chosen on val, reported elsewhere."""
    from cachelora.base_model import model_sha256

    ep = params.evaluate
    names = [*params.train_models, MERGED]
    adapters = {n: paths.model_dir(n) for n in names}
    loaders = model_loaders(params.base_model, adapters, params.train.device, params.train.max_seq_length)
    loaders.update(reference_loaders(params))
    sets = pipeline_sets(params)
    checked = contamination(params, sets)
    scored = score_models(loaders, sets, ep.batch_size)
    candidates = [name for name in loaders if name not in ep.reference_models]
    traffic = traffic_dev_replays(params, candidates) if ep.deploy_on == TRAFFIC_DEV else None
    result: dict[str, Any] = {
        "base_model": {"name": params.base_model, "sha256": model_sha256(params.base_model)},
        "references": {name: {"sha256": model_sha256(name)} for name in ep.reference_models},
        "target_precision": ep.target_precision,
        "contamination": checked,
    }
    result.update(
        models_metrics(
            scored, ep.target_precision, ep.bootstrap, ep.seed, tuple(ep.reference_models), ep.deploy_on, traffic
        )
    )
    result["headline"] = natural_headline(scored, result, ep.bootstrap, ep.seed)
    return result, scored


def traffic_dev_replays(params: Params, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each model's traffic-dev replay with the verifier (``models/verifier``), every domain at the
    setting chosen there: the most re-asks answered at hit precision >= ``evaluate.target_precision``.
    On CPU, as the ``traffic`` stage replays (and ships) the deploy model."""
    from cachelora.traffic import read_traffic, traffic_file
    from cachelora.traffic_replay import WITH_VERIFIER, replay_model, traffic_replays, traffic_vectors
    from cachelora.verifier_model import load_verifier, scorer

    dev = {"dev": {d: read_traffic(traffic_file("dev", d), d) for d in params.domains}}
    verify = scorer(load_verifier(), params.evaluate.batch_size)
    adapters = {name: paths.model_dir(name) for name in names if name != BASELINE}
    loaders = model_loaders(params.base_model, adapters, max_seq_length=params.train.max_seq_length)
    out = {}
    for name, load in loaders.items():
        vectors = traffic_vectors(load(), dev, params.evaluate.batch_size, name)
        replays = traffic_replays(vectors, dev, params.traffic.seed, verify, params.traffic.rival_window)
        out[name] = replay_model(replays, params.evaluate.target_precision, None, verify, None)[WITH_VERIFIER]
    return out


def reference_loaders(params: Params) -> dict[str, Callable[[], Any]]:
    """Lazy loaders of ``evaluate.reference_models`` (each alone, no adapter); a name the pipeline
    already uses for a model is refused."""
    from cachelora.base_model import load_base

    taken = {BASELINE, *params.train_models, MERGED}
    for name in params.evaluate.reference_models:
        if name in taken or "." in name:
            raise CacheloraError(
                f"params.yaml: evaluate.reference_models: '{name}' is a pipeline model's name or has a '.'"
                " (metrics keys are dotted)"
            )
    window = params.train.max_seq_length
    return {name: partial(load_base, name, params.train.device, window) for name in params.evaluate.reference_models}


def cost_models(params: Params, deploy: str) -> dict[str, Callable[[], Any]]:
    """The models the cost table compares: the baseline, the deploy model and each reference."""
    adapters = {deploy: paths.model_dir(deploy)} if deploy != BASELINE else {}
    loaders = model_loaders(params.base_model, adapters, max_seq_length=params.train.max_seq_length)
    return {**loaders, **reference_loaders(params)}


def cost_queries(params: Params) -> list[str]:
    """The queries the cost table times: the first 64 distinct natural test anchors, sorted."""
    natural = natural_rows(paths.natural("test"), params.domains, params.evaluate.min_rows)
    return sorted({row["anchor"] for rows in natural.values() for row in rows})[:64]


def pipeline_cost(params: Params, deploy: str) -> dict[str, Any]:
    """Parameters and CPU ms/query (batch 1 and 32) of the cost table's models, on the natural test anchors."""
    from cachelora import cost

    queries = cost_queries(params)
    figures = {
        name: cost.measure(load(), queries, params.evaluate.cost_repeats)
        for name, load in cost_models(params, deploy).items()
    }
    return {"queries": len(queries), "deploy": deploy, "models": figures, "load": cost.machine_load()}


def models_metrics(
    scored: dict[str, dict[str, dict[str, Scored]]],
    target_precision: float,
    resamples: int,
    seed: int,
    references: tuple[str, ...] = (),
    deploy_on: str = CHOSEN_ON,
    traffic_dev: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Each model's operating points chosen on val and its metrics on every reported set at exactly
    those thresholds, then the ``deploy`` choice (made on ``deploy_on``, val, natural dev or traffic
    dev, never a test set, among models that are not ``references``). ``traffic_dev``: each
    candidate's traffic-dev replay with the verifier (:func:`traffic_dev_replays`), kept per model."""
    result: dict[str, Any] = {}
    for name, by_set in scored.items():
        chosen = operating_points(by_set[CHOSEN_ON], target_precision)
        natural = operating_points(by_set[NATURAL_CHOSEN_ON], target_precision) if NATURAL_CHOSEN_ON in by_set else None
        calibrated = (
            calibrated_thresholds(by_set[NATURAL_CHOSEN_ON], target_precision) if NATURAL_CHOSEN_ON in by_set else None
        )
        result[name] = {
            "calibrated": calibrated,
            CHOSEN_ON: {g: s.replay.at(chosen[g]["replay"]) for g, s in by_set[CHOSEN_ON].items()},
            **{
                set_name: report_set(
                    by_set[set_name],
                    scored[BASELINE][set_name],
                    chosen,
                    resamples,
                    seed,
                    natural=natural if set_name.startswith("natural_") else None,
                    natural_in_sample=set_name == NATURAL_CHOSEN_ON,
                    calibrated=calibrated,
                )
                for set_name in REPORTED_SETS
                if set_name in by_set
            },
        }
    candidates = [name for name in scored if name not in references]
    if deploy_on == TRAFFIC_DEV:
        assert traffic_dev is not None, "deploy_on traffic_dev needs each candidate's traffic-dev replay"
        for name in candidates:
            result[name][TRAFFIC_DEV] = traffic_dev[name]
    result["deploy"] = choose_deploy(result, candidates, deploy_on, target_precision)
    deployed = scored[result["deploy"]["model"]]
    if "guarantee" in result["deploy"] and HEADLINE_SET in deployed:
        result["deploy"]["hindsight"] = hindsight(deployed[HEADLINE_SET], result["deploy"], target_precision)
    return result


def hindsight(natural_test: dict[str, Scored], deploy: dict[str, Any], target_precision: float) -> dict[str, Any]:
    """Per group: the natural test hit rate the deploy model reaches at the lowest threshold whose hit
    precision there reaches ``target_precision`` (chosen on natural test itself: in-sample, a yardstick
    that chooses nothing), and the share of it the shipped thresholds reach."""
    out = {}
    for group, s in natural_test.items():
        best = s.replay.at(s.replay.operating_point(target_precision))
        shipped = (deploy if group == ALL else deploy["per_domain"][group])[HEADLINE_SET]
        share = shipped["hit_rate"] / best["hit_rate"] if best["hit_rate"] else None
        out[group] = {
            **{k: best[k] for k in ("threshold", "hit_rate", "hit_precision")},
            "in_sample": 1,
            "shipped_share": None if share is None else round(share, 6),
        }
    return out


def replay_ratios(scored: Scored, threshold: float) -> dict[str, Ratio]:
    """Natural hit rate and hit precision of one model's replay at ``threshold``, per lookup."""
    hits = scored.replay.top1 >= threshold
    return {
        "natural_hit_rate": Ratio(hits.astype(float), np.ones(len(hits))),
        "natural_hit_precision": Ratio((hits & scored.replay.correct).astype(float), hits.astype(float)),
    }


def paired_average_precision(ours: Scores, theirs: Scores, weights: np.ndarray) -> dict[str, Any]:
    """Pair-view AP of two models on the same triplets, with the paired bootstrap's intervals
    (``weights``: one row per resample, one column per triplet)."""
    samples, values = {}, {}
    for name, scores in (("model", ours), ("baseline", theirs)):
        labels, scored = scores.labels_and_scores
        values[name] = float(average_precision_score(labels, scored))
        samples[name] = np.array([average_precision_score(labels, scored, sample_weight=np.r_[w, w]) for w in weights])
    return comparison(values["model"], values["baseline"], samples["model"], samples["baseline"])


def natural_headline(
    scored: dict[str, dict[str, dict[str, Scored]]], result: dict[str, Any], resamples: int, seed: int
) -> dict[str, Any]:
    """The deploy model against the baseline on natural test, per group, each at the thresholds it
    ships: hit rate, hit precision and AP with 95 % intervals, and their paired differences."""
    deploy = result["deploy"]["model"]
    out: dict[str, Any] = {"model": deploy, "set": HEADLINE_SET}
    for group, ours in scored[deploy][HEADLINE_SET].items():
        theirs = scored[BASELINE][HEADLINE_SET][group]
        at = {name: shipped_entry(result[name], HEADLINE_SET, group)["threshold"] for name in (deploy, BASELINE)}
        groups = ours.scores.groups if ours.scores.groups is not None else np.arange(len(ours.replay.top1))
        weights = group_bootstrap(groups, resamples, seed)
        figures = paired(replay_ratios(ours, at[deploy]), replay_ratios(theirs, at[BASELINE]), weights)
        figures["natural_ap"] = paired_average_precision(ours.scores, theirs.scores, weights)
        out[group] = figures
    return out


def pipeline_evaluation(params: Params) -> dict[str, Any]:
    """Evaluate the pipeline's models and write eval.json, the plot data and the figures."""
    from cachelora.base_model import use_threads

    use_threads(params.evaluate.threads)
    result, scored = pipeline_metrics(params)
    write_json(paths.METRICS_DIR / "eval.json", result)
    write_plots(scored, params, result)
    cost = pipeline_cost(params, result["deploy"]["model"])
    write_json(paths.COST, cost)
    from cachelora import figures

    figures.cost_quality(cost, result, paths.METRICS_DIR / "figures" / "cost_quality.png")
    return result


def write_plots(scored: dict[str, dict[str, dict[str, Scored]]], params: Params, result: dict[str, Any]) -> None:
    """DVC plot data (one file per question: replay per set, PR per domain, every model in it as a
    ``model`` column) and the PNG figures."""
    from cachelora import figures

    references = list(result.get("references", {}))
    shown = list(dict.fromkeys([BASELINE, MULTI, MERGED, result["deploy"]["model"], *references]))
    replay_curves: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {}
    for set_name in ("test", "natural_test"):
        replay_curves[set_name] = {}
        rows = []
        for name in scored:
            curves = {g: s.replay.curve() for g, s in scored[name][set_name].items()}
            pooled = curves[ALL] if ALL in curves else next(iter(curves.values()))  # one domain: no ALL
            rows += [{"model": name, **point} for point in pooled]
            if name in shown:
                replay_curves[set_name][name] = curves
        write_json(paths.METRICS_DIR / "plots" / "replay" / f"{set_name}.json", rows)
    pr: dict[str, dict[str, list[float]]] = {}
    for domain in params.domains:
        models = [BASELINE, domain, MULTI, MERGED, *references]
        pr[domain] = {name: pr_curve(scored[name]["test"][domain].scores) for name in models}
        write_json(
            paths.METRICS_DIR / "plots" / "pr" / f"{domain}.json",
            [
                {"model": name, "recall": float(r), "precision": curve[i]}
                for name, curve in pr[domain].items()
                for i, r in enumerate(GRID)
            ],
        )
    operating = {name: result[name] for name in shown}
    figures.replay_curves(replay_curves, operating, paths.METRICS_DIR / "figures" / "replay.png")
    figures.pr_curves(pr, GRID, paths.METRICS_DIR / "figures" / "pr_curves.png")
    models = [name for name in scored if name != BASELINE]
    figures.gain_heatmap(result, params.domains, models, paths.METRICS_DIR / "figures" / "margin_gain.png")
