"""Any sentence-transformers base trains: all-mpnet-base-v2 (offline, from its PyPI parts) through
the same train, save, reload, merge and encode code as MiniLM, with ``lora.target_modules: auto``."""

import shutil
from pathlib import Path

import pytest
import torch

from cachelora.adapters import load_adapter_model, lora_targets, save_adapter
from cachelora.base_model import load_base, resolve_base
from cachelora.errors import CacheloraError
from cachelora.merging import merge_adapters
from cachelora.records import write_jsonl
from cachelora.training import train_model
from tests.conftest import tiny_model_params, tiny_rows

MPNET = "all-mpnet-base-v2"


def on(base: str, **lora: object):
    params = tiny_model_params(epochs=0.5)
    return params.model_copy(
        update={
            "base_model": base,
            "lora": params.lora.model_copy(update={"target_modules": "auto", **lora}),
            "domains": ["medical", "law"],
            "train_models": ["medical", "law", "multi"],
        }
    )


def test_mpnet_assembles_offline_into_a_sentence_transformers_folder():
    path = Path(resolve_base(MPNET))
    assert (path / "modules.json").is_file() and (path / "model.safetensors").stat().st_size > 400e6
    assert resolve_base(MPNET) == str(path)  # unpacked once, then reused


def test_auto_and_all_linear_pick_each_architectures_layers():
    assert lora_targets(load_base("all-MiniLM-L6-v2"), "auto") == ["query", "key", "value"]
    assert lora_targets(load_base(MPNET), "auto") == ["q", "k", "v"]
    # all-linear (the default): attention projections, attention output and feed-forward layers
    assert lora_targets(load_base("all-MiniLM-L6-v2"), "all-linear") == ["dense", "key", "query", "value"]
    assert lora_targets(load_base(MPNET), "all-linear") == ["dense", "k", "o", "q", "v"]
    with pytest.raises(CacheloraError, match=r"lora.target_modules: 'query' matches no module \(have: .*\bq\b"):
        lora_targets(load_base(MPNET), ["query"])


def test_mpnet_trains_saves_reloads_and_merges(tmp_path):
    train = tmp_path / "train.jsonl"
    write_jsonl(train, tiny_rows(16))
    params = on(MPNET)
    trained = train_model("medical", params, [train])
    save_adapter(trained.model, tmp_path / "medical", MPNET, trained.info, trained.probe)
    config = (tmp_path / "medical" / "adapter_config.json").read_text()
    assert '"target_modules": [\n    "k",\n    "q",\n    "v"\n  ]' in config
    reloaded = load_adapter_model(tmp_path / "medical")
    vector = reloaded.encode(["how long does a knee replacement last"], convert_to_tensor=True)
    assert vector.shape == (1, 768) and torch.isfinite(vector).all()
    shutil.copytree(tmp_path / "medical", tmp_path / "law")
    merged, _ = merge_adapters(params, {"medical": tmp_path / "medical", "law": tmp_path / "law"})
    assert merged.encode(["is ibuprofen safe"], convert_to_tensor=True).shape == (1, 768)
