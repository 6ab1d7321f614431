import shutil

import pytest
import torch

from cachelora.errors import CacheloraError
from cachelora.merging import merge_adapters
from tests.conftest import tiny_model_params

TIGHT = 1e-6  # float32 rounding of the same update computed two ways


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


def test_linear_of_identical_adapters_with_quarter_weights_reproduces_one(sources):
    from cachelora.adapters import load_adapter_model
    from cachelora.base_model import load_base

    text = ["symptoms of asthma in children"]
    single = torch.tensor(load_adapter_model(sources["medical"]).encode(text))
    # peft's linear scales A and B each by sqrt(weight * scaling) and sums them, so two copies of one
    # adapter give (sqrt(w1) + sqrt(w2))**2 times its update: 0.25 and 0.25 give it exactly once.
    merged, _ = merge_adapters(params("linear", weights=[0.25, 0.25]), sources)
    assert torch.allclose(torch.tensor(merged.encode(text)), single, atol=TIGHT)
    # Other weights give another update, so the check above sees weights that are ignored or misapplied.
    half, _ = merge_adapters(params("linear", weights=[0.5, 0.5]), sources)
    base = torch.tensor(load_base("all-MiniLM-L6-v2").encode(text))
    assert (torch.tensor(half.encode(text)) - single).abs().max() > 100 * TIGHT
    assert (base - single).abs().max() > 100 * TIGHT


def test_random_method_is_seeded(sources):
    first, _ = merge_adapters(params("dare_linear", seed=5), sources)
    second, _ = merge_adapters(params("dare_linear", seed=5), sources)
    text = ["how is migraine treated"]
    assert (first.encode(text) == second.encode(text)).all()
    other, _ = merge_adapters(params("dare_linear", seed=6), sources)
    assert (first.encode(text) != other.encode(text)).any()


def test_adapters_on_another_base_are_refused(sources):
    import json

    info_path = sources["law"] / "training_info.json"
    info = json.loads(info_path.read_text())
    info["base_model"]["sha256"] = "f" * 64
    info_path.write_text(json.dumps(info))
    with pytest.raises(CacheloraError, match=r"law: trained on another base model"):
        merge_adapters(params("cat"), sources)
