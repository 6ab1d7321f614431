"""Triplet generation: the offline lexicon backend, and the dispatch to a backend by params."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cachelora.corpus import corpus_triplets, read_corpus
from cachelora.lexicon import Lexicon, Topic, load_lexicons, render
from cachelora.near_miss import with_near_misses
from cachelora.params import Params, SplitParams
from cachelora.records import write_jsonl
from cachelora.splitting import SplitPlan
from cachelora.triplets import concept_id, make_record, normalise

log = logging.getLogger(__name__)

MAX_TRIES = 50


class OfflineGenerator:
    """Deterministic triplets from a lexicon, for one split.

    Anchor and positive are two phrasings of one (topic, aspect): different templates and,
    where the topic has aliases, different names. The negative keeps the topic and changes the
    aspect, or (a ``sibling_fraction`` share) keeps the aspect and changes to a sibling topic.
    With a :class:`SplitPlan`, a split's rows use only that split's topics and templates.
    """

    def __init__(
        self,
        lexicon: Lexicon,
        seed: int,
        sibling_fraction: float,
        plan: SplitPlan | None = None,
        split: str | None = None,
    ) -> None:
        self.lexicon = lexicon
        self.split = split
        self.plan = plan
        domain = lexicon.domain
        self.rng = random.Random(f"{seed}:{domain}" if split is None else f"{seed}:{domain}:{split}")
        self.sibling_fraction = sibling_fraction
        self.topics = [t for t in lexicon.topics if plan is None or plan.topics[(domain, t.name)] == split]
        self.concepts = [(t, a) for t in self.topics for a in lexicon.aspects_of(t)]
        self.generator = {"backend": "offline", "model": None, "prompt_version": None}

    def _templates(self, aspect: str) -> list[str]:
        templates = list(self.lexicon.aspects[aspect].templates)
        if self.plan is None:
            return templates
        return [t for t in templates if self.plan.templates[normalise(t)] == self.split]

    def _siblings(self, topic: Topic, aspect: str) -> list[Topic]:
        others = [t for t in self.topics if t is not topic and aspect in self.lexicon.aspects_of(t)]
        same_group = [t for t in others if topic.group is not None and t.group == topic.group]
        return same_group or others

    def _phrase(self, topic: Topic, aspect: str, avoid: tuple[str, str] | None = None) -> tuple[str, str]:
        """Pick (template, surface), different from ``avoid`` in both where the lexicon allows."""
        templates = self._templates(aspect)
        surfaces = list(topic.surfaces)
        if avoid is not None:
            templates = [t for t in templates if t != avoid[0]] or templates
            surfaces = [s for s in surfaces if s != avoid[1]] or surfaces
        return self.rng.choice(templates), self.rng.choice(surfaces)

    def triplet(self, topic: Topic, aspect: str) -> dict[str, Any]:
        """One triplet whose positive asks about (topic, aspect)."""
        pos = self._phrase(topic, aspect)
        anc = self._phrase(topic, aspect, avoid=pos)
        siblings = self._siblings(topic, aspect)
        if siblings and self.rng.random() < self.sibling_fraction:
            neg_topic, neg_aspect, kind = self.rng.choice(siblings), aspect, "sibling_topic"
        else:
            kind = "other_aspect"
            neg_topic = topic
            neg_aspect = self.rng.choice([a for a in self.lexicon.aspects_of(topic) if a != aspect])
        neg = self._phrase(neg_topic, neg_aspect)
        domain = self.lexicon.domain
        placed = (
            {}
            if self.plan is None
            else {
                "split": self.split,
                "topic_group": self.plan.groups[(domain, topic.name)],
                "negative_topic_group": self.plan.groups[(domain, neg_topic.name)],
            }
        )
        return make_record(
            domain,
            anchor=render(*anc),
            positive=render(*pos),
            negative=render(*neg),
            source_id=concept_id(domain, topic.name, aspect),
            generator=self.generator,
            topic=topic.name,
            aspect=aspect,
            negative_source_id=concept_id(domain, neg_topic.name, neg_aspect),
            negative_topic=neg_topic.name,
            negative_aspect=neg_aspect,
            negative_kind=kind,
            **placed,
        )

    def generate(self, count: int) -> list[dict[str, Any]]:
        """``count`` distinct triplets, cycling through every (topic, aspect) in a seeded order."""
        rows: list[dict[str, Any]] = []
        seen: set[tuple[str, str, str]] = set()
        order: list[tuple[Topic, str]] = []
        label = self.lexicon.domain if self.split is None else f"{self.lexicon.domain} {self.split}"
        if not self.concepts or count == 0:
            return rows
        with tqdm(total=count, desc=f"generate {label}", unit="triplet") as bar:
            for _ in range(count * MAX_TRIES):
                if len(rows) == count:
                    break
                if not order:
                    order = self.rng.sample(self.concepts, len(self.concepts))
                row = self.triplet(*order.pop())
                key = (normalise(row["anchor"]), normalise(row["positive"]), normalise(row["negative"]))
                if key in seen or key[0] == key[1]:
                    continue
                seen.add(key)
                rows.append(row)
                bar.update()
        if len(rows) < count:
            log.warning("%s: lexicon yields only %d distinct triplets of %d asked", label, len(rows), count)
        return rows


def split_counts(total: int, params: SplitParams) -> dict[str, int]:
    """Rows per split for ``total`` generated rows (test takes the rounding remainder)."""
    train, val = round(total * params.train), round(total * params.val)
    return {"train": train, "val": val, "test": total - train - val}


def generate_offline(params: Params, domain: str, lexicons: dict[str, Lexicon]) -> list[dict[str, Any]]:
    """Each split's share of ``triplets_per_domain``, from that split's topics and templates only, then
    the domain's curated corpus (``generate.corpus``) placed by the same plan; a ``near_miss_fraction``
    share of the rows then get a near-miss of their anchor as the negative."""
    gen = params.generate
    plan = SplitPlan.of(lexicons, params.split)
    rows = []
    for split, count in split_counts(gen.triplets_per_domain, params.split).items():
        generator = OfflineGenerator(lexicons[domain], gen.seed, gen.sibling_negative_fraction, plan, split)
        rows += generator.generate(count)
    if gen.corpus:
        originals = read_corpus(Path(gen.corpus) / f"{domain}.jsonl", domain)
        rows += corpus_triplets(originals, gen.corpus_triplets_per_query, gen.seed, plan, params.split)
    return with_near_misses(rows, lexicons[domain], gen.near_miss_fraction, gen.seed, plan)


def generate_domain(params: Params, domain: str, out: str | Path, seed_dir: str | Path) -> int:
    """Generate ``domain``'s triplets with the backend params name; return the row count."""
    params.check_domain(domain)
    lexicons = load_lexicons(params.domains, seed_dir)
    if params.generate.backend == "offline":
        rows = generate_offline(params, domain, lexicons)
    else:
        from cachelora.llm_generation import generate_with_llm

        rows = generate_with_llm(params, lexicons[domain])
    log.info("%s: writing %d triplets to %s", domain, len(rows), out)
    return write_jsonl(out, rows)
