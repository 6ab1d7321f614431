import shutil

import pytest
import torch

from cachelora.errors import CacheloraError
from cachelora.merging import merge_adapters
from tests.conftest import tiny_model_params


def params(method, **extra):
    base = tiny_model_params()
    return base.model_copy(
        update={
            "domains": ["medical", "law"],
            "train_models": ["medical", "law", "multi"],
            "merge": base.merge.model_copy(update={"method": method, **extra}),
        }
    )


@pytest.fixture
def sources(tiny_adapter, tmp_path):
    # the second "domain" is a copy: enough to check the merge mechanics
    return {"medical": tiny_adapter, "law": shutil.copytree(tiny_adapter, tmp_path / "law")}


def test_cat_sums_ranks(sources):
    model, info = merge_adapters(params("cat"), sources)
    assert info["rank"] == 8 and set(info["sources"]) == {"medical", "law"}
    assert list(model[0].model.peft_config) == ["default"]


def test_linear_of_identical_adapters_with_half_weights_reproduces_one(sources):
    from cachelora.adapters import load_adapter_model

    merged, _ = merge_adapters(params("linear", weights=[0.5, 0.5]), sources)
    single = load_adapter_model(sources["medical"])
    text = ["symptoms of asthma in children"]
    # linear averages A and B separately: 0.5A+0.5A = A, so the product matches one adapter up to scaling
    assert torch.allclose(torch.tensor(merged.encode(text)), torch.tensor(single.encode(text)), atol=0.05)


def test_random_method_is_seeded(sources):
    first, _ = merge_adapters(params("dare_linear", seed=5), sources)
    second, _ = merge_adapters(params("dare_linear", seed=5), sources)
    text = ["how is migraine treated"]
    assert (first.encode(text) == second.encode(text)).all()


def test_adapters_on_another_base_are_refused(sources):
    import json

    info_path = sources["law"] / "training_info.json"
    info = json.loads(info_path.read_text())
    info["base_model"]["sha256"] = "f" * 64
    info_path.write_text(json.dumps(info))
    with pytest.raises(CacheloraError, match=r"law: trained on another base model"):
        merge_adapters(params("cat"), sources)
