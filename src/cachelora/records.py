"""Files, written atomically (temp file + rename) and read with one-line errors: JSON, JSONL, YAML, hashes."""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from cachelora.errors import CacheloraError

log = logging.getLogger(__name__)

_UMASK = os.umask(0)
os.umask(_UMASK)


def _temp_prefix(path: Path) -> str:
    """Temp names are ``.<name>.<pid>.<random>.tmp``: the pid tells a killed writer's leftovers from live ones."""
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process: possibly another thread's write in progress
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Remove the temp siblings of ``path`` that an interrupted (killed) writer left; return them.

    Only temps of this target are touched (not those of ``<name>.other``), and only when the
    process that made them is gone (names without a pid predate the pid and are stale too).
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]+\.tmp")
    removed = []
    for sibling in sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp")):
        match = pattern.fullmatch(sibling.name)
        if match is None or (match[1] is not None and _alive(int(match[1]))):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write", sibling)
        removed.append(sibling)
    return removed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it into place only if the block succeeds.

    Temps that a killed writer left for the same ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:  # a full disk, a read-only folder
        raise CacheloraError(f"{path}: not written ({exc.strerror or exc}); what was there is kept") from None
    finally:
        tmp_path.unlink(missing_ok=True)


def new_temp_dir(path: str | Path) -> Path:
    """A new temp directory beside ``path``, named as atomic writes name theirs (so a killed writer's
    is removed by the next write of ``path``), after removing those already left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)
    return tmp


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; it replaces ``path`` only if the block succeeds.

    Temps that a killed writer left for the same ``path`` are removed first.
    """
    path = Path(path)
    tmp = new_temp_dir(path)
    try:
        yield tmp
        if path.exists():
            # Move the old directory aside first: a failure between the two renames puts it back.
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix="_old.tmp", dir=path.parent))
            os.replace(path, old / "dir")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "dir", path)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write pretty, key-sorted JSON atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: str) -> Any:
    """``json.loads`` that refuses NaN and Infinity (bad input, never a number) and nesting too deep to
    read (ValueError, with the reason; a JSONDecodeError names its line)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a missing or malformed file (NaN and Infinity included) is a one-line error."""
    path = Path(path)
    try:
        return parse_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheloraError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise CacheloraError(f"{path}: is a directory, not a JSON file") from None
    except json.JSONDecodeError as exc:
        raise CacheloraError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    except ValueError as exc:
        raise CacheloraError(f"{path}: malformed JSON ({exc})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping holding a key twice (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path, *, keys: Iterable[str] = (), missing: str = "file not found") -> dict[str, Any]:
    """Read a YAML mapping; a missing file (``missing`` says what), malformed YAML (a key twice in one
    mapping included) or anything but a mapping is a one-line error naming the file (``keys``, the
    expected ones, name the mapping)."""
    path = Path(path)
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError:
        raise CacheloraError(f"{path}: {missing}") from None
    except yaml.YAMLError as exc:
        raise CacheloraError(f"{path}: malformed YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise CacheloraError(f"{path}: expected a mapping" + (f" with keys {', '.join(keys)}" if keys else ""))
    return raw


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object a line, atomically; return the number of rows."""
    count = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
    return count


def read_jsonl_lines(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Read JSONL as (line number, object) pairs: lines are split at newlines only (a U+2028 inside a
    text does not shift the count), blank lines are skipped, and a malformed line (NaN or Infinity,
    nesting too deep) is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise CacheloraError(f"{path}: file not found")
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise CacheloraError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = parse_json(line)
            except json.JSONDecodeError as exc:
                raise CacheloraError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            except ValueError as exc:
                raise CacheloraError(f"{path}:{lineno}: malformed JSON ({exc})") from None
            if not isinstance(row, dict):
                raise CacheloraError(f"{path}:{lineno}: expected a JSON object")
            rows.append((lineno, row))
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read JSONL (:func:`read_jsonl_lines`), the objects alone."""
    return [row for _, row in read_jsonl_lines(path)]


def file_md5(path: str | Path) -> str:
    """md5 of a file's bytes (as DVC records it)."""
    return _file_hash(path, hashlib.md5())


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    return _file_hash(path, hashlib.sha256())


def _file_hash(path: str | Path, digest: Any) -> str:
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
