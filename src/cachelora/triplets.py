"""The triplet record: its text fields, its ids, the text normalisation, and reading triplet files."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cachelora.errors import CacheloraError
from cachelora.records import read_jsonl_lines

TEXT_FIELDS = ("anchor", "positive", "negative")


def normalise(text: str) -> str:
    """Text as compared for duplicates and leakage: lower case, punctuation and spacing folded."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def stable_id(*parts: str, length: int = 16) -> str:
    """A short hash that depends only on ``parts`` (not on run or platform)."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:length]


def concept_id(domain: str, topic: str, aspect: str) -> str:
    """The id of an original query asked from a lexicon: one (topic, aspect) question."""
    return stable_id(domain, topic, aspect)


def make_record(
    domain: str,
    anchor: str,
    positive: str,
    negative: str,
    source_id: str,
    generator: dict[str, Any],
    **provenance: Any,
) -> dict[str, Any]:
    """A triplet record (docs/metrics.md, "Triplet records"); ``id`` is a hash of its texts."""
    return {
        "id": stable_id(domain, anchor, positive, negative),
        "domain": domain,
        "anchor": anchor,
        "positive": positive,
        "negative": negative,
        "source_id": source_id,
        "generator": generator,
        **provenance,
    }


def read_triplets(path: str | Path, required: Iterable[str] = TEXT_FIELDS) -> list[dict[str, Any]]:
    """Read triplet JSONL, checking that every row has non-empty string ``required`` fields."""
    numbered = read_jsonl_lines(path)
    for lineno, row in numbered:
        for key in required:
            value = row.get(key)
            if not isinstance(value, str) or not value.strip():
                problem = "missing field" if key not in row else "empty or non-string field"
                raise CacheloraError(f"{path}:{lineno}: {problem} '{key}'")
    return [row for _, row in numbered]
