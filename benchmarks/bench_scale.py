"""Pipeline scale: each stage's wall time and peak RSS at 10k, 100k and 500k triplets in total.

For every size, a temp copy of the repo (as bench_pipeline.py makes it) gets params for that many
offline triplets in total (``generate.triplets_per_domain`` = size / domains, no corpus, so the count
is exact), a fixed training budget (``train.max_steps``), no reference models and one cost repeat.
Each stage script runs in its own process, in dvc.yaml's order (generate, validate, split, train,
merge, evaluate; the teacher stage is off at distill weight 0): its wall time is timed around the
process and its peak RSS is the process's own ``ru_maxrss`` (``os.wait4``). A stage's figures are the
sum of its per-domain (or per-model) runs' wall times and the largest peak. The slope of each stage
is the least-squares exponent b of wall = a * rows^b over the sizes (b <= 1: linear or better).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import at_repo_root, finish
from bench_pipeline import copy_repo

from cachelora.records import read_json

SIZES = (10_000, 100_000, 500_000)
STAGES = ("generate", "validate", "split", "train", "merge", "evaluate")
RSS_LIMIT_GIB = 4.0
MAX_DROPPED = 0.05  # share of rows the split may drop for sharing a text across splits


def scale_params(root: Path, total: int, steps: int) -> dict[str, Any]:
    """Write the benchmark's params for ``total`` triplets into the copy's params.yaml; return them."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["generate"].update(triplets_per_domain=total // len(params["domains"]), corpus=None)
    params["validate"].update(max_bad_fraction=0.5)  # the gate's counts are reported, never the point here
    params["train"].update(max_steps=steps)
    params["train"]["distill"].update(weight=0.0)
    params["evaluate"].update(reference_models=[], cost_repeats=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def run_stage(root: Path, script: str, args: list[str]) -> dict[str, float]:
    """One stage script in its own process: wall seconds and the process's peak RSS in MiB."""
    env = {**os.environ, "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(root / "src")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, f"stages/{script}.py", *args], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"stages/{script}.py {' '.join(args)} failed:\n{stderr.decode(errors='replace')[-3000:]}")
    per_mib = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / per_mib}


def run_size(total: int, steps: int) -> dict[str, Any]:
    """Every stage at ``total`` triplets in a fresh copy; per stage wall/RSS, and the split's drops."""
    root = Path(tempfile.mkdtemp(prefix=f"cachelora-scale-{total}-"))
    try:
        copy_repo(root, tiny=False)
        params = scale_params(root, total, steps)
        calls = [(stage, ["--domain", d]) for stage in ("generate", "validate", "split") for d in params["domains"]]
        calls += [("train", ["--name", name]) for name in params["train_models"]] + [("merge", []), ("evaluate", [])]
        runs: dict[str, list[dict[str, float]]] = {stage: [] for stage in STAGES}
        for stage, args in calls:
            runs[stage].append(run_stage(root, stage, args))
            print(f"  {total}: {stage} {' '.join(args)} {runs[stage][-1]['wall_s']:.1f} s", flush=True)
        split = {d: read_json(root / f"metrics/split/{d}.json") for d in params["domains"]}
        validated = {d: read_json(root / f"metrics/validate/{d}.json") for d in params["domains"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows_in = {d: validated[d]["passed"] for d in params["domains"]}
    dropped = {d: sum(split[d]["dropped_overlap"].values()) for d in params["domains"]}
    return {
        "triplets": total,
        "triplets_per_domain": params["generate"]["triplets_per_domain"],
        "stages": {
            stage: {
                "wall_s": round(sum(r["wall_s"] for r in rs), 2),
                "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rs), 1),
                "processes": len(rs),
            }
            for stage, rs in runs.items()
        },
        "validated": {d: {k: validated[d][k] for k in ("rows_in", "passed", "quarantined")} for d in rows_in},
        "split": {d: split_figures(rows_in[d], split[d]["rows"], dropped[d]) for d in params["domains"]},
    }


def split_figures(rows_in: int, rows: dict[str, int], dropped: int) -> dict[str, Any]:
    return {"rows_in": rows_in, "rows": rows, "dropped_overlap": dropped, "dropped_share": round(dropped / rows_in, 6)}


def exponent(sizes: list[int], walls: list[float]) -> float:
    """Least-squares b in wall = a * size^b."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(w, 1e-3)) for w in walls]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="triplets in total")
    parser.add_argument("--steps", type=int, default=10, help="train.max_steps for every train stage")
    parser.add_argument("--quick", action="store_true", help="sizes 400 and 800, 2 steps (a smoke test)")
    parser.add_argument("--out")
    opts = parser.parse_args()
    if opts.quick:
        opts.sizes, opts.steps = [400, 800], 2
    at_repo_root()
    results = []
    for total in opts.sizes:
        print(f"scale {total} triplets", flush=True)
        results.append(run_size(total, opts.steps))
    sizes = [r["triplets"] for r in results]
    slopes = {
        stage: round(exponent(sizes, [r["stages"][stage]["wall_s"] for r in results]), 3) if len(sizes) > 1 else None
        for stage in STAGES
    }
    largest = results[-1]
    peak = max(largest["stages"].values(), key=lambda s: s["peak_rss_mib"])["peak_rss_mib"]
    worst_drop = max(s["dropped_share"] for r in results for s in r["split"].values())
    table = [
        (f"{r['triplets']:,} triplets: wall s per stage", ", ".join(
            f"{s} {r['stages'][s]['wall_s']:.0f}" for s in STAGES)) for r in results
    ] + [
        (f"{r['triplets']:,} triplets: peak RSS MiB per stage", ", ".join(
            f"{s} {r['stages'][s]['peak_rss_mib']:.0f}" for s in STAGES)) for r in results
    ] + [
        ("slope b (wall ∝ rows^b; ≤ 1 linear or better)", ", ".join(f"{s} {b}" for s, b in slopes.items())),
        (f"peak RSS at {largest['triplets']:,} (limit {RSS_LIMIT_GIB:g} GiB)", f"{peak / 1024:.2f} GiB"),
        (f"most rows the split dropped, any domain and size (limit {MAX_DROPPED:.0%})", f"{worst_drop:.2%}"),
    ]  # fmt: skip
    finish("scale", opts.out, {
        "sizes": results, "slopes": slopes, "train_max_steps": opts.steps, "quick": opts.quick,
        "peak_rss_gib_at_largest": round(peak / 1024, 3), "meets_rss_limit": peak / 1024 <= RSS_LIMIT_GIB,
        "max_dropped_share": worst_drop, "meets_split_limit": worst_drop <= MAX_DROPPED,
        "linear_or_better": all(b is not None and b <= 1.1 for b in slopes.values()),
        "timing": "wall = seconds around each stage process (imports and model loads included), summed over the "
        "stage's per-domain or per-model processes; peak RSS = the largest ru_maxrss of those processes (os.wait4).",
        "cpu_count": os.cpu_count(), "ru_maxrss_self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }, table)  # fmt: skip


if __name__ == "__main__":
    main()
