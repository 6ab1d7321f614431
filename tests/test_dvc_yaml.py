"""dvc.yaml and params.yaml must agree: every domain's adapter feeds merge and evaluate."""

import ast
from pathlib import Path

import pytest
import yaml

from cachelora.params import Params, load_params

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


# --- what each stage reads, derived from the code --------------------------------------------------

PACKAGE = Path("src/cachelora")
NO_EFFECT_ON_OUTPUTS = {PACKAGE / "entrypoint.py", PACKAGE / "errors.py"}  # logging and the error line
FIELDS = {field.alias or name for name, field in Params.model_fields.items()}


def _module_file(module: str) -> Path | None:
    if module == "cachelora" or not module.startswith("cachelora."):
        return None
    return PACKAGE / f"{module.split('.', 1)[1].replace('.', '/')}.py"


def _imports(path: Path) -> set[Path]:
    """Project modules ``path`` imports anywhere (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_module_file(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(_module_file(node.module))
            if node.module == "cachelora":
                found |= {_module_file(f"cachelora.{alias.name}") for alias in node.names}
    return {f for f in found if f is not None and f.is_file()}


def _on_params(node: ast.AST, bound: set[str]) -> str | None:
    """``key`` when ``node`` is ``<params>.<key>`` for a Params-bound name."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
        key = "validate" if node.attr == "validate_" else node.attr
        return key if key in FIELDS else None
    return None


def _params_keys(fn: ast.FunctionDef) -> set[str]:
    """Params keys one function reads: ``p.<key>.<sub>`` as ``key.sub``, a bare ``p.<key>`` as ``key``."""
    bound = {a.arg for a in fn.args.args if isinstance(a.annotation, ast.Name) and a.annotation.id == "Params"}
    for node in ast.walk(fn):
        called = getattr(getattr(node, "value", None), "func", None)
        if isinstance(node, ast.Assign) and getattr(called, "id", None) == "load_params":
            bound |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    keys, nested = set(), set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Attribute) and (key := _on_params(node.value, bound)):
            keys.add(f"{key}.{node.attr}")
            nested.add(id(node.value))
    for node in ast.walk(fn):
        if id(node) not in nested and (key := _on_params(node, bound)):
            keys.add(key)
    return keys


def reads(script: str) -> tuple[set[Path], set[str]]:
    """The project modules a stage script runs (transitively) and the params keys they read:
    ``x.<key>`` or ``x.<key>.<sub>`` on a name bound to a Params (an argument annotated ``Params``
    or the result of ``load_params()``)."""
    todo, seen = [Path(script)], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += _imports(path)
    keys = set()
    for path in seen:
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef):
                keys |= _params_keys(fn)
    return seen - {Path(script)}, keys


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(dep) or Path(dep) in path.parents for dep in deps)


def _key_covered(key: str, declared: list[str]) -> bool:
    """``train.device`` is covered by ``train`` or ``train.device``; ``train`` only by ``train``."""
    return any(key == p or key.startswith(f"{p}.") for p in declared)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_dvc_yaml_declares_every_module_and_params_key_a_stage_reads(name):
    body = STAGES[name].get("do", STAGES[name])
    deps = [d.replace("${item}", "x").replace("${key}", "x") for d in body["deps"]]
    modules, keys = reads(body["cmd"].split()[1])
    missing = sorted(str(m) for m in modules - NO_EFFECT_ON_OUTPUTS if not _covered(m, deps))
    assert not missing, f"{name}: dvc.yaml deps miss {missing}"
    declared = [p for p in body.get("params", [])]
    if "params.yaml" in deps:  # the whole file is a dependency
        declared = sorted(FIELDS)
    missing_keys = sorted(k for k in keys if not _key_covered(k, declared))
    assert not missing_keys, f"{name}: dvc.yaml params miss {missing_keys}"


def test_the_checker_sees_a_missing_module_and_key():
    modules, keys = reads("stages/evaluate.py")
    assert PACKAGE / "replay.py" in modules and PACKAGE / "records.py" in modules
    assert {"evaluate", "train.device", "base_model", "domains"} <= keys
    assert not _key_covered("train.device", ["evaluate", "train.lr"])


def test_each_domain_model_trains_on_its_own_split_only():
    body = STAGES["train"]["do"]
    assert "${item}" in body["deps"] and "data/splits" not in body["deps"]
    assert PARAMS.train_data == {**{d: f"data/splits/{d}" for d in PARAMS.domains}, "multi": "data/splits"}


def test_every_stage_waits_for_the_params_check():
    for name, stage in STAGES.items():
        if name != "check_params":
            assert "metrics/params_check.json" in stage.get("do", stage)["deps"], name


def test_every_input_a_stage_reads_is_one_the_report_header_names():
    """RESULTS.md names the commit holding the pipeline's inputs: every dep no stage outputs is one."""
    from cachelora.paths import PIPELINE_INPUTS

    outs = {
        (next(iter(o)) if isinstance(o, dict) else o).replace("${item}", "x").replace("${key}", "x")
        for stage in STAGES.values()
        for kind in ("outs", "metrics", "plots")
        for o in stage.get("do", stage).get(kind, [])
    }
    for name, stage in STAGES.items():
        for dep in stage.get("do", stage)["deps"]:
            dep = dep.replace("${item}", "x").replace("${key}", "x")
            # benchmark results (git) that RESULTS.md cites are named there with their own md5
            generated = ("data/triplets", "data/validated", "data/splits", "models/", "metrics", "benchmarks/results/")
            if dep == "x" or dep in outs or dep.startswith(generated):
                continue
            assert any(dep == i or dep.startswith(f"{i}/") for i in PIPELINE_INPUTS), (name, dep)


def test_the_stated_near_miss_share_does_not_rerun_evaluate():
    """evaluate replays traffic dev for the deploy choice, but only the stream's order reaches it."""

    def reads_share(stage: dict) -> bool:
        body = stage.get("do", stage)
        return any(_key_covered("traffic.near_miss_share", [p]) for p in body.get("params", []) if isinstance(p, str))

    assert "traffic.seed" in STAGES["evaluate"]["params"]
    assert not reads_share(STAGES["evaluate"]) and reads_share(STAGES["traffic"])
