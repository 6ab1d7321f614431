import json
import shutil

import numpy as np
import pytest

from cachelora.adapters import (
    CONFIG,
    INFO,
    WEIGHTS,
    canonical_config,
    load_adapter_model,
    load_served_model,
    read_info,
    save_adapter,
)
from cachelora.errors import CacheloraError


def copy(adapter, tmp_path):
    return shutil.copytree(adapter, tmp_path / "adapter")


def test_saved_adapter_has_its_files_and_a_portable_config(tiny_adapter):
    assert sorted(p.name for p in tiny_adapter.iterdir()) == sorted([WEIGHTS, CONFIG, INFO])
    config = json.loads((tiny_adapter / CONFIG).read_text())
    assert config["base_model_name_or_path"] == "all-MiniLM-L6-v2"
    assert config["r"] == 4
    assert read_info(tiny_adapter)["base_model"]["name"] == "all-MiniLM-L6-v2"


def test_config_lists_that_peft_keeps_as_sets_are_saved_sorted(tiny_adapter):
    """peft saves target_modules in set order, which follows the hash seed; the saved file does not."""
    config = json.loads((tiny_adapter / CONFIG).read_text())
    assert config["target_modules"] == ["query", "value"]
    assert list(config) == sorted(config)
    shuffled = {"target_modules": ["value", "query"], "exclude_modules": ["b", "a"], "layer_replication": [[4, 2]]}
    assert canonical_config(shuffled) == {
        "target_modules": ["query", "value"],
        "exclude_modules": ["a", "b"],
        "layer_replication": [[4, 2]],  # an ordered list stays as it is
    }


def test_reloaded_adapter_changes_embeddings(tiny_adapter):
    from cachelora.base_model import load_base

    text = ["what are the symptoms of asthma"]
    tuned = load_adapter_model(tiny_adapter).encode(text)
    base = load_base("all-MiniLM-L6-v2").encode(text)
    assert abs(tuned - base).max() > 1e-4


def test_missing_adapter_dir_and_missing_file(tiny_adapter, tmp_path):
    with pytest.raises(CacheloraError, match=r"nowhere: adapter directory not found"):
        read_info(tmp_path / "nowhere")
    broken = copy(tiny_adapter, tmp_path)
    (broken / WEIGHTS).unlink()
    with pytest.raises(CacheloraError, match=r"adapter_model.safetensors: missing from the adapter directory"):
        load_adapter_model(broken)


def test_corrupt_weights_are_one_clear_error(tiny_adapter, tmp_path):
    broken = copy(tiny_adapter, tmp_path)
    data = (broken / WEIGHTS).read_bytes()
    (broken / WEIGHTS).write_bytes(data[:-6])
    with pytest.raises(CacheloraError, match=r"adapter does not load"):
        load_adapter_model(broken)


def test_adapter_for_another_base_is_refused(tiny_adapter, tmp_path):
    other = copy(tiny_adapter, tmp_path)
    info = json.loads((other / INFO).read_text())
    info["base_model"]["sha256"] = "0" * 64
    (other / INFO).write_text(json.dumps(info))
    with pytest.raises(CacheloraError, match=r"training_info.json: base_model.sha256: adapter was trained on 000000"):
        load_adapter_model(other)


def test_failed_reload_check_leaves_no_adapter(tiny_adapter, tmp_path, monkeypatch):
    import cachelora.adapters as adapters

    model = load_adapter_model(tiny_adapter)
    monkeypatch.setattr(adapters, "RELOAD_TOLERANCE", -1.0)  # every comparison now "differs"
    with pytest.raises(CacheloraError, match=r"reloaded adapter differs"):
        save_adapter(model, tmp_path / "out", "all-MiniLM-L6-v2", read_info(tiny_adapter), ["a probe"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("targets", [["query"], ["query", "value", "key"]])
def test_config_that_disagrees_with_the_weights_is_an_error(tiny_adapter, tmp_path, targets):
    """peft only warns about missing or unused adapter keys; evaluating such an adapter would give wrong numbers."""
    adapter = copy(tiny_adapter, tmp_path)
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**config, "target_modules": targets}))
    with pytest.raises(CacheloraError, match=r"adapter_config.json and adapter_model.safetensors disagree"):
        load_adapter_model(adapter)


def test_config_of_another_rank_is_an_error(tiny_adapter, tmp_path):
    adapter = copy(tiny_adapter, tmp_path)
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(CacheloraError, match=r"adapter does not load \(RuntimeError"):
        load_adapter_model(adapter)


def test_the_served_model_is_the_adapter_merged_in_with_the_same_embeddings(tiny_adapter):
    """What evaluate scores and export ships: no peft layer left, embeddings as base + adapter."""
    text = ["how long does recovery take after knee surgery", "is it safe to drive after a concussion"]
    served = load_served_model(tiny_adapter)
    assert not hasattr(served[0].model, "peft_config")
    assert np.allclose(served.encode(text), load_adapter_model(tiny_adapter).encode(text), atol=1e-5)
