"""``cachelora verify``: the checks that every reported number traces to a checksummed artifact.

The lock as ``dvc status`` sees it, every model directory and adapter file, RESULTS.md's header and
citations, every table cell against the metric it cites, and (``--recompute``) re-evaluation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import struct
import subprocess
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from cachelora import paths
from cachelora.errors import CacheloraError
from cachelora.params import MERGED, Params
from cachelora.records import file_md5, read_json
from cachelora.report import (
    EVAL,
    LOCK,
    README,
    RESULTS,
    Cell,
    all_tables,
    git,
    headline_table,
    locked_outputs,
    params_digest,
)

RECOMPUTE_TOLERANCE = 1e-4  # per metric; percentages are 100x a ratio, so they get 100x this


def check_commit(commit: str, inputs: list[str], source: Path) -> Iterator[str]:
    """The named commit exists, is HEAD or an ancestor of it, and holds the inputs as they are now."""
    sha = commit.removesuffix("+uncommitted")
    if commit != sha:
        yield f"{source}: generated from inputs not committed on {sha[:12]} (commit them, then `dvc repro -f report`)"
    elif git("merge-base", "--is-ancestor", sha, "HEAD").returncode != 0:
        yield f"{source}: commit {sha[:12]} is not HEAD or an ancestor of it"
    elif changed := git("diff", "--name-only", sha, "--", *inputs).stdout.split():
        yield f"{source}: inputs changed since commit {sha[:12]}: {', '.join(changed[:5])}"


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
    """Every table row in ``path`` has exactly its cited cells, each equal to the metric it cites."""
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
        try:
            rendered = table.render_rows(cache)
        except CacheloraError as exc:
            yield f"{path}: table '{table.title}': {exc}"
            continue
        for spec, expected in zip(table.rows, rendered, strict=True):
            labels = list(itertools.takewhile(lambda c: isinstance(c, str), spec))  # a row's leading labels
            prefix = "| " + " | ".join(labels) + " |"
            found = next((i for i in range(start, len(lines)) if lines[i].startswith(prefix)), None)
            if found is None:
                yield f"{path}: table '{table.title}' has no row '{' / '.join(labels)}'"
                continue
            actual = [c.strip() for c in lines[found].strip().removeprefix("|").removesuffix("|").split("|")]
            if len(actual) != len(expected):
                label = " / ".join(labels)
                yield f"{path}:{found + 1}: row '{label}' has {len(actual)} cells, expected {len(expected)}"
                continue
            for cell, want, got in zip(spec, expected, actual, strict=True):
                if isinstance(cell, Cell) and want != got:
                    yield f"{path}:{found + 1}: {cell.key} is {got} here, {want} in {cell.source}"


def check_recompute(params: Params, tolerance: float = RECOMPUTE_TOLERANCE) -> Iterator[str]:
    """Re-evaluate the locked adapters on the locked sets; compare with eval.json key by key, both ways."""
    import math

    from cachelora.base_model import use_threads
    from cachelora.evaluation import pipeline_metrics

    use_threads(params.evaluate.threads)
    fresh, _ = pipeline_metrics(params)
    stored, again = dict(_leaves(read_json(EVAL))), dict(_leaves(fresh))
    for key in sorted(stored.keys() - again.keys()):
        yield f"{EVAL}: {key} is not produced by re-evaluation"
    for key in sorted(again.keys() - stored.keys()):
        yield f"{EVAL}: {key} missing (re-evaluation produces it)"
    for key in sorted(stored.keys() & again.keys()):
        old, value = stored[key], again[key]
        if not isinstance(value, float | int) or isinstance(value, bool):
            if old != value:
                yield f"{EVAL}: {key} is {old!r}, re-evaluation gives {value!r}"
            continue
        if not isinstance(old, float | int) or math.isnan(float(old)) or math.isnan(float(value)):
            yield f"{EVAL}: {key} is {old}, re-evaluation gives {value} (NaN or not a number)"
            continue
        allowed = tolerance * 100 if "_pct" in key else tolerance
        if abs(float(old) - float(value)) > allowed:
            yield f"{EVAL}: {key} is {old}, re-evaluation gives {value} (tolerance {allowed:g})"


def _leaves(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_status() -> Iterator[str]:
    """Every stage as ``dvc status`` sees it, through DVC's own API: changed deps, params, outs or
    command. Outputs that match the lock but are absent from the local DVC cache are not failures."""
    from dvc.repo import Repo

    with Repo(".") as repo:
        status = repo.status()
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, str):
                yield f"{LOCK}: stage '{stage}': {change}"
                continue
            for kind, items in change.items():
                if not isinstance(items, dict):
                    yield f"{LOCK}: stage '{stage}': {kind} {items}"
                    continue
                for path, what in items.items():
                    if what == "not in cache":
                        continue
                    detail = ", ".join(f"{k} {v}" for k, v in what.items()) if isinstance(what, dict) else what
                    yield f"{LOCK}: stage '{stage}': {kind.removeprefix('changed ')} {path}: {detail} (`dvc status`)"


HEADER = {
    "base": re.compile(r"^\| base model \| `(?P<name>[^`]+)` sha256 `(?P<sha>[0-9a-f]+)` \|$"),
    "params": re.compile(r"^\| params\.yaml \| sha256 `(?P<digest>[0-9a-f]+)`"),
    "commit": re.compile(r"^\| inputs .* at git commit \| `(?P<commit>[^`]+)` \|$"),
    "model": re.compile(r"^\| `models/(?P<name>[^`]+)` \| md5 `(?P<md5>[^`]+)` \(dvc\.lock\) \|$"),
}
SOURCE = re.compile(r"`(?P<path>[^`]+)` \(md5 `(?P<md5>[^`]+)`\)")


def check_header(params: Params, path: Path = RESULTS) -> Iterator[str]:
    """RESULTS.md's provenance header and every "Source … md5" citation, against what is here now."""
    from cachelora.base_model import model_sha256

    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    found = {kind: [(i + 1, m) for i, line in enumerate(lines) if (m := rx.match(line))] for kind, rx in HEADER.items()}
    for kind in ("base", "params", "commit"):
        if len(found[kind]) != 1:
            yield f"{path}: header line '{kind}' missing or repeated"
    locked = locked_outputs()
    for lineno, m in found["base"]:
        if m["name"] != params.base_model or m["sha"] != model_sha256(params.base_model):
            yield f"{path}:{lineno}: base model {m['name']} {m['sha'][:12]}… is not the installed '{params.base_model}'"
    for lineno, m in found["params"]:
        if m["digest"] != params_digest():
            now = params_digest()
            yield f"{path}:{lineno}: params digest {m['digest'][:12]}… differs from params.yaml now ({now[:12]}…)"
    for _, m in found["commit"]:
        yield from check_commit(m["commit"], paths.PIPELINE_INPUTS, path)
    models = {m["name"] for _, m in found["model"]}
    for name in sorted({*params.train_models, MERGED} - models):
        yield f"{path}: header names no md5 for models/{name}"
    cited = [(i + 1, m) for i, line in enumerate(lines) if line.startswith("Source: ") for m in SOURCE.finditer(line)]
    for lineno, m in [*((n, m) for n, m in found["model"]), *cited]:
        source = m["path"] if "path" in m.groupdict() else f"models/{m['name']}"
        if m["md5"] != locked.get(source, "not in dvc.lock"):
            yield f"{path}:{lineno}: {source} md5 {m['md5']} differs from dvc.lock {locked.get(source)}"
        elif Path(source).is_file() and file_md5(Path(source)) != m["md5"]:
            yield f"{path}:{lineno}: {source} md5 {file_md5(Path(source))} differs from the cited {m['md5']}"


