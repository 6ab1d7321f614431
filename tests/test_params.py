from pathlib import Path

import pytest
import yaml

from cachelora.errors import CacheloraError
from cachelora.params import load_params


def write(tmp_path, **changes):
    raw = yaml.safe_load(Path("params.yaml").read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repo_params_load():
    params = load_params("params.yaml")
    assert params.train_models == [*params.domains, "multi"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"generate__sibling_negative_fraction": -0.1}, r"generate.sibling_negative_fraction: .*greater than or equal"),
        ({"split__train": 0.9}, r"split: .*must sum to 1"),
        ({"generate__backend": "magic"}, r"generate.backend: Input should be 'offline' or 'openai'"),
        ({"train_models": ["medical", "multi"]}, r"train_models must be the domains followed by 'multi'"),
        ({"split__tset": 0.1}, r"split.tset: Extra inputs are not permitted"),
        ({"lora__rank": 0}, r"lora.rank: Input should be greater than 0"),
        ({"train__lr": -1e-4}, r"train.lr: Input should be greater than 0"),
        ({"merge__method": "average"}, r"merge.method: Input should be 'cat', 'linear'"),
        ({"merge__weights": [1.0]}, r"merge.weights: need one weight per domain \(4\)"),
        ({"lora__rank": True}, r"lora.rank: Input should be a valid integer"),
        ({"train__epochs": "3"}, r"train.epochs: Input should be a valid number"),
        ({"train__lr": float("inf")}, r"train.lr: Input should be a finite number"),
        ({"train__epochs": float("inf")}, r"train.epochs: Input should be a finite number"),
        ({"lora__alpha": float("inf")}, r"lora.alpha: Input should be a finite number"),
        ({"merge__weights": [0.35, float("nan"), 0.35, 0.35]}, r"merge.weights.1: Input should be a finite number"),
        ({"evaluate__seed": -1}, r"evaluate.seed: Input should be greater than or equal to 0"),
        ({"verifier__seed": -1}, r"verifier.seed: Input should be greater than or equal to 0"),
    ],
)
def test_invalid_values_name_the_key(tmp_path, change, message):
    with pytest.raises(CacheloraError, match=message):
        load_params(write(tmp_path, **change))


def test_unknown_domain_is_named():
    with pytest.raises(CacheloraError, match=r"domains: unknown domain 'astrology'"):
        load_params("params.yaml").check_domain("astrology")


def test_a_key_given_twice_is_refused(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(Path("params.yaml").read_text() + "\nlora:\n  rank: 4\n")
    with pytest.raises(CacheloraError, match=r"params.yaml: malformed YAML .*key 'lora' appears twice"):
        load_params(path)
