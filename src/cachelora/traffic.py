"""Natural traffic sets (``data/natural/traffic/<set>/<domain>.jsonl``): answer groups of an original,
its re-asks (the same question in other words) and its near-misses (almost the same words, another
answer), read, checked with Great Expectations, and laid out as the stream a cache sees.

One JSON object a line::

    {"group_id": "law-dev-001", "domain": "law", "original": "...", "reasks": ["...", "..."],
     "near_misses": [{"text": "...", "kind": "jurisdiction"}, ...]}
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cachelora.errors import CacheloraError
from cachelora.lexicon import BAD_RENDER_RE
from cachelora.records import read_jsonl_lines
from cachelora.triplets import normalise

TRAFFIC_DIR = Path("data/natural/traffic")
SETS = ("dev", "test")  # replayed: dev chooses the settings, test reports them
TRAIN_SET = "train"  # written apart from both: pairs the verifier trains on
REASK, NEAR_MISS, ORIGINAL = "reask", "near_miss", "original"
GROUP_SIZE = (2, 3)  # re-asks and near-misses a group holds, each
MIN_SHARED_WORDS = 0.6  # a near-miss keeps at least this share of its original's distinct words
MAX_CHARS = 300


@dataclass(frozen=True)
class AnswerGroup:
    """One original query with its re-asks and near-misses ((text, kind) pairs)."""

    group_id: str
    domain: str
    original: str
    reasks: tuple[str, ...]
    near_misses: tuple[tuple[str, str], ...]

    @property
    def texts(self) -> tuple[str, ...]:
        """The original, then the re-asks, then the near-misses' texts."""
        return (self.original, *self.reasks, *(text for text, _ in self.near_misses))


@dataclass(frozen=True)
class Lookup:
    """A query the cache sees: its text, the id of the answer it needs, and what it is."""

    text: str
    answer_id: str
    kind: str  # original, reask or near_miss
    group_id: str
    near_miss_kind: str | None = None


def traffic_file(set_name: str, domain: str, folder: Path = TRAFFIC_DIR) -> Path:
    return folder / set_name / f"{domain}.jsonl"


def _strings(path: Path, line: int, value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) and t.strip() for t in value):
        raise CacheloraError(f"{path}:{line}: {key}: must be a list of non-empty strings")
    return tuple(value)


