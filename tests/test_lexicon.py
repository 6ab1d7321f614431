import pytest
import yaml

from cachelora.errors import CacheloraError
from cachelora.lexicon import load_lexicon
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


def write(seed_dir, data):
    (seed_dir / "medical.yaml").write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: d["aspects"]["symptoms"].update(templates=["no placeholder here", "{topic}?"]),
            r"aspects.symptoms.templates: template 0 must contain \{topic\}",
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
