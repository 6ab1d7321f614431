"""RESULTS.md and README's results block, generated from the metrics files they cite.

Every number is a :class:`Cell`: a JSON file, a dotted key and a format. The report renders cells
and cites each source with its md5 in dvc.lock; ``verify`` renders them again and compares.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cachelora import paths
from cachelora.cost import load_note
from cachelora.errors import CacheloraError
from cachelora.evaluation import ALL
from cachelora.headline import HEADLINE_NATURAL, HEADLINE_TRAFFIC, headline
from cachelora.params import BASELINE, MERGED, MULTI, Params
from cachelora.records import file_md5, read_json, write_json, write_text

LOCK = Path("dvc.lock")
RESULTS = Path("RESULTS.md")
README = Path("README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
EVAL = paths.METRICS_DIR / "eval.json"
TRAFFIC = paths.METRICS_DIR / "traffic.json"
TRAFFIC_COST = paths.METRICS_DIR / "traffic_cost.json"
ABLATION = Path("benchmarks/results/ablation.json")  # benchmarks/ablation_near_miss.py: no near-miss negatives
ABLATION_VERIFIER = Path("benchmarks/results/ablation_verifier.json")  # benchmarks/ablation_verifier.py
REFERENCE = Path("benchmarks/results/reference.json")  # benchmarks/reference_models.py: references outside dvc repro
HEADLINE_JSON = paths.METRICS_DIR / "headline.json"  # what dvc.yaml declares as metrics


# --- citations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """A number in a table: the JSON file and dotted key it comes from, and how it is printed."""

    source: Path
    key: str
    fmt: str = ".3f"

    def render(self, cache: dict[Path, Any]) -> str:
        if self.source not in cache:
            cache[self.source] = read_json(self.source)
        value = lookup(cache[self.source], self.key, self.source)
        return format(value, self.fmt)


@dataclass(frozen=True)
class Table:
    """A markdown table whose first column labels each row."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str | Cell, ...], ...]

    def sources(self) -> list[Path]:
        return sorted({c.source for row in self.rows for c in row if isinstance(c, Cell)})

    def render_rows(self, cache: dict[Path, Any]) -> list[list[str]]:
        return [[c.render(cache) if isinstance(c, Cell) else c for c in row] for row in self.rows]


def lookup(data: Any, key: str, source: Path) -> Any:
    """``data[k1][k2]...`` for a dotted key; a missing key names the file and key."""
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            raise CacheloraError(f"{source}: key '{key}' not found")
        data = data[part]
    return data


