"""What "unseen" means: topics and phrasings assigned to train/val/test, and the split that checks it.

Topics are grouped across domains by normalised name and alias (ADHD is a medical and a
psychology topic): a group goes to one split for every domain. Each aspect's templates are
partitioned between the splits, so a val or test text is a phrasing no training text used. The
generator draws each split's rows from its own topics and templates (:class:`SplitPlan`); the
split stage routes rows by that plan and fails when a topic group or a template crosses splits.
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cachelora.errors import CacheloraError
from cachelora.lexicon import Lexicon
from cachelora.params import SplitParams
from cachelora.triplets import TEXT_FIELDS, normalise

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
HELD_OUT = ("val", "test")
TOPIC_FIELD = {"anchor": "topic", "positive": "topic", "negative": "negative_topic"}
MIN_HELD_OUT_TEMPLATES = 2  # anchor and positive need two phrasings within a split


def topic_groups(lexicons: dict[str, Lexicon]) -> dict[tuple[str, str], str]:
    """(domain, topic name) -> group: topics sharing a normalised name or alias, in any domain, are one."""
    parent: dict[Any, Any] = {}

    def find(node: Any) -> Any:
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for domain, lexicon in lexicons.items():
        for topic in lexicon.topics:
            for surface in topic.surfaces:
                parent[find((domain, topic.name))] = find(("surface", normalise(surface)))
    members: dict[Any, list[tuple[str, str]]] = defaultdict(list)
    for domain, lexicon in lexicons.items():
        for topic in lexicon.topics:
            members[find((domain, topic.name))].append((domain, topic.name))
    return {member: min(normalise(m[1]) for m in group) for group in members.values() for member in group}


def _quotas(params: SplitParams, total: float) -> dict[str, float]:
    return {name: getattr(params, name) * total for name in SPLITS}


def assign_topics(lexicons: dict[str, Lexicon], params: SplitParams) -> dict[tuple[str, str], str]:
    """(domain, topic) -> split. Groups go, in a seeded order, to the split furthest below its
    share in the domains the group spans, so every domain gets about its share of topics."""
    groups = topic_groups(lexicons)
    members: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for member, group in groups.items():
        members[group].append(member)
    order = sorted(members)
    random.Random(f"{params.seed}:topics").shuffle(order)
    quota = {d: _quotas(params, len(lex.topics)) for d, lex in lexicons.items()}
    filled = {d: dict.fromkeys(SPLITS, 0) for d in lexicons}
    assignment: dict[tuple[str, str], str] = {}
    for group in order:
        domains = [d for d, _ in members[group]]

        def deficit(split: str, domains: list[str] = domains) -> float:
            return sum(quota[d][split] - filled[d][split] for d in domains)

        split = max(SPLITS, key=deficit)
        for domain, topic in members[group]:
            assignment[(domain, topic)] = split
            filled[domain][split] += 1
    return assignment


def assign_templates(lexicons: dict[str, Lexicon], params: SplitParams) -> dict[str, str]:
    """Normalised template -> split. Each aspect gives val and test their share of its templates
    (at least two each when they are non-empty); a template shared by aspects or domains has one split."""
    assignment: dict[str, str] = {}
    aspects = sorted((domain, aspect) for domain, lexicon in lexicons.items() for aspect in lexicon.aspects)
    random.Random(f"{params.seed}:templates").shuffle(aspects)
    for domain, aspect in aspects:
        keys = sorted({normalise(t) for t in lexicons[domain].aspects[aspect].templates})
        random.Random(f"{params.seed}:{domain}:{aspect}").shuffle(keys)
        free = [k for k in keys if k not in assignment]
        for split in HELD_OUT:
            share = getattr(params, split)
            need = max(MIN_HELD_OUT_TEMPLATES, round(share * len(keys))) if share > 0 else 0
            have = sum(assignment.get(k) == split for k in keys)
            while have < need and len(free) > MIN_HELD_OUT_TEMPLATES:
                assignment[free.pop()] = split
                have += 1
        for key in free:
            assignment[key] = "train"
    return assignment


def template_key(text: str, surfaces: Iterable[str], known: dict[str, str]) -> str | None:
    """The lexicon template ``text`` reads as: its normalised form with the topic's name put back as
    ``topic``, when that is a ``known`` template; None otherwise. Natural text (the corpus, LLM
    replies) that happens to share a short pattern ("how is X treated") with another topic's text
    is language, not a template: only lexicon templates are kept to one split."""
    norm = normalise(text)
    for surface in sorted({normalise(s) for s in surfaces}, key=len, reverse=True):
        for match in re.finditer(rf"(?<!\w){re.escape(surface)}(?!\w)", norm):
            reading = norm[: match.start()] + "topic" + norm[match.end() :]
            if reading in known:
                return reading
    return None


@dataclass(frozen=True)
class SplitPlan:
    """Which split each topic and each template belongs to, for every domain in params."""

    topics: dict[tuple[str, str], str]
    groups: dict[tuple[str, str], str]
    templates: dict[str, str]
    surfaces: dict[tuple[str, str], tuple[str, ...]]

    @classmethod
    def of(cls, lexicons: dict[str, Lexicon], params: SplitParams) -> SplitPlan:
        return cls(
            topics=assign_topics(lexicons, params),
            groups=topic_groups(lexicons),
            templates=assign_templates(lexicons, params),
            surfaces={(d, t.name): t.surfaces for d, lex in lexicons.items() for t in lex.topics},
        )

    def route(self, row: dict[str, Any], domain: str) -> str | None:
        """The split a row belongs to: the one it was generated for, else its lexicon topic's."""
        if row.get("split") in SPLITS:
            return str(row["split"])
        return self.topics.get((domain, row.get("topic")))  # type: ignore[arg-type]

    def group_of(self, domain: str, topic: Any) -> str | None:
        """A topic's cross-domain group (a normalised name for topics the lexicons do not know)."""
        if not isinstance(topic, str) or not topic:
            return None
        return self.groups.get((domain, topic), normalise(topic))

    def templates_of(self, row: dict[str, Any], domain: str) -> set[str]:
        """The templates a row's texts were rendered from (texts whose topic the lexicons name)."""
        found = set()
        for field in TEXT_FIELDS:
            surfaces = self.surfaces.get((domain, row.get(TOPIC_FIELD[field])))  # type: ignore[arg-type]
            if surfaces and (key := template_key(row[field], surfaces, self.templates)):
                found.add(key)
        return found


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


