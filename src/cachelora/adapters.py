"""LoRA adapter directories: wrap a base model, save with a reload check, load with a base check."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer

from cachelora.base_model import load_base, model_sha256
from cachelora.errors import CacheloraError
from cachelora.params import LoraParams
from cachelora.records import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
INFO = "training_info.json"
RELOAD_TOLERANCE = 1e-5
# How check_base words a refusal: fields adapter, info (its training_info.json), trained and trained_sha (the
# base it names), base and sha (the installed base asked for).
WRONG_BASE = "{info}: base_model.sha256: adapter was trained on {trained_sha:.12}…, installed '{base}' is {sha:.12}…"
# adapter_config.json lists that peft holds as sets (their saved order follows the hash seed): saved sorted.
SET_VALUED = ("target_modules", "exclude_modules", "modules_to_save", "target_parameters")


ATTENTION_PROJECTIONS = (
    ("query", "key", "value"),  # BERT, MiniLM
    ("q", "k", "v"),  # MPNet
    ("q_proj", "k_proj", "v_proj"),  # Llama-style encoders
    ("q_lin", "k_lin", "v_lin"),  # DistilBERT
)


def lora_targets(model: SentenceTransformer, wanted: list[str] | str) -> list[str]:
    """The modules LoRA wraps: ``auto`` picks the architecture's attention projections, ``all-linear``
    every linear layer's name; named targets must exist (an unknown one is named with the modules
    there are)."""
    modules = dict(model[0].model.named_modules())
    names = {name.rsplit(".", 1)[-1] for name in modules}
    linear = {n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    if wanted == "all-linear":
        return sorted(linear)
    if wanted == "auto":
        for family in ATTENTION_PROJECTIONS:
            if set(family) <= linear:
                return list(family)
        found = ", ".join(sorted(linear))
        raise CacheloraError(f"params.yaml: lora.target_modules: auto found no attention projections (linear: {found})")
    for target in wanted:
        if target not in names:
            known = ", ".join(sorted(n for n in names if n and not n.isdigit()))
            raise CacheloraError(f"params.yaml: lora.target_modules: '{target}' matches no module (have: {known})")
    return list(wanted)


def add_lora(model: SentenceTransformer, lora: LoraParams) -> None:
    """Wrap the model's transformer in a fresh peft LoRA on :func:`lora_targets`."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora.target_modules),
    )
    model[0].model = get_peft_model(model[0].model, config)


def read_info(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's ``training_info.json``, after checking its files are all there."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise CacheloraError(f"{adapter_dir}: adapter directory not found")
    for name in (WEIGHTS, CONFIG, INFO):
        if not (adapter_dir / name).is_file():
            raise CacheloraError(f"{adapter_dir / name}: missing from the adapter directory")
    return read_json(adapter_dir / INFO)


def check_base(adapter_dir: str | Path, base: str | None = None, refusal: str = WRONG_BASE) -> dict[str, Any]:
    """The adapter's ``training_info.json``, once the installed ``base`` (default: the base it names) has the
    weights it was trained on (same sha256); otherwise ``refusal``, filled in, is the error."""
    info = read_info(adapter_dir)
    trained = info["base_model"]
    base = base or trained["name"]
    sha = model_sha256(base)
    if sha != trained["sha256"]:
        facts = {"trained": trained["name"], "trained_sha": trained["sha256"], "base": base, "sha": sha}
        raise CacheloraError(refusal.format(adapter=adapter_dir, info=Path(adapter_dir) / INFO, **facts))
    return info


def attach_adapter(model: SentenceTransformer, adapter_dir: str | Path) -> None:
    """Load a saved adapter onto ``model`` (in place); a corrupt file is one clear error."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    try:
        peft_model = PeftModel.from_pretrained(model[0].model, str(adapter_dir))
        with safe_open(str(Path(adapter_dir) / WEIGHTS), framework="pt") as st:
            stored = set(st.keys())
    except Exception as exc:  # safetensors, json and peft all raise their own types
        detail = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        raise CacheloraError(f"{adapter_dir}: adapter does not load ({detail})") from None
    expected = set(get_peft_model_state_dict(peft_model))
    if stored != expected:  # peft only warns: its config and its weights describe different adapters
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        raise CacheloraError(
            f"{adapter_dir}: {CONFIG} and {WEIGHTS} disagree ({len(missing)} missing weights, e.g. "
            f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]})"
        )
    model[0].model = peft_model
    model.eval()


def load_adapter_model(
    adapter_dir: str | Path, device: str = "cpu", max_seq_length: int | None = None
) -> SentenceTransformer:
    """Base model + adapter; fails if the installed base differs from the one it was trained on."""
    info = check_base(adapter_dir)
    model = load_base(info["base_model"]["name"], device, max_seq_length or info.get("max_seq_length"))
    attach_adapter(model, adapter_dir)
    return model


def merged_for_serving(model: SentenceTransformer) -> SentenceTransformer:
    """The model with any peft adapter merged into the base weights, as export ships it: no LoRA
    layers left at serving time."""
    inner = model[0].model
    if hasattr(inner, "merge_and_unload"):
        model[0].model = inner.merge_and_unload()
    return model


def load_served_model(adapter_dir: str | Path, device: str = "cpu") -> SentenceTransformer:
    """:func:`load_adapter_model` with the adapter merged in: what export ships and evaluate scores."""
    return merged_for_serving(load_adapter_model(adapter_dir, device))


def canonical_config(config: dict[str, Any]) -> dict[str, Any]:
    """``adapter_config.json`` as a function of its content: set-valued lists sorted (keys are sorted on write)."""
    return {
        key: sorted(value) if key in SET_VALUED and isinstance(value, list) else value for key, value in config.items()
    }


def save_adapter(
    model: SentenceTransformer, out_dir: str | Path, base_name: str, info: dict[str, Any], probe: list[str]
) -> None:
    """Write adapter files to a temp dir, reload them onto a fresh base, compare, then rename into place.

    An interrupted or mismatching save leaves no complete-looking adapter behind. Every file is a
    function of the weights, the config and ``info``, so the same inputs give the same DVC hash.
    """
    model.eval()
    with atomic_dir(out_dir) as tmp:
        model[0].model.save_pretrained(str(tmp), save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)
        config = canonical_config(read_json(tmp / CONFIG))
        config["base_model_name_or_path"] = base_name  # not this machine's path: resolved at load time
        write_json(tmp / CONFIG, config)  # key-sorted
        write_json(tmp / INFO, info)
        reloaded = load_adapter_model(tmp, device=str(model.device), max_seq_length=model.max_seq_length)
        with torch.no_grad():
            expected = model.encode(probe, convert_to_tensor=True, normalize_embeddings=True)
            actual = reloaded.encode(probe, convert_to_tensor=True, normalize_embeddings=True)
        diff = float((expected - actual).abs().max())
        if not diff <= RELOAD_TOLERANCE:  # NaN too: a NaN weight makes every comparison false
            raise CacheloraError(f"{out_dir}: reloaded adapter differs from the trained one (max |Δ| = {diff:.2e})")
        log.info("saved %s (reload check max |Δ| = %.1e)", out_dir, diff)
