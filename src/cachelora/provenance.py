"""Provenance: RESULTS.md generated from the metrics it cites, and the checks behind ``verify``.

Every number in RESULTS.md (and in README's results block) is a :class:`Cell`: a JSON file, a
dotted key and a format. The report renders cells; ``verify`` renders them again from the current
metrics and compares, so a hand-edited or stale number is caught and named.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cachelora import paths
from cachelora.errors import CacheloraError
from cachelora.params import Params
from cachelora.records import file_md5, read_json, write_text

LOCK = Path("dvc.lock")
RESULTS = Path("RESULTS.md")
README = Path("README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
RECOMPUTE_TOLERANCE = 1e-4  # per metric; percentages are 100x a ratio, so they get 100x this
EVAL = paths.METRICS_DIR / "eval.json"


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


def git_commit() -> str:
    """The checked-out commit, ``+dirty`` when the working tree differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.stdout.strip() else "")


# --- the tables ----------------------------------------------------------------------------------


def headline_table(params: Params) -> Table:
    """Baseline against the merged and multi adapters, per domain (test split)."""
    rows = []
    for d in params.domains:
        rows.append(
            (
                d,
                Cell(EVAL, f"baseline.{d}.margin", ".4f"),
                Cell(EVAL, f"merged.{d}.margin", ".4f"),
                Cell(EVAL, f"merged.{d}.margin_gain_pct", "+.1f"),
                Cell(EVAL, f"merged.{d}.margin_gain_pct_ci_low", "+.1f"),
                Cell(EVAL, f"merged.{d}.margin_gain_pct_ci_high", "+.1f"),
                Cell(EVAL, f"baseline.{d}.triplet_accuracy", ".3f"),
                Cell(EVAL, f"merged.{d}.triplet_accuracy", ".3f"),
                Cell(EVAL, f"multi.{d}.margin_gain_pct", "+.1f"),
                Cell(EVAL, f"multi.{d}.triplet_accuracy", ".3f"),
            )
        )
    header = (
        "domain", "baseline margin", "merged margin", "merged gain %", "CI low", "CI high",
        "baseline acc", "merged acc", "multi gain %", "multi acc",
    )  # fmt: skip
    return Table("Headline: merged adapter against the baseline (test split)", header, tuple(rows))


def model_tables(params: Params) -> list[Table]:
    """Every model on each domain's test split, thresholds chosen on val."""
    from cachelora.evaluation import BASELINE
    from cachelora.merging import MERGED

    header = (
        "model", "margin", "gain %", "CI low", "CI high", "accuracy", "AP", "ROC AUC",
        "threshold (val)", "precision", "recall", "F1", "false-hit rate",
    )  # fmt: skip
    tables = []
    for d in params.domains:
        rows = []
        for m in (BASELINE, *params.train_models, MERGED):
            at = f"{m}.{d}.at_max_f1"
            rows.append(
                (
                    m,
                    Cell(EVAL, f"{m}.{d}.margin", ".4f"),
                    Cell(EVAL, f"{m}.{d}.margin_gain_pct", "+.1f"),
                    Cell(EVAL, f"{m}.{d}.margin_gain_pct_ci_low", "+.1f"),
                    Cell(EVAL, f"{m}.{d}.margin_gain_pct_ci_high", "+.1f"),
                    Cell(EVAL, f"{m}.{d}.triplet_accuracy", ".3f"),
                    Cell(EVAL, f"{m}.{d}.average_precision", ".3f"),
                    Cell(EVAL, f"{m}.{d}.roc_auc", ".3f"),
                    Cell(EVAL, f"{at}.threshold", ".3f"),
                    Cell(EVAL, f"{at}.precision", ".3f"),
                    Cell(EVAL, f"{at}.recall", ".3f"),
                    Cell(EVAL, f"{at}.f1", ".3f"),
                    Cell(EVAL, f"{at}.false_hit_rate", ".3f"),
                )
            )
        tables.append(Table(f"{d} (test split)", header, tuple(rows)))
    return tables


