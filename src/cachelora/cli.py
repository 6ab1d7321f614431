"""The ``cachelora`` command: ad-hoc evaluation (and, later, verify/export/publish)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cachelora.entrypoint import user_errors
from cachelora.errors import CacheloraError
from cachelora.evaluation import (
    BASELINE,
    MACRO_KEYS,
    domain_entries,
    macro,
    model_loaders,
    score_models,
    select_thresholds,
    triplet_metrics,
)
from cachelora.records import read_json, read_triplets, write_json

ALL = "all"


@click.group()
def main() -> None:
    """Train and verify domain LoRA adapters for semantic-cache embedding models."""


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by their ``domain`` field (when every row has one), plus ``all``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    if all(isinstance(r.get("domain"), str) and r["domain"] for r in rows):
        for row in rows:
            groups.setdefault(row["domain"], []).append(row)
    if len(groups) != 1:
        groups[ALL] = rows
    return groups


def _thresholds_from(path: Path, model: str, group: str) -> dict[str, float]:
    """The val-chosen thresholds of ``model`` for ``group``; for a group eval.json has no entry for
    (``all``, or a file without domains), the mean over its domains, as ``export`` recommends."""
    domains = domain_entries(read_json(path), model)
    if not domains:
        raise CacheloraError(f"{path}: no thresholds for model '{model}' (use --threshold)")
    chosen = [domains[group]] if group in domains else list(domains.values())
    return {
        name: sum(entry[f"at_{name}"]["threshold"] for entry in chosen) / len(chosen)
        for name in ("max_f1", "target_precision")
    }


def _table(result: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        f"{'model':<14} {'domain':<12} {'n':>5} {'margin':>7} {'gain %':>8} {'acc':>6} {'AP':>6}"
        f" {'thresh':>7} {'prec':>6} {'recall':>6} {'F1':>6} {'FHR':>6}"
    ]
    for model, groups in result.items():
        for group, m in groups.items():
            if group == "macro":
                continue
            d = m["at_max_f1"] if "at_max_f1" in m else m["at_given"]
            flag = " (in-sample)" if d["in_sample"] else ""
            lines.append(
                f"{model:<14} {group:<12} {m['triplets']:>5} {m['margin']:>7.4f} {m['margin_gain_pct']:>+8.1f}"
                f" {m['triplet_accuracy']:>6.3f} {m['average_precision']:>6.3f} {d['threshold']:>7.3f}"
                f" {d['precision']:>6.3f} {d['recall']:>6.3f} {d['f1']:>6.3f} {d['false_hit_rate']:>6.3f}{flag}"
            )
    return "\n".join(lines)


@main.command()
@click.option(
    "--triplets",
    "triplets_file",
    required=True,
    type=click.Path(path_type=Path),
    help="JSONL of {anchor, positive, negative[, domain]}.",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Adapter directory (repeatable); the base model alone is always evaluated as 'baseline'.",
)
@click.option("--base", default=None, help="Base model name or path (default: params.yaml base_model).")
@click.option("--threshold", type=float, default=None, help="Fixed cache threshold for the decision metrics.")
@click.option(
    "--thresholds-from",
    type=click.Path(path_type=Path),
    default=None,
    help="Take each model's val-chosen thresholds from this eval.json.",
)
@click.option("--target-precision", default=0.9, show_default=True, help="For the target-precision threshold.")
@click.option("--bootstrap", default=1000, show_default=True, help="Paired-bootstrap resamples.")
@click.option("--seed", default=42, show_default=True)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the metrics here.")
@user_errors
def evaluate(
    triplets_file: Path,
    adapters: tuple[Path, ...],
    base: str | None,
    threshold: float | None,
    thresholds_from: Path | None,
    target_precision: float,
    bootstrap: int,
    seed: int,
    json_out: Path | None,
) -> None:
    """Evaluate the base model and adapters on any triplet file, per domain when rows name one.

    Thresholds come from --threshold, from --thresholds-from (chosen on val by the pipeline), or
    else are chosen on this same file and labelled in-sample.
    """
    if threshold is not None and thresholds_from is not None:
        raise CacheloraError("--threshold and --thresholds-from exclude each other")
    if base is None:
        from cachelora.params import PARAMS_FILE, load_params

        base = load_params().base_model if PARAMS_FILE.is_file() else "all-MiniLM-L6-v2"
    _check_adapters(adapters, base)
    groups = _groups(read_triplets(triplets_file))
    loaders = model_loaders(base, {path.name: path for path in adapters})
    scores = score_models(loaders, groups, batch_size=128)
    result: dict[str, Any] = {}
    for model, by_group in scores.items():
        per_group = {}
        for group, s in by_group.items():
            if threshold is not None:
                chosen, in_sample = {"given": threshold}, False
            elif thresholds_from is not None:
                chosen, in_sample = _thresholds_from(thresholds_from, model, group), False
            else:
                chosen, in_sample = select_thresholds(s, target_precision), True
            per_group[group] = triplet_metrics(s, scores[BASELINE][group], chosen, bootstrap, seed, in_sample)
        domains = {k: v for k, v in per_group.items() if k != ALL}
        if len(domains) > 1:
            per_group["macro"] = macro(domains, MACRO_KEYS)
        result[model] = per_group
    click.echo(_table(result))
    if json_out is not None:
        write_json(json_out, result)


def _check_adapters(adapters: tuple[Path, ...], base: str) -> None:
    """Every adapter must be complete and trained on ``base`` (same weights)."""
    from cachelora.adapters import read_info
    from cachelora.base_model import weights_sha256

    sha = weights_sha256(base)
    for path in adapters:
        trained_on = read_info(path)["base_model"]
        if trained_on["sha256"] != sha:
            raise CacheloraError(
                f"{path}: trained on base '{trained_on['name']}' ({trained_on['sha256'][:12]}…), "
                f"not '{base}' ({sha[:12]}…)"
            )


@main.command()
@click.option("--pull", is_flag=True, help="Fetch locked outputs from the DVC remote first.")
@click.option("--recompute", is_flag=True, help="Re-evaluate the locked adapters and compare with eval.json.")
@user_errors
def verify(pull: bool, recompute: bool) -> None:
    """Check every artifact against dvc.lock, every adapter file and load, and every reported number."""
    from cachelora.params import load_params
    from cachelora.provenance import RECOMPUTE_TOLERANCE, verify

    failures, checks = verify(load_params(), pull=pull, recompute=recompute)
    for failure in failures:
        click.echo(f"FAIL {failure}")
    if failures:
        raise SystemExit(1)
    extra = f", re-evaluation within {RECOMPUTE_TOLERANCE}" if recompute else ""
    click.echo(f"verify: OK ({checks} checks{extra})")


@main.command()
@click.option("--model", "model_name", required=True, help="merged, multi or a domain.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory to write the model to.")
@user_errors
def export(model_name: str, out: Path) -> None:
    """Merge a LoRA into the base model: a standalone sentence-transformers directory plus cache_config.json."""
    from cachelora.export import export_model

    config = export_model(model_name, out)
    t = config["recommended_threshold"]
    click.echo(
        f"exported {model_name} to {out}: dim {config['dimension']}, threshold {t['threshold']:.3f} "
        f"(test precision {t['test_precision']:.3f}, recall {t['test_recall']:.3f})"
    )


@main.command()
@click.option("--to", "url", required=True, help="New release prefix, s3://BUCKET/PREFIX (never overwritten).")
@click.option("--model", "model_name", default="merged", show_default=True, help="Model to export into the release.")
@user_errors
def publish(url: str, model_name: str) -> None:
    """Verify, then upload a release: exported model, adapters, RESULTS.md, metrics, dvc.lock, manifest.json.

    Prints the release's digest (sha256 of its manifest.json) and records it in releases.json.
    """
    import tempfile

    from cachelora.merging import MERGED
    from cachelora.params import load_params
    from cachelora.provenance import verify
    from cachelora.releases import build_release, publish_release, record_release, release_url

    release_url(url)  # a bad URL fails before the export
    params = load_params()
    failures, _ = verify(params)
    if failures:
        raise CacheloraError(f"publish refused: verify found {len(failures)} problem(s), first: {failures[0]}")
    with tempfile.TemporaryDirectory(prefix="cachelora-release-") as tmp:
        build_release(Path(tmp) / "release", model_name, [*params.train_models, MERGED])
        release = publish_release(Path(tmp) / "release", url, repo=Path.cwd())
    click.echo(f"published {release.files} files ({release.bytes / 1e6:.1f} MB) to {release.url}")
    click.echo(f"manifest sha256: {release.manifest_sha256}")
    recorded = record_release(Path.cwd(), release)
    click.echo(
        f"recorded in {recorded.name} (commit it); consumers without the repo run: cachelora fetch"
        f" --from {release.url} --to DIR --sha256 {release.manifest_sha256}"
    )


@main.command("fetch")
@click.option("--from", "url", required=True, help="Release prefix, s3://BUCKET/PREFIX.")
@click.option("--to", "dest", required=True, type=click.Path(path_type=Path), help="New directory to create.")
@click.option(
    "--sha256",
    default=None,
    help="The release's manifest sha256, as publish printed it (default: the entry in the repo's releases.json).",
)
@click.option(
    "--repo",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Use this DVC repo's releases.json and default-remote endpoint/credentials (default: the enclosing"
    " repo, if any; else AWS_* env).",
)
@user_errors
def fetch(url: str, dest: Path, sha256: str | None, repo: Path | None) -> None:
    """Download a release: manifest.json must match the digest, every file its manifest entry, before --to appears."""
    from cachelora.releases import client_repo, enclosing_repo, fetch_release, required_digest

    digest = required_digest(url, sha256, repo if repo is not None else enclosing_repo())
    files = fetch_release(url, dest, digest, repo=client_repo(repo))
    click.echo(f"fetched {len(files)} files from {url} into {dest} (manifest sha256 {digest}; every file verified)")
