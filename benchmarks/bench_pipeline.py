"""Pipeline wall time: `dvc repro` from scratch in a temp copy of the repo, then a no-op `dvc repro`.

A sampler thread walks the dvc process's descendants every --interval seconds and keeps, per stage
(`stages/<x>.py --domain/--name <y>` -> `<x>@<y>`), the highest VmHWM (peak resident set, from
/proc/<pid>/status; psutil's current RSS where /proc is missing). A stage's peak is exact up to its
last sample, so only a final spike shorter than the interval can be missed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from _common import REPO, at_repo_root, finish

TINY = {  # the overrides tests/test_pipeline.py uses
    "generate": {"triplets_per_domain": 40},
    "validate": {"min_rows": 10, "max_bad_fraction": 0.25},
    "train": {"batch_size": 8, "max_seq_length": 24, "epochs": 1, "lr": 1e-3, "device": "cpu"},
    "lora": {"rank": 4, "alpha": 8},
    "evaluate": {"bootstrap": 100},
}
STAGE = re.compile(r"stages/(\w+)\.py(?:\s+--(?:domain|name)[ =](\S+))?")


REPORT_INPUTS = {"benchmarks/results/ablation.json"}  # the report stage cites it


def copy_repo(root: Path, tiny: bool) -> None:
    """The tracked and unignored files (benchmarks/ left out but for what the report cites), without
    dvc.lock, as a fresh git repo."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    for name in filter(None, listed.split("\0")):
        if (REPO / name).is_file() and (not name.startswith("benchmarks/") or name in REPORT_INPUTS):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    (root / "dvc.lock").unlink(missing_ok=True)
    if tiny:
        params = yaml.safe_load((root / "params.yaml").read_text())
        for section, values in TINY.items():
            params[section].update(values)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.email=bench@localhost", "-c", "user.name=bench"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark copy"]):
        subprocess.run([*git, *args], cwd=root, check=True)


def peak_kib(proc: psutil.Process) -> int:
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1))
    except (OSError, AttributeError):
        return proc.memory_info().rss // 1024


def sample(pid: int, peaks: dict[str, int], stop: threading.Event, interval: float) -> None:
    root = psutil.Process(pid)
    while not stop.wait(interval):
        try:
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                match = STAGE.search(" ".join(child.cmdline()))
                if match:
                    stage = "@".join(filter(None, match.groups()))
                    peaks[stage] = max(peaks.get(stage, 0), peak_kib(child))
            except (psutil.Error, OSError):
                continue


def repro(root: Path, target: list[str], interval: float) -> tuple[float, dict[str, int]]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    peaks: dict[str, int] = {}
    stop = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro", *target], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    sampler = threading.Thread(target=sample, args=(proc.pid, peaks, stop, interval), daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"dvc repro {' '.join(target)} failed ({proc.returncode}):\n{output[-4000:]}")
    return wall, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny params (as tests/test_pipeline.py)")
    parser.add_argument("--target", nargs="*", default=[], help="dvc repro targets (default: the whole pipeline)")
    parser.add_argument("--interval", type=float, default=0.2, help="RSS sampling period, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp copy (its path is printed)")
    parser.add_argument("--out")
    opts = parser.parse_args()
    at_repo_root()
    root = Path(tempfile.mkdtemp(prefix="cachelora-bench-"))
    try:
        copy_repo(root, opts.quick)
        scratch, peaks = repro(root, opts.target, opts.interval)
        noop, _ = repro(root, opts.target, opts.interval)
    finally:
        if opts.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    heaviest = max(peaks, key=peaks.__getitem__) if peaks else None
    mib = {stage: round(kib / 1024, 1) for stage, kib in sorted(peaks.items())}
    finish("pipeline", opts.out, {
        "repro_from_scratch_s": scratch, "repro_noop_s": noop, "peak_rss_mib_by_stage": mib,
        "heaviest_stage": heaviest, "targets": opts.target or "all", "params": "tiny (tests)" if opts.quick
        else "params.yaml defaults", "tiny_overrides": TINY if opts.quick else None, "sample_interval_s": opts.interval,
        "rss_method": "max VmHWM of each stage process over samples (psutil RSS where /proc is absent)",
        "cpu_count": os.cpu_count(), "quick": opts.quick,
    }, [
        ("dvc repro from scratch", f"{scratch:.1f} s"),
        ("dvc repro no-op", f"{noop:.1f} s"),
        ("peak RSS, heaviest stage", f"{mib[heaviest]:.0f} MiB ({heaviest})" if heaviest else "n/a"),
        ("scope", f"{' '.join(opts.target) or 'all stages'}, {'tiny params' if opts.quick else 'default params'}"),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
