"""Train/val/test split grouped so no original query (or its paraphrases) crosses splits."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from typing import Any

from cachelora.errors import CacheloraError
from cachelora.params import SplitParams
from cachelora.records import TEXT_FIELDS, normalise

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def group_key(row: dict[str, Any], group_by: str) -> str:
    """The row's split group: its ``group_by`` field, falling back to ``source_id`` (user data)."""
    return str(row.get(group_by) or row["source_id"])


def texts_of(rows: list[dict[str, Any]]) -> set[str]:
    """Every normalised anchor/positive/negative text in ``rows``."""
    return {normalise(row[field]) for row in rows for field in TEXT_FIELDS}


def assign_groups(sizes: dict[str, int], params: SplitParams, salt: str) -> dict[str, str]:
    """Map each group to a split, in a seeded order, so each split gets about its row share."""
    groups = sorted(sizes)
    random.Random(f"{params.seed}:{salt}").shuffle(groups)
    total = sum(sizes.values())
    bounds = [params.train, params.train + params.val]
    assignment, done = {}, 0
    for group in groups:
        middle = (done + sizes[group] / 2) / total
        assignment[group] = SPLITS[sum(middle >= b for b in bounds)]
        done += sizes[group]
    return assignment


def _drop_overlap(rows: list[dict[str, Any]], held_out: set[str]) -> tuple[list[dict[str, Any]], int]:
    kept = [r for r in rows if not any(normalise(r[f]) in held_out for f in TEXT_FIELDS)]
    return kept, len(rows) - len(kept)


def split_rows(
    rows: list[dict[str, Any]], params: SplitParams, salt: str
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Split ``rows`` by group; drop train/val rows that share a text with a later split.

    Groups keep an original query and its paraphrases together. A negative can still name
    another group's text (a sibling topic); such rows are dropped from train (and val), so no
    test text is ever seen in training. Returns the splits and their metrics.
    """
    sizes: dict[str, int] = defaultdict(int)
    for row in rows:
        sizes[group_key(row, params.group_by)] += 1
    assignment = assign_groups(sizes, params, salt)
    splits: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for row in rows:
        splits[assignment[group_key(row, params.group_by)]].append(row)

    test_texts = texts_of(splits["test"])
    splits["val"], val_dropped = _drop_overlap(splits["val"], test_texts)
    splits["train"], train_dropped = _drop_overlap(splits["train"], test_texts | texts_of(splits["val"]))

    train_texts = texts_of(splits["train"])
    metrics = {
        "rows": {name: len(part) for name, part in splits.items()},
        "groups": {name: sum(1 for g in assignment.values() if g == name) for name in SPLITS},
        "dropped_overlap": {"train": train_dropped, "val": val_dropped},
        "leakage": len(test_texts & train_texts),
        "val_leakage": len(texts_of(splits["val"]) & train_texts),
    }
    if metrics["leakage"] or metrics["val_leakage"]:
        raise CacheloraError(f"split {salt}: {metrics['leakage']} test texts found in train (leakage must be 0)")
    for name in SPLITS:
        if getattr(params, name) > 0 and not splits[name]:
            raise CacheloraError(f"split {salt}: split.{name} is empty ({len(sizes)} groups are too few to split)")
    log.info("split %s: %s", salt, metrics["rows"])
    return splits, metrics
