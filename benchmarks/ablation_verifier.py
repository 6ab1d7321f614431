"""Ablation: the verifier trained without the natural traffic train set's pairs, and the lookup
without the rival check.

The pipeline's verifier (``models/verifier``) trains on traffic train's pairs beside the generated
ones (``verifier.natural_pairs``); this script answers "what did those pairs buy?". It trains a
verifier with ``verifier.natural_pairs: false`` and nothing else changed (in memory, the stage's own
code), then replays the deploy model (eval.json's) on the traffic sets with each verifier exactly
as the ``traffic`` stage does, at settings chosen on traffic dev. A third arm replays the pipeline's
verifier without the rival check (``traffic.rival_window: null``): what the check buys. Run after
``dvc repro``; writes ``benchmarks/results/ablation_verifier.json`` (RESULTS.md's traffic ablation
cites it).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from _common import at_repo_root, finish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    at_repo_root()
    from cachelora import paths
    from cachelora.base_model import encode_unique
    from cachelora.evaluation import ALL, BASELINE, model_loaders
    from cachelora.params import load_params
    from cachelora.records import read_json
    from cachelora.traffic import read_traffic_sets
    from cachelora.traffic_replay import WITH_VERIFIER, replay_model, traffic_replays
    from cachelora.verifier import save_verifier, train_verifier
    from cachelora.verifier_model import load_verifier, scorer, verifier_dir
    from cachelora.verify import dir_md5

    params = load_params()
    deploy = read_json(paths.METRICS_DIR / "eval.json")["deploy"]["model"]
    without = params.model_copy(update={"verifier": params.verifier.model_copy(update={"natural_pairs": False})})
    model, info, run, _ = train_verifier(without)
    print(f"  verifier without natural pairs: {info['pairs']} pairs, {run['wall_time_s']:.0f} s", flush=True)
    sets = read_traffic_sets(params.domains)
    texts = sorted({t for by in sets.values() for gs in by.values() for g in gs for t in g.texts})
    adapters = {deploy: paths.model_dir(deploy)} if deploy != BASELINE else {}
    vectors = encode_unique(
        model_loaders(params.base_model, adapters, max_seq_length=params.train.max_seq_length)[deploy](),
        texts,
        params.evaluate.batch_size,
    )
    with tempfile.TemporaryDirectory(prefix="cachelora-ablation-verifier-") as tmp:
        save_verifier(model, Path(tmp) / "verifier", info, [(texts[0], texts[1])])
        window = params.traffic.rival_window
        arms = {
            "with_natural_pairs": (verifier_dir(), window),
            "without_natural_pairs": (Path(tmp) / "verifier", window),
            "with_natural_pairs_no_rival_check": (verifier_dir(), None),
        }
        result = {
            "model": deploy,
            "changed": {
                "verifier.natural_pairs": [params.verifier.natural_pairs, False],
                "traffic.rival_window": [window, None],
            },
        }
        settings = (params.evaluate.target_precision, params.traffic.near_miss_share)
        for arm, (folder, rival_window) in arms.items():
            verify = scorer(load_verifier(folder), params.evaluate.batch_size)
            replays = traffic_replays(vectors, sets, params.traffic.seed, verify, rival_window)
            result[arm] = {"verifier_md5": dir_md5(folder), "traffic": replay_model(replays, *settings, verify, None)}
    table = [
        (f"{v} {s} {k}", f"{result[v]['traffic'][WITH_VERIFIER][s][ALL][k]:.3f}")
        for v in arms
        for s in ("dev", "test")
        for k in ("reask_hit_rate", "near_miss_wrong_hit_rate", "hit_precision")
    ]
    finish("ablation_verifier", args.out, result, table)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