def data_table(params: Params) -> Table:
    """Rows through the quality gate and the split, per domain."""
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
                Cell(split, "leakage", "d"),
            )
        )
    header = ("domain", "generated", "quarantined", "train", "val", "test", "dropped (overlap)", "leakage")
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


def all_tables(params: Params) -> list[Table]:
    return [headline_table(params), *model_tables(params), data_table(params), training_table(params)]


# --- rendering -----------------------------------------------------------------------------------


def _markdown(table: Table, cache: dict[Path, Any], locked: dict[str, str]) -> list[str]:
    lines = [f"### {table.title}", "", "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
    lines += ["| " + " | ".join(row) + " |" for row in table.render_rows(cache)]
    cites = ", ".join(f"`{s}` (md5 `{locked.get(str(s), 'not in dvc.lock')}`)" for s in table.sources())
    return [*lines, "", f"Source: {cites}; each cell is the JSON key named by its row and column.", ""]


def render_results(params: Params) -> str:
    """RESULTS.md: provenance header, then every table with its sources and their locked md5."""
    from cachelora.merging import MERGED

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
        f"| generated at git commit | `{git_commit()}` |",
        *[f"| `models/{m}` | md5 `{locked.get(f'models/{m}', 'not in dvc.lock')}` (dvc.lock) |" for m in models],
        "",
        "Thresholds are chosen on each domain's val split (max F1) and reported on its test split.",
        "Gain % is the margin gain over the baseline with a paired-bootstrap 95 % CI.",
        "",
    ]
    for table in all_tables(params):
        lines += _markdown(table, cache, locked)
    return "\n".join(lines)


def readme_block(params: Params) -> str:
    """README's results block: the headline table, same source as RESULTS.md."""
    lines = _markdown(headline_table(params), {}, locked_outputs())
    return "\n".join([BEGIN, *lines, "Full tables and provenance: [RESULTS.md](RESULTS.md).", END])


def replace_block(text: str, block: str, source: Path = README) -> str:
    """``text`` with the part between the results markers replaced by ``block``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise CacheloraError(f"{source}: needs exactly one '{BEGIN}' and one '{END}' marker")
    head, rest = text.split(BEGIN)
    return head + block + rest.split(END, 1)[1]


def write_report(params: Params) -> None:
    """Write RESULTS.md and README's results block."""
    write_text(RESULTS, render_results(params) + "\n")
    write_text(README, replace_block(README.read_text(encoding="utf-8"), readme_block(params)))


# --- verify --------------------------------------------------------------------------------------


