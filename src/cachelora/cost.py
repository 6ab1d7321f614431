"""What a model costs to serve: parameters and CPU milliseconds per query at batch 1 and batch 32.

Measured in the evaluate stage's run, on the natural test queries, for the models a cost table
compares. Timings vary between runs and machines, so they go to ``metrics/cost.json``, apart from
``eval.json`` (which ``verify --recompute`` reproduces exactly); compare them only within one file.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from typing import Any

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 32)


def machine_load() -> dict[str, Any]:
    """The load average when timings were taken, and whether they can be trusted: a 1-minute load
    above the CPU count means other work shared the cores (timings then run 2x to 30x slow)."""
    load = [round(x, 2) for x in os.getloadavg()]
    cpus = os.cpu_count() or 1
    return {"loadavg": load, "cpus": cpus, "reliable": load[0] <= cpus}


def load_note(load: dict[str, Any]) -> str:
    """How a cost table's title describes the machine's load during its timings."""
    where = f"load average {load['loadavg'][0]:.1f} on {load['cpus']} CPUs"
    return where if load["reliable"] else f"{where}: UNRELIABLE, other work shared the cores"


def parameter_count(model: Any) -> int:
    """Parameters as served: an adapter is merged into the base first (no LoRA at serving time)."""
    return sum(p.numel() for p in model.parameters())


def ms_per_query(model: Any, queries: list[str], batch_size: int, repeats: int) -> float:
    """Median over ``repeats`` passes of the wall time per query, encoding ``queries`` ``batch_size`` at a time."""
    import torch

    model.encode(queries[:batch_size], batch_size=batch_size)  # warm-up
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        with torch.inference_mode():
            for start in range(0, len(queries), batch_size):
                model.encode(queries[start : start + batch_size], batch_size=batch_size, normalize_embeddings=True)
        runs.append((time.perf_counter() - started) * 1000 / len(queries))
    return statistics.median(runs)


def measure(model: Any, queries: list[str], repeats: int = 3) -> dict[str, Any]:
    """Parameters and ms/query at each of :data:`BATCH_SIZES` for one model."""
    import torch

    from cachelora.adapters import merged_for_serving

    model = merged_for_serving(model)
    model.eval()
    figures: dict[str, Any] = {"parameters": parameter_count(model), "threads": torch.get_num_threads()}
    for batch_size in BATCH_SIZES:
        figures[f"ms_per_query_batch_{batch_size}"] = round(ms_per_query(model, queries, batch_size, repeats), 3)
    log.info("cost: %s", figures)
    return figures
