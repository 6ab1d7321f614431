"""Domain lexicons (``data/seed/<domain>.yaml``): topics with aliases, aspects with templates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cachelora.errors import CacheloraError, from_validation
from cachelora.paths import SEED_DIR
from cachelora.records import read_yaml

PLACEHOLDER = "{topic}"
# The one placeholder pattern: a ``{name}`` slot (``{topic}``, ``{ }``) or a lone brace. A template holds
# exactly one match, ``{topic}``; a rendered text holds none (the quality gate's ``bad_render`` check).
PLACEHOLDER_RE = re.compile(r"\{[^{}]*\}|[{}]")
# What a rendered question must not contain, each with the words an error uses for it.
RENDER_FLAWS = {
    "a placeholder or brace": PLACEHOLDER_RE.pattern,
    "leading or trailing whitespace": r"^\s|\s$",
    "doubled whitespace": r"\s\s",
    "a space before '?'": r"\s\?",
}
BAD_RENDER_RE = re.compile("|".join(RENDER_FLAWS.values()))


def render(template: str, surface: str) -> str:
    """Fill a template's ``{topic}`` with a topic name or alias."""
    return template.replace(PLACEHOLDER, surface)


def render_flaw(text: str) -> str | None:
    """What is wrong with ``text`` as a rendered question: "blank", a ``RENDER_FLAWS`` key, or None."""
    if not text.strip():
        return "blank"
    return next((what for what, pattern in RENDER_FLAWS.items() if re.search(pattern, text)), None)


def _check_surface(text: str) -> str:
    """A topic name or alias: pasted into templates as is, so it must render cleanly itself."""
    flaw = render_flaw(text)
    if flaw == "blank":
        raise ValueError("must not be empty or blank")
    if flaw:
        raise ValueError(f"must not contain {flaw}: {text!r}")
    return text


def _check_template(template: str) -> str:
    """Exactly one ``{topic}`` and no other brace; filled with a clean name, it renders cleanly."""
    if not template.strip():
        raise ValueError("must not be empty or blank")
    if PLACEHOLDER_RE.findall(template) != [PLACEHOLDER]:
        raise ValueError(f"must contain {PLACEHOLDER} exactly once and no other braces: {template!r}")
    if flaw := render_flaw(render(template, "x")):
        raise ValueError(f"must not contain {flaw}: {template!r}")
    return template


Surface = Annotated[str, AfterValidator(_check_surface)]
Template = Annotated[str, AfterValidator(_check_template)]


class Topic(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Surface
    aliases: tuple[Surface, ...] = ()
    group: str | None = None
    aspects: tuple[str, ...] | None = None

    @property
    def surfaces(self) -> tuple[str, ...]:
        """Every way of naming the topic: its name first, then its aliases."""
        return (self.name, *self.aliases)


class Aspect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    templates: tuple[Template, ...] = Field(min_length=2)

    @field_validator("templates")
    @classmethod
    def _distinct(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(templates)) != len(templates):
            raise ValueError("templates repeat")
        return templates


# What makes a near-miss need another answer (docs/metrics.md: re-ask vs near-miss). "number" edits are made by
# rule (a digit run changed), "sibling" edits from the topics' groups; the rest come from the lexicon.
NearMissKind = Literal["negation", "number", "population", "version", "jurisdiction", "role", "sibling"]


class NearMisses(BaseModel):
    """Answer-changing edits: ``swaps`` (word or phrase pairs, either side replaced by the other) and
    ``qualifiers`` (phrases added before the final "?": another population, version, place), per kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    swaps: dict[NearMissKind, tuple[tuple[Surface, Surface], ...]] = {}
    qualifiers: dict[NearMissKind, tuple[Surface, ...]] = {}


class Lexicon(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str
    topics: tuple[Topic, ...] = Field(min_length=2)
    aspects: dict[str, Aspect] = Field(min_length=2)
    near_misses: NearMisses = NearMisses()

    @model_validator(mode="after")
    def _consistent(self) -> Lexicon:
        seen: set[str] = set()
        for i, topic in enumerate(self.topics):
            if topic.name.lower() in seen:
                raise ValueError(f"topics.{i}.name: '{topic.name}' is listed twice")
            seen.add(topic.name.lower())
            for aspect in topic.aspects or ():
                if aspect not in self.aspects:
                    raise ValueError(f"topics.{i}.aspects: unknown aspect '{aspect}'")
            if len(self.aspects_of(topic)) < 2:
                raise ValueError(f"topics.{i}.aspects: a topic needs two aspects for a negative")
        return self

    def aspects_of(self, topic: Topic) -> list[str]:
        """The aspects a topic can be asked about."""
        return list(topic.aspects) if topic.aspects is not None else list(self.aspects)


def load_lexicon(domain: str, seed_dir: str | Path = SEED_DIR) -> Lexicon:
    """Load and check one domain's lexicon; errors name the file and key."""
    path = Path(seed_dir) / f"{domain}.yaml"
    raw = read_yaml(path, keys=Lexicon.model_fields, missing=f"lexicon not found for domain '{domain}'")
    try:
        lexicon = Lexicon.model_validate(raw)
    except ValidationError as exc:
        raise from_validation(path, exc) from None
    if lexicon.domain != domain:
        raise CacheloraError(f"{path}: domain: '{lexicon.domain}' does not match the file name '{domain}'")
    return lexicon


def load_lexicons(domains: list[str], seed_dir: str | Path = SEED_DIR) -> dict[str, Lexicon]:
    """Every domain's lexicon (topics are grouped and split across all of them)."""
    return {domain: load_lexicon(domain, seed_dir) for domain in domains}