def dir_md5(path: Path) -> str:
    """DVC's hash of a directory: md5 of the sorted JSON listing of (md5, relpath), plus ``.dir``."""
    entries = sorted(
        ({"md5": file_md5(p), "relpath": p.relative_to(path).as_posix()} for p in path.rglob("*") if p.is_file()),
        key=lambda entry: entry["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def check_lock(lock: Path = LOCK, cache_dir: Path = Path(".dvc/cache/files/md5")) -> Iterator[str]:
    """Every dvc.lock output exists with its locked md5; a changed directory is explained file by file
    when its listing is in the DVC cache."""
    for path, md5 in locked_outputs(lock).items():
        target = Path(path)
        if not target.exists():
            yield f"{path}: missing (dvc.lock has md5 {md5})"
        elif not md5.endswith(".dir"):
            if (actual := file_md5(target)) != md5:
                yield f"{path}: md5 {actual} differs from dvc.lock {md5}"
        elif (actual := dir_md5(target)) != md5:
            manifest = cache_dir / md5[:2] / md5[2:]
            if not manifest.is_file():
                yield f"{path}: directory md5 {actual} differs from dvc.lock {md5} (file detail needs the DVC cache)"
                continue
            entries = {e["relpath"]: e["md5"] for e in json.loads(manifest.read_text())}
            present = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
            for rel in sorted(present - set(entries)):
                yield f"{path}/{rel}: not in the locked directory"
            for rel, expected in sorted(entries.items()):
                file = target / rel
                if not file.is_file():
                    yield f"{path}/{rel}: missing (dvc.lock directory {md5})"
                elif (actual := file_md5(file)) != expected:
                    yield f"{path}/{rel}: md5 {actual} differs from dvc.lock {expected}"


def check_safetensors(path: Path) -> str | None:
    """None if the header's data offsets cover the file exactly and it loads, else the problem."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{path}: {size} bytes, too short for a safetensors header"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"{path}: header length {header_len} exceeds the file ({size} bytes)"
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{path}: header is not valid JSON"
    spans = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    covered = 0
    for begin, end in spans:
        if begin != covered:
            return f"{path}: tensor data has a gap or overlap at byte {begin} (expected {covered})"
        covered = end
    expected = 8 + header_len + covered
    if expected != size:
        return f"{path}: header and data offsets cover {expected} bytes, file has {size} ({size - expected:+d})"
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                st.get_tensor(key)
    except Exception as exc:  # safetensors raises its own types
        return f"{path}: does not load ({type(exc).__name__}: {exc})"
    return None


def check_results(params: Params, path: Path) -> Iterator[str]:
    """Every table cell in ``path`` equals the metric it cites."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else None
    if lines is None:
        yield f"{path}: missing (run `dvc repro report`)"
        return
    tables = [headline_table(params)] if path == README else all_tables(params)
    cache: dict[Path, Any] = {}
    for table in tables:
        try:
            start = lines.index(f"### {table.title}")
        except ValueError:
            yield f"{path}: table '{table.title}' missing"
            continue
        for spec, expected in zip(table.rows, table.render_rows(cache), strict=True):
            label = expected[0]
            found = next((i for i in range(start, len(lines)) if lines[i].startswith(f"| {label} |")), None)
            if found is None:
                yield f"{path}: table '{table.title}' has no row '{label}'"
                continue
            actual = [c.strip() for c in lines[found].strip().strip("|").split("|")]
            for cell, want, got in zip(spec[1:], expected[1:], actual[1:], strict=False):
                if want != got:
                    yield f"{path}:{found + 1}: {cell.key} is {got} here, {want} in {cell.source}"


def check_recompute(params: Params, tolerance: float = RECOMPUTE_TOLERANCE) -> Iterator[str]:
    """Re-evaluate the locked adapters on the locked test splits; compare with eval.json."""
    from cachelora.evaluation import pipeline_metrics

    fresh, _ = pipeline_metrics(params)
    stored = read_json(EVAL)
    for key, value in _leaves(fresh):
        try:
            old = lookup(stored, key, EVAL)
        except CacheloraError as exc:
            yield str(exc)
            continue
        allowed = tolerance * 100 if key.endswith(("_pct", "_pct_ci_low", "_pct_ci_high")) else tolerance
        if isinstance(value, float | int) and abs(float(old) - float(value)) > allowed:
            yield f"{EVAL}: {key} is {old}, re-evaluation gives {value} (tolerance {allowed:g})"


def _leaves(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def verify(params: Params, pull: bool = False, recompute: bool = False) -> tuple[list[str], int]:
    """Run every check; returns the failures (one line each) and how many checks ran."""
    from cachelora.adapters import load_adapter_model
    from cachelora.merging import MERGED

    if pull:
        proc = subprocess.run(["dvc", "pull"], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            return [f"dvc pull failed: {tail[-1] if tail else proc.returncode}"], 1
    failures = list(check_lock())
    checks = len(locked_outputs())
    for name in (*params.train_models, MERGED):
        adapter = paths.model_dir(name)
        weights = adapter / "adapter_model.safetensors"
        checks += 2
        if not weights.is_file():
            failures.append(f"{weights}: missing")
            continue
        if problem := check_safetensors(weights):
            failures.append(problem)
            continue
        try:
            load_adapter_model(adapter)
        except CacheloraError as exc:
            failures.append(str(exc))
    for target in (RESULTS, README):
        failures += check_results(params, target)
        checks += 1
    if recompute:
        failures += check_recompute(params)
        checks += 1
    return failures, checks
