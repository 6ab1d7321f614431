"""Ablation: the deploy-candidate adapter trained with another share of lexicon near-miss negatives.

The pipeline trains with ``generate.near_miss_fraction`` of its rows carrying a lexicon near-miss
negative (the corpus's hand-written near-misses are there either way); this script answers "what do
those negatives do?". In a temp copy of the repo (as bench_pipeline.py makes it) it runs the real
stage scripts (generate, validate and split for every domain, then train for ``multi`` by default)
with ``--fraction`` (default: 0.5 when the pipeline's is 0, else 0) and nothing else changed, then
replays the traffic sets with that adapter and with the pipeline's own (``models/multi``) exactly as
the ``traffic`` stage does: alone and with the pipeline's verifier (``models/verifier``), at settings
chosen on traffic dev; and scores both on the natural dev and test sets (AP, triplet accuracy).
``with_near_miss_negatives`` is the arm with the larger share. Run after ``dvc repro``; writes
``benchmarks/results/ablation.json`` (RESULTS.md's ablation tables cite it with the adapter's md5).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import yaml
from _common import at_repo_root, finish
from bench_pipeline import copy_repo
from bench_scale import run_stage


def natural_quality(model: object, params: object) -> dict[str, dict[str, float]]:
    """AP and triplet accuracy on the natural dev and test sets (all domains), as evaluate scores them."""
    from sklearn.metrics import average_precision_score

    from cachelora import paths
    from cachelora.base_model import encode_unique
    from cachelora.evaluation import Scores, natural_rows

    out = {}
    for split in ("dev", "test"):
        rows = [r for rs in natural_rows(paths.natural(split), params.domains, 2).values() for r in rs]
        vectors = encode_unique(model, [r[f] for r in rows for f in ("anchor", "positive", "negative")])
        scores = Scores.of(rows, vectors)
        labels, values = scores.labels_and_scores
        out[f"natural_{split}"] = {
            "average_precision": round(float(average_precision_score(labels, values)), 6),
            "triplet_accuracy": round(float((scores.pos > scores.neg).mean()), 6),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="multi", help="the train stage's model to retrain")
    parser.add_argument("--fraction", type=float, default=None, help="the other arm's generate.near_miss_fraction")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    at_repo_root()
    from cachelora.base_model import encode_unique
    from cachelora.evaluation import ALL, model_loaders
    from cachelora.params import load_params
    from cachelora.records import read_json
    from cachelora.traffic import read_traffic_sets
    from cachelora.traffic_replay import WITH_VERIFIER, replay_model, traffic_replays
    from cachelora.verifier_model import load_verifier, scorer
    from cachelora.verify import dir_md5

    params = load_params()
    ours = params.generate.near_miss_fraction
    other = args.fraction if args.fraction is not None else (0.5 if ours == 0 else 0.0)
    if other == ours:
        raise SystemExit(f"--fraction {other} is the pipeline's own generate.near_miss_fraction")
    root = Path(tempfile.mkdtemp(prefix="cachelora-ablation-"))
    try:
        copy_repo(root, tiny=False)
        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["generate"]["near_miss_fraction"] = other
        (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        calls = [(stage, ["--domain", d]) for stage in ("generate", "validate", "split") for d in params.domains]
        for stage, stage_args in [*calls, ("train", ["--name", args.model])]:
            took = run_stage(root, stage, stage_args)["wall_s"]
            print(f"  {stage} {' '.join(stage_args)}: {took:.0f} s", flush=True)
        arms = sorted([(ours, Path("models") / args.model), (other, root / "models" / args.model)], reverse=True)
        trained = {"with": arms[0][1], "without": arms[1][1]}
        fractions = {"with_near_miss_negatives": arms[0][0], "without_near_miss_negatives": arms[1][0]}
        sets = read_traffic_sets(params.domains)
        texts = sorted({t for by in sets.values() for gs in by.values() for g in gs for t in g.texts})
        verify = scorer(load_verifier(), params.evaluate.batch_size)
        settings = (params.evaluate.target_precision, params.traffic.near_miss_share)
        variants = {}
        for name, adapter in trained.items():
            model = model_loaders(params.base_model, {args.model: adapter}, max_seq_length=params.train.max_seq_length)[
                args.model
            ]()
            vectors = encode_unique(model, texts, params.evaluate.batch_size, desc=f"ablation {name}")
            variants[f"{name}_near_miss_negatives"] = {
                "adapter_md5": dir_md5(adapter),
                "traffic": replay_model(
                    traffic_replays(vectors, sets, params.traffic.seed, verify, params.traffic.rival_window),
                    *settings,
                    verify,
                    None,
                ),
                "natural": natural_quality(model, params),
            }
        result = {
            "model": args.model,
            "changed": {"generate.near_miss_fraction": [ours, other]},
            "near_miss_fraction": fractions,
            "pipeline": next(k for k, f in fractions.items() if f == ours),
            "verifier_md5": dir_md5(Path("models/verifier")),
            "training_other_arm": read_json(root / "metrics" / "train" / f"{args.model}.json"),
            **variants,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = [
        (f"{v} {mode} test {k}", f"{result[v]['traffic'][mode]['test'][ALL][k]:.3f}")
        for v in ("with_near_miss_negatives", "without_near_miss_negatives")
        for mode in ("embedding", WITH_VERIFIER)
        for k in ("reask_hit_rate", "near_miss_wrong_hit_rate", "hit_precision")
    ]
    finish("ablation", args.out, result, table)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
