"""Traffic replay: originals first, misses cached, near-misses never right, settings from dev only."""

from __future__ import annotations

import numpy as np
import pytest

from cachelora.traffic import NEAR_MISS, ORIGINAL, REASK, AnswerGroup
from cachelora.traffic_replay import (
    EMBEDDING,
    WITH_VERIFIER,
    TrafficReplay,
    calibrate,
    figures,
    replay_model,
    traffic_replays,
)
from tests.conftest import tiny_params


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=float)
    return v / np.linalg.norm(v)


GROUP = AnswerGroup(
    "g1",
    "medical",
    original="deposit back in california",
    reasks=("ca landlord kept my deposit",),
    near_misses=(("deposit back in texas", "jurisdiction"),),
)
VECTORS = {
    "deposit back in california": unit(1, 0, 0),
    "ca landlord kept my deposit": unit(0.8, 0.6, 0),  # cos 0.8 to the original
    "deposit back in texas": unit(0.95, 0, 0.312),  # cos 0.95: the near-miss is closer than the re-ask
}


def by_kind(replay: TrafficReplay, t: float, v: float | None = None) -> dict[str, tuple[bool, bool]]:
    out = replay.run(t, v)
    return {str(k): (bool(h), bool(r)) for k, h, r in zip(out.kind, out.hit, out.right, strict=True)}


def test_originals_come_first_then_a_seeded_order() -> None:
    groups = [GROUP, AnswerGroup("g2", "medical", "o2", ("r2a", "r2b"), (("n2", "number"),))]
    lookups = TrafficReplay.of(
        groups, {**VECTORS, **{t: unit(0, 1, 1) for t in ("o2", "r2a", "r2b", "n2")}}, "s"
    ).lookups
    assert [lk.kind for lk in lookups[:2]] == [ORIGINAL, ORIGINAL]
    assert {lk.answer_id for lk in lookups if lk.kind == NEAR_MISS} == {"g1:near_miss:0", "g2:near_miss:0"}


def test_a_near_miss_that_hits_its_own_original_is_a_wrong_hit() -> None:
    replay = TrafficReplay.of([GROUP], VECTORS, "seed")
    assert by_kind(replay, 0.7) == {NEAR_MISS: (True, False), REASK: (True, True)}
    f = figures(replay.run(0.7), near_miss_share=0.1)
    assert f["near_miss_wrong_hit_rate"] == 1.0 and f["reask_hit_rate"] == 1.0 and f["hit_precision"] == 0.5
    assert f["precision_at_near_miss_share"] == round(0.9 / (0.9 + 0.1), 6)


def test_a_miss_is_cached_with_its_own_answer() -> None:
    """The near-miss (cos 0.85 to the original) misses at 0.9 and is cached; the re-ask, below 0.9 to
    the original but at 0.99 to the near-miss, then finds the near-miss: a wrong hit. A replay
    that did not cache misses would see the original only and miss."""
    group = AnswerGroup("g1", "medical", "orig", ("reask",), (("near", "number"),))
    vectors = {"orig": unit(1, 0, 0), "near": unit(0.85, 0.527, 0)}
    vectors["reask"] = unit(*(0.99 * vectors["near"] + 0.141 * unit(0, 0, 1)))
    seed = next(s for s in map(str, range(50)) if TrafficReplay.of([group], vectors, s).lookups[1].kind == NEAR_MISS)
    replay = TrafficReplay.of([group], vectors, seed)
    assert float(vectors["reask"] @ vectors["orig"]) < 0.9 < float(vectors["reask"] @ vectors["near"])
    assert by_kind(replay, 0.9) == {NEAR_MISS: (False, False), REASK: (True, False)}


def test_the_verifier_refuses_a_candidate_and_only_candidates_are_verified() -> None:
    asked: list[tuple[str, str]] = []

    def verifier(pairs: list[tuple[str, str]]) -> np.ndarray:
        asked.extend(pairs)
        return np.array([0.1 if "texas" in q + c else 0.9 for q, c in pairs])

    replay = TrafficReplay.of([GROUP], VECTORS, "seed", verifier)
    assert by_kind(replay, 0.7, 0.5) == {NEAR_MISS: (False, False), REASK: (True, True)}
    out = replay.run(0.9, 0.5)  # only the near-miss (0.95) is a candidate at 0.9
    assert out.candidate.tolist() == [k == NEAR_MISS for k in out.kind]


