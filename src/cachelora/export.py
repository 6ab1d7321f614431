"""A standalone serving model: the LoRA merged into the base weights, plus the cache settings."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from cachelora import paths
from cachelora.adapters import WEIGHTS, load_served_model, read_info
from cachelora.errors import CacheloraError
from cachelora.records import atomic_dir, file_sha256, read_json, write_json, write_text

log = logging.getLogger(__name__)

CACHE_CONFIG = "cache_config.json"
MODEL_CARD = "README.md"


SEMANTIC_ROUTER_CONFIG = "semantic_router.yaml"
VERIFIER_DIR = "verifier"  # the verifier's folder inside an export
FIGURES = ("hit_rate", "hit_precision", "false_hit_rate")
SETS = ("val", "test", "natural_test")
CALIBRATED_SETS = ("test", "natural_dev", "natural_test")  # natural dev: where they were calibrated (in-sample)


def shipped_thresholds(eval_metrics: dict[str, Any], model: str) -> dict[str, Any]:
    """The thresholds the model ships (global and per domain) with the cache-replay figures measured at
    exactly those thresholds: its natural-dev calibrated ones, each with its guarantee (a one-sided 95 %
    Clopper-Pearson lower bound on hit precision) and the figures on the generated test split, natural
    dev (in-sample) and natural test; or, where natural dev was not scored, its val operating points."""
    from cachelora.evaluation import ALL, CALIBRATED, replay_entry, shipped_threshold

    entry = eval_metrics.get(model)
    if not isinstance(entry, dict) or ALL not in entry.get("val", {}):
        raise CacheloraError(f"{paths.METRICS_DIR / 'eval.json'}: no metrics for model '{model}'")
    target = eval_metrics["target_precision"]
    calibrated = entry.get("calibrated")

    def at(group: str) -> dict[str, Any]:
        if calibrated:
            sets = [s for s in CALIBRATED_SETS if group in entry.get(s, {})]
            figures = {s: {k: entry[s][group][CALIBRATED][k] for k in FIGURES} for s in sets}
            return {"threshold": shipped_threshold(entry, group), "guarantee": calibrated[group], **figures}
        figures = {s: {k: replay_entry(entry, s, group)[k] for k in FIGURES} for s in SETS if group in entry[s]}
        return {"threshold": shipped_threshold(entry, group), **figures}

    chosen_on = (
        f"natural dev: the lowest threshold whose one-sided 95 % Clopper-Pearson lower bound on hit precision"
        f" reaches {target} (a domain that cannot certify it alone: the pooled threshold)"
        if calibrated
        else f"the generated val split: the lowest threshold whose cache-replay hit precision reaches {target}"
    )
    return {
        "chosen_on": chosen_on,
        "target_precision": target,
        "confidence": 0.95,
        "global": at(ALL),
        "per_domain": {group: at(group) for group in entry["val"] if group != ALL},
    }


ROUTER_MODEL_PATH = "/path/to/this/export"  # the placeholder the operator replaces


def semantic_router_snippet(model: str, thresholds: dict[str, Any]) -> str:
    """Cache settings in vllm-project/semantic-router's config (canonical schema v0.3, as ``vllm-sr
    config validate`` 0.4.0 checks it): the ``response_cache`` store embedding with ``bert`` from
    ``model_catalog.embeddings.semantic.bert_model_path`` (this export), its global threshold, and per
    decision a ``response_cache`` plugin with ``scope: global`` and its own
    ``semantic.similarity_threshold`` (a decision without one gets the router's 0.8: nothing cascades)."""

    def measured(entry: dict[str, Any]) -> str:
        figures = [
            f"{s} precision {entry[s]['hit_precision']:.3f} hit rate {entry[s]['hit_rate']:.3f}"
            for s in dict.fromkeys((*SETS, *CALIBRATED_SETS))
            if s in entry and s != "natural_dev"
        ]
        for key in ("calibration", "guarantee"):
            if key in entry:
                figures.append(guarantee(entry[key], thresholds["confidence"]))
        if ROUTER_ALONE in entry:
            alone = entry[ROUTER_ALONE]
            figures.append(
                f"router alone on traffic test: re-ask hit rate {alone['reask_hit_rate']:.3f}, near-miss wrong-hit"
                f" rate {alone['near_miss_wrong_hit_rate']:.3f}"
            )
        return ", ".join(figures)

    g = thresholds["global"]
    lines = [
        f"# cachelora export of '{model}' for vllm-project/semantic-router (canonical config v0.3).",
        f"# Thresholds chosen on {thresholds['chosen_on']}.",
        "# Merge into your config.yaml: `global` as is; each decision below names the domain whose queries it",
        "# routes: add its plugin to your decision for that domain (create one from your own rules and modelRefs).",
        f"# Replace {ROUTER_MODEL_PATH} with the absolute path of this export directory (config.json,",
        "# tokenizer.json, model.safetensors): with embedding_model other than bert, or no bert_model_path, the",
        "# router embeds with its own default model and this model is never used.",
        "# scope: global caches across users (the router's default, user, skips requests without a user id).",
        "# The router does not run cachelora's verifier or its rival check (the export's verifier/ folder and",
        "# cache_config.json's verifier block);",
        *(
            [
                "# NO threshold below certified the target precision: each sits above every lookup it was",
                "# calibrated on, so the router's cache will hardly ever answer. The embedding alone does not",
                "# tell a re-ask from a near-miss worded like it (same words, another answer; the best bound",
                "# any threshold reached is beside each one); cachelora's two-stage lookup with the verifier does.",
            ]
            if not any(_certified(e) for e in (g, *thresholds["per_domain"].values()))
            else [
                "# with these embedding thresholds alone it will serve some near-misses (same words, another answer)."
            ]
        ),
        "# Its own response_cache.polarity_guard (an NLI model of the router's, not measured here) is left off.",
        "global:",
        "  stores:",
        "    response_cache:",
        "      enabled: true",
        "      embedding_model: bert",
        f"      similarity_threshold: {g['threshold']:.4f}  # {measured(g)}",
        "  model_catalog:",
        "    embeddings:",
        "      semantic:",
        f"        bert_model_path: {ROUTER_MODEL_PATH}",
        "routing:",
        "  decisions:",
    ]
    for domain, entry in thresholds["per_domain"].items():
        lines += [
            f"    # {domain} ({measured(entry)})",
            f"    - name: {domain}",
            "      plugins:",
            "        - type: response_cache",
            "          configuration:",
            "            enabled: true",
            "            scope: global",
            "            semantic:",
            f"              similarity_threshold: {entry['threshold']:.4f}",
        ]
    return "\n".join(lines) + "\n"


def _certified(entry: dict[str, Any]) -> bool:
    """False only for a threshold whose calibration (natural dev, or a user's log) did not certify the
    target; a val-chosen threshold states no bound and counts as True."""
    found = entry.get("guarantee") or entry.get("calibration")
    return found is None or bool(found.get("certified"))


ROUTER_ALONE = "router_alone_traffic_test"  # the embedding thresholds alone on traffic test (no verifier)


def add_router_alone(thresholds: dict[str, Any], traffic: dict[str, Any] | None, model: str) -> None:
    """Beside each domain's threshold, what the router does with it alone (no verifier) on traffic test,
    where near-misses are asked: the traffic stage replays the shipped embedding thresholds. (Its pooled
    row counts each domain at its own threshold: not the global threshold's, so it is left out.)"""
    figures = ((traffic or {}).get("models", {}).get(model, {}).get("shipped_thresholds") or {}).get("test")
    if not figures:
        return
    keys = ("reask_hit_rate", "near_miss_wrong_hit_rate", "hit_precision")
    for group, entry in thresholds["per_domain"].items():
        if group in figures:
            entry[ROUTER_ALONE] = {k: figures[group][k] for k in keys}


def guarantee(found: dict[str, Any], confidence: float) -> str:
    """A calibrated threshold's guarantee in words: its counts and the lower bound they certify."""
    said = (
        f"{found['right_hits']}/{found['hits']} hits right: precision >= {found['precision_lower_bound']:.3f}"
        f" at {confidence:.0%} confidence"
    )
    best = found.get("best")
    closest = (
        f"; the best any threshold reached here: precision >= {best['precision_lower_bound']:.3f} at"
        f" {best['threshold']:.3f} ({best['right_hits']}/{best['hits']} right)"
        if best
        else ""
    )
    if not found.get("certified") and not found.get("fallback"):
        return said + f" (NOT certified: the target is not met here{closest})"
    return said + (f" (not certified alone: the pooled threshold{closest})" if found.get("fallback") else "")


def calibrated_thresholds(calibration: dict[str, Any], source: str) -> dict[str, Any]:
    """``cachelora calibrate``'s result in the shape of an export's ``thresholds``."""
    target, confidence = calibration["target_precision"], calibration["confidence"]
    return {
        "chosen_on": f"{source}: the lowest threshold whose one-sided {confidence:.0%} Clopper-Pearson lower bound"
        f" on hit precision reaches {target}",
        "target_precision": target,
        "confidence": confidence,
        "global": {"threshold": calibration["pooled"]["threshold"], "calibration": calibration["pooled"]},
        "per_domain": {
            d: {"threshold": found["threshold"], "calibration": found} for d, found in calibration["per_domain"].items()
        },
    }


def apply_calibration(out: Path, calibration: dict[str, Any], source: str) -> dict[str, Any]:
    """Rewrite an export's thresholds (cache_config.json, the router config, the model card) with the
    calibrated ones; the checksums follow. Each file is replaced atomically."""
    path = out / CACHE_CONFIG
    if not path.is_file():
        raise CacheloraError(f"{path}: not found (is {out} a `cachelora export` directory?)")
    config = read_json(path)
    config["thresholds"] = calibrated_thresholds(calibration, source)
    write_text(out / SEMANTIC_ROUTER_CONFIG, semantic_router_snippet(config["model"], config["thresholds"]))
    write_text(out / MODEL_CARD, model_card(config))
    for name in (SEMANTIC_ROUTER_CONFIG, MODEL_CARD):
        config["checksums"][name] = file_sha256(out / name)
    write_json(path, config)
    return config


def verifier_settings(
    traffic: dict[str, Any] | None, model: str, cost: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The verifier block of ``cache_config.json`` for ``model``: the verifier's folder (relative to
    the export), its threshold (global and per domain), the embedding thresholds it is paired with,
    all chosen on traffic dev, and the traffic figures measured at exactly those settings. None when
    the traffic stage shipped another model (or did not run)."""
    from cachelora.evaluation import ALL

    if not traffic or traffic["shipped"]["model"] != model:
        return None
    shipped = traffic["shipped"]
    settings = shipped["settings"]
    domains = [d for d in settings if d != ALL]
    window = traffic.get("rival_window")
    rival = (
        f", the next-nearest cached query's cosine is below that threshold or more than {window} below the"
        " nearest's (else the embedding cannot tell the two apart: a miss, the verifier not asked),"
        if window is not None
        else ""
    )
    return {
        "path": VERIFIER_DIR,
        "threshold": settings[ALL]["verifier_threshold"],
        "per_domain": {d: settings[d]["verifier_threshold"] for d in domains},
        "embedding_threshold": settings[ALL]["threshold"],
        "embedding_per_domain": {d: settings[d]["threshold"] for d in domains},
        "rival_window": window,
        "rule": "hit when cos(query, nearest cached query) >= the domain's embedding threshold"
        f"{rival} AND the verifier's score of (query, nearest cached query) >= the domain's verifier threshold",
        "chosen_on": shipped["chosen_on"],
        "target_precision": traffic["target_precision"],
        "near_miss_share": traffic["near_miss_share"],
        "traffic_dev": shipped["dev"],
        "traffic_test": shipped["test"],
        "cost": (cost or {}).get("shipped"),
    }


def _load(model_name: str) -> tuple[Any, dict[str, Any], str | None]:
    """The serving model (LoRA merged into the weights), its base model record and adapter sha256."""
    from cachelora.evaluation import BASELINE

    if model_name == BASELINE:
        from cachelora.base_model import load_base, model_sha256
        from cachelora.params import load_params

        params = load_params()
        base = params.base_model
        model = load_base(base, max_seq_length=params.train.max_seq_length)  # the window evaluate measured
        return model, {"name": base, "sha256": model_sha256(base)}, None
    adapter = paths.model_dir(model_name)
    info = read_info(adapter)
    model = load_served_model(adapter)
    return model, info["base_model"], file_sha256(adapter / WEIGHTS)


def pin_tokenizer(folder: Path, max_seq_length: int) -> None:
    """Make the saved ``tokenizer.json`` read text as the model was evaluated, whoever reads it (the
    router's candle, ``tokenizers``, transformers): truncation at the model's ``max_seq_length`` and
    no padding (the base model's file pads every input to a fixed 128, which a reader that mean-pools
    without the attention mask averages in). ``tokenizer_config.json``'s ``model_max_length`` agrees."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        return
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_seq_length)
    tokenizer.no_padding()
    tokenizer.save(str(path))
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        write_json(config_path, {**read_json(config_path), "model_max_length": max_seq_length})


def _pooling(model: Any) -> str | None:
    """The Pooling module's mode(s), e.g. ``mean``; None when the model has no Pooling module."""
    for module in model:
        if type(module).__name__ == "Pooling":
            mode = module.pooling_mode
            return mode if isinstance(mode, str) else "+".join(mode)
    return None


def _files_under(folder: Path) -> list[str]:
    """Every entry below ``folder`` that is not a directory (files, symlinks, sockets...), relative, sorted;
    symlinked directories are listed, never followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in [*files, *links]:
            found.append((Path(root) / name).relative_to(folder).as_posix())
    return sorted(found)


def check_export_target(out: Path, force: bool = False) -> None:
    """Refuse an ``--out`` an export would destroy: a file, a symlink, the working directory or one of its
    parents, or a non-empty directory that is not a previous export. A previous export whose files were
    edited since is replaced only with ``force``; a directory holding anything an export did not write,
    never."""
    kept = "nothing was written"
    if out.is_symlink():
        raise CacheloraError(f"{out}: is a symlink; give a new directory ({kept})")
    if not out.exists():
        return
    if not out.is_dir():
        raise CacheloraError(f"{out}: exists and is not a directory ({kept})")
    if out.resolve() in (Path.cwd().resolve(), *Path.cwd().resolve().parents):
        raise CacheloraError(f"{out}: is the working directory or holds it; give a new directory ({kept})")
    present = _files_under(out)
    if not present and not any(out.iterdir()):
        return
    config_path = out / CACHE_CONFIG
    if CACHE_CONFIG not in present:
        raise CacheloraError(
            f"{out}: not empty and not a cachelora export (no {CACHE_CONFIG}); give a new directory ({kept})"
        )
    checksums = read_json(config_path).get("checksums")
    if not isinstance(checksums, dict):
        raise CacheloraError(f"{config_path}: checksums: missing; not an export this version wrote ({kept})")
    foreign = [f for f in present if f != CACHE_CONFIG and (f not in checksums or (out / f).is_symlink())]
    if foreign:
        raise CacheloraError(f"{out / foreign[0]}: not written by an export; {out} is kept even with --force ({kept})")
    edited = [f for f in present if f in checksums and file_sha256(out / f) != checksums[f]]
    if edited and not force:
        raise CacheloraError(f"{out / edited[0]}: edited since it was exported; --force replaces it ({kept})")


def export_model(
    model_name: str | None,
    out: Path,
    eval_path: Path = paths.METRICS_DIR / "eval.json",
    force: bool = False,
) -> dict[str, Any]:
    """Save a model that loads without peft (``deploy``'s choice by default) with its cache thresholds.

    ``out`` must be new, empty or a previous export (see ``check_export_target``); a failed write
    (a full disk) leaves ``out`` as it was.
    """
    check_export_target(out, force)
    eval_metrics = read_json(eval_path)
    model_name = model_name or eval_metrics["deploy"]["model"]
    thresholds = shipped_thresholds(eval_metrics, model_name)
    traffic_path, cost_path = eval_path.parent / "traffic.json", eval_path.parent / "traffic_cost.json"
    traffic = read_json(traffic_path) if traffic_path.exists() else None
    add_router_alone(thresholds, traffic, model_name)
    verifier = verifier_settings(traffic, model_name, read_json(cost_path) if cost_path.exists() else None)
    model, base, adapter_sha = _load(model_name)
    try:
        config = _write_export(model, model_name, base, adapter_sha, eval_metrics, thresholds, verifier, out)
    except OSError as exc:
        raise CacheloraError(f"{out}: {exc.strerror or exc} (nothing was written)") from None
    log.info("exported %s to %s (threshold %.3f)", model_name, out, thresholds["global"]["threshold"])
    return config


def _write_export(
    model: Any,
    model_name: str,
    base: dict[str, Any],
    adapter_sha: str | None,
    eval_metrics: dict[str, Any],
    thresholds: dict[str, Any],
    verifier: dict[str, Any] | None,
    out: Path,
) -> dict[str, Any]:
    """Write the export into a temp directory beside ``out`` and rename it into place."""
    import shutil

    from cachelora.verifier_model import verifier_dir

    with atomic_dir(out) as tmp:
        model.save(str(tmp))
        pin_tokenizer(tmp, model.max_seq_length)
        if verifier is not None:
            shutil.copytree(verifier_dir(), tmp / VERIFIER_DIR)
        modules = [type(m).__name__ for m in model]
        write_text(tmp / SEMANTIC_ROUTER_CONFIG, semantic_router_snippet(model_name, thresholds))
        config: dict[str, Any] = {
            "model": model_name,
            "deploy_choice": model_name == eval_metrics["deploy"]["model"],
            "base_model": base,
            "adapter_sha256": adapter_sha,
            "pooling": _pooling(model),
            "normalize": "Normalize" in modules,
            "dimension": model.get_embedding_dimension(),
            "max_seq_length": model.max_seq_length,
            "similarity": "cosine",
            "thresholds": thresholds,
            "verifier": verifier,
        }
        write_text(tmp / MODEL_CARD, model_card(config))  # in place of the base model's upstream card
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        config["checksums"] = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in files}
        write_json(tmp / CACHE_CONFIG, config)
    return config


def model_card(config: dict[str, Any]) -> str:
    """The export's README.md: what the model is, how it was chosen, and what it does at the shipped
    settings (every figure from ``cache_config.json``, which it names)."""
    thresholds = config["thresholds"]
    g = thresholds["global"]
    base = config["base_model"]
    merged = ", LoRA merged into its weights." if config["adapter_sha256"] else "."
    measured = "; ".join(
        f"{s} hit precision {g[s]['hit_precision']:.3f}, hit rate {g[s]['hit_rate']:.3f}" for s in SETS if s in g
    )
    for key in ("calibration", "guarantee"):
        if key in g:
            measured = (
                f"{measured}; {guarantee(g[key], thresholds['confidence'])}"
                if measured
                else guarantee(g[key], thresholds["confidence"])
            )
    lines = [
        f"# cachelora export: `{config['model']}`",
        "",
        f"A sentence-transformers model for a semantic cache: base `{base.get('name')}` (sha256 "
        f"`{str(base.get('sha256'))[:16]}…`){merged}",
        f"{config['pooling']} pooling, L2-normalised, {config['dimension']} dimensions, inputs truncated at "
        f"{config['max_seq_length']} tokens; compare by cosine. Every figure below is in `{CACHE_CONFIG}`.",
        "",
        f"## Cache thresholds (chosen on {thresholds.get('chosen_on', 'the generated val split').split(':')[0]})",
        "",
        f"Global threshold {g['threshold']:.4f}: {measured}. Per domain: `thresholds.per_domain`.",
    ]
    verifier = config.get("verifier")
    if verifier:
        test = verifier["traffic_test"]["all"]
        lines += [
            "",
            "## With the verifier (chosen on natural traffic dev)",
            "",
            f"`{verifier['path']}/` is a `sentence_transformers.CrossEncoder` that reads (query, cached query). "
            f"Rule: {verifier['rule']}. Thresholds per domain: `verifier.per_domain`, `verifier.embedding_per_domain`.",
            f"On natural traffic test: re-ask hit rate {test['reask_hit_rate']:.3f}, near-miss wrong-hit rate "
            f"{test['near_miss_wrong_hit_rate']:.3f}, hit precision {test['hit_precision']:.3f}.",
        ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        'model = SentenceTransformer("path/to/this/export")',
        'vectors = model.encode(["can I take ibuprofen after a tooth extraction"], normalize_embeddings=True)',
        "```",
        "",
        f"`{SEMANTIC_ROUTER_CONFIG}` holds the settings for vllm-project/semantic-router (its comments say what"
        " the router will not check).",
    ]
    return "\n".join(lines) + "\n"
