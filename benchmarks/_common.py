"""Helpers shared by the benchmark scripts: repo root, data, machine description, peaks, output."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LOADAVG_AT_START = os.getloadavg()


def at_repo_root() -> None:
    """The project resolves params.yaml and data/ relative to the working directory."""
    os.chdir(REPO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def triplet_rows(params: Any, domain: str, count: int, splits: tuple[str, ...] = ("train",)) -> tuple[list, str]:
    """``count`` rows from the project's splits of ``domain`` (0 = all), else generated offline."""
    from cachelora import paths
    from cachelora.triplets import read_triplets

    files = [paths.split_file(domain, s) for s in splits]
    if all(f.is_file() for f in files):
        rows = [row for f in files for row in read_triplets(f)]
        if count <= len(rows):
            return rows[:count] if count else rows, "+".join(map(str, files))
    from cachelora.generation import OfflineGenerator
    from cachelora.lexicon import load_lexicon

    gp = params.generate
    count = count or gp.triplets_per_domain
    rows = OfflineGenerator(load_lexicon(domain), gp.seed, gp.sibling_negative_fraction).generate(count)
    return rows, f"generated offline from data/seed/{domain}.yaml"


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_info() -> dict[str, Any]:
    """CPU model, max MHz (lscpu, else /proc/cpuinfo) and SIMD flags."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.+)$", text, re.M).group(1).split()) if "flags" in text else set()
    mhz, source = 0.0, "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^CPU max MHz:\s*([\d.]+)", lscpu, re.M)
        if found:
            mhz, source = float(found.group(1)), "lscpu CPU max MHz"
    except (OSError, subprocess.CalledProcessError):
        pass
    if not mhz and text:
        mhz, source = max(float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)), "/proc/cpuinfo cpu MHz"
    return {
        "model": model.group(1).strip() if model else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "max_mhz": mhz,
        "mhz_source": source,
        "avx512f": "avx512f" in flags,
        "avx2_fma": {"avx2", "fma"} <= flags,
    }


def theoretical_peak(threads: int) -> dict[str, Any]:
    """fp32 FLOP/s = cores x max clock x FLOP/cycle/core (from the SIMD flags)."""
    cpu = cpu_info()
    per_cycle = 64 if cpu["avx512f"] else 32 if cpu["avx2_fma"] else 8
    cores = min(threads, cpu["logical_cpus"] or threads)
    return {
        **cpu,
        "cores_used": cores,
        "fp32_flop_per_cycle_per_core": per_cycle,
        "fp32_peak_flops": cores * cpu["max_mhz"] * 1e6 * per_cycle,
        "formula": "cores_used x max_mhz x 1e6 x flop_per_cycle (avx512f: 2 FMA units x 16 lanes x 2 = 64; "
        "avx2+fma: 2 x 8 x 2 = 32; else 8)",
    }


def matmul_peak(device: str, size: int, reps: int) -> dict[str, Any]:
    """Best achieved fp32 FLOP/s of ``reps`` torch.matmul calls on size x size matrices."""
    import torch

    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.matmul(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return {"size": size, "reps": reps, "best_s": best, "fp32_flops": 2 * size**3 / best}


def finish(name: str, out: str | None, result: dict[str, Any], table: list[tuple[str, str]]) -> None:
    """Write ``result`` (atomically) and print a two-column table of the headline figures."""
    from cachelora.records import write_json

    path = Path(out) if out else RESULTS / f"{name}.json"
    created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result = {"benchmark": name, "created": created, **result}
    result.update(loadavg_at_start=LOADAVG_AT_START, loadavg_at_end=os.getloadavg())
    result["headline"] = [{"figure": k, "value": v} for k, v in table]
    write_json(path, result)
    width = max(len(k) for k, _ in table)
    print(f"\n{name} ({path})")
    if LOADAVG_AT_START[0] > 0.5 * (os.cpu_count() or 1):
        print(f"  warning: load average {LOADAVG_AT_START[0]:.1f} at start: other work shares the CPU")
    for key, value in table:
        print(f"  {key:<{width}}  {value}")
