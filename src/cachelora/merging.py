"""One multi-domain adapter from the per-domain ones, with peft's add_weighted_adapter."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer

from cachelora import paths
from cachelora.adapters import WEIGHTS, check_base
from cachelora.base_model import load_base, model_sha256
from cachelora.errors import CacheloraError
from cachelora.params import MERGED, Params
from cachelora.records import file_md5

log = logging.getLogger(__name__)


def merge_adapters(
    params: Params, sources: dict[str, Path] | None = None
) -> tuple[SentenceTransformer, dict[str, Any]]:
    """Load every domain adapter onto one base model and combine them into the active adapter."""
    from peft import PeftModel

    sources = sources or {domain: paths.model_dir(domain) for domain in params.domains}
    refusal = "{adapter}: trained on another base model than '{base}'"
    infos = {name: check_base(path, params.base_model, refusal) for name, path in sources.items()}
    sha = model_sha256(params.base_model)
    names = list(sources)
    weights = list(params.merge.weights or [1.0] * len(names))
    seq_len = max(info.get("max_seq_length", params.train.max_seq_length) for info in infos.values())
    model = load_base(params.base_model, "cpu", seq_len)
    peft_model = PeftModel.from_pretrained(model[0].model, str(sources[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(str(sources[name]), adapter_name=name)
    torch.manual_seed(params.merge.seed)
    kwargs: dict[str, Any] = {}
    if params.merge.method not in ("cat", "linear", "svd"):
        kwargs["density"] = params.merge.density
    log.info("merge %s with %s, weights %s", names, params.merge.method, weights)
    try:
        # The merged adapter is named "default" so that it saves as a plain adapter directory.
        peft_model.add_weighted_adapter(names, weights, "default", combination_type=params.merge.method, **kwargs)
    except ValueError as exc:
        method = params.merge.method
        raise CacheloraError(f"params.yaml: merge.method: '{method}' cannot merge these adapters ({exc})") from None
    peft_model.set_adapter("default")
    for name in names:
        peft_model.delete_adapter(name)
    model[0].model = peft_model
    model.eval()
    info = {
        "name": MERGED,
        "base_model": {"name": params.base_model, "sha256": sha},
        "params": {"merge": params.merge.model_dump(), "weights": dict(zip(names, weights, strict=True))},
        "sources": {name: file_md5(Path(path) / WEIGHTS) for name, path in sources.items()},
        "max_seq_length": seq_len,
        "rank": peft_model.peft_config["default"].r,
    }
    return model, info
