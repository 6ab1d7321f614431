"""The traffic stage's cost per lookup: the verifier is paid for the lookups it reads, no others."""

from __future__ import annotations

from cachelora.traffic_evaluation import lookup_costs
from cachelora.traffic_replay import EMBEDDING, WITH_VERIFIER


def test_a_lookup_pays_the_verifier_only_for_candidates_without_a_rival() -> None:
    """Of the test lookups, 0.9 reach the embedding threshold and 0.3 of all miss for a rival before
    the verifier is asked: the verifier is paid for 0.6 of lookups."""
    entry = {"test": {"all": {"candidate_share": 0.9, "verified_share": 0.6}}}
    costs = lookup_costs({"m": {EMBEDDING: entry, WITH_VERIFIER: entry}}, {"m": 10.0}, verify_ms=20.0)
    assert costs["m"][EMBEDDING]["lookup_ms_batch_1"] == 10.0
    assert costs["m"][WITH_VERIFIER] == {"verified_share": 0.6, "lookup_ms_batch_1": 22.0, "lookup_over_embedding": 2.2}
