"""Where each artifact lives, relative to the repo root (dvc.yaml names the same paths)."""

from __future__ import annotations

from pathlib import Path

SEED_DIR = Path("data/seed")
METRICS_DIR = Path("metrics")
COST = METRICS_DIR / "cost.json"  # run-dependent timings: kept apart from eval.json
MODELS_DIR = Path("models")
PARAMS_CHECK = METRICS_DIR / "params_check.json"
# What people edit and every number depends on (git-tracked; DVC outputs under data/ are gitignored).
PIPELINE_INPUTS = ["dvc.yaml", "params.yaml", "stages", "src", "data"]


def triplets(domain: str) -> Path:
    return Path("data/triplets") / f"{domain}.jsonl"


def validated(domain: str) -> Path:
    return Path("data/validated") / f"{domain}.jsonl"


def quarantine(domain: str) -> Path:
    return Path("data/quarantine") / f"{domain}.jsonl"


def split_dir(domain: str) -> Path:
    return Path("data/splits") / domain


def split_file(domain: str, split: str) -> Path:
    return split_dir(domain) / f"{split}.jsonl"


def natural(split: str) -> Path:
    """Hand-written natural triplets: ``dev`` chooses defaults, ``test`` is only reported."""
    return Path("data/natural") / f"{split}.jsonl"


def stage_metrics(stage: str, name: str) -> Path:
    return METRICS_DIR / stage / f"{name}.json"


def model_dir(name: str) -> Path:
    return MODELS_DIR / name


def train_log(name: str) -> Path:
    """A training run's DVCLive directory: metrics.json, params.yaml, plots/metrics/{loss,lr}.tsv."""
    return METRICS_DIR / "train" / name
