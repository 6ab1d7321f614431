"""The ``cachelora`` command: every command a person runs (evaluate, verify, export, calibrate, publish, fetch)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from cachelora.entrypoint import user_errors
from cachelora.errors import CacheloraError
from cachelora.params import BASELINE
from cachelora.records import read_json, write_json

ALL = "all"  # evaluation.ALL: every group pooled (imported lazily: the evaluation stack is slow to import)


class FiniteFloat(click.ParamType):
    """A finite float within [low, high] (``low_open``: above ``low``); NaN, inf and words are refused."""

    name = "number"

    def __init__(self, low: float, high: float, low_open: bool = False) -> None:
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"'{value}' is not a number", param, ctx)
        above_low = number > self.low if self.low_open else number >= self.low
        if not (math.isfinite(number) and above_low and number <= self.high):
            bracket = "(" if self.low_open else "["
            self.fail(f"{value} is not a finite number in {bracket}{self.low}, {self.high}]", param, ctx)
        return number


@click.group()
@click.version_option(package_name="cachelora", prog_name="cachelora")
def main() -> None:
    """Train and verify domain LoRA adapters for semantic-cache embedding models."""


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows by their ``domain`` field (when every row has one), plus ``all`` (one cache for every row)."""
    from cachelora.evaluation import with_all

    if not all(isinstance(r.get("domain"), str) and r["domain"] for r in rows):
        return {ALL: rows}
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["domain"], []).append(row)
    return with_all(groups)


def _thresholds_from(path: Path, model: str) -> dict[str, dict[str, float]]:
    """A model's val-chosen thresholds per group in eval.json (groups it lacks take ``all``'s)."""
    metrics = read_json(path)
    entry = metrics.get(model) if isinstance(metrics, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("val"), dict) or ALL not in entry["val"]:
        raise CacheloraError(f"{path}: no thresholds for model '{model}' (use --threshold)")
    test = entry.get("test") if isinstance(entry.get("test"), dict) else {}
    chosen = {}
    for group, at in entry["val"].items():
        replay = at.get("threshold") if isinstance(at, dict) else None
        at_test = test.get(group) if isinstance(test.get(group), dict) else {}
        max_f1 = at_test.get("at_max_f1", {}).get("threshold", replay)
        for key, value in (("val", replay), ("test.at_max_f1", max_f1)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not -1 <= value <= 1:
                raise CacheloraError(f"{path}: {model}.{key}.{group}.threshold: {value!r} is not a cosine in [-1, 1]")
        chosen[group] = {"replay": float(replay), "max_f1": float(max_f1)}
    return chosen


def _table(result: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        f"{'model':<14} {'group':<12} {'n':>5} {'AP':>6} {'acc':>6} {'gain %':>8}"
        f" {'thresh':>7} {'hit rate':>8} {'hit prec':>8} {'FHR':>6}"
    ]
    for model, groups in result.items():
        for group, m in groups.items():
            if group == "macro":
                continue
            r = m["replay"]
            flag = " (in-sample)" if r["in_sample"] else ""
            lines.append(
                f"{model:<14} {group:<12} {m['triplets']:>5} {m['average_precision']:>6.3f}"
                f" {m['triplet_accuracy']:>6.3f} {m['margin_gain_pct']:>+8.1f} {r['threshold']:>7.3f}"
                f" {r['hit_rate']:>8.3f} {r['hit_precision']:>8.3f} {r['false_hit_rate']:>6.3f}{flag}"
            )
    return "\n".join(lines)


@main.command()
@click.option(
    "--triplets",
    "triplets_file",
    required=True,
    type=click.Path(path_type=Path),
    help="JSONL of {anchor, positive, negative[, domain, source_id, topic]}.",
)
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Adapter directory (repeatable); the base model alone is always evaluated as 'baseline'.",
)
@click.option("--base", default=None, help="Base model name or path (default: params.yaml base_model).")
@click.option("--threshold", type=FiniteFloat(-1, 1), default=None, help="Fixed cache threshold (cosine, -1 to 1).")
@click.option(
    "--thresholds-from",
    type=click.Path(path_type=Path),
    default=None,
    help="Take each model's val-chosen thresholds (per domain, and 'all') from this eval.json.",
)
@click.option(
    "--target-precision",
    type=FiniteFloat(0, 1, low_open=True),
    default=0.95,
    show_default=True,
    help="In-sample operating point: the lowest threshold whose hit precision reaches this.",
)
@click.option(
    "--bootstrap", type=click.IntRange(min=1), default=1000, show_default=True, help="Paired-bootstrap resamples."
)
@click.option(
    "--min-rows", type=click.IntRange(min=1), default=5, show_default=True, help="Fewer triplets is an error."
)
@click.option("--seed", type=click.IntRange(min=0), default=42, show_default=True)
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
    min_rows: int,
    seed: int,
    json_out: Path | None,
) -> None:
    """Cache replay, ranking quality and margins of the base model and adapters on any triplet file.

    Thresholds come from --threshold, from --thresholds-from (chosen on val by the pipeline), or
    else are chosen on this same file and labelled in-sample.
    """
    from cachelora.evaluation import evaluation_rows, model_loaders, operating_points, report_set, score_models

    if threshold is not None and thresholds_from is not None:
        raise CacheloraError("--threshold and --thresholds-from exclude each other")
    if json_out is not None and json_out.is_dir():
        raise CacheloraError(f"--json {json_out}: is a directory (name a file to write)")
    if base is None:
        from cachelora.params import PARAMS_FILE, load_params

        base = load_params().base_model if PARAMS_FILE.is_file() else "all-MiniLM-L6-v2"
    _check_adapters(adapters, base)
    groups = _groups(evaluation_rows(triplets_file, min_rows))
    loaders = model_loaders(base, {path.name: path for path in adapters})
    preset = {name: _thresholds_from(thresholds_from, name) for name in loaders} if thresholds_from else {}
    scored = score_models(loaders, {"file": groups}, batch_size=128)
    result: dict[str, Any] = {}
    for model, by_set in scored.items():
        in_sample = threshold is None and thresholds_from is None
        if threshold is not None:
            chosen = {ALL: {"replay": threshold, "max_f1": threshold}}
        elif thresholds_from is not None:
            chosen = preset[model]
        else:
            chosen = operating_points(by_set["file"], target_precision)
        result[model] = report_set(by_set["file"], scored[BASELINE]["file"], chosen, bootstrap, seed, in_sample)
    click.echo(_table(result))
    if json_out is not None:
        write_json(json_out, result)


