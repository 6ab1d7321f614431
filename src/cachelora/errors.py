"""The one error type users see: a single line naming the file, line or key at fault."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError


class CacheloraError(Exception):
    """A user-facing error; the CLI prints ``error: <message>`` and exits non-zero."""


def from_validation(path: str | Path, exc: ValidationError) -> CacheloraError:
    """The first pydantic problem as ``file: dotted.key: message``."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return CacheloraError(f"{path}: {key}: {msg}" if key else f"{path}: {msg}")
