"""Shared fixtures: a tiny lexicon, tiny params, and a temp working directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cachelora.params import Params

TINY_LEXICON = {
    "domain": "medical",
    "topics": [
        {"name": "hypertension", "aliases": ["high blood pressure"], "group": "heart"},
        {"name": "heart failure", "group": "heart"},
        {"name": "asthma", "aliases": ["bronchial asthma"], "group": "lungs"},
        {"name": "pneumonia", "group": "lungs"},
        {"name": "migraine", "group": "brain"},
        {"name": "epilepsy", "aliases": ["seizure disorder"], "group": "brain"},
    ],
    "aspects": {
        "symptoms": {"templates": ["What are the symptoms of {topic}?", "how do i know if i have {topic}",
                                   "{topic} warning signs in adults"]},
        "treatment": {"templates": ["How is {topic} treated?", "best treatment options for {topic}",
                                    "what do doctors prescribe for {topic}"]},
        "causes": {"templates": ["What causes {topic}?", "why do people get {topic}",
                                 "main causes of {topic} explained"]},
    },
}


def tiny_params(**overrides: object) -> Params:
    """Params for one tiny domain; ``overrides`` replace top-level sections."""
    raw: dict = {
        "domains": ["medical"],
        "train_models": ["medical", "multi"],
        "generate": {"seed": 1, "triplets_per_domain": 60, "sibling_negative_fraction": 0.25},
        "validate": {"min_rows": 10, "max_bad_fraction": 0.2},
        "split": {"seed": 1, "train": 0.6, "val": 0.2, "test": 0.2},
    }
    raw.update(overrides)
    return Params.model_validate(raw)


@pytest.fixture
def seed_dir(tmp_path: Path) -> Path:
    """A data/seed folder holding the tiny medical lexicon."""
    folder = tmp_path / "data" / "seed"
    folder.mkdir(parents=True)
    (folder / "medical.yaml").write_text(yaml.safe_dump(TINY_LEXICON), encoding="utf-8")
    return folder
