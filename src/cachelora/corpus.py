"""The curated corpus: natural original queries shipped in ``data/corpus/<domain>.jsonl``, each with
paraphrases (same answer) and negatives (same topic, another answer), read into triplets.

Each original becomes up to ``triplets_per_query`` (paraphrase, negative) pairings, chosen seeded,
in the split its topic has in the :class:`SplitPlan` (a lexicon topic's split, matched by name or
alias in any domain; another topic's split drawn from its normalised name, the same in every
domain). A pairing whose text reads as a lexicon template of another split is left out: no phrasing
crosses the train / held-out line.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cachelora.errors import CacheloraError
from cachelora.params import SplitParams
from cachelora.records import read_jsonl_lines
from cachelora.splitting import SPLITS, SplitPlan
from cachelora.triplets import make_record, normalise, stable_id

log = logging.getLogger(__name__)

GENERATOR = {"backend": "corpus", "model": None, "prompt_version": None}


@dataclass(frozen=True)
class Original:
    """One natural query with its paraphrases and negatives."""

    domain: str
    topic: str
    query: str
    paraphrases: tuple[str, ...]
    negatives: tuple[str, ...]

    @property
    def source_id(self) -> str:
        return stable_id(self.domain, "corpus", normalise(self.query))


def _texts(path: Path, line: int, row: dict[str, Any], key: str) -> tuple[str, ...]:
    value = row.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
        raise CacheloraError(f"{path}:{line}: {key}: must be a non-empty list of non-empty strings")
    return tuple(value)


def read_corpus(path: str | Path, domain: str) -> list[Original]:
    """The originals in ``path``; a malformed one is an error naming the file, line and key."""
    path = Path(path)
    originals = []
    for line, row in read_jsonl_lines(path):
        for key in ("topic", "query"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise CacheloraError(f"{path}:{line}: {key}: must be a non-empty string")
        if row.get("domain", domain) != domain:
            raise CacheloraError(f"{path}:{line}: domain: '{row['domain']}' in the {domain} corpus")
        originals.append(
            Original(
                domain,
                row["topic"],
                row["query"],
                _texts(path, line, row, "paraphrases"),
                _texts(path, line, row, "negatives"),
            )
        )
    return originals


def hashed_split(name: str, params: SplitParams) -> str:
    """A split for a topic the lexicons do not know, drawn from its normalised name."""
    draw = random.Random(f"{params.seed}:corpus:{normalise(name)}").random()
    bounds = [params.train, params.train + params.val]
    return SPLITS[sum(draw >= b for b in bounds)]


class CorpusPlacer:
    """Where corpus topics go: the lexicon topic they name (by name or alias; the corpus's own domain
    first, then any), else a split drawn from the topic's name."""

    def __init__(self, plan: SplitPlan, params: SplitParams) -> None:
        self.plan, self.params = plan, params
        self.named: dict[tuple[str, str], tuple[str, str]] = {}
        self.anywhere: dict[str, tuple[str, str]] = {}
        for (d, name), surfaces in sorted(plan.surfaces.items()):
            for surface in surfaces:
                self.named.setdefault((d, normalise(surface)), (d, name))
                self.anywhere.setdefault(normalise(surface), (d, name))

    def place(self, domain: str, topic: str) -> tuple[str, str, str]:
        """(the row's topic: the lexicon's name in this domain, else as written; its group; its split)."""
        found = self.named.get((domain, normalise(topic))) or self.anywhere.get(normalise(topic))
        if found is None:
            return topic, normalise(topic), hashed_split(topic, self.params)
        name = found[1] if found[0] == domain else topic
        return name, self.plan.groups[found], self.plan.topics[found]


def corpus_triplets(
    originals: list[Original], per_query: int, seed: int, plan: SplitPlan, params: SplitParams
) -> list[dict[str, Any]]:
    """Up to ``per_query`` seeded (paraphrase, negative) triplets per original, placed in splits."""
    placer = CorpusPlacer(plan, params)
    rows, crossing = [], 0
    for original in originals:
        topic, group, split = placer.place(original.domain, original.topic)
        pairs = [(p, n) for p in original.paraphrases for n in original.negatives]
        chosen = random.Random(f"{seed}:{original.source_id}").sample(pairs, min(per_query, len(pairs)))
        for anchor, negative in chosen:
            # negatives[0] is the curated near-miss: worded like the query, another answer
            kind = "near_miss:curated" if negative == original.negatives[0] else "curated"
            row = make_record(
                original.domain,
                anchor=anchor,
                positive=original.query,
                negative=negative,
                source_id=original.source_id,
                generator=GENERATOR,
                topic=topic,
                negative_topic=topic,
                split=split,
                topic_group=group,
                negative_topic_group=group,
                negative_kind=kind,
            )
            if any(plan.templates.get(key, split) != split for key in plan.templates_of(row, original.domain)):
                crossing += 1
                continue
            rows.append(row)
    if crossing:
        log.info(
            "%s corpus: %d pairing(s) left out: a text reads as another split's template", originals[0].domain, crossing
        )
    return rows