def check_models(params: Params) -> Iterator[str]:
    """Every model directory is there and whole; every adapter file's framing; every adapter loads."""
    from cachelora.adapters import CONFIG, INFO, WEIGHTS, load_adapter_model

    for name in (*params.train_models, MERGED):
        adapter = paths.model_dir(name)
        if not adapter.is_dir():
            yield f"{adapter}: model directory missing (run `dvc pull` or `dvc repro`)"
            continue
        missing = [f for f in (WEIGHTS, CONFIG, INFO) if not (adapter / f).is_file()]
        if missing:
            yield f"{adapter}: partial model directory, missing {', '.join(missing)}"
            continue
        if problem := check_safetensors(adapter / WEIGHTS):
            yield problem
            continue
        try:
            load_adapter_model(adapter)
        except CacheloraError as exc:
            yield str(exc)


def verify(params: Params, pull: bool = False, recompute: bool = False) -> tuple[list[str], int]:
    """Run every check, each to the end; returns the failures (one line each) and how many checks ran."""
    if pull:
        proc = subprocess.run(["dvc", "pull"], capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()
            return [f"dvc pull failed: {tail[-1] if tail else proc.returncode}"], 1
    checks: list[Callable[[], Iterator[str]]] = [
        check_lock,
        check_status,
        partial(check_models, params),
        partial(check_header, params),
        partial(check_results, params, RESULTS),
        partial(check_results, params, README),
    ]
    if recompute:
        checks.append(partial(check_recompute, params))
    failures: list[str] = []
    for check in checks:
        try:
            failures += check()
        except CacheloraError as exc:  # a check that cannot go on names why; the others still run
            failures.append(str(exc))
    return failures, len(checks)
