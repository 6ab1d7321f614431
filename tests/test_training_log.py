"""A training run's DVCLive log: every step's loss and lr, the last loss for `dvc exp show`, and the
settings the run resolved."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from cachelora import paths
from cachelora.records import write_jsonl
from cachelora.training import train_model
from cachelora.training_log import training_log
from tests.conftest import tiny_model_params, tiny_rows


def read_tsv(path):
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def test_each_step_reaches_the_dvclive_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", tiny_rows(24))
    with training_log("medical") as log:
        trained = train_model("medical", tiny_model_params(), [tmp_path / "train.jsonl"], step_log=log)
    folder = paths.train_log("medical")
    losses = read_tsv(folder / "plots/metrics/loss.tsv")
    assert [float(r["loss"]) for r in losses] == pytest.approx([h["loss"] for h in trained.history], abs=1e-6)
    assert [float(r["lr"]) for r in read_tsv(folder / "plots/metrics/lr.tsv")] == pytest.approx(
        [h["lr"] for h in trained.history]
    )
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["loss"] == pytest.approx(trained.history[-1]["loss"], abs=1e-6)
    settings = yaml.safe_load((folder / "params.yaml").read_text())
    assert settings == {
        "device": "cpu",
        "precision": "fp32",
        "threads": trained.run["threads"],
        "steps": len(trained.history),
    }
    assert not (tmp_path / "dvc.yaml").exists()  # dvc.yaml declares the log: DVCLive does not write one


def test_a_rank_that_does_not_write_gets_no_log(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with training_log("medical", write=False) as log:
        assert log is None
    assert not paths.train_log("medical").exists()