def read_traffic(path: Path, domain: str) -> list[AnswerGroup]:
    """The answer groups of one file; a malformed group is an error naming the file, line and key."""
    groups = []
    for line, row in read_jsonl_lines(path):
        for key in ("group_id", "original"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise CacheloraError(f"{path}:{line}: {key}: must be a non-empty string")
        if row.get("domain", domain) != domain:
            raise CacheloraError(f"{path}:{line}: domain: '{row.get('domain')}' in the {domain} traffic file")
        misses = row.get("near_misses")
        if not isinstance(misses, list) or not all(
            isinstance(m, dict) and isinstance(m.get("text"), str) and m["text"].strip() for m in misses
        ):
            raise CacheloraError(f"{path}:{line}: near_misses: must be a list of {{text, kind}} objects")
        groups.append(
            AnswerGroup(
                row["group_id"],
                domain,
                row["original"],
                _strings(path, line, row.get("reasks"), "reasks"),
                tuple((m["text"], str(m.get("kind", ""))) for m in misses),
            )
        )
    return groups


def read_traffic_sets(domains: list[str], folder: Path = TRAFFIC_DIR) -> dict[str, dict[str, list[AnswerGroup]]]:
    """set -> domain -> answer groups, for both sets and every domain."""
    return {s: {d: read_traffic(traffic_file(s, d, folder), d) for d in domains} for s in SETS}


def texts_of(groups: list[AnswerGroup]) -> set[str]:
    """Every normalised text of the groups (for contamination checks)."""
    return {normalise(t) for g in groups for t in g.texts}


def words(text: str) -> set[str]:
    """A text's distinct lower-case words (runs of letters and digits)."""
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def shared_words(original: str, text: str) -> float:
    """The share of ``original``'s distinct words that ``text`` also holds."""
    kept = words(original)
    return len(kept & words(text)) / max(1, len(kept))


def stream(groups: list[AnswerGroup], seed: str) -> list[Lookup]:
    """What the cache sees, in order: every original first (cached with its answer id), then the
    re-asks (the original's answer id) and near-misses (each its own answer id) in a seeded order."""
    originals = [Lookup(g.original, g.group_id, ORIGINAL, g.group_id) for g in groups]
    later = [Lookup(t, g.group_id, REASK, g.group_id) for g in groups for t in g.reasks]
    later += [
        Lookup(t, f"{g.group_id}:near_miss:{i}", NEAR_MISS, g.group_id, kind)
        for g in groups
        for i, (t, kind) in enumerate(g.near_misses)
    ]
    random.Random(seed).shuffle(later)
    return originals + later


# --- the Great Expectations check ------------------------------------------------------------------


def _frame(groups: list[AnswerGroup]) -> pd.DataFrame:
    """One row per text: its group, role, normalised form, the group's shape and the word overlap."""
    rows = []
    for g in groups:
        texts = [(g.original, ORIGINAL), *((t, REASK) for t in g.reasks), *((t, NEAR_MISS) for t, _ in g.near_misses)]
        for text, role in texts:
            rows.append(
                {
                    "group_id": g.group_id,
                    "role": role,
                    "text": text,
                    "norm": normalise(text),
                    "reasks": len(g.reasks),
                    "near_misses": len(g.near_misses),
                    "shared_words": shared_words(g.original, text) if role == NEAR_MISS else None,
                }
            )
    return pd.DataFrame(rows)


def _suite(name: str) -> Any:
    import great_expectations as gx
    import great_expectations.expectations as gxe

    low, high = GROUP_SIZE
    suite = gx.ExpectationSuite(name=name)
    for expectation in (
        gxe.ExpectColumnValuesToBeBetween(column="reasks", min_value=low, max_value=high),
        gxe.ExpectColumnValuesToBeBetween(column="near_misses", min_value=low, max_value=high),
        gxe.ExpectColumnValuesToBeUnique(column="norm"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=5, max_value=MAX_CHARS),
        gxe.ExpectColumnValuesToNotMatchRegex(column="text", regex=BAD_RENDER_RE.pattern),
        gxe.ExpectColumnValuesToBeBetween(column="shared_words", min_value=MIN_SHARED_WORDS),
    ):
        suite.add_expectation(expectation)
    return suite


def check_traffic(groups: list[AnswerGroup], source: str, min_groups: int) -> dict[str, Any]:
    """Group shape (2-3 re-asks, 2-3 near-misses), no text twice in the set, clean texts, near-misses
    that share most words with their original, and at least ``min_groups`` groups; the first problem
    fails with the file and the text at fault."""
    from cachelora.quality import run_suite

    if len(groups) < min_groups:
        raise CacheloraError(f"{source}: {len(groups)} answer groups, fewer than traffic.min_groups ({min_groups})")
    df = _frame(groups)
    for result in run_suite(df, lambda: _suite(f"traffic_{Path(source).stem}")):
        if result.success:
            continue
        config = result.expectation_config
        bad = result.result.get("unexpected_index_list") or []
        where = f"group {df.loc[bad[0], 'group_id']}: {df.loc[bad[0], 'text']!r}" if bad else "the set"
        raise CacheloraError(f"{source}: {where}: fails {config.type} on {config.kwargs.get('column')}")
    kinds: dict[str, int] = {}
    for g in groups:
        for _, kind in g.near_misses:
            kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "groups": len(groups),
        "reasks": sum(len(g.reasks) for g in groups),
        "near_misses": sum(len(g.near_misses) for g in groups),
        "near_miss_kinds": dict(sorted(kinds.items())),
    }
