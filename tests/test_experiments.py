"""Sweeps through DVC's own queue: two queued experiments run in parallel (`dvc queue start -j 2`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from subprocess import DEVNULL

import pytest
import yaml

from tests.test_pipeline import REPO, TINY, run, set_params, shrink_natural, shrink_traffic

pytestmark = pytest.mark.slow
TARGET = "train@medical"  # one adapter: the queue re-runs only it, its inputs come from the cache


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HEAD's tree (a queued experiment runs a commit, never the working tree) as a fresh git repo with
    tiny params."""
    root = tmp_path_factory.mktemp("repo")
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=REPO, capture_output=True, check=True).stdout
    # tar, not tarfile: extractall's filter= is missing from Python 3.11 before 3.11.4 (Debian's 3.11.2)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    (root / "dvc.lock").unlink(missing_ok=True)
    set_params(root, TINY)
    shrink_natural(root)
    shrink_traffic(root)
    # 1 torch thread per experiment: 2 workers on 2 cores at torch's default (2 threads each) oversubscribe
    # the cores and ran ~60x slower (0.6 triplets/s against 34).
    set_params(root, {"train": {"threads": 1}, "evaluate": {"threads": 1}})
    params = yaml.safe_load((root / "params.yaml").read_text())  # one domain: a quarter of the stages
    params.update(domains=["medical"], train_models=["medical", "multi"])
    params["train_data"] = {"medical": "data/splits/medical", "multi": "data/splits"}
    params["merge"]["weights"] = None
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc_yaml = (root / "dvc.yaml").read_text().splitlines(keepends=True)  # merge and evaluate: medical's model only
    others = ("- models/law\n", "- models/programming\n", "- models/psychology\n")
    (root / "dvc.yaml").write_text("".join(line for line in dvc_yaml if not line.lstrip().endswith(others)))
    run(root, "git", "init", "-q")
    commit(root, "tiny")
    return root


def commit(root: Path, message: str) -> None:
    run(root, "git", "add", "-A")
    run(root, "git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", message)


def wait_for_queue(root: Path, timeout: float = 600) -> tuple[str, int]:
    """`dvc queue status` once nothing is queued or running, and the most experiments seen running at once."""
    deadline, most = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        status = run(root, "dvc", "queue", "status").stdout
        most = max(most, status.count("Running"))
        if not any(word in status for word in ("Queued", "Running")):
            return status, most
        time.sleep(1)
    raise AssertionError(f"queue still busy after {timeout} s:\n{status}")


def test_queued_experiments_run_in_parallel_and_differ(repo):
    run(repo, "dvc", "repro", TARGET)
    commit(repo, "tiny, trained once")  # queued experiments start from the commit: dvc.lock included

    for rank in (2, 4):
        run(repo, "dvc", "exp", "run", "--queue", "-n", f"rank{rank}", "-S", f"lora.rank={rank}", TARGET)
    assert run(repo, "dvc", "queue", "status").stdout.count("Queued") == 2
    # The workers outlive `dvc queue start`: with no pipe to hold open, it returns at once.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env |= {"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=repo, env=env, check=True, stdout=DEVNULL, stderr=DEVNULL)
    status, most = wait_for_queue(repo)
    assert status.count("Success") == 2, status
    assert most == 2  # both ran at once

    shown = json.loads(run(repo, "dvc", "exp", "show", "--json").stdout)
    found = {}
    for commit_entry in shown:
        for exp in commit_entry.get("experiments") or []:
            (revision,) = exp["revs"]
            data = revision["data"]
            metrics = data["metrics"]["metrics/train/medical/metrics.json"]["data"]  # its DVCLive summary
            found[exp["name"]] = (data["params"]["params.yaml"]["data"]["lora"]["rank"], metrics)
    assert {name: rank for name, (rank, _) in found.items()} == {"rank2": 2, "rank4": 4}
    losses = {name: m["loss"] for name, (_, m) in found.items()}
    assert losses["rank2"] != losses["rank4"], losses
    steps = {name: m["step"] for name, (_, m) in found.items()}
    assert steps["rank2"] == steps["rank4"] > 0


def test_an_experiment_on_another_base_trains_merges_and_evaluates(repo):
    """`dvc exp run -S base_model=all-mpnet-base-v2`, nothing else changed: lora.target_modules all-linear
    picks MPNet's linear layers (q/k/v/o, dense), and every stage from validate on runs on the 768-d model."""
    run(repo, "dvc", "repro")
    commit(repo, "tiny, every stage")
    exp = run(repo, "dvc", "exp", "run", "-S", "base_model=all-mpnet-base-v2")
    ran = {line.split("'")[1] for line in exp.stdout.splitlines() if line.startswith("Running stage")}
    assert {"validate@medical", "train@medical", "train@multi", "merge", "evaluate", "report"} <= ran, ran
    for name in ("medical", "multi", "merged"):
        config = json.loads((repo / f"models/{name}/adapter_config.json").read_text())
        assert sorted(config["target_modules"]) == ["dense", "k", "o", "q", "v"], (name, config["target_modules"])
    info = json.loads((repo / "models/multi/training_info.json").read_text())
    assert info["base_model"]["name"] == "all-mpnet-base-v2"
    metrics = json.loads((repo / "metrics/eval.json").read_text())
    assert {"baseline", "medical", "multi", "merged", "deploy"} <= set(metrics)
    cost = json.loads((repo / "metrics/cost.json").read_text())
    assert cost["models"]["baseline"]["parameters"] > 100_000_000  # mpnet's 109 M, against MiniLM's 23 M