def locked_outputs(lock: Path = LOCK) -> dict[str, str]:
    """Every output path in dvc.lock with its md5 (``….dir`` for directories)."""
    if not lock.is_file():
        raise CacheloraError(f"{lock}: not found (run `dvc repro` first)")
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {out["path"]: out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


def params_digest(path: Path = Path("params.yaml")) -> str:
    """sha256 of the parsed params, canonical JSON (comments and layout do not count)."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def git(*args: str) -> subprocess.CompletedProcess[str]:
    """Run git here; the caller reads returncode and stdout."""
    return subprocess.run(["git", *args], capture_output=True, text=True)


def git_commit(inputs: list[str]) -> str:
    """The commit holding the pipeline's inputs: HEAD, with ``+uncommitted`` when they differ from it."""
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return "unknown"
    changed = git("status", "--porcelain", "--untracked-files=all", "--", *inputs).stdout.strip()
    return head.stdout.strip() + ("+uncommitted" if changed else "")


# --- the tables ----------------------------------------------------------------------------------


def _outside(params: Params) -> list[str]:
    """The references ``benchmarks/reference_models.py`` scored outside the pipeline (those not in
    ``evaluate.reference_models``; each timed beside the baseline in the benchmark's own run)."""
    return [m for m in read_json(REFERENCE)["models"] if m not in params.evaluate.reference_models]


def _references(params: Params, outside: list[str]) -> list[str]:
    """The reference models: those the pipeline scores, then ``outside`` (:func:`_outside`)."""
    return [*params.evaluate.reference_models, *outside]


def _source(model: str, kind: str, outside: list[str]) -> tuple[Path, str]:
    """Where one model's figures of a kind (``eval``, ``traffic``, ``cost`` or ``traffic_cost``) are:
    the file and the key prefix. A reference in ``outside`` is in the benchmark's file."""
    key = model if kind == "eval" else f"models.{model}"
    if model in outside:
        return REFERENCE, f"{kind}.{model if kind == 'traffic' else key}"
    return {"eval": EVAL, "traffic": TRAFFIC, "cost": paths.COST, "traffic_cost": TRAFFIC_COST}[kind], key


def _models(params: Params, outside: list[str]) -> list[str]:
    return [BASELINE, *params.train_models, MERGED, *_references(params, outside)]


def _groups(params: Params) -> list[str]:
    return [*params.domains, ALL]


def _columns(
    model: str, group: str, columns: tuple[tuple[str, str, str, str], ...], outside: list[str]
) -> tuple[Cell, ...]:
    """One cell per column: (header, set, key, format) read as ``<model>.<set>.<group>.<key>`` of
    eval.json (of the reference benchmark's ``eval`` for a reference in ``outside``)."""
    source, prefix = _source(model, "eval", outside)
    return tuple(Cell(source, f"{prefix}.{s}.{group}.{key}", fmt) for _, s, key, fmt in columns)


HEADLINE_COLUMNS = (
    ("threshold (val)", "val", "threshold", ".3f"),
    ("test hit rate", "test", "replay.hit_rate", ".3f"),
    ("test hit precision", "test", "replay.hit_precision", ".3f"),
    ("test AP", "test", "average_precision", ".3f"),
    ("natural hit rate", "natural_test", "replay.hit_rate", ".3f"),
    ("natural hit precision", "natural_test", "replay.hit_precision", ".3f"),
    ("natural AP", "natural_test", "average_precision", ".3f"),
    ("natural hit rate, natural-dev threshold", "natural_test", "replay_natural_op.hit_rate", ".3f"),
    ("its precision", "natural_test", "replay_natural_op.hit_precision", ".3f"),
)
MODEL_COLUMNS = (
    ("test hit rate", "test", "replay.hit_rate", ".3f"),
    ("test hit precision", "test", "replay.hit_precision", ".3f"),
    ("test false-hit rate", "test", "replay.false_hit_rate", ".3f"),
    ("test AP", "test", "average_precision", ".3f"),
    ("test ROC AUC", "test", "roc_auc", ".3f"),
    ("test margin", "test", "margin", ".4f"),
    ("test gain %", "test", "margin_gain_pct", "+.1f"),
    ("CI low", "test", "margin_gain_pct_ci_low", "+.1f"),
    ("CI high", "test", "margin_gain_pct_ci_high", "+.1f"),
    ("test accuracy", "test", "triplet_accuracy", ".3f"),
    ("natural hit rate", "natural_test", "replay.hit_rate", ".3f"),
    ("natural hit precision", "natural_test", "replay.hit_precision", ".3f"),
    ("natural AP", "natural_test", "average_precision", ".3f"),
    ("natural gain %", "natural_test", "margin_gain_pct", "+.1f"),
    ("natural accuracy", "natural_test", "triplet_accuracy", ".3f"),
    ("natural hit rate, natural-dev threshold", "natural_test", "replay_natural_op.hit_rate", ".3f"),
    ("its precision", "natural_test", "replay_natural_op.hit_precision", ".3f"),
)
COST_COLUMNS = (
    ("natural AP", "natural_test", "average_precision", ".3f"),
    ("natural accuracy", "natural_test", "triplet_accuracy", ".3f"),
    ("natural hit rate, natural-dev threshold", "natural_test", "replay_natural_op.hit_rate", ".3f"),
    ("test AP", "test", "average_precision", ".3f"),
)
DEPLOY_SETS = ("val", "test", "natural_test")
DEPLOY_CALIBRATED_SETS = ("test", "natural_dev", "natural_test")
COST_FIGURES = (
    ("parameters", "parameters", ",d"),
    ("ms/query, batch 1", "ms_per_query_batch_1", ".2f"),
    ("ms/query, batch 32", "ms_per_query_batch_32", ".2f"),
)


def headline_table(params: Params) -> Table:
    """Per domain (and all domains in one cache): what a cache does at the val-chosen operating point,
    on the generated test split and the natural test set, for the baseline, multi and merged."""
    outside = _outside(params)
    shown = (BASELINE, MULTI, MERGED, *_references(params, outside))
    rows = tuple((g, m, *_columns(m, g, HEADLINE_COLUMNS, outside)) for g in _groups(params) for m in shown)
    header = ("domain", "model", *(c[0] for c in HEADLINE_COLUMNS))
    return Table(
        "Headline: cache hit rate at the val-chosen operating point (generated test, natural test)", header, rows
    )


TRAFFIC_FIGURES = (
    ("re-ask hit rate", "reask_hit_rate"),
    ("near-miss wrong-hit rate", "near_miss_wrong_hit_rate"),
    ("hit precision", "hit_precision"),
)
TRAFFIC_MODES = (
    ("shipped embedding thresholds, no verifier (the router)", "shipped_thresholds"),
    ("embedding alone, traffic-dev thresholds", "embedding"),
    ("embedding + verifier, traffic-dev thresholds", "with_verifier"),
)


def _traffic_models(params: Params, outside: list[str]) -> list[tuple[str, str]]:
    """(label, model) rows of the traffic tables: baseline, the deploy model, each reference."""
    deploy = read_json(TRAFFIC)["shipped"]["model"]
    return [
        ("baseline", BASELINE),
        *([(f"{deploy} (deploy)", deploy)] if deploy != BASELINE else []),
        *((r, r) for r in _references(params, outside)),
    ]


def traffic_table(params: Params) -> Table:
    """The headline: what the shipped cache does on natural traffic test (re-asks and near-misses),
    per domain, at its shipped settings (the deploy model with the verifier, chosen on traffic dev)."""
    traffic = read_json(TRAFFIC)
    shipped = traffic["shipped"]
    rows = []
    for g in _groups(params):
        cells = [Cell(TRAFFIC, f"shipped.settings.{g}.threshold", ".3f")]
        cells.append(Cell(TRAFFIC, f"shipped.settings.{g}.verifier_threshold", ".3f"))
        cells += [Cell(TRAFFIC, f"shipped.test.{g}.{k}", ".3f") for _, k in TRAFFIC_FIGURES]
        cells.append(Cell(TRAFFIC, f"shipped.test.{g}.precision_at_near_miss_share", ".3f"))
        rows.append((g, *cells))
    share, window = traffic["near_miss_share"], traffic.get("rival_window")
    header = (
        "domain", "embedding threshold", "verifier threshold", *(f"test {c[0]}" for c in TRAFFIC_FIGURES),
        f"precision at {share:.0%} near-misses",
    )  # fmt: skip
    title = (
        f"Headline: natural traffic test, the shipped cache ({shipped['model']} + verifier"
        f"{'' if window is None else f' + rival check at {window}'}, settings chosen on traffic dev; the all row"
        " pools each domain at its own settings)"
    )
    return Table(title, header, tuple(rows))


def traffic_ablation_table(params: Params) -> Table:
    """Every traffic-replayed model, alone and with the verifier, on traffic dev and test (all domains)."""
    rows, outside = [], _outside(params)
    for label, m in _traffic_models(params, outside):
        source, prefix = _source(m, "traffic", outside)
        modes = lookup(read_json(source), prefix, source)
        for mode_label, mode in TRAFFIC_MODES:
            if mode not in modes:
                continue
            cells = (
                Cell(source, f"{prefix}.{mode}.{s}.{ALL}.{k}", ".3f")
                for s in ("dev", "test")
                for _, k in TRAFFIC_FIGURES
            )
            rows.append((label, mode_label, *cells))
    for variant, label in ablation_arms():
        for mode_label, mode in TRAFFIC_MODES[1:]:
            cells = (
                Cell(ABLATION, f"{variant}.traffic.{mode}.{s}.{ALL}.{k}", ".3f")
                for s in ("dev", "test")
                for _, k in TRAFFIC_FIGURES
            )
            rows.append((label, mode_label, *cells))
    deploy = read_json(ABLATION_VERIFIER)["model"]
    arms = (
        ("with_natural_pairs", "verifier with traffic-train pairs"),
        ("without_natural_pairs", "verifier without traffic-train pairs"),
        ("with_natural_pairs_no_rival_check", "verifier with traffic-train pairs, no rival check"),
    )
    for variant, label in arms:
        cells = (
            Cell(ABLATION_VERIFIER, f"{variant}.traffic.with_verifier.{s}.{ALL}.{k}", ".3f")
            for s in ("dev", "test")
            for _, k in TRAFFIC_FIGURES
        )
        rows.append((f"{deploy}, {label}", TRAFFIC_MODES[2][0], *cells))
    header = ("model", "settings", *(f"{s} {c[0]}" for s in ("dev", "test") for c in TRAFFIC_FIGURES))
    window = params.traffic.rival_window
    rival = "no rival check" if window is None else f"the rival check at {window} unless a row says not"
    title = f"Traffic ablation: all domains (with the verifier, {rival}; dev is in-sample for its own settings)"
    return Table(title, header, tuple(rows))


def ablation_arms() -> list[tuple[str, str]]:
    """The near-miss ablation's two arms (its keys) with their labels: the adapter, its
    ``generate.near_miss_fraction``, and which arm the pipeline trains."""
    ablation = read_json(ABLATION)
    name, ours = ablation["model"], ablation["pipeline"]
    return [
        (variant, f"{name}, near-miss fraction {fraction:g}" + (" (pipeline)" if variant == ours else ""))
        for variant, fraction in ablation["near_miss_fraction"].items()
    ]


def ablation_natural_table() -> Table:
    """The ablated adapter with each share of lexicon near-miss negatives on the natural dev and test sets."""
    rows = tuple(
        (label,
         *(Cell(ABLATION, f"{variant}.natural.natural_{s}.{k}", ".3f") for s in ("dev", "test")
           for k in ("average_precision", "triplet_accuracy")))
        for variant, label in ablation_arms()
    )  # fmt: skip
    header = ("model", "natural dev AP", "natural dev accuracy", "natural test AP", "natural test accuracy")
    return Table("Near-miss negatives and natural queries (all domains)", header, rows)


def traffic_cost_table(params: Params) -> Table:
    """What a lookup costs on CPU at batch 1 for each traffic model, alone and with the verifier (the
    verifier reads only the lookups whose nearest entry reaches the embedding threshold and has no rival)."""
    rows, outside = [], _outside(params)
    for label, m in _traffic_models(params, outside):
        source, prefix = _source(m, "traffic_cost", outside)
        modes = lookup(read_json(source), prefix, source)
        for mode_label, mode in TRAFFIC_MODES[1:]:
            if mode in modes:
                rows.append(
                    (
                        label,
                        mode_label,
                        Cell(source, f"{prefix}.embedding_ms_batch_1", ".2f"),
                        Cell(source, f"{prefix}.{mode}.verified_share", ".3f"),
                        Cell(source, f"{prefix}.{mode}.lookup_ms_batch_1", ".2f"),
                        Cell(source, f"{prefix}.{mode}.lookup_over_embedding", ".2f"),
                    )
                )
    if outside:
        cell = Cell(REFERENCE, f"traffic_cost.models.{BASELINE}.embedding_ms_batch_1", ".2f")
        rows.append((f"{BASELINE} (timed with the references)", TRAFFIC_MODES[1][0], cell, "—", "—", "—"))
    header = ("model", "settings", "embedding ms", "share verified (test)", "lookup ms", "lookup / embedding")
    return Table(
        f"Cost per lookup on traffic test (CPU, batch 1; {_timing_runs(TRAFFIC_COST, outside)})", header, tuple(rows)
    )


def _timing_runs(source: Path, outside: list[str]) -> str:
    """Which run timed a cost table's rows: the stage's (with its load), and the reference benchmark's."""
    note = f"one run, {load_note(read_json(source)['load'])}"
    if outside:
        kind = "cost" if source == paths.COST else "traffic_cost"
        reference_load = load_note(read_json(REFERENCE)[kind]["load"])
        note += f"; {', '.join(outside)} timed beside the baseline in another run, {reference_load}"
    return note


def verifier_cost_table() -> Table:
    """The verifier alone: CPU ms per (query, cached query) pair at batch 1 and batch 32."""
    row = ("verifier", *(Cell(TRAFFIC_COST, f"verifier_ms_per_pair_batch_{b}", ".2f") for b in (1, 32)))
    return Table("Verifier cost (CPU, same run)", ("model", "ms/pair, batch 1", "ms/pair, batch 32"), (row,))


def deploy_table(params: Params) -> Table:
    """The model ``deploy`` chose, at exactly the thresholds it ships: per domain the natural-dev
    threshold certified by a one-sided 95 % Clopper-Pearson bound (else the pooled one), its counts and
    bound, and the figures measured there; the last column says whether the target held on natural test."""
    eval_metrics = read_json(EVAL)
    deploy, target = eval_metrics["deploy"], eval_metrics["target_precision"]
    if "guarantee" not in deploy:  # natural dev not scored: the val thresholds
        return _val_deploy_table(params, deploy)
    rows = []
    for g in _groups(params):
        base = "deploy" if g == ALL else f"deploy.per_domain.{g}"
        figures = [
            Cell(EVAL, f"{base}.{s}.{k}", ".3f") for s in DEPLOY_CALIBRATED_SETS for k in ("hit_rate", "hit_precision")
        ]
        found = deploy["guarantee"][g]
        held = deploy[DEPLOY_CALIBRATED_SETS[-1]] if g == ALL else deploy["per_domain"][g][DEPLOY_CALIBRATED_SETS[-1]]
        certified = "yes" if found["certified"] else ("no: all's threshold" if found.get("fallback") else "no")
        if found.get("best"):
            best = found["best"]
            certified += f" (best: >= {best['precision_lower_bound']:.3f} at {best['threshold']:.3f})"
        yardstick = _hindsight_cells(deploy, g)
        rows.append(
            (
                g,
                Cell(EVAL, f"deploy.guarantee.{g}.threshold", ".3f"),
                Cell(EVAL, f"deploy.guarantee.{g}.right_hits", "d"),
                Cell(EVAL, f"deploy.guarantee.{g}.hits", "d"),
                Cell(EVAL, f"deploy.guarantee.{g}.precision_lower_bound", ".3f"),
                certified,
                *figures,
                ("yes" if held["hit_precision"] >= target else "NO")
                + (" (nothing hits)" if not held["hit_rate"] else ""),
                *yardstick,
            )
        )
    header = (
        "thresholds",
        "threshold",
        "natural dev right hits",
        "hits",
        "precision lower bound (95 %)",
        "certified",
        *(f"{s.replace('_', ' ')} {k}" for s in DEPLOY_CALIBRATED_SETS for k in ("hit rate", "hit precision")),
        f"natural test precision >= {target}",
        *(
            (f"natural test hit rate in hindsight (in-sample, precision >= {target})", "shipped share of it")
            if "hindsight" in deploy
            else ()
        ),
    )
    chosen_on = deploy["chosen_on"].replace("_", " ")
    title = (
        f"Deploy: {deploy['model']}, chosen on {chosen_on}, at its shipped thresholds (calibrated on natural dev:"
        f" a one-sided 95 % Clopper-Pearson lower bound on hit precision >= {target})"
    )
    return Table(title, header, tuple(rows))


def _hindsight_cells(deploy: dict[str, Any], group: str) -> tuple[str | Cell, ...]:
    """The yardstick columns of the deploy table: natural test's own operating point (in-sample) and
    the share of its hit rate the shipped thresholds reach ("-" where nothing can reach the target)."""
    if "hindsight" not in deploy:
        return ()
    share = deploy["hindsight"][group]["shipped_share"]
    return (
        Cell(EVAL, f"deploy.hindsight.{group}.hit_rate", ".3f"),
        "-" if share is None else Cell(EVAL, f"deploy.hindsight.{group}.shipped_share", ".2f"),
    )


def _val_deploy_table(params: Params, deploy: dict[str, Any]) -> Table:
    rows = []
    for g in _groups(params):
        base = "deploy" if g == ALL else f"deploy.per_domain.{g}"
        figures = (Cell(EVAL, f"{base}.{s}.{k}", ".3f") for s in DEPLOY_SETS for k in ("hit_rate", "hit_precision"))
        rows.append((g, Cell(EVAL, f"{base}.val.threshold", ".3f"), *figures))
    header = (
        "thresholds",
        "threshold",
        *(f"{s.replace('_', ' ')} {k}" for s in DEPLOY_SETS for k in ("hit rate", "hit precision")),
    )
    chosen_on = deploy["chosen_on"].replace("_", " ")
    return Table(
        f"Deploy: {deploy['model']}, chosen on {chosen_on}, at its shipped (val) thresholds", header, tuple(rows)
    )


def cost_table(params: Params) -> Table:
    """Cost against quality: the baseline, the deploy model and each reference, timed in one run."""
    deploy = read_json(EVAL)["deploy"]["model"]
    rows, outside = [], _outside(params)
    for role, m in (
        ("baseline", BASELINE),
        ("deploy", deploy),
        *(("reference", r) for r in _references(params, outside)),
    ):
        source, prefix = _source(m, "cost", outside)
        timing = tuple(Cell(source, f"{prefix}.{k}", f) for _, k, f in COST_FIGURES)
        rows.append((f"{m} ({role})", *timing, *_columns(m, ALL, COST_COLUMNS, outside)))
    if outside:
        timing = tuple(Cell(REFERENCE, f"cost.models.{BASELINE}.{k}", f) for _, k, f in COST_FIGURES)
        rows.append(
            (f"{BASELINE} (timed with the references)", *timing, *_columns(BASELINE, ALL, COST_COLUMNS, outside))
        )
    header = ("model", *(c[0] for c in COST_FIGURES), *(c[0] for c in COST_COLUMNS))
    title = f"Cost against quality: all domains, one cache (CPU timings: {_timing_runs(paths.COST, outside)})"
    return Table(title, header, tuple(rows))


def model_tables(params: Params) -> list[Table]:
    """Every model on each domain (and all): replay, ranking quality and the seeds' margin metrics."""
    header, outside = ("model", *(c[0] for c in MODEL_COLUMNS)), _outside(params)
    return [
        Table(
            f"{'all domains, one cache' if g == ALL else g}: every model (generated test, natural test)",
            header,
            tuple((m, *_columns(m, g, MODEL_COLUMNS, outside)) for m in _models(params, outside)),
        )
        for g in _groups(params)
    ]


def data_table(params: Params) -> Table:
    """Rows through the quality gate and the split, per domain, and what the split checks found."""
    rows = []
    for d in params.domains:
        val, split = paths.stage_metrics("validate", d), paths.stage_metrics("split", d)
        rows.append(
            (
                d,
                Cell(val, "rows_in", "d"),
                Cell(val, "quarantined", "d"),
                Cell(split, "rows.train", "d"),
                Cell(split, "rows.val", "d"),
                Cell(split, "rows.test", "d"),
                Cell(split, "dropped_overlap.train", "d"),
                Cell(split, "unseen.cross_split_topics", "d"),
                Cell(split, "unseen.cross_split_templates", "d"),
            )
        )
    header = (
        "domain", "generated", "quarantined", "train", "val", "test", "dropped (shared text)",
        "topics across splits", "templates across splits",
    )  # fmt: skip
    return Table("Data: quality gate and split", header, tuple(rows))


def training_table(params: Params) -> Table:
    rows = []
    for m in params.train_models:
        t = paths.stage_metrics("train", m)
        rows.append(
            (m, Cell(t, "triplets", "d"), Cell(t, "steps", "d"), Cell(t, "final_loss_mean_last_10pct", ".4f"),
             Cell(t, "triplets_per_s", ".1f"))
        )  # fmt: skip
    return Table("Training", ("model", "triplets", "steps", "final loss", "triplets/s"), tuple(rows))


HEADLINE_LABELS = {
    "natural_hit_rate": "natural test hit rate",
    "natural_hit_precision": "natural test hit precision",
    "natural_ap": "natural test AP",
    "reask_hit_rate": "traffic test re-ask hit rate (with verifier)",
    "near_miss_hit_rate": "traffic test near-miss wrong-hit rate (with verifier)",
    "traffic_hit_precision": "traffic test hit precision (with verifier)",
}


def interval_table(params: Params) -> Table:
    """The headline figures of the deploy model and the baseline, each at the settings it ships, with
    95 % intervals and the paired-bootstrap interval of their difference (metrics/headline.json)."""
    sources = {name: EVAL for name in HEADLINE_NATURAL} | {name: TRAFFIC for name in HEADLINE_TRAFFIC}
    keys = ("model", "model_ci_low", "model_ci_high", "baseline", "baseline_ci_low", "baseline_ci_high")
    rows = tuple(
        (
            group,
            HEADLINE_LABELS[name],
            *(Cell(source, f"headline.{group}.{name}.{k}") for k in keys),
            *(Cell(source, f"headline.{group}.{name}.{k}", "+.3f") for k in ("diff", "diff_ci_low", "diff_ci_high")),
        )
        for group in [ALL, *params.domains]
        for name, source in sources.items()
    )
    header = ("domain", "figure", "deploy", "CI low", "CI high", "baseline", "CI low", "CI high")
    return Table(
        "Headline with 95 % intervals: the deploy model against the baseline (paired bootstrap over topics /"
        " answer groups)",
        (*header, "deploy - baseline", "CI low", "CI high"),
        rows,
    )


def previous_headline() -> dict[str, Any] | None:
    """metrics/headline.json as the last commit holds it (None when it holds none)."""
    shown = git("show", f"HEAD:{HEADLINE_JSON.as_posix()}")
    if shown.returncode != 0:
        return None
    try:
        return json.loads(shown.stdout)
    except json.JSONDecodeError:
        return None


def changes_since(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """RESULTS.md's comparison with the last commit: each all-domains deploy figure, then and now; a
    change is beyond noise when the earlier figure lies outside this run's 95 % interval."""
    lines = ["### Since the last commit (deploy model, all domains)", ""]
    if previous is None or ALL not in previous:
        return [*lines, "The last commit holds no `metrics/headline.json` to compare with.", ""]
    lines += [
        f"Deploy model then: `{previous.get('deploy_model')}`; now: `{current['deploy_model']}`.",
        "",
        "| figure | last commit | now | now, 95 % interval | change |",
        "|---|---|---|---|---|",
    ]
    for name, label in HEADLINE_LABELS.items():
        now = current[ALL][name]
        then = previous[ALL].get(name, {}).get("deploy")
        if then is None:
            lines.append(f"| {label} | - | {now['deploy']:.3f} | {now['deploy_ci95']} | new |")
            continue
        low, high = (float(x) for x in now["deploy_ci95"].strip("[]").split(","))
        verdict = "none" if then == now["deploy"] else "within noise" if low <= then <= high else "beyond noise"
        lines.append(f"| {label} | {then:.3f} | {now['deploy']:.3f} | {now['deploy_ci95']} | {verdict} |")
    return [*lines, "", "A change is beyond noise when the last commit's figure lies outside this run's interval.", ""]


def all_tables(params: Params) -> list[Table]:
    return [
        traffic_table(params),
        interval_table(params),
        traffic_ablation_table(params),
        ablation_natural_table(),
        traffic_cost_table(params),
        verifier_cost_table(),
        headline_table(params),
        deploy_table(params),
        cost_table(params),
        *model_tables(params),
        data_table(params),
        training_table(params),
    ]


# --- rendering -----------------------------------------------------------------------------------


def _markdown(table: Table, cache: dict[Path, Any], locked: dict[str, str]) -> list[str]:
    lines = [f"### {table.title}", "", "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.render_rows(cache)]
    cites = ", ".join(
        f"`{s}` (md5 `{locked[str(s)]}`)" if str(s) in locked else f"`{s}` (in git, md5 `{file_md5(s)}`)"
        for s in table.sources()
    )
    return [*lines, "", f"Source: {cites}; each cell is the JSON key named by its row and column.", ""]


def render_results(params: Params) -> str:
    """RESULTS.md: provenance header, then every table with its sources and their locked md5."""

    locked = locked_outputs()
    cache: dict[Path, Any] = {}
    base = read_json(EVAL)["base_model"]
    models = [*params.train_models, MERGED]
    lines = [
        "# Results",
        "",
        "Generated by the `report` stage (`dvc repro report`) from the metrics files it cites; do not edit.",
        "`cachelora verify` re-checks every number here against those files and every file against `dvc.lock`.",
        "",
        "| artifact | identity |",
        "|---|---|",
        f"| base model | `{base['name']}` sha256 `{base['sha256']}` |",
        f"| params.yaml | sha256 `{params_digest()}` (parsed, canonical JSON) |",
        f"| inputs (code, params, seeds, natural sets) at git commit | `{git_commit(paths.PIPELINE_INPUTS)}` |",
        *[f"| `models/{m}` | md5 `{locked.get(f'models/{m}', 'not in dvc.lock')}` (dvc.lock) |" for m in models],
        "",
        "**Cache replay** (docs/metrics.md): the cache holds every positive and negative of a set; each anchor",
        "looks up its nearest entry and hits when the cosine reaches the threshold; a hit is correct when",
        "the entry asks the anchor's question. Each model's threshold is its **operating point**: the lowest",
        f"val threshold whose val hit precision reaches {read_json(EVAL)['target_precision']} (per domain; one",
        'global threshold for the cross-domain cache "all"). It is chosen on the generated val split and',
        "reported on the generated test split and on the hand-written natural test set (`data/natural/test.jsonl`).",
        "Natural sets are also replayed at the natural dev set's own operating point (the natural-dev threshold).",
        "**What ships** are other thresholds: per domain the lowest natural-dev threshold whose one-sided 95 %",
        "Clopper-Pearson lower bound on hit precision reaches the target (a domain that cannot certify it alone",
        "takes the pooled one); the deploy table gives each with its counts, bound and natural test figures.",
        "Test topics and phrasings are unseen by every model (README, Pipeline: `split`). AP is threshold-free.",
        "Reference models (no adapter) are scored the same way and never deployed; those outside",
        "`evaluate.reference_models` by `benchmarks/reference_models.py` with the stages' own functions",
        "(`benchmarks/results/reference.json`). The cost table's timings come from the evaluate stage's own run",
        "(`metrics/cost.json`), a reference's from the benchmark's run beside the baseline: compare within a run.",
        "Gain % is the seeds' margin gain over the baseline, with a paired-bootstrap 95 % CI over whole topics.",
        "",
        "**Traffic replay** (docs/metrics.md): per domain, every original of `data/natural/traffic/<set>` is",
        "asked first and cached; re-asks (same answer) and near-misses (same words, another answer) follow in a",
        "seeded order; a miss is cached with its own answer. Settings are chosen on traffic dev, reported on test.",
        "",
    ]
    for table in all_tables(params):
        lines += _markdown(table, cache, locked)
    lines += changes_since(previous_headline(), read_json(HEADLINE_JSON))
    return "\n".join(lines)


def readme_block(params: Params) -> str:
    """README's results block: the headline table, same source as RESULTS.md."""
    cache: dict[Path, Any] = {}
    lines = [
        *_markdown(traffic_table(params), cache, locked_outputs()),
        *_markdown(headline_table(params), cache, locked_outputs()),
    ]
    return "\n".join([BEGIN, *lines, "Full tables and provenance: [RESULTS.md](RESULTS.md).", END])


def replace_block(text: str, block: str, source: Path = README) -> str:
    """``text`` with the part between the results markers replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise CacheloraError(f"{source}: needs exactly one '{BEGIN}' and one '{END}' marker")
    head, rest = text.split(BEGIN)
    return head + block + rest.split(END, 1)[1]


def write_report(params: Params) -> None:
    """Write metrics/headline.json, RESULTS.md and README's results block."""
    write_json(HEADLINE_JSON, headline(read_json(EVAL), read_json(TRAFFIC), params.domains))
    write_text(RESULTS, render_results(params) + "\n")
    write_text(README, replace_block(README.read_text(encoding="utf-8"), readme_block(params)))