def _check_adapters(adapters: tuple[Path, ...], base: str) -> None:
    """Every adapter must be complete, trained on ``base`` (same weights), and named apart: its
    directory's name labels its figures, so ``baseline`` or a name given twice would mix models."""
    from cachelora.adapters import check_base

    names = [path.name for path in adapters]
    for path in adapters:
        if path.name == BASELINE:
            raise CacheloraError(f"--adapter {path}: '{BASELINE}' names the base model alone; rename the directory")
        if names.count(path.name) > 1:
            raise CacheloraError(f"--adapter {path}: another --adapter has the directory name '{path.name}'")
    for path in adapters:
        check_base(path, base, "{adapter}: trained on base '{trained}' ({trained_sha:.12}…), not '{base}' ({sha:.12}…)")


@main.command()
@click.option("--pull", is_flag=True, help="Fetch locked outputs from the DVC remote first.")
@click.option("--recompute", is_flag=True, help="Re-evaluate the locked adapters and compare with eval.json.")
@user_errors
def verify(pull: bool, recompute: bool) -> None:
    """Check every artifact against dvc.lock, every adapter file and load, and every reported number."""
    from cachelora.params import load_params
    from cachelora.verify import RECOMPUTE_TOLERANCE, verify

    failures, checks = verify(load_params(), pull=pull, recompute=recompute)
    for failure in failures:
        click.echo(f"FAIL {failure}")
    if failures:
        raise SystemExit(1)
    extra = f", re-evaluation within {RECOMPUTE_TOLERANCE}" if recompute else ""
    click.echo(f"verify: OK ({checks} checks{extra})")


