"""Evaluation throughput: cachelora.evaluation.score_models against raw model.encode on the same texts.

The base model is loaded once, untimed; score_models gets the baseline loader's model through a
loader that returns it, so both timings cover encoding only (score_models also dedupes, sorts and
computes the cosine scores). The two run alternated (A B A B ...); figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from _common import at_repo_root, finish, median, triplet_rows

TIMING = (
    "texts_per_s = distinct texts / wall time of one pass; ours = score_models({'baseline': loader}, sets, "
    "batch_size) with a loader returning the preloaded base model; raw = model.encode(distinct texts, batch_size, "
    "normalize_embeddings=True). Model load excluded from both."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--batch-size", type=int, help="default: evaluate.batch_size")
    parser.add_argument("--limit", type=int, default=0, help="rows per set (0 = all)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: train.device")
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="16 rows per set, 2 rounds (a smoke test)")
    opts = parser.parse_args()
    at_repo_root()
    import torch

    from cachelora.base_model import pick_device
    from cachelora.evaluation import BASELINE, model_loaders, score_models
    from cachelora.params import load_params
    from cachelora.triplets import TEXT_FIELDS

    params = load_params()
    rounds = opts.rounds or (2 if opts.quick else 5)
    limit = 16 if opts.quick and not opts.limit else opts.limit
    batch_size = opts.batch_size or params.evaluate.batch_size
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = pick_device(opts.device or params.train.device)
    sets: dict[str, dict[str, list[dict[str, Any]]]] = {"val": {}, "test": {}}
    sources = {}
    for domain in params.domains:
        for split in ("val", "test"):
            rows, sources[f"{domain}/{split}"] = triplet_rows(params, domain, 0, (split,))
            sets[split][domain] = rows[:limit] if limit else rows
    distinct = sorted({row[f] for g in sets.values() for rows in g.values() for row in rows for f in TEXT_FIELDS})
    triplets = sum(len(rows) for g in sets.values() for rows in g.values())

    model = model_loaders(params.base_model, {}, device)[BASELINE]()
    model.encode(distinct[:batch_size], batch_size=batch_size)  # warm-up

    def ours() -> None:
        score_models({BASELINE: lambda: model}, sets, batch_size)

    def raw() -> None:
        model.encode(distinct, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)

    walls: dict[str, list[float]] = {"ours": [], "raw": []}
    for _ in range(rounds):
        for name, run in (("ours", ours), ("raw", raw)):
            start = time.perf_counter()
            run()
            walls[name].append(time.perf_counter() - start)
    result = {
        name: {"wall_s": w, "wall_s_median": median(w), "texts_per_s": len(distinct) / median(w)}
        for name, w in walls.items()
    }
    ratio = result["ours"]["texts_per_s"] / result["raw"]["texts_per_s"]
    info = {
        **result, "ratio_ours_over_raw": ratio, "timing": TIMING, "distinct_texts": len(distinct),
        "triplets": triplets, "sets": sources, "limit_per_set": limit, "batch_size": batch_size,
        "max_seq_length": model.max_seq_length, "device": device, "threads": torch.get_num_threads(),
        "rounds": rounds, "quick": opts.quick, "torch": torch.__version__,
    }  # fmt: skip
    finish("evaluate", opts.out, info, [
        ("ours texts/s (score_models, median)", f"{result['ours']['texts_per_s']:.1f}"),
        ("raw model.encode texts/s (median)", f"{result['raw']['texts_per_s']:.1f}"),
        ("ratio ours/raw", f"{ratio:.2f}"),
        ("setup", f"{device}, {torch.get_num_threads()} threads, {len(distinct)} texts, batch {batch_size}"),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
