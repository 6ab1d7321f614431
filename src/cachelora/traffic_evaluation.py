"""The traffic stage: every model's traffic replay on the natural traffic sets, alone and with the
verifier, at settings chosen on traffic dev (never on test), and the shipped settings.

For each model and each domain, the embedding threshold (and, with the verifier, the verifier
threshold) is the setting that answers the most traffic-dev re-asks while hit precision stays at
``evaluate.target_precision``; traffic test is replayed at exactly that setting. The embedding
thresholds the router ships (``eval.json``: calibrated on natural dev) are replayed too, alone. The
shipped setting is ``eval.json``'s deploy model with the verifier; its cost per lookup (CPU, batch 1)
is measured against the embedding alone. The models: the baseline, the deploy model and each
reference (``benchmarks/ablation_near_miss.py`` replays ``multi`` with and without near-miss negatives).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from cachelora import paths
from cachelora.cost import machine_load, ms_per_query
from cachelora.errors import CacheloraError
from cachelora.evaluation import (
    ALL,
    BASELINE,
    corpus_texts,
    model_loaders,
    reference_loaders,
    shipped_threshold,
)
from cachelora.intervals import Ratio, group_bootstrap, paired
from cachelora.params import EvaluateParams, Params
from cachelora.records import read_json, write_json
from cachelora.splitting import texts_of as triplet_texts
from cachelora.traffic import (
    NEAR_MISS,
    REASK,
    SETS,
    TRAIN_SET,
    AnswerGroup,
    check_traffic,
    read_traffic,
    read_traffic_sets,
    texts_of,
    traffic_file,
)
from cachelora.traffic_replay import (
    WITH_VERIFIER,
    Outcome,
    TrafficReplay,
    pooled,
    replay_model,
    traffic_replays,
    traffic_vectors,
)
from cachelora.triplets import read_triplets

log = logging.getLogger(__name__)

TRAFFIC_JSON = paths.METRICS_DIR / "traffic.json"
TRAFFIC_COST_JSON = paths.METRICS_DIR / "traffic_cost.json"  # timings of this run (apart from traffic.json)


def contamination(params: Params, sets: dict[str, dict[str, list[AnswerGroup]]]) -> dict[str, int]:
    """Traffic texts also found where training or choosing could have seen them (must all be 0): both
    sets against every train split, the corpus and the traffic train set (the verifier's); traffic
    test also against val, natural dev and traffic dev; the natural sets against traffic train."""
    train = triplet_texts([r for d in params.domains for r in read_triplets(paths.split_file(d, "train"))])
    val = triplet_texts([r for d in params.domains for r in read_triplets(paths.split_file(d, "val"))])
    natural = {s: triplet_texts(read_triplets(paths.natural(s))) for s in SETS}
    corpus = corpus_texts(params)
    texts = {s: texts_of([g for groups in sets[s].values() for g in groups]) for s in SETS}
    verifier_train = texts_of([g for d in params.domains for g in read_traffic(traffic_file(TRAIN_SET, d), d)])
    counts = {
        "dev_in_train": len(texts["dev"] & train),
        "dev_in_corpus": len(texts["dev"] & corpus),
        "dev_in_traffic_train": len(texts["dev"] & verifier_train),
        "natural_dev_in_traffic_train": len(natural["dev"] & verifier_train),
        "natural_test_in_traffic_train": len(natural["test"] & verifier_train),
        "test_in_train": len(texts["test"] & train),
        "test_in_corpus": len(texts["test"] & corpus),
        "test_in_traffic_train": len(texts["test"] & verifier_train),
        "test_in_val": len(texts["test"] & val),
        "test_in_natural_dev": len(texts["test"] & natural["dev"]),
        "test_in_dev": len(texts["test"] & texts["dev"]),
    }
    if any(counts.values()):
        where = traffic_file("test", "*").parent.parent
        raise CacheloraError(f"{where}: traffic shares text with data used to train or choose: {counts}")
    return counts


def shipped_embedding_thresholds(model: dict[str, Any], groups: list[str]) -> dict[str, float] | None:
    """The embedding thresholds a model ships per group (natural-dev calibrated, else val's), or None."""
    return {g: shipped_threshold(model, g) for g in groups} if model.get("calibrated") or model.get("val") else None


def outcome_ratios(outcome: Outcome) -> dict[str, Ratio]:
    """The headline traffic figures of one replay, per lookup (``figures`` gives their values)."""
    reask, near = outcome.kind == REASK, outcome.kind == NEAR_MISS
    return {
        "reask_hit_rate": Ratio((outcome.right & reask).astype(float), reask.astype(float), empty=0.0),
        "near_miss_hit_rate": Ratio((outcome.hit & near).astype(float), near.astype(float), empty=0.0),
        "traffic_hit_precision": Ratio(outcome.right.astype(float), outcome.hit.astype(float)),
    }


def traffic_headline(
    ours: dict[str, TrafficReplay],
    our_settings: dict[str, dict[str, Any]],
    theirs: dict[str, TrafficReplay],
    their_settings: dict[str, dict[str, Any]],
    ep: EvaluateParams,
) -> dict[str, Any]:
    """The shipped cache against the baseline's (each with the verifier, at its own dev-chosen settings)
    on one set, per domain and pooled: re-ask hit rate, near-miss wrong-hit rate and hit precision with
    95 % intervals, and their paired differences (a bootstrap over answer groups)."""

    def run(replays: dict[str, TrafficReplay], settings: dict[str, dict[str, Any]]) -> dict[str, Outcome]:
        outcomes = {d: r.run(settings[d]["threshold"], settings[d]["verifier_threshold"]) for d, r in replays.items()}
        outcomes = {d: replace(o, group=np.array([f"{d}:{g}" for g in o.group])) for d, o in outcomes.items()}
        return {**outcomes, ALL: pooled(list(outcomes.values()))}

    mine, base = run(ours, our_settings), run(theirs, their_settings)
    return {
        group: paired(outcome_ratios(o), outcome_ratios(base[group]), group_bootstrap(o.group, ep.bootstrap, ep.seed))
        for group, o in mine.items()
    }


def _timed(fn: Callable[[], Any], count: int) -> float:
    """Median over three passes of ``fn``'s wall time in ms, per one of its ``count`` items (after a warm-up)."""
    fn()
    runs = []
    for _ in range(3):
        started = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - started) * 1000 / count)
    return statistics.median(runs)


