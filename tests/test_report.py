import json

import pytest

from cachelora.errors import CacheloraError
from cachelora.report import BEGIN, END, Cell, lookup, replace_block


def test_lookup_and_cells(tmp_path):
    source = tmp_path / "m.json"
    source.write_text(json.dumps({"merged": {"law": {"margin": 0.123456}}}))
    assert Cell(source, "merged.law.margin", ".4f").render({}) == "0.1235"
    with pytest.raises(CacheloraError, match=r"m.json: key 'merged.medical.margin' not found"):
        lookup(json.loads(source.read_text()), "merged.medical.margin", source)


def test_replace_block_needs_both_markers():
    text = f"intro\n{BEGIN}\nold\n{END}\nrest\n"
    assert replace_block(text, f"{BEGIN}\nnew\n{END}") == f"intro\n{BEGIN}\nnew\n{END}\nrest\n"
    with pytest.raises(CacheloraError, match=r"needs exactly one"):
        replace_block("no markers", "x")


def test_report_loads_without_torch():
    """Writing RESULTS.md reads JSON: importing the report must not load torch or sentence-transformers."""
    import subprocess
    import sys

    probe = "import sys, cachelora.report; print(sorted({'torch', 'sentence_transformers'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_a_reference_scored_outside_the_pipeline_is_cited_from_the_benchmarks_file(tmp_path, monkeypatch):
    """A reference the pipeline did not score (benchmarks/reference_models.py did) is read from that
    benchmark's file; one in ``evaluate.reference_models`` from the pipeline's own metrics."""
    from cachelora import paths, report
    from tests.conftest import tiny_params

    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"models": ["big"]}))
    monkeypatch.setattr(report, "REFERENCE", reference)
    params = tiny_params()
    outside = report._outside(params)
    assert outside == ["big"] and report._references(params, outside) == ["big"]
    assert [report._source("big", k, outside) for k in ("eval", "traffic", "cost", "traffic_cost")] == [
        (reference, "eval.big"),
        (reference, "traffic.big"),
        (reference, "cost.models.big"),
        (reference, "traffic_cost.models.big"),
    ]
    assert report._source("baseline", "eval", outside) == (report.EVAL, "baseline")
    assert report._source("baseline", "cost", outside) == (paths.COST, "models.baseline")
    inside = tiny_params(evaluate={"reference_models": ["big", "other"]})
    assert report._outside(inside) == [] and report._references(inside, []) == ["big", "other"]
    assert report._source("big", "traffic", []) == (report.TRAFFIC, "models.big")
    assert report._source("big", "traffic_cost", []) == (report.TRAFFIC_COST, "models.big")


def test_the_deploy_table_says_when_nothing_hits_how_close_certification_came_and_the_hindsight_share(
    tmp_path, monkeypatch
):
    from cachelora import report
    from tests.conftest import tiny_params

    params = tiny_params()
    figures = {s: {"hit_rate": 0.0, "hit_precision": 1.0} for s in ("test", "natural_dev", "natural_test")}
    best = {"threshold": 0.82, "right_hits": 95, "hits": 114, "precision_lower_bound": 0.765}
    nothing = {"threshold": 0.998, "right_hits": 0, "hits": 0, "precision_lower_bound": 0.0, "certified": False}
    groups = [*params.domains, "all"]
    deploy = {
        "model": "medical",
        "chosen_on": "traffic_dev",
        **figures,
        "per_domain": {d: figures for d in params.domains},
        "guarantee": {g: {**nothing, "best": best} for g in groups},
        "hindsight": {g: {"hit_rate": 0.667, "shipped_share": 0.0} for g in groups},
    }
    deploy["hindsight"]["all"]["shipped_share"] = None  # nothing reaches the target in hindsight either
    source = tmp_path / "eval.json"
    source.write_text(json.dumps({"deploy": deploy, "target_precision": 0.95}))
    monkeypatch.setattr(report, "EVAL", source)
    table = report.deploy_table(params)
    rows = {row[0]: row for row in table.render_rows({})}
    first = rows[params.domains[0]]
    assert "yes (nothing hits)" in first and "no (best: >= 0.765 at 0.820)" in first
    assert first[-2:] == ["0.667", "0.00"] and rows["all"][-1] == "-"
