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
    ],
)
def test_invalid_values_name_the_key(tmp_path, change, message):
    with pytest.raises(CacheloraError, match=message):
        load_params(write(tmp_path, **change))


def test_unknown_domain_is_named():
    with pytest.raises(CacheloraError, match=r"domains: unknown domain 'astrology'"):
        load_params("params.yaml").check_domain("astrology")
