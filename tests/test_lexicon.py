import pytest
import yaml

from cachelora.errors import CacheloraError
from cachelora.lexicon import BAD_RENDER_RE, load_lexicon, render, render_flaw
from cachelora.params import load_params
from tests.conftest import TINY_LEXICON

SHIPPED = load_params("params.yaml").domains


@pytest.mark.parametrize("domain", SHIPPED)
def test_shipped_lexicons_meet_the_minimums(domain):
    lexicon = load_lexicon(domain)
    assert len(lexicon.topics) >= 60
    assert len(lexicon.aspects) >= 8
    assert all(len(a.templates) >= 6 for a in lexicon.aspects.values())
    assert sum(1 for t in lexicon.topics if t.aliases) >= 20  # real synonyms are what the model must learn


def test_shipped_lexicons_know_common_synonyms():
    medical = {t.name: t for t in load_lexicon("medical").topics}
    assert any("high blood pressure" in t.surfaces and "hypertension" in t.surfaces for t in medical.values())


@pytest.mark.parametrize("domain", SHIPPED)
def test_shipped_lexicons_render_cleanly(domain):
    """A lexicon that loads renders only questions the quality gate's bad_render check passes."""
    lexicon = load_lexicon(domain)
    for topic in lexicon.topics:
        for aspect in lexicon.aspects_of(topic):
            for template in lexicon.aspects[aspect].templates:
                for surface in topic.surfaces:
                    text = render(template, surface)
                    assert render_flaw(text) is None and not BAD_RENDER_RE.search(text), text


@pytest.mark.parametrize(
    ("text", "flaw"),
    [
        ("What causes asthma?", None),
        ("How do I use f-strings in python 3.12", None),
        ("What causes {topic}?", "a placeholder or brace"),
        ("What causes { }?", "a placeholder or brace"),
        ("What causes asthma }", "a placeholder or brace"),
        ("What causes  asthma?", "doubled whitespace"),
        (" What causes asthma?", "leading or trailing whitespace"),
        ("What causes asthma?\n", "leading or trailing whitespace"),
        ("What causes asthma ?", "a space before '?'"),
    ],
)
def test_render_flaws_are_what_the_quality_gate_matches(text, flaw):
    assert render_flaw(text) == flaw
    assert bool(BAD_RENDER_RE.search(text)) == (flaw is not None)


def test_blank_text_is_a_flaw():
    assert render_flaw("") == render_flaw(" \t") == "blank"


def write(seed_dir, data):
    (seed_dir / "medical.yaml").write_text(yaml.safe_dump(data))


def second_template(data, text):
    data["aspects"]["causes"]["templates"][1] = text


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["aspects"]["symptoms"].update(templates=["no placeholder here", "{topic}?"]),
            r"aspects.symptoms.templates.0: must contain \{topic\} exactly once",
        ),
        (lambda d: d["topics"][3].update(aliases=["lung infection", ""]), r"topics.3.aliases.1: must not be empty"),
        (lambda d: d["topics"][3].update(aliases=["   "]), r"topics.3.aliases.0: must not be empty or blank"),
        (lambda d: d["topics"][0].update(aliases=[None]), r"topics.0.aliases.0: Input should be a valid string"),
        (lambda d: d["topics"][2].update(name=" "), r"topics.2.name: must not be empty or blank"),
        (lambda d: d["topics"][2].update(name=""), r"topics.2.name: must not be empty or blank"),
        (
            lambda d: d["topics"][2].update(aliases=["bronchial  asthma"]),
            r"topics.2.aliases.0: must not contain doubled whitespace: 'bronchial  asthma'",
        ),
        (
            lambda d: d["topics"][2].update(aliases=["asthma "]),
            r"topics.2.aliases.0: must not contain leading or trailing whitespace",
        ),
        (
            lambda d: d["topics"][2].update(aliases=["{asthma}"]),
            r"topics.2.aliases.0: must not contain a placeholder or brace",
        ),
        (lambda d: second_template(d, ""), r"aspects.causes.templates.1: must not be empty"),
        (lambda d: second_template(d, " \t"), r"aspects.causes.templates.1: must not be empty"),
        (
            lambda d: second_template(d, "what is {topic} caused by {"),
            r"aspects.causes.templates.1: must contain \{topic\} exactly once and no other braces",
        ),
        (
            lambda d: second_template(d, "{topic}: { } or {cause}?"),
            r"aspects.causes.templates.1: must contain \{topic\} exactly once and no other braces",
        ),
        (
            lambda d: second_template(d, "{topic}{topic}"),
            r"aspects.causes.templates.1: must contain \{topic\} exactly once",
        ),
        (
            lambda d: second_template(d, "what  causes {topic}"),
            r"aspects.causes.templates.1: must not contain doubled whitespace: 'what  causes \{topic\}'",
        ),
        (
            lambda d: second_template(d, "what causes {topic} ?"),
            r"aspects.causes.templates.1: must not contain a space before '\?'",
        ),
        (
            lambda d: second_template(d, " what causes {topic}"),
            r"aspects.causes.templates.1: must not contain leading or trailing whitespace",
        ),
        (lambda d: d.update(aspects={}), r"aspects: .*at least 2"),
        (lambda d: d.update(topics=[]), r"topics: .*at least 2"),
        (lambda d: d["topics"][1].update(name="Hypertension"), r"topics.1.name: 'Hypertension' is listed twice"),
        (lambda d: d["topics"][0].update(aspects=["diet"]), r"topics.0.aspects: unknown aspect 'diet'"),
        (lambda d: d["topics"][0].update(colour="red"), r"topics.0.colour: Extra inputs"),
        (lambda d: d.update(domain="law"), r"domain: 'law' does not match the file name 'medical'"),
    ],
)
def test_bad_lexicon_names_file_and_key(seed_dir, mutate, message):
    data = yaml.safe_load(yaml.safe_dump(TINY_LEXICON))
    mutate(data)
    write(seed_dir, data)
    with pytest.raises(CacheloraError, match=r"medical.yaml: " + message):
        load_lexicon("medical", seed_dir)


def test_missing_lexicon(seed_dir):
    with pytest.raises(CacheloraError, match=r"law.yaml: lexicon not found for domain 'law'"):
        load_lexicon("law", seed_dir)