def test_a_rival_within_the_window_makes_the_lookup_miss_without_asking_the_verifier() -> None:
    """The near-miss misses (the verifier refuses it against the original) and is cached; the re-ask
    then finds the near-miss nearest (0.88) with the original just behind (0.87). A verifier that
    accepts that pair would serve the near-miss's answer; with the rival check, a rival within the
    window (and at the threshold) makes the lookup miss and the verifier is not asked."""
    group = AnswerGroup("g1", "medical", "orig", ("reask",), (("near", "number"),))
    vectors = {"orig": unit(1, 0, 0), "near": unit(0.9, 0.436, 0)}
    vectors["reask"] = unit(0.87, 0.2225, 0.44)
    cos = {t: round(float(vectors["reask"] @ vectors[t]), 3) for t in ("orig", "near")}
    assert cos["orig"] < cos["near"] < cos["orig"] + 0.02, cos
    seed = next(s for s in map(str, range(50)) if TrafficReplay.of([group], vectors, s).lookups[1].kind == NEAR_MISS)
    asked: list[tuple[str, str]] = []

    def verifier(pairs: list[tuple[str, str]]) -> np.ndarray:
        asked.extend(pairs)
        return np.array([0.1 if {q, c} == {"near", "orig"} else 0.9 for q, c in pairs])

    def reask_at(window: float | None, threshold: float) -> tuple[bool, bool, bool]:
        replay = TrafficReplay.of([group], vectors, seed, verifier, window)
        replay.scores.clear()  # scored again as run() asks for them
        asked.clear()
        out = replay.run(threshold, 0.5)
        i = list(out.kind).index(REASK)
        return bool(out.hit[i]), bool(out.rival[i]), ("reask", "near") in asked

    assert reask_at(None, 0.8) == (True, False, True)  # no check: the near-miss's answer is served
    assert reask_at(0.02, 0.8) == (False, True, False)  # a rival: a miss, the verifier not asked
    assert reask_at(0.005, 0.8) == (True, False, True)  # the original is outside the window
    assert reask_at(0.02, 0.875) == (True, False, True)  # the original is below the threshold
    f = figures(TrafficReplay.of([group], vectors, seed, verifier, 0.02).run(0.8, 0.5), None)
    assert f["rival_misses"] == 1 and f["verified_share"] == 0.5  # the verifier read the near-miss only


def test_readmes_lookup_serves_exactly_what_the_replay_counts(tmp_path, monkeypatch) -> None:
    """README's Python lookup (both stages and the rival check), run over a replay's stream with the
    same vectors and verifier scores, hits and misses where the replay does: what ships is what was
    measured."""
    import json
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "def lookup(" in b)
    rng = np.random.default_rng(7)
    groups, vectors = [], {}
    for g in range(12):
        centre = rng.normal(size=8)
        texts = [f"g{g} original", f"g{g} reask a", f"g{g} reask b", f"g{g} near a", f"g{g} near b"]
        for text, noise in zip(texts, [0, 0.45, 0.6, 0.35, 0.5], strict=True):
            vectors[text] = unit(*(centre + noise * rng.normal(size=8)))
        groups.append(AnswerGroup(f"g{g}", "medical", texts[0], tuple(texts[1:3]), ((texts[3], "n"), (texts[4], "n"))))
    scores = {(a, b): float(rng.random()) for a in vectors for b in vectors}
    verifier_scores = lambda pairs: np.array([scores[p] for p in pairs])  # noqa: E731
    threshold, verifier_threshold, window = 0.75, 0.3, 0.05
    replay = TrafficReplay.of(groups, vectors, "seed", verifier_scores, window)
    outcome = replay.run(threshold, verifier_threshold)

    class Embedder:
        def __init__(self, path: str) -> None:
            pass

        def encode(self, text: str, normalize_embeddings: bool) -> np.ndarray:
            return vectors[text]

    class Verifier(Embedder):
        def predict(self, pairs: list[tuple[str, str]]) -> np.ndarray:
            return verifier_scores(pairs)

    monkeypatch.chdir(tmp_path)
    Path("exported").mkdir()
    block = {"path": "verifier", "embedding_per_domain": {"medical": threshold}, "rival_window": window,
             "per_domain": {"medical": verifier_threshold}}  # fmt: skip
    Path("exported/cache_config.json").write_text(json.dumps({"verifier": block}))
    namespace = {"SentenceTransformer": Embedder, "CrossEncoder": Verifier}
    exec(re.sub(r"^from sentence_transformers.*$", "", code, flags=re.MULTILINE), namespace)
    cache = namespace["cache"]
    first = sum(lk.kind == ORIGINAL for lk in replay.lookups)
    cache["medical"] = [(lk.text, vectors[lk.text], lk.answer_id) for lk in replay.lookups[:first]]
    served = []
    for lk in replay.lookups[first:]:
        answer = namespace["lookup"](lk.text, "medical")
        served.append(answer)
        if answer is None:
            cache["medical"].append((lk.text, vectors[lk.text], lk.answer_id))
    assert [a is not None for a in served] == outcome.hit.tolist()
    assert [a == lk.answer_id for a, lk in zip(served, replay.lookups[first:], strict=True)] == outcome.right.tolist()
    assert outcome.rival.any() and outcome.hit.any() and (outcome.hit & ~outcome.right).any()


