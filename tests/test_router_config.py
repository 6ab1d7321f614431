"""The exported router fragment passes the semantic router's own validator (`vllm-sr config validate`)."""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from cachelora.export import ROUTER_MODEL_PATH, semantic_router_snippet

DOMAINS = ("medical", "law", "programming", "psychology")
THRESHOLDS = {
    "chosen_on": "natural dev",
    "global": {"threshold": 0.83, "test": {"hit_precision": 0.97, "hit_rate": 0.41}},
    "per_domain": {d: {"threshold": 0.8 + i / 100, "test": {"hit_precision": 0.96, "hit_rate": 0.4}}
                   for i, d in enumerate(DOMAINS)},
}  # fmt: skip


def vllm_sr() -> str:
    """The validator `make router-validator` installs (or $VLLM_SR); a missing one fails with the fix."""
    path = os.environ.get("VLLM_SR") or str(Path(__file__).resolve().parents[1] / ".venv-vllm-sr/bin/vllm-sr")
    if not Path(path).is_file():
        pytest.fail(f"{path}: the router's validator is missing; run `make router-validator` (vllm-sr==0.4.0)")
    return path


def merge(starter: dict, fragment: dict) -> dict:
    """What an operator does: `global` merged key by key; each fragment decision's plugin added to a
    decision for its domain (made here from the starter's catch-all decision: its rules and modelRefs)."""

    def deep(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                deep(into[key], value)
            else:
                into[key] = value

    merged = copy.deepcopy(starter)
    deep(merged.setdefault("global", {}), fragment["global"])
    template = merged["routing"]["decisions"][0]
    for i, decision in enumerate(fragment["routing"]["decisions"]):
        merged["routing"]["decisions"].append({**copy.deepcopy(template), "name": decision["name"],
                                               "priority": 200 + i, "plugins": decision["plugins"]})  # fmt: skip
    return merged


def validate(config: dict, folder: Path) -> subprocess.CompletedProcess[str]:
    path = folder / "merged.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return subprocess.run([vllm_sr(), "config", "validate", "--config", str(path)], capture_output=True,
                          text=True, cwd=folder, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def starter(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("router")
    subprocess.run([vllm_sr(), "config", "init", "--output", "config.yaml"], cwd=folder, check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    return yaml.safe_load((folder / "config.yaml").read_text())


def test_the_fragment_merged_into_the_starter_config_validates(starter: dict, tmp_path: Path) -> None:
    fragment = yaml.safe_load(semantic_router_snippet("multi", THRESHOLDS))
    result = validate(merge(starter, fragment), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_fragment_loads_our_model_and_sets_every_decisions_threshold() -> None:
    fragment = yaml.safe_load(semantic_router_snippet("multi", THRESHOLDS))
    store = fragment["global"]["stores"]["response_cache"]
    assert store["embedding_model"] == "bert" and store["similarity_threshold"] == 0.83
    assert fragment["global"]["model_catalog"]["embeddings"]["semantic"]["bert_model_path"] == ROUTER_MODEL_PATH
    decisions = {d["name"]: d["plugins"][0] for d in fragment["routing"]["decisions"]}
    assert set(decisions) == set(DOMAINS)
    for i, domain in enumerate(DOMAINS):
        plugin = decisions[domain]
        assert plugin["type"] == "response_cache" and plugin["configuration"]["scope"] == "global"
        assert plugin["configuration"]["semantic"]["similarity_threshold"] == pytest.approx(0.8 + i / 100)


def test_the_validator_rejects_the_deprecated_store(starter: dict, tmp_path: Path) -> None:
    """The check can fail: yesterday's fragment (the deprecated semantic_cache store) is refused."""
    fragment = yaml.safe_load(semantic_router_snippet("multi", THRESHOLDS))
    fragment["global"]["stores"] = {"semantic_cache": fragment["global"]["stores"]["response_cache"]}
    result = validate(merge(starter, fragment), tmp_path)
    assert result.returncode != 0 and "semantic_cache" in result.stdout + result.stderr


def test_a_calibrated_fragment_validates_too(starter: dict, tmp_path: Path) -> None:
    """`cachelora calibrate`'s thresholds (each with its guarantee in a comment) in the same schema."""
    from cachelora.export import calibrated_thresholds

    found = {"threshold": 0.81, "right_hits": 70, "hits": 70, "precision_lower_bound": 0.958, "certified": True}
    calibration = {
        "target_precision": 0.95,
        "confidence": 0.95,
        "pooled": found,
        "per_domain": {"medical": found, "law": {**found, "certified": False, "fallback": "pooled"}},
    }
    snippet = semantic_router_snippet("multi", calibrated_thresholds(calibration, "labelled traffic log.jsonl"))
    assert "70/70 hits right: precision >= 0.958 at 95% confidence" in snippet and "the pooled threshold" in snippet
    result = validate(merge(starter, yaml.safe_load(snippet)), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_each_threshold_says_what_the_router_alone_does_with_near_misses() -> None:
    """The traffic stage's replay of the shipped embedding thresholds without the verifier lands beside
    each threshold and in its router comment: what the router, which cannot run the verifier, serves."""
    from cachelora.export import ROUTER_ALONE, add_router_alone

    thresholds = copy.deepcopy(THRESHOLDS)
    alone = {"reask_hit_rate": 0.69, "near_miss_wrong_hit_rate": 0.92, "hit_precision": 0.43, "hits": 7}
    traffic = {"models": {"multi": {"shipped_thresholds": {"test": {"all": alone, "programming": alone}}}}}
    add_router_alone(thresholds, traffic, "multi")
    assert thresholds["per_domain"]["programming"][ROUTER_ALONE] == {k: alone[k] for k in list(alone)[:3]}
    assert ROUTER_ALONE not in thresholds["per_domain"]["law"] and ROUTER_ALONE not in thresholds["global"]
    snippet = semantic_router_snippet("multi", thresholds)
    assert "router alone on traffic test: re-ask hit rate 0.690, near-miss wrong-hit rate 0.920" in snippet
    add_router_alone(thresholds, None, "multi")  # no traffic stage: nothing to add, nothing breaks


def test_a_fragment_whose_thresholds_certify_nothing_says_the_cache_will_hardly_answer() -> None:
    nothing = {"threshold": 0.998, "right_hits": 0, "hits": 0, "precision_lower_bound": 0.0, "certified": False}
    uncertified = copy.deepcopy(THRESHOLDS)
    for entry in (uncertified["global"], *uncertified["per_domain"].values()):
        entry["guarantee"] = nothing
    said = semantic_router_snippet("medical", {**uncertified, "confidence": 0.95})
    assert "NO threshold below certified the target precision" in said and "will serve some near-misses" not in said
    uncertified["per_domain"]["law"]["guarantee"] = {**nothing, "hits": 80, "right_hits": 80, "certified": True}
    said = semantic_router_snippet("medical", {**uncertified, "confidence": 0.95})
    assert "NO threshold" not in said and "will serve some near-misses" in said
