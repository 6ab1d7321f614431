"""Pipeline wall time: `dvc repro` from scratch in a temp copy of the repo, then a no-op `dvc repro`.

A sampler thread walks the dvc process's descendants every --interval seconds and keeps, per stage
(`stages/<x>.py --domain/--name <y>` -> `<x>@<y>`), the highest VmHWM (peak resident set, from
/proc/<pid>/status; psutil's current RSS where /proc is missing) and the wall time from the stage
process's start to its last sample. A stage's peak is exact up to its last sample, so only a final
spike shorter than the interval can be missed.

``--set section.key=value`` overrides params.yaml in the copy (e.g. ``train.threads=1``). Every
output whose md5 differs from the repo's own dvc.lock is listed (``outputs_differing``): with the
default params, only files that hold timings may differ.
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


REPORT_INPUTS = {  # the report cites them
    "benchmarks/results/ablation.json",
    "benchmarks/results/ablation_verifier.json",
    "benchmarks/results/reference.json",
}


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


def sample(
    pid: int, peaks: dict[str, int], spans: dict[str, list[float]], stop: threading.Event, interval: float
) -> None:
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
                    spans[stage] = [spans.get(stage, [child.create_time()])[0], time.time()]
            except (psutil.Error, OSError):
                continue


def repro(root: Path, target: list[str], interval: float) -> tuple[float, dict[str, int], dict[str, float]]:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    peaks: dict[str, int] = {}
    spans: dict[str, list[float]] = {}
    stop = threading.Event()
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro", *target], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    sampler = threading.Thread(target=sample, args=(proc.pid, peaks, spans, stop, interval), daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"dvc repro {' '.join(target)} failed ({proc.returncode}):\n{output[-4000:]}")
    return wall, peaks, {stage: round(end - begin, 1) for stage, (begin, end) in spans.items()}


def set_params(root: Path, settings: list[str]) -> None:
    """Apply ``section.key=value`` overrides (the value read as YAML) to the copy's params.yaml."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    for setting in settings:
        key, _, value = setting.partition("=")
        *sections, last = key.split(".")
        node = params
        for section in sections:
            node = node[section]
        if last not in node:
            sys.exit(f"--set {setting}: params.yaml has no key {key}")
        node[last] = yaml.safe_load(value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def output_md5s(lock: Path) -> dict[str, str]:
    """Every stage output's md5 in a dvc.lock (path -> md5)."""
    stages = yaml.safe_load(lock.read_text()).get("stages", {}) if lock.is_file() else {}
    return {out["path"]: out.get("md5", "") for stage in stages.values() for out in stage.get("outs", [])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny params (as tests/test_pipeline.py)")
    parser.add_argument("--target", nargs="*", default=[], help="dvc repro targets (default: the whole pipeline)")
    parser.add_argument("--interval", type=float, default=0.2, help="RSS sampling period, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp copy (its path is printed)")
    parser.add_argument("--set", nargs="*", default=[], help="params.yaml overrides in the copy: section.key=value")
    parser.add_argument("--out")
    opts = parser.parse_args()
    at_repo_root()
    root = Path(tempfile.mkdtemp(prefix="cachelora-bench-"))
    try:
        copy_repo(root, opts.quick)
        set_params(root, opts.set)
        scratch, peaks, stage_s = repro(root, opts.target, opts.interval)
        noop, _, _ = repro(root, opts.target, opts.interval)
        ours, theirs = output_md5s(REPO / "dvc.lock"), output_md5s(root / "dvc.lock")
        compared = [p for p in theirs if p in ours]
        differing = sorted(p for p in compared if ours[p] != theirs[p])
    finally:
        if opts.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    heaviest = max(peaks, key=peaks.__getitem__) if peaks else None
    mib = {stage: round(kib / 1024, 1) for stage, kib in sorted(peaks.items())}
    finish("pipeline", opts.out, {
        "repro_from_scratch_s": scratch, "repro_noop_s": noop, "peak_rss_mib_by_stage": mib,
        "heaviest_stage": heaviest, "stage_wall_s": dict(sorted(stage_s.items())),
        "stage_wall_s_sum": round(sum(stage_s.values()), 1), "param_overrides": opts.set,
        "outputs_compared": len(compared), "outputs_differing": differing,
        "targets": opts.target or "all", "params": "tiny (tests)" if opts.quick
        else "params.yaml defaults", "tiny_overrides": TINY if opts.quick else None, "sample_interval_s": opts.interval,
        "rss_method": "max VmHWM of each stage process over samples (psutil RSS where /proc is absent)",
        "cpu_count": os.cpu_count(), "quick": opts.quick,
    }, [
        ("dvc repro from scratch", f"{scratch:.1f} s"),
        ("dvc repro no-op", f"{noop:.1f} s"),
        ("peak RSS, heaviest stage", f"{mib[heaviest]:.0f} MiB ({heaviest})" if heaviest else "n/a"),
        ("outputs differing from dvc.lock", f"{len(differing)} of {len(compared)}"),
        ("scope", f"{' '.join(opts.target) or 'all stages'}, {'tiny params' if opts.quick else 'default params'}"
                  f"{', ' + ' '.join(opts.set) if opts.set else ''}"),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
