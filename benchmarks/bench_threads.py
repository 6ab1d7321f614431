"""Torch thread count on a small machine, idle and beside a busy process: training s/step and encoding ms/text.

For each load (idle, busy) and each thread count (0 = torch's default, then fixed counts), one fresh
worker process (torch's thread count is per process) runs cachelora.training.train_model with
train.threads set to it: an untimed warm-up run of 2 steps, then a timed run of N steps (loop time
only, training_info wall_time_s). The same process then times SentenceTransformer.encode of short
distinct queries (batch 128) and CrossEncoder.predict of (anchor, positive) pairs (batch 32), each
warmed up once and timed over a few passes (median). "busy" is another process doing fp32 torch
matmuls with torch's default threads, started before the load's workers and killed after them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import at_repo_root, finish, median, triplet_rows

TIMING = (
    "train s_per_step = train_model's loop wall time (training_info wall_time_s: model load and tokenisation "
    "excluded) / steps, after an untimed 2-step warm-up run in the same process; steps = --steps, cut to what "
    "fits --train-budget-s at the warm-up's rate (at least 2). encode ms_per_text = median wall time of "
    "model.encode(distinct texts, batch_size) / texts; cross_encoder ms_per_pair = median wall time of "
    "CrossEncoder.predict(pairs, batch_size) / pairs; both warmed up once, --passes timed passes. cpu_per_wall = "
    "the worker's user+sys CPU seconds / wall seconds over the phase (above the threads' share of the cores "
    "means spinning). loadavg = os.getloadavg() before and after each phase."
)
BUSY = "a separate process running fp32 torch.matmul of 1024 x 1024 matrices in a loop, torch's default threads"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def system_cpu() -> tuple[float, float]:
    """Seconds every CPU spent busy (not idle or iowait), and stolen by the hypervisor, since boot."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - times.iowait, getattr(times, "steal", 0.0)


class Phase:
    """Wall time, the process's CPU time, the whole machine's busy CPUs and the load average around a block."""

    def __enter__(self) -> Phase:
        self.loadavg_before = os.getloadavg()
        self.system = system_cpu()
        self.cpu, self.start = cpu_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self.start
        self.cpu_s = cpu_seconds() - self.cpu
        busy, steal = (b - a for a, b in zip(self.system, system_cpu(), strict=True))
        self.busy_cores, self.steal_cores = busy / self.wall_s, steal / self.wall_s
        self.loadavg_after = os.getloadavg()

    def facts(self) -> dict[str, Any]:
        return {
            "phase_wall_s": round(self.wall_s, 3), "cpu_per_wall": round(self.cpu_s / self.wall_s, 3),
            "machine_busy_cores": round(self.busy_cores, 3), "steal_cores": round(self.steal_cores, 3),
            "loadavg_before": self.loadavg_before, "loadavg_after": self.loadavg_after,
        }  # fmt: skip


def timed_passes(run: Any, passes: int, budget_s: float) -> list[float]:
    """Wall times of ``run()``: ``passes`` of them, or fewer (at least one) once ``budget_s`` is spent."""
    walls: list[float] = []
    while len(walls) < passes and (not walls or sum(walls) < budget_s):
        start = time.perf_counter()
        run()
        walls.append(time.perf_counter() - start)
    return walls


