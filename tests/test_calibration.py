"""`cachelora calibrate`: thresholds certified by a Clopper-Pearson bound on a user's labelled log."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from cachelora.calibration import (
    LogReplay,
    Query,
    calibrate_log,
    certify,
    precision_lower_bound,
    read_log,
    right_hits_needed,
)
from cachelora.errors import CacheloraError


def test_the_bound_with_every_hit_right_is_the_closed_form_and_59_certify_095():
    for n in (1, 10, 59, 200):
        assert precision_lower_bound(n, n) == pytest.approx(0.05 ** (1 / n), rel=1e-9)
    assert right_hits_needed(0.95) == 59
    assert precision_lower_bound(59, 59) >= 0.95 > precision_lower_bound(58, 58)
    assert precision_lower_bound(91, 92) < 0.95 <= precision_lower_bound(92, 93)  # one wrong hit: 92 right
    assert precision_lower_bound(0, 0) == 0.0


def test_the_lowest_certified_threshold_is_chosen_not_the_point_estimate():
    """At 0.6 the point precision is 0.95 (57 of 60) but the bound is below 0.95: 0.8 (70/70) certifies."""
    points = {0.9: (40, 40), 0.8: (70, 70), 0.7: (75, 77), 0.6: (57, 60)}
    found = certify(points, 0.95, 0.95)
    assert found["certified"] and found["threshold"] == 0.8 and found["right_hits"] == 70
    assert precision_lower_bound(75, 77) < 0.95  # 0.7 is not certified either


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def synthetic_log(groups: int, domain: str = "medical", seed: int = 0) -> tuple[list[Query], dict[str, np.ndarray]]:
    """Each group: an original and a re-ask at cosine ~0.9; groups share a common direction (cosine
    ~0.5 between groups), so a low threshold serves a new question another group's answer."""
    rng = np.random.default_rng(seed)
    common = unit(np.ones(256))
    queries, vectors = [], {}
    for g in range(groups):
        centre = unit(0.7 * common + 0.7 * unit(rng.normal(size=256)))
        for k in range(2):
            text = f"{domain} q{g} v{k}"
            vectors[text] = unit(centre + 0.3 * unit(rng.normal(size=256)))
            queries.append(Query(text, f"{domain}:{g}", domain, len(queries) + 1))
    return queries, vectors


def test_a_replay_caches_misses_and_counts_right_hits():
    queries, vectors = synthetic_log(3)
    replay = LogReplay.of(queries, vectors)
    assert replay.reasks == 3
    assert replay.run(0.5) == (3, 3)  # each re-ask finds its original
    assert replay.run(0.999) == (0, 0)


def test_a_log_too_small_to_certify_is_refused_saying_how_many_reasks_it_needs():
    queries, vectors = synthetic_log(40)
    with pytest.raises(CacheloraError, match=r"log.jsonl: 40 labelled re-asks; .* needs at least 59"):
        calibrate_log(queries, vectors, 0.95, source="log.jsonl")


def test_each_domain_certifies_alone_or_takes_the_pooled_threshold_and_says_so():
    medical, v1 = synthetic_log(70, "medical")
    law, v2 = synthetic_log(10, "law", seed=1)
    result = calibrate_log(medical + law, {**v1, **v2}, 0.95)
    pooled = result["pooled"]
    assert pooled["certified"] and pooled["reasks"] == 80 and 0.5 <= pooled["threshold"] <= 0.9
    assert result["per_domain"]["medical"]["certified"]
    law_entry = result["per_domain"]["law"]
    assert (
        not law_entry["certified"]
        and law_entry["threshold"] == pooled["threshold"]
        and "pooled" in law_entry["fallback"]
    )


def test_a_log_reads_answer_ids_duplicates_and_names_a_bad_line(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("id,query,duplicate_of,domain\na,reset my router,,it\nb,how to reset a router,a,it\nc,other,,it\n")
    queries = read_log(path)
    assert [q.answer for q in queries] == [queries[0].answer, queries[0].answer, "line:4"]
    path.write_text("query,duplicate_of\nfirst,\nsecond,9\n")
    with pytest.raises(CacheloraError, match=r"log.csv:3: duplicate_of '9' names no earlier query"):
        read_log(path)
    jsonl = tmp_path / "log.jsonl"
    jsonl.write_text(json.dumps({"query": "x", "answer_id": 1}) + "\n\n" + json.dumps({"answer_id": 2}) + "\n")
    with pytest.raises(CacheloraError, match=r"log.jsonl:3: 'query' must be a non-empty string"):
        read_log(jsonl)


TOPICS = [
    f"{thing} {place}"
    for thing in ("reset", "update", "back up", "repair", "clean", "replace", "test")
    for place in (
        "my router",
        "the laptop",
        "a phone",
        "the printer",
        "a car battery",
        "the boiler",
        "my bike",
        "the fridge",
        "a garden hose",
        "the roof",
    )
]


def test_calibrate_rewrites_the_exports_thresholds_router_config_and_checksums(tmp_path):
    """End to end on the base model: 70 re-asks (a query and its reworded twin) certify a threshold."""
    from sentence_transformers import SentenceTransformer

    from cachelora.base_model import load_base
    from cachelora.cli import main
    from cachelora.records import file_sha256

    export = tmp_path / "export"
    load_base("all-MiniLM-L6-v2").save(str(export))
    config = {
        "model": "baseline",
        "base_model": {"name": "all-MiniLM-L6-v2", "sha256": "x"},
        "adapter_sha256": None,
        "pooling": "mean",
        "dimension": 384,
        "max_seq_length": 256,
        "verifier": None,
        "checksums": {},
        "thresholds": {"chosen_on": "val", "global": {"threshold": 1.0}, "per_domain": {}},
    }
    (export / "cache_config.json").write_text(json.dumps(config))
    log = tmp_path / "log.jsonl"
    rows = []
    for i, topic in enumerate(TOPICS):
        rows += [
            {"query": f"how do I {topic}", "answer_id": i, "domain": "home"},
            {"query": f"how can i {topic}?", "answer_id": i, "domain": "home"},
        ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = CliRunner().invoke(main, ["calibrate", str(log), "--export", str(export)])
    assert result.exit_code == 0, result.output
    saved = json.loads((export / "cache_config.json").read_text())
    g = saved["thresholds"]["global"]
    assert g["calibration"]["certified"] and g["calibration"]["right_hits"] >= 59
    assert g["threshold"] == saved["thresholds"]["per_domain"]["home"]["threshold"] < 1.0
    router = (export / "semantic_router.yaml").read_text()
    assert f"similarity_threshold: {g['threshold']:.4f}" in router and "at 95% confidence" in router
    assert saved["checksums"]["semantic_router.yaml"] == file_sha256(export / "semantic_router.yaml")
    assert "labelled traffic log.jsonl" in (export / "README.md").read_text()
    assert SentenceTransformer(str(export)).encode(["x"]).shape == (1, 384)
    assert math.isclose(
        g["calibration"]["precision_lower_bound"],
        precision_lower_bound(g["calibration"]["right_hits"], g["calibration"]["hits"]),
        abs_tol=1e-6,
    )