def verifier_ms(verifier: Any, pairs: list[tuple[str, str]], batch_size: int) -> float:
    """CPU ms per (query, cached query) pair at ``batch_size``."""
    with torch.inference_mode():
        return _timed(
            lambda: [verifier.predict(pairs[i : i + batch_size], batch_size=batch_size, show_progress_bar=False)
                     for i in range(0, len(pairs), batch_size)],
            len(pairs),
        )  # fmt: skip


def lookup_costs(models: dict[str, Any], embed_ms: dict[str, float], verify_ms: float) -> dict[str, Any]:
    """Per model and settings: the share of traffic-test lookups the verifier reads (those whose nearest
    entry reaches the embedding threshold, less those that missed for a rival) and the CPU ms of a
    lookup at batch 1: the embedding, plus the verifier for that share."""
    out: dict[str, Any] = {}
    for name, modes in models.items():
        out[name] = {"embedding_ms_batch_1": round(embed_ms[name], 3)}
        for mode, entry in modes.items():
            share = _verified_share(entry) if mode == WITH_VERIFIER else 0.0
            lookup = embed_ms[name] + share * verify_ms
            out[name][mode] = {
                "verified_share": round(share, 6),
                "lookup_ms_batch_1": round(lookup, 3),
                "lookup_over_embedding": round(lookup / embed_ms[name], 3),
            }
    return out


def timing_inputs(sets: dict[str, dict[str, list[AnswerGroup]]]) -> tuple[list[str], list[tuple[str, str]]]:
    """What a lookup's cost is timed on: up to 64 traffic-test re-asks (the embedding), and up to 64
    (re-ask, original) pairs (the verifier)."""
    test = [g for groups in sets["test"].values() for g in groups]
    return [g.reasks[0] for g in test if g.reasks][:64], [(g.reasks[0], g.original) for g in test][:64]