def test_settings_are_chosen_on_dev_and_only_reported_on_test() -> None:
    """Dev separates re-asks (0.8) from near-misses (0.6); test does not (its near-miss is closer):
    settings chosen on dev are feasible there; chosen on test, nothing would ever hit."""
    dev_vectors = {**VECTORS, "deposit back in texas": unit(0.6, 0, 0.8)}
    test_group = AnswerGroup("t1", "medical", "tx orig", ("tx reask",), (("tx near", "number"),))
    test_vectors = {"tx orig": unit(1, 0, 0), "tx reask": unit(0.7, 0.714, 0), "tx near": unit(0.9, 0, 0.436)}
    sets = {"dev": {"medical": [GROUP]}, "test": {"medical": [test_group]}}
    params = tiny_params()
    replays = traffic_replays({**dev_vectors, **test_vectors}, sets, params.traffic.seed, None)
    result = replay_model(replays, params.evaluate.target_precision, params.traffic.near_miss_share, None, None)
    chosen = result[EMBEDDING]["settings"]["medical"]
    assert chosen["feasible"] and 0.6 < chosen["threshold"] <= 0.8
    expected, _, _ = calibrate([TrafficReplay.of([GROUP], dev_vectors, "x")], 0.95, with_verifier=False)
    assert chosen["threshold"] == round(expected, 6)
    assert result[EMBEDDING]["test"]["medical"]["near_miss_wrong_hit_rate"] == 1.0  # reported, not tuned away
    assert WITH_VERIFIER not in result


def _write_groups(path, groups: list[AnswerGroup]) -> None:
    from cachelora.records import write_jsonl

    write_jsonl(
        path,
        [
            {"group_id": g.group_id, "domain": g.domain, "original": g.original, "reasks": list(g.reasks),
             "near_misses": [{"text": t, "kind": k} for t, k in g.near_misses]}
            for g in groups
        ],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("where", "key"),
    [
        ("traffic_train", "test_in_traffic_train"),
        ("traffic_train_dev", "dev_in_traffic_train"),
        ("natural_test", "natural_test_in_traffic_train"),
        ("train", "test_in_train"),
        ("val", "test_in_val"),
        ("dev", "test_in_dev"),
    ],
)
def test_traffic_contamination_looks_everywhere_a_text_could_have_been_seen(tmp_path, monkeypatch, where, key):
    """A traffic text copied into any set that trains (the verifier's traffic train included) or
    chooses is counted under its own key and fails the stage."""
    from cachelora import paths
    from cachelora.errors import CacheloraError
    from cachelora.records import write_jsonl
    from cachelora.traffic import traffic_file
    from cachelora.traffic_evaluation import contamination
    from tests.conftest import tiny_rows

    monkeypatch.chdir(tmp_path)
    rows = [dict(r, domain="medical") for r in tiny_rows(12, seed=5)]
    test_group = AnswerGroup("t1", "medical", "how long is a tattoo sore", ("tattoo pain days",), (("x y z", "n"),))
    dev_group = AnswerGroup("d1", "medical", "is ibuprofen ok after surgery", ("advil post op",), (("a b c", "n"),))
    train_group = AnswerGroup("r1", "medical", "can I swim with stitches", ("pool stitches",), (("e f g", "n"),))
    copied = {"traffic_train_dev": dev_group.reasks[0]}.get(where, test_group.reasks[0])
    place = {"traffic_train": "traffic_train", "traffic_train_dev": "traffic_train"}.get(where, where)
    text_row = dict(rows[0], anchor=copied)
    if place == "traffic_train":
        train_group = AnswerGroup("r1", "medical", copied, train_group.reasks, train_group.near_misses)
    write_jsonl(paths.split_file("medical", "train"), [text_row if place == "train" else rows[1]])
    write_jsonl(paths.split_file("medical", "val"), [text_row if place == "val" else rows[2]])
    write_jsonl(paths.natural("dev"), [rows[3]])
    natural_test = [dict(rows[4], anchor=train_group.original) if place == "natural_test" else rows[4]]
    write_jsonl(paths.natural("test"), natural_test)
    if place == "dev":
        dev_group = AnswerGroup("d1", "medical", copied, dev_group.reasks, dev_group.near_misses)
    _write_groups(traffic_file("train", "medical"), [train_group])
    sets = {"dev": {"medical": [dev_group]}, "test": {"medical": [test_group]}}
    params = tiny_params()
    with pytest.raises(CacheloraError, match=rf"'{key}': 1"):
        contamination(params, sets)
