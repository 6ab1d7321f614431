"""A standalone serving model: the LoRA merged into the base weights, plus the cache settings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cachelora import paths
from cachelora.adapters import load_adapter_model, read_info
from cachelora.errors import CacheloraError
from cachelora.records import atomic_dir, file_sha256, read_json, write_json

log = logging.getLogger(__name__)

CACHE_CONFIG = "cache_config.json"


def recommended_threshold(eval_metrics: dict[str, Any], model: str) -> dict[str, Any]:
    """The mean of the per-domain max-F1 thresholds (chosen on val), with val/test precision and recall."""
    from cachelora.evaluation import domain_entries

    domains = {d: m["at_max_f1"] for d, m in domain_entries(eval_metrics, model).items()}
    if not domains:
        raise CacheloraError(f"{paths.METRICS_DIR / 'eval.json'}: no metrics for model '{model}'")
    mean = lambda key: round(sum(d[key] for d in domains.values()) / len(domains), 6)  # noqa: E731
    return {
        "threshold": mean("threshold"),
        "chosen_on": "val (max F1 per domain, averaged)",
        "val_precision": mean("val_precision"),
        "val_recall": mean("val_recall"),
        "test_precision": mean("precision"),
        "test_recall": mean("recall"),
        "per_domain": {
            d: {k: m[k] for k in ("threshold", "val_precision", "val_recall", "precision", "recall")}
            for d, m in domains.items()
        },
    }


def _pooling(model: Any) -> str | None:
    """The Pooling module's mode(s), e.g. ``mean``; None when the model has no Pooling module."""
    for module in model:
        if type(module).__name__ == "Pooling":
            mode = module.pooling_mode
            return mode if isinstance(mode, str) else "+".join(mode)
    return None


def export_model(model_name: str, out: Path, eval_path: Path = paths.METRICS_DIR / "eval.json") -> dict[str, Any]:
    """Merge ``models/<model_name>`` into its base and save a model that loads without peft."""
    adapter = paths.model_dir(model_name)
    info = read_info(adapter)
    threshold = recommended_threshold(read_json(eval_path), model_name)
    model = load_adapter_model(adapter)
    model[0].model = model[0].model.merge_and_unload()
    with atomic_dir(out) as tmp:
        model.save(str(tmp))
        modules = [type(m).__name__ for m in model]
        config = {
            "model": model_name,
            "base_model": info["base_model"],
            "adapter_sha256": file_sha256(adapter / "adapter_model.safetensors"),
            "pooling": _pooling(model),
            "normalize": "Normalize" in modules,
            "dimension": model.get_embedding_dimension(),
            "max_seq_length": model.max_seq_length,
            "similarity": "cosine",
            "recommended_threshold": threshold,
            "checksums": {p.relative_to(tmp).as_posix(): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        write_json(tmp / CACHE_CONFIG, config)
    log.info("exported %s to %s (threshold %.3f)", model_name, out, threshold["threshold"])
    return config
