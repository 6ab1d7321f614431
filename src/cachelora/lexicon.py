"""Domain lexicons (``data/seed/<domain>.yaml``): topics with aliases, aspects with templates."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cachelora.errors import CacheloraError, from_validation

SEED_DIR = Path("data/seed")
PLACEHOLDER = "{topic}"


class Topic(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    group: str | None = None
    aspects: tuple[str, ...] | None = None

    @property
    def surfaces(self) -> tuple[str, ...]:
        """Every way of naming the topic: its name first, then its aliases."""
        return (self.name, *self.aliases)


class Aspect(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    templates: tuple[str, ...] = Field(min_length=2)

    @field_validator("templates")
    @classmethod
    def _one_placeholder(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        for i, template in enumerate(templates):
            if template.count(PLACEHOLDER) != 1:
                raise ValueError(f"template {i} must contain {PLACEHOLDER} exactly once: {template!r}")
        if len(set(templates)) != len(templates):
            raise ValueError("templates repeat")
        return templates


class Lexicon(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str
    topics: tuple[Topic, ...] = Field(min_length=2)
    aspects: dict[str, Aspect] = Field(min_length=2)

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
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CacheloraError(f"{path}: lexicon not found for domain '{domain}'") from None
    except yaml.YAMLError as exc:
        raise CacheloraError(f"{path}: malformed YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise CacheloraError(f"{path}: expected a mapping with keys domain, topics, aspects")
    try:
        lexicon = Lexicon.model_validate(raw)
    except ValidationError as exc:
        raise from_validation(path, exc) from None
    if lexicon.domain != domain:
        raise CacheloraError(f"{path}: domain: '{lexicon.domain}' does not match the file name '{domain}'")
    return lexicon
