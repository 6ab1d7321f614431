"""Near-miss negatives: seeded edits that keep a question's words and change its answer.

A near-miss is "almost the same words, another answer": a negation or modal flip, another number,
another population, version or jurisdiction, a role or direction swap, or a sibling object. The
edits come from the lexicon (``near_misses``: swap pairs and qualifiers per kind, topics and their
groups for siblings); numbers are changed by rule. :func:`with_near_misses` puts an edit of the
anchor into the hard-negative slot of a seeded share of rows, so MultipleNegativesRankingLoss
learns that a question worded like the anchor but asking something else is not its match.
"""

from __future__ import annotations

import functools
import random
import re
from typing import Any

from cachelora.lexicon import Lexicon, Topic
from cachelora.splitting import SplitPlan
from cachelora.triplets import normalise, stable_id

NEAR_MISS = "near_miss"  # negative_kind prefix: near_miss:<kind>
REPLACE_SHARE = 0.7  # how often a replacement is chosen over an added qualifier, where both apply


@functools.cache  # the same lexicon phrases, for every row
def _word(phrase: str) -> re.Pattern[str]:
    """``phrase`` as a whole word or phrase (an apostrophe joins words: "can" is not in "can't")."""
    return re.compile(rf"(?<![\w']){re.escape(phrase)}(?![\w'])", re.IGNORECASE)


def _cased(found: str, replacement: str) -> str:
    """``replacement`` capitalised like ``found``'s first letter."""
    return replacement[:1].upper() + replacement[1:] if found[:1].isupper() else replacement


def _replace_first(text: str, old: str, new: str) -> str | None:
    match = _word(old).search(text)
    if match is None:
        return None
    return text[: match.start()] + _cased(match.group(), new) + text[match.end() :]


def _other_number(value: str) -> str:
    """Another number: a year-like one moves by one, any other doubles (0 becomes 1)."""
    n = int(value)
    if 1900 <= n <= 2100:
        return str(n - 1)
    return str(n * 2 if n else 1)


def _with_qualifier(text: str, qualifier: str) -> str:
    """``qualifier`` added before the final "?" (or at the end)."""
    body = text.rstrip()
    if body.endswith("?"):
        return f"{body[:-1].rstrip()} {qualifier}?"
    return f"{body} {qualifier}"


def candidate_edits(text: str, lexicon: Lexicon, siblings: tuple[Topic, ...] | None = None) -> list[tuple[str, str]]:
    """Every (kind, edited text) the lexicon allows for ``text``, replacements (swaps, numbers,
    siblings) before additions (qualifiers); each edited text differs from ``text`` after
    normalisation. Sibling edits name only ``siblings`` (default: every topic), so a row never names a
    topic of another split."""
    replaced, added = _replacements(text, lexicon, siblings), _additions(text, lexicon)
    own = normalise(text)
    return [(kind, edited) for kind, edited in dict.fromkeys(replaced + added) if normalise(edited) != own]


def _replacements(text: str, lexicon: Lexicon, siblings: tuple[Topic, ...] | None) -> list[tuple[str, str]]:
    edits: list[tuple[str, str]] = []
    for kind, pairs in lexicon.near_misses.swaps.items():
        for a, b in pairs:
            for old, new in ((a, b), (b, a)):
                edited = _replace_first(text, old, new)
                if edited is not None:
                    edits.append((kind, edited))
    number = re.search(r"(?<![\w.])\d+(?![\w.])", text)
    if number:
        edits.append(("number", text[: number.start()] + _other_number(number.group()) + text[number.end() :]))
    return edits + _sibling_edits(text, lexicon, lexicon.topics if siblings is None else siblings)


def _additions(text: str, lexicon: Lexicon) -> list[tuple[str, str]]:
    return [
        (kind, _with_qualifier(text, qualifier))
        for kind, qualifiers in lexicon.near_misses.qualifiers.items()
        for qualifier in qualifiers
        if not _word(qualifier).search(text)
    ]


def _sibling_edits(text: str, lexicon: Lexicon, allowed: tuple[Topic, ...]) -> list[tuple[str, str]]:
    """The longest topic name or alias found in ``text`` swapped for the name of each ``allowed``
    sibling topic (same group; any allowed topic when it has no group)."""
    found = [(len(s), s, t) for t in lexicon.topics for s in t.surfaces if _word(s).search(text)]
    if not found:
        return []
    _, surface, topic = max(found, key=lambda f: f[0])
    siblings = [t for t in allowed if t.name != topic.name and (topic.group is None or t.group == topic.group)]
    return [("sibling", edited) for t in siblings if (edited := _replace_first(text, surface, t.name)) is not None]


def near_miss_of(
    text: str, lexicon: Lexicon, rng: random.Random, siblings: tuple[Topic, ...] | None = None
) -> tuple[str, str] | None:
    """One seeded (kind, edited text), or None when no edit applies. A replacement (a word swapped,
    a number changed, a sibling named) is preferred to an added qualifier ``REPLACE_SHARE`` of the
    time; within the tier, a kind is drawn first (kinds with many candidates do not crowd out the
    rest), then an edit of that kind."""
    replaced = _replacements(text, lexicon, siblings)
    tiers = [replaced, _additions(text, lexicon)]
    if replaced and rng.random() >= REPLACE_SHARE:
        tiers.reverse()
    own = normalise(text)
    for tier in tiers:
        edits = [(k, e) for k, e in dict.fromkeys(tier) if normalise(e) != own]
        if edits:
            kind = rng.choice(sorted({k for k, _ in edits}))
            return kind, rng.choice([e for k, e in edits if k == kind])
    return None


def with_near_misses(
    rows: list[dict[str, Any]], lexicon: Lexicon, fraction: float, seed: int, plan: SplitPlan | None = None
) -> list[dict[str, Any]]:
    """A seeded ``fraction`` of rows get an edit of their anchor as the negative (``negative_kind``
    ``near_miss:<kind>``, ``near_miss_of: anchor``); each row's draw depends only on the seed and its
    id, so rows keep their edits whatever else is generated. With a ``plan``, a sibling edit names
    only topics of the row's own split."""
    by_split: dict[str | None, tuple[Topic, ...]] = {}
    out = []
    for row in rows:
        split = row.get("split")
        if split not in by_split:
            by_split[split] = tuple(
                t for t in lexicon.topics if plan is None or plan.topics[(lexicon.domain, t.name)] == split
            )
        rng = random.Random(f"{seed}:{NEAR_MISS}:{row['id']}")
        edit = near_miss_of(row["anchor"], lexicon, rng, by_split[split]) if rng.random() < fraction else None
        if edit is None:
            out.append(row)
            continue
        kind, negative = edit
        edited = {
            **row,
            "negative": negative,
            "negative_kind": f"{NEAR_MISS}:{kind}",
            "near_miss_of": "anchor",
            "negative_source_id": stable_id(row["domain"], NEAR_MISS, normalise(negative)),
            "negative_topic": row.get("topic"),
            "negative_topic_group": row.get("topic_group"),
        }
        edited.pop("negative_aspect", None)
        edited["id"] = stable_id(row["domain"], row["anchor"], row["positive"], negative)
        out.append({k: v for k, v in edited.items() if v is not None})
    return out