def pipeline_traffic(params: Params) -> dict[str, Any]:
    """Check the traffic sets, replay every model on them, and write ``metrics/traffic.json``."""
    from cachelora.base_model import use_threads
    from cachelora.verifier_model import load_verifier, scorer

    use_threads(params.evaluate.threads)
    sets = read_traffic_sets(params.domains)
    checked = {
        s: {d: check_traffic(groups, str(traffic_file(s, d)), params.traffic.min_groups) for d, groups in by.items()}
        for s, by in sets.items()
    }
    counts = contamination(params, sets)
    eval_metrics = read_json(paths.METRICS_DIR / "eval.json")
    deploy = eval_metrics["deploy"]["model"]
    adapters = {deploy: paths.model_dir(deploy)} if deploy != BASELINE else {}
    loaders = model_loaders(params.base_model, adapters, max_seq_length=params.train.max_seq_length)
    loaders.update(reference_loaders(params))
    verifier_model = load_verifier()
    verify = scorer(verifier_model, params.evaluate.batch_size)
    timing_queries, pairs = timing_inputs(sets)
    models: dict[str, Any] = {}
    replays: dict[str, dict[str, dict[str, TrafficReplay]]] = {}
    embed_ms: dict[str, float] = {}
    for name, load in loaders.items():
        model = load()
        vectors = traffic_vectors(model, sets, params.evaluate.batch_size, name)  # dev's: evaluate's deploy choice's
        thresholds = shipped_embedding_thresholds(eval_metrics.get(name, {}), [*params.domains, ALL])
        log.info("traffic replay: %s", name)
        replays[name] = traffic_replays(vectors, sets, params.traffic.seed, verify, params.traffic.rival_window)
        models[name] = replay_model(
            replays[name],
            params.evaluate.target_precision,
            params.traffic.near_miss_share,
            verify,
            thresholds,
            pooled_setting=name == deploy,
        )
        embed_ms[name] = ms_per_query(model, timing_queries, batch_size=1, repeats=3)
    shipped = models[deploy][WITH_VERIFIER]
    verify_ms = {b: verifier_ms(verifier_model, pairs, b) for b in (1, 32)}
    result = {
        "target_precision": params.evaluate.target_precision,
        "near_miss_share": params.traffic.near_miss_share,
        "rival_window": params.traffic.rival_window,
        "sets": checked,
        "contamination": counts,
        "models": models,
        "shipped": {
            "model": deploy,
            "verifier": "models/verifier",
            "settings": shipped["settings"],
            "chosen_on": "traffic dev: the most re-asks answered at hit precision >= target",
            **{s: shipped[s] for s in SETS},
        },
        "headline": traffic_headline(
            replays[deploy]["test"],
            shipped["settings"],
            replays[BASELINE]["test"],
            models[BASELINE][WITH_VERIFIER]["settings"],
            params.evaluate,
        )
        | {"model": deploy, "set": "test"},
    }
    costs = lookup_costs(models, embed_ms, verify_ms[1])
    cost = {
        "threads": torch.get_num_threads(),
        "load": machine_load(),
        "queries": len(timing_queries),
        "verifier_ms_per_pair_batch_1": round(verify_ms[1], 3),
        "verifier_ms_per_pair_batch_32": round(verify_ms[32], 3),
        "models": costs,
        "shipped": {
            "model": deploy,
            **costs[deploy][WITH_VERIFIER],
            "embedding_ms_batch_1": costs[deploy]["embedding_ms_batch_1"],
        },
    }
    write_json(TRAFFIC_COST_JSON, cost)
    write_json(TRAFFIC_JSON, result)
    return result


def _verified_share(entry: dict[str, Any]) -> float:
    """The share of traffic-test lookups (all domains) the verifier reads at these settings."""
    return float(entry["test"][ALL]["verified_share"])
