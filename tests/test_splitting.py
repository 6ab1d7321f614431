import pytest

from cachelora.errors import CacheloraError
from cachelora.generation import generate_offline
from cachelora.lexicon import Lexicon
from cachelora.splitting import (
    SplitPlan,
    assign_topics,
    check_unseen,
    split_rows,
    template_key,
    texts_of,
    topic_groups,
    unseen_check,
)
from cachelora.triplets import normalise
from tests.conftest import TINY_LEXICON, tiny_params

SPLIT = tiny_params().split
PSYCHOLOGY = {
    "domain": "psychology",
    "topics": [
        {"name": "attention deficit hyperactivity disorder", "aliases": ["ADHD"]},
        {"name": "panic disorder"},
        {"name": "phobias"},
        {"name": "grief"},
        {"name": "burnout"},
    ],
    "aspects": {"symptoms": TINY_LEXICON["aspects"]["symptoms"], "causes": TINY_LEXICON["aspects"]["causes"]},
}
MEDICAL = {**TINY_LEXICON, "topics": [*TINY_LEXICON["topics"], {"name": "ADHD", "group": "brain"}]}


@pytest.fixture
def lexicons():
    return {d: Lexicon.model_validate(raw) for d, raw in (("medical", MEDICAL), ("psychology", PSYCHOLOGY))}


def params_for(domains):
    return tiny_params(domains=domains, train_models=[*domains, "multi"])


@pytest.fixture
def generated(lexicons):
    params = params_for(["medical", "psychology"])
    plan = SplitPlan.of(lexicons, params.split)
    by_domain = {d: split_rows(generate_offline(params, d, lexicons), params.split, d, plan)[0] for d in lexicons}
    return plan, by_domain


def test_topics_are_grouped_across_domains_by_alias(lexicons):
    groups = topic_groups(lexicons)
    assert groups[("medical", "ADHD")] == groups[("psychology", "attention deficit hyperactivity disorder")]
    assignment = assign_topics(lexicons, SPLIT)
    assert assignment[("medical", "ADHD")] == assignment[("psychology", "attention deficit hyperactivity disorder")]
    for domain in lexicons:
        splits = [s for (d, _), s in assignment.items() if d == domain]
        assert {"train", "val", "test"} <= set(splits)


def test_each_split_has_its_own_templates(lexicons):
    plan = SplitPlan.of(lexicons, SPLIT)
    for aspect in ("symptoms", "causes", "treatment"):
        keys = {normalise(t) for t in MEDICAL["aspects"][aspect]["templates"]}
        per_split = {s: {k for k in keys if plan.templates[k] == s} for s in ("train", "val", "test")}
        assert all(len(found) >= 2 for found in per_split.values()), per_split


def test_template_key_reads_the_template_back():
    surfaces = ("hypertension", "high blood pressure")
    known = {"what are the symptoms of topic": "test"}
    assert template_key("What are the symptoms of high blood pressure?", surfaces, known) == next(iter(known))
    assert template_key("no topic here", surfaces, known) is None
    assert template_key("how is high blood pressure treated", surfaces, known) is None  # not a lexicon template


def test_generated_splits_share_no_topic_template_or_text(generated):
    plan, by_domain = generated
    for domain, splits in by_domain.items():
        assert check_unseen(domain, unseen_check(domain, by_domain, plan)) == {
            "cross_split_topics": 0,
            "cross_split_templates": 0,
        }
        assert all(splits[name] for name in ("train", "val", "test"))
        assert not texts_of(splits["test"]) & texts_of(splits["train"])
        assert not texts_of(splits["val"]) & texts_of(splits["train"])


def test_a_shared_topic_injected_across_domains_fails(generated):
    plan, by_domain = generated
    adhd_split = plan.topics[("medical", "ADHD")]
    other = "test" if adhd_split == "train" else "train"
    row = dict(by_domain["psychology"][other][0], topic="ADHD", negative_topic="ADHD")
    injected = {**by_domain, "psychology": {**by_domain["psychology"], other: [*by_domain["psychology"][other], row]}}
    with pytest.raises(CacheloraError, match=r"split medical: 1 topics in train and in val/test across domains"):
        check_unseen("medical", unseen_check("medical", injected, plan))


def test_a_shared_template_injected_fails(generated):
    plan, by_domain = generated
    test_row = by_domain["medical"]["test"][0]
    train_template = next(
        t for t in MEDICAL["aspects"][test_row["aspect"]]["templates"] if plan.templates[normalise(t)] == "train"
    )
    row = dict(test_row, anchor=train_template.replace("{topic}", test_row["topic"]))
    injected = {**by_domain, "medical": {**by_domain["medical"], "test": [row, *by_domain["medical"]["test"][1:]]}}
    with pytest.raises(CacheloraError, match=r"templates in train and in val/test"):
        check_unseen("medical", unseen_check("medical", injected, plan))


def user_rows(negative, groups=40):
    """40 rows of user data (no topic): row i asks q{i}; ``negative(i)`` names its negative."""
    return [
        {
            "anchor": f"q{i} variant",
            "positive": f"q{i} original",
            "negative": negative(i),
            "source_id": f"s{i % groups}",
        }
        for i in range(40)
    ]


def test_rows_sharing_a_held_out_text_are_counted_then_dropped():
    rows = user_rows(lambda i: f"q{(i + 1) % 40} original")  # each negative is another row's positive
    splits, metrics = split_rows(rows, SPLIT, "user")
    shared = metrics["texts_shared"]
    assert shared["test_in_train"] > 0 and shared["val_in_train"] > 0 and metrics["dropped_overlap"]["train"] > 0
    assert sum(metrics["rows"].values()) + sum(metrics["dropped_overlap"].values()) == len(rows)
    assert not texts_of(splits["test"]) & texts_of(splits["train"])
    assert not texts_of(splits["val"]) & texts_of(splits["train"])
    assert not texts_of(splits["test"]) & texts_of(splits["val"])


def test_seeded(lexicons):
    params = params_for(["medical", "psychology"])
    first = generate_offline(params, "medical", lexicons)
    assert first == generate_offline(params, "medical", lexicons)
    other = tiny_params(
        domains=["medical", "psychology"],
        train_models=["medical", "psychology", "multi"],
        split={"seed": 2, "train": 0.6, "val": 0.2, "test": 0.2},
    )
    assert generate_offline(other, "medical", lexicons) != first


def test_user_rows_group_by_source_id_when_no_topic():
    splits, _ = split_rows(user_rows(lambda i: f"other {i}", groups=10), SPLIT, "user")
    ids = {name: {r["source_id"] for r in part} for name, part in splits.items()}
    assert not ids["train"] & ids["test"]


def test_too_few_groups_fail_clearly():
    rows = [{"anchor": "a question", "positive": "the question", "negative": "another one", "source_id": "only"}]
    with pytest.raises(CacheloraError, match=r"split.(val|test) is empty"):
        split_rows(rows, SPLIT, "tiny")