def wait_for_quiet(limit_s: float, cores: float = 0.3, sample_s: float = 2.0) -> dict[str, Any]:
    """Before an idle run: sample the machine's busy CPUs until under ``cores`` or ``limit_s`` has passed."""
    start, samples = time.perf_counter(), []
    while True:
        before = system_cpu()[0]
        time.sleep(sample_s)
        samples.append(round((system_cpu()[0] - before) / sample_s, 3))
        if samples[-1] < cores or time.perf_counter() - start >= limit_s:
            return {"busy_cores_samples": samples, "quiet": samples[-1] < cores,
                    "waited_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def busy_loop(size: int) -> None:
    """The background load: matmuls until the parent is gone (so it never outlives the benchmark)."""
    import torch

    parent = os.getppid()
    a, b = torch.randn(size, size), torch.randn(size, size)
    while os.getppid() == parent:
        torch.matmul(a, b)


def worker(opts: argparse.Namespace) -> None:
    """One measurement at ``opts.threads``; writes its figures to ``opts.worker``."""
    at_repo_root()
    import logging

    import torch
    import transformers

    from cachelora.base_model import load_base
    from cachelora.params import load_params
    from cachelora.records import write_json, write_jsonl
    from cachelora.training import train_model
    from cachelora.verifier import new_cross_encoder

    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    params = load_params()
    domain = params.domains[0]
    rows, source = triplet_rows(params, domain, opts.triplets)
    queries, pairs = distinct_queries(params, opts.texts), [(r["anchor"], r["positive"]) for r in rows]
    pairs = pairs[: opts.pairs]
    train = params.train.model_copy(update={
        "threads": opts.threads, "batch_size": opts.batch_size, "max_seq_length": opts.max_seq_length,
        "device": "cpu", "precision": "fp32", "epochs": 1, "max_steps": 2,
    })  # fmt: skip
    params = params.model_copy(update={"train": train})
    import cachelora

    out: dict[str, Any] = {"threads_setting": opts.threads, "data": source, "cachelora": cachelora.__file__}
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.jsonl"
        write_jsonl(train_file, rows)
        with Phase() as warm:
            warm_run = train_model("bench", params, [train_file]).run
        warm_rate = warm_run["wall_time_s"] / 2
        steps = max(2, min(opts.steps, int(opts.train_budget_s / warm_rate)))
        params = params.model_copy(update={"train": train.model_copy(update={"max_steps": steps})})
        with Phase() as timed:
            run = train_model("bench", params, [train_file]).run
    out["torch_threads"] = torch.get_num_threads()  # what train_model left set (0: torch's default)
    out["interop_threads"] = torch.get_num_interop_threads()
    out["train"] = {
        "steps": steps, "steps_asked": opts.steps, "loop_s": run["wall_time_s"],
        "s_per_step": run["wall_time_s"] / steps,
        "warmup_s_per_step": warm_rate, "warmup_phase_wall_s": round(warm.wall_s, 3), **timed.facts(),
    }  # fmt: skip

    model = load_base(params.base_model, "cpu", opts.max_seq_length)
    model.eval()
    model.encode(queries[: opts.encode_batch], batch_size=opts.encode_batch, show_progress_bar=False)
    with Phase() as enc:
        walls = timed_passes(
            lambda: model.encode(queries, batch_size=opts.encode_batch, normalize_embeddings=True,
                                 show_progress_bar=False), opts.passes, opts.eval_budget_s,
        )  # fmt: skip
    out["encode"] = {
        "texts": len(queries), "batch_size": opts.encode_batch, "wall_s": walls,
        "ms_per_text": 1000 * median(walls) / len(queries), **enc.facts(),
    }  # fmt: skip

    cross = new_cross_encoder(params)
    cross.model.eval()
    cross.predict(pairs[: opts.cross_batch], batch_size=opts.cross_batch, show_progress_bar=False)
    with Phase() as ce:
        walls = timed_passes(
            lambda: cross.predict(pairs, batch_size=opts.cross_batch, show_progress_bar=False), opts.passes,
            opts.eval_budget_s,
        )  # fmt: skip
    out["cross_encoder"] = {
        "pairs": len(pairs), "batch_size": opts.cross_batch, "max_length": params.verifier.max_length,
        "wall_s": walls, "ms_per_pair": 1000 * median(walls) / len(pairs), **ce.facts(),
    }  # fmt: skip
    out["torch_threads_end"] = torch.get_num_threads()
    write_json(opts.worker, out)


def distinct_queries(params: Any, count: int) -> list[str]:
    """``count`` distinct anchors from the domains' val splits (short queries), in a fixed order."""
    seen: dict[str, None] = {}
    for domain in params.domains:
        rows, _ = triplet_rows(params, domain, 0, ("val",))
        seen.update((row["anchor"], None) for row in rows)
    return sorted(seen)[:count]


def start_busy(size: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--busy", str(size)], stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    return proc


def stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc`` (this script's own child, by its pid) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure(opts: argparse.Namespace, threads: int, tmp: str, load: str) -> dict[str, Any]:
    path = Path(tmp) / f"{load}-{threads}.json"
    args = [sys.executable, __file__, "--worker", str(path), "--threads-setting", str(threads)]
    for flag in ("steps", "train_budget_s", "batch_size", "max_seq_length", "triplets", "texts", "encode_batch",
                 "pairs", "cross_batch", "passes", "eval_budget_s"):  # fmt: skip
        args += [f"--{flag.replace('_', '-')}", str(getattr(opts, flag))]
    quiet = wait_for_quiet(opts.quiet_wait_s) if load == "idle" and opts.quiet_wait_s else None
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=opts.worker_timeout_s)
    if done.returncode:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"worker threads={threads} load={load} failed ({done.returncode})")
    result = json.loads(path.read_text())
    return {**result, "load": load, "process_wall_s": round(time.perf_counter() - start, 3), "quiet_wait": quiet}


def run_all(opts: argparse.Namespace) -> dict[str, Any]:
    import psutil

    runs: list[dict[str, Any]] = []
    busy_facts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for load in opts.loads:
            busy = start_busy(opts.busy_size) if load == "busy" else None
            try:
                if busy:
                    time.sleep(opts.busy_ramp_s)  # its imports done, its threads running
                    if busy.poll() is not None:
                        raise SystemExit(f"busy process exited ({busy.returncode})")
                    handle, wall0 = psutil.Process(busy.pid), time.perf_counter()
                    cpu0 = sum(handle.cpu_times()[:2])
                for threads in opts.threads:
                    print(f"  {load} threads={threads} ...", flush=True)
                    runs.append(measure(opts, threads, tmp, load))
                    train, enc, ce = (runs[-1][k] for k in ("train", "encode", "cross_encoder"))
                    print(f"    {train['s_per_step']:.2f} s/step ({train['steps']} steps), {enc['ms_per_text']:.2f} "
                          f"ms/text, {ce['ms_per_pair']:.2f} ms/pair, machine busy {train['machine_busy_cores']:.2f} "
                          "cores", flush=True)  # fmt: skip
                if busy:
                    if busy.poll() is not None:
                        raise SystemExit(f"busy process exited during the runs ({busy.returncode})")
                    cpu = sum(handle.cpu_times()[:2]) - cpu0
                    wall = time.perf_counter() - wall0
                    busy_facts = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "cores_used": round(cpu / wall, 3)}
            finally:
                if busy:
                    stop(busy)
    return {"runs": runs, "busy_process": busy_facts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2], help="0 = torch's default")
    parser.add_argument("--loads", nargs="+", choices=["idle", "busy"], default=["idle", "busy"])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps (cut to fit --train-budget-s)")
    parser.add_argument("--train-budget-s", type=float, default=30.0, help="timed training seconds per run, about")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=48)
    parser.add_argument("--triplets", type=int, default=320)
    parser.add_argument("--texts", type=int, default=256, help="distinct queries encoded")
    parser.add_argument("--encode-batch", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=128, help="(anchor, positive) pairs the CrossEncoder scores")
    parser.add_argument("--cross-batch", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3, help="timed encode / predict passes (median)")
    parser.add_argument("--eval-budget-s", type=float, default=15.0, help="no further pass once this is spent")
    parser.add_argument(
        "--quiet-wait-s",
        type=float,
        default=30.0,
        help="before an idle run, wait up to this long for the machine to go quiet (0 = no wait)",
    )
    parser.add_argument("--busy-size", type=int, default=1024)
    parser.add_argument("--busy-ramp-s", type=float, default=5.0)
    parser.add_argument("--worker-timeout-s", type=float, default=400.0)
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="2 steps of batch 8, 32 texts, 16 pairs (a smoke test)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads-setting", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--busy", type=int, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.busy:
        busy_loop(opts.busy)
        return
    if opts.worker:
        opts.threads = opts.threads_setting
        worker(opts)
        return
    if opts.quick:
        opts.steps, opts.batch_size, opts.triplets, opts.texts, opts.pairs = 2, 8, 64, 32, 16
        opts.encode_batch, opts.cross_batch, opts.passes, opts.busy_ramp_s, opts.quiet_wait_s = 16, 8, 1, 2.0, 4.0
    at_repo_root()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: the busy process goes
    import torch

    started = time.perf_counter()
    measured = run_all(opts)
    total = time.perf_counter() - started
    runs = measured["runs"]
    figures = {"train": ("train", "s_per_step"), "encode": ("encode", "ms_per_text"),
               "cross_encoder": ("cross_encoder", "ms_per_pair")}  # fmt: skip
    fastest: dict[str, dict[str, Any]] = {}
    for load in opts.loads:
        mine = [r for r in runs if r["load"] == load]
        fastest[load] = {}
        for name, (section, key) in figures.items():
            best = min(mine, key=lambda r: r[section][key])
            fastest[load][name] = {
                "threads": best["threads_setting"], key: best[section][key],
                "others": {str(r["threads_setting"]): r[section][key] for r in mine},
            }  # fmt: skip

    def cell(load: str, threads: int, section: str, key: str, fmt: str) -> str:
        row = next((r for r in runs if r["load"] == load and r["threads_setting"] == threads), None)
        return format(row[section][key], fmt) if row else "-"

    heads = ("threads", "torch", "s/step", "ms/text", "ms/pair", "load1", "cores")
    print("\nload  " + " ".join(f"{h:>8}" for h in heads))
    for r in runs:
        print(f"{r['load']:<5} {r['threads_setting']:>8} {r['torch_threads']:>8} {r['train']['s_per_step']:>8.2f} "
              f"{r['encode']['ms_per_text']:>8.2f} {r['cross_encoder']['ms_per_pair']:>8.2f} "
              f"{r['train']['loadavg_before'][0]:>8.2f} {r['train']['machine_busy_cores']:>8.2f}")  # fmt: skip
    threads_label = " / ".join(map(str, opts.threads))
    table = []
    for load in opts.loads:
        for label, section, key, fmt in (("train s/step", "train", "s_per_step", ".2f"),
                                         ("encode ms/text", "encode", "ms_per_text", ".2f"),
                                         ("cross-encoder ms/pair", "cross_encoder", "ms_per_pair", ".2f")):  # fmt: skip
            values = " / ".join(cell(load, t, section, key, fmt) for t in opts.threads)
            table.append((f"{load}: {label}, threads {threads_label}", values))
        best = ", ".join(str(fastest[load][name]["threads"]) for name in figures)
        table.append((f"{load}: fastest threads (train, encode, cross-encoder)", best))
    table.append(("setup", f"{os.cpu_count()} CPUs, torch default {torch.get_num_threads()} threads, batch "
                           f"{opts.batch_size}, seq {opts.max_seq_length}, {total:.0f} s in all"))  # fmt: skip
    settings = {k: getattr(opts, k) for k in ("threads", "loads", "steps", "train_budget_s", "batch_size",
                                              "max_seq_length", "triplets", "texts", "encode_batch", "pairs",
                                              "cross_batch", "passes", "eval_budget_s", "quiet_wait_s", "busy_size",
                                              "busy_ramp_s")}  # fmt: skip
    finish("threads", opts.out, {
        "machine": {"cpu_count": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
                    "torch": torch.__version__, "torch_default_threads": torch.get_num_threads(),
                    "torch_default_interop_threads": torch.get_num_interop_threads(),
                    "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                                             "GOMP_SPINCOUNT")},
                    "parallel_backend": torch.__config__.parallel_info().splitlines()[-1].strip()},
        "settings": settings, "busy": BUSY, "busy_process": measured["busy_process"], "fastest": fastest,
        "runs": runs, "timing": TIMING, "total_wall_s": round(total, 1), "quick": opts.quick,
    }, table)  # fmt: skip


if __name__ == "__main__":
    main()