@main.command()
@click.option(
    "--model", "model_name", default=None, help="baseline, merged, multi or a domain (default: eval.json's deploy)."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="New (or empty) directory to write the model to; a previous export there is replaced.",
)
@click.option("--force", is_flag=True, help="Replace a previous export even if its files were edited since.")
@user_errors
def export(model_name: str | None, out: Path, force: bool) -> None:
    """A standalone sentence-transformers directory (LoRA merged in) with cache_config.json and a
    semantic-router config snippet, both carrying the shipped thresholds (calibrated on natural dev) and
    their measured figures."""
    from cachelora.export import export_model

    config = export_model(model_name, out, force=force)
    g = config["thresholds"]["global"]
    click.echo(
        f"exported {config['model']} to {out}: dim {config['dimension']}, threshold {g['threshold']:.3f} "
        f"(test hit precision {g['test']['hit_precision']:.3f}, hit rate {g['test']['hit_rate']:.3f}; "
        f"natural test {g['natural_test']['hit_precision']:.3f}, {g['natural_test']['hit_rate']:.3f})"
    )
    if config["verifier"]:
        test = config["verifier"]["traffic_test"]["all"]
        click.echo(
            f"with the verifier ({out}/{config['verifier']['path']}, thresholds per domain in cache_config.json): "
            f"traffic test re-ask hit rate {test['reask_hit_rate']:.3f}, near-miss wrong-hit rate "
            f"{test['near_miss_wrong_hit_rate']:.3f}, hit precision {test['hit_precision']:.3f}"
        )


@main.command()
@click.argument("log", type=click.Path(path_type=Path))
@click.option("--export", "out", required=True, type=click.Path(path_type=Path), help="A `cachelora export` directory.")
@click.option(
    "--target", type=FiniteFloat(0, 1, low_open=True), default=0.95, show_default=True, help="Hit precision to certify."
)
@user_errors
def calibrate(log: Path, out: Path, target: float) -> None:
    """Calibrate an export's thresholds on your own labelled traffic (LOG: JSONL or CSV with `query`,
    `answer_id` or `duplicate_of`, and optional `domain`, in the order your cache saw them): per domain,
    the lowest threshold whose one-sided 95 % Clopper-Pearson lower bound on hit precision reaches
    --target. Rewrites the export's cache_config.json, semantic_router.yaml and model card."""
    from sentence_transformers import SentenceTransformer

    from cachelora.base_model import encode_unique
    from cachelora.calibration import calibrate_log, read_log
    from cachelora.export import apply_calibration

    queries = read_log(log)
    if not (out / "cache_config.json").is_file():
        raise CacheloraError(f"{out}: no cache_config.json (not a `cachelora export` directory)")
    vectors = encode_unique(
        SentenceTransformer(str(out), device="cpu"), [q.text for q in queries], 64, desc="calibrate"
    )
    calibration = calibrate_log(queries, vectors, target, source=str(log))
    apply_calibration(out, calibration, f"labelled traffic {log.name}")
    pooled = calibration["pooled"]
    click.echo(
        f"calibrated {out} on {log}: global threshold {pooled['threshold']:.2f} "
        f"({pooled['right_hits']}/{pooled['hits']} hits right, precision >= {pooled['precision_lower_bound']:.3f}"
        " at 95 % confidence)"
    )
    for domain, found in calibration["per_domain"].items():
        note = ", the pooled threshold: this domain cannot certify alone" if found.get("fallback") else ""
        click.echo(
            f"  {domain}: {found['threshold']:.2f} ({found['right_hits']}/{found['hits']}, >= "
            f"{found['precision_lower_bound']:.3f}{note})"
        )


@main.command()
@click.option("--to", "url", required=True, help="New release prefix, s3://BUCKET/PREFIX (never overwritten).")
@click.option(
    "--model", "model_name", default=None, help="Model to export into the release (default: eval.json's deploy)."
)
@user_errors
def publish(url: str, model_name: str | None) -> None:
    """Verify, then upload a release: exported model, adapters, RESULTS.md, metrics, dvc.lock, manifest.json.

    Prints the release's digest (sha256 of its manifest.json) and records it in releases.json.
    """
    import tempfile

    from cachelora.params import MERGED, load_params
    from cachelora.releases import build_release, publish_release, record_release, release_url
    from cachelora.verify import verify

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
