"""dvc.yaml and params.yaml must agree: every domain's adapter feeds merge and evaluate."""

from pathlib import Path

import yaml

from cachelora.params import load_params

STAGES = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
PARAMS = load_params("params.yaml")


def test_merge_and_evaluate_depend_on_every_domain_adapter():
    for domain in PARAMS.domains:
        assert f"models/{domain}" in STAGES["merge"]["deps"]
        assert f"models/{domain}" in STAGES["evaluate"]["deps"]
    assert {"models/multi", "models/merged"} <= set(STAGES["evaluate"]["deps"])


def test_every_stage_has_a_script_that_is_also_a_dependency():
    for name, stage in STAGES.items():
        body = stage.get("do", stage)
        script = body["cmd"].split()[1]
        assert Path(script).is_file() and script in body["deps"], name


def test_metrics_are_not_cached():
    for stage in STAGES.values():
        for entry in stage.get("do", stage).get("metrics", []):
            (options,) = entry.values()
            assert options["cache"] is False