def route_rows(
    rows: list[dict[str, Any]], params: SplitParams, domain: str, plan: SplitPlan | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Rows by split: by the plan where it places them, the rest by whole groups (``group_by``)."""
    splits: dict[str, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    unplanned = []
    for row in rows:
        split = plan.route(row, domain) if plan else None
        (splits[split] if split else unplanned).append(row)
    sizes: dict[str, int] = defaultdict(int)
    for row in unplanned:
        sizes[group_key(row, params.group_by)] += 1
    assignment = assign_groups(sizes, params, domain) if sizes else {}
    for row in unplanned:
        splits[assignment[group_key(row, params.group_by)]].append(row)
    return splits


def split_rows(
    rows: list[dict[str, Any]], params: SplitParams, salt: str, plan: SplitPlan | None = None
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Route ``rows`` to splits; drop train/val rows that share a text with a later split.

    Returns the splits and their metrics: rows and groups per split, the rows dropped for sharing a
    text, and ``texts_shared`` (held-out texts the input had in train or val before the drop).
    """
    splits = route_rows(rows, params, salt, plan)
    test_texts, val_texts = texts_of(splits["test"]), texts_of(splits["val"])
    shared = {
        "test_in_train": len(test_texts & texts_of(splits["train"])),
        "val_in_train": len(val_texts & texts_of(splits["train"])),
        "test_in_val": len(test_texts & val_texts),
    }
    splits["val"], val_dropped = _drop_overlap(splits["val"], test_texts)
    splits["train"], train_dropped = _drop_overlap(splits["train"], test_texts | texts_of(splits["val"]))
    metrics = {
        "rows": {name: len(part) for name, part in splits.items()},
        "groups": {name: len({group_key(r, params.group_by) for r in part}) for name, part in splits.items()},
        "texts_shared": shared,
        "dropped_overlap": {"train": train_dropped, "val": val_dropped},
    }
    for name in SPLITS:
        if getattr(params, name) > 0 and not splits[name]:
            raise CacheloraError(f"split {salt}: split.{name} is empty (too few topics or groups to split)")
    log.info("split %s: %s", salt, metrics["rows"])
    return splits, metrics


def unseen_check(domain: str, by_domain: dict[str, dict[str, list[dict[str, Any]]]], plan: SplitPlan) -> dict[str, Any]:
    """Topic groups and templates that ``domain`` shares across the train / held-out line with any
    domain (itself included). Both must be empty: no model trains on what any domain holds out."""

    def topics(rows: list[dict[str, Any]], d: str) -> set[str]:
        return {g for r in rows for f in ("topic", "negative_topic") if (g := plan.group_of(d, r.get(f)))}

    def templates(rows: list[dict[str, Any]], d: str) -> set[str]:
        return {t for r in rows for t in plan.templates_of(r, d)}

    def side(kind: Any, d: str, names: tuple[str, ...]) -> set[str]:
        return {x for name in names for x in kind(by_domain[d][name], d)}

    result: dict[str, Any] = {}
    for label, kind in (("topics", topics), ("templates", templates)):
        train_all = {x for d in by_domain for x in side(kind, d, ("train",))}
        held_all = {x for d in by_domain for x in side(kind, d, HELD_OUT)}
        own_train, own_held = side(kind, domain, ("train",)), side(kind, domain, HELD_OUT)
        result[label] = sorted((own_train & held_all) | (own_held & train_all))
    return result


def check_unseen(domain: str, found: dict[str, Any]) -> dict[str, int]:
    """Fail naming what crossed the line; return the counts for the split metrics."""
    counts = {"cross_split_topics": len(found["topics"]), "cross_split_templates": len(found["templates"])}
    for label in ("topics", "templates"):
        if found[label]:
            shown = ", ".join(repr(x) for x in found[label][:3])
            raise CacheloraError(
                f"split {domain}: {len(found[label])} {label} in train and in val/test across domains "
                f"(must be 0), e.g. {shown}"
            )
    return counts
