"""Reference models (no adapter, never deployed: all-mpnet-base-v2 by default), scored exactly as the
pipeline scores its own models, but outside `dvc repro`.

``evaluate.reference_models`` puts a reference inside the pipeline: evaluate and traffic then score
it beside the pipeline's models. The default leaves the list empty. all-mpnet-base-v2 took about a
sixth of a default run (it encodes about 9,000 texts at five times MiniLM's cost per text), and the
router cannot load it. This script computes the same figures from the pipeline's outputs with the
stages' own functions:
- evaluate's sets at the reference's own val and natural-dev thresholds, paired against the baseline;
- its traffic replay, alone and with the pipeline's verifier (``models/verifier``), at settings
  chosen on traffic dev, and at its own natural-dev calibrated thresholds without the verifier;
- both cost tables, each reference timed beside the baseline in this run.
The baseline is scored again as a check: its figures must equal ``metrics/eval.json``'s, or the
script stops. Run after ``dvc repro``; writes ``benchmarks/results/reference.json`` (RESULTS.md's
reference rows cite it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from _common import at_repo_root, finish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["all-mpnet-base-v2"], help="reference models (names or paths)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    at_repo_root()
    from cachelora import cost, paths
    from cachelora.base_model import use_threads
    from cachelora.evaluation import (
        ALL,
        BASELINE,
        TRAFFIC_DEV,
        contamination,
        cost_queries,
        model_loaders,
        models_metrics,
        pipeline_sets,
        reference_loaders,
        score_models,
    )
    from cachelora.params import load_params
    from cachelora.records import read_json
    from cachelora.traffic import read_traffic_sets
    from cachelora.traffic_evaluation import lookup_costs, shipped_embedding_thresholds, timing_inputs, verifier_ms
    from cachelora.traffic_replay import WITH_VERIFIER, replay_model, traffic_replays, traffic_vectors
    from cachelora.verifier_model import load_verifier, scorer, verifier_dir
    from cachelora.verify import dir_md5

    params = load_params()
    ep = params.evaluate
    use_threads(ep.threads)
    with_references = params.model_copy(update={"evaluate": ep.model_copy(update={"reference_models": args.models})})
    loaders = {
        BASELINE: model_loaders(params.base_model, {}, params.train.device, params.train.max_seq_length)[BASELINE],
        **reference_loaders(with_references),
    }
    sets = pipeline_sets(params)
    contamination(params, sets)
    scored = score_models(loaders, sets, ep.batch_size)
    metrics = models_metrics(scored, ep.target_precision, ep.bootstrap, ep.seed, tuple(args.models), deploy_on="val")
    pipeline = {k: v for k, v in read_json(paths.METRICS_DIR / "eval.json")[BASELINE].items() if k != TRAFFIC_DEV}
    if json.loads(json.dumps(metrics[BASELINE])) != pipeline:
        sys.exit("the baseline scored here differs from metrics/eval.json's: run `dvc repro` first")

    traffic = read_traffic_sets(params.domains)
    verifier = load_verifier()
    verify = scorer(verifier, ep.batch_size)
    timing_queries, pairs = timing_inputs(traffic)
    queries = cost_queries(params)
    replayed, embed_ms, costs = {}, {}, {}
    for name, load in loaders.items():
        model = load()
        costs[name] = cost.measure(model, queries, ep.cost_repeats)
        embed_ms[name] = cost.ms_per_query(model, timing_queries, batch_size=1, repeats=3)
        if name == BASELINE:
            continue
        vectors = traffic_vectors(model, traffic, ep.batch_size, name)
        replays = traffic_replays(vectors, traffic, params.traffic.seed, verify, params.traffic.rival_window)
        thresholds = shipped_embedding_thresholds(metrics[name], [*params.domains, ALL])
        replayed[name] = replay_model(replays, ep.target_precision, params.traffic.near_miss_share, verify, thresholds)
    verify_ms = verifier_ms(verifier, pairs, 1)
    result = {
        "models": args.models,
        "inputs": {"models/verifier": dir_md5(verifier_dir())},
        "eval": {name: metrics[name] for name in args.models},
        "traffic": replayed,
        "cost": {"load": cost.machine_load(), "queries": len(queries), "models": costs},
        "traffic_cost": {
            "load": cost.machine_load(),
            "queries": len(timing_queries),
            "verifier_ms_per_pair_batch_1": round(verify_ms, 3),
            "models": {
                BASELINE: {"embedding_ms_batch_1": round(embed_ms[BASELINE], 3)},
                **lookup_costs(replayed, embed_ms, verify_ms),
            },
        },
    }
    table = [
        (f"{name} traffic test {k}", f"{replayed[name][WITH_VERIFIER]['test'][ALL][k]:.3f}")
        for name in args.models
        for k in ("reask_hit_rate", "near_miss_wrong_hit_rate", "hit_precision")
    ]
    finish("reference", args.out, result, table)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
