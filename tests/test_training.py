import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cachelora.adapters import INFO, save_adapter
from cachelora.base_model import load_base, pick_precision
from cachelora.errors import CacheloraError
from cachelora.records import file_md5, write_jsonl
from cachelora.training import (
    FINAL_LOSS,
    Tokenised,
    conflict_keys,
    embed_columns,
    load_training_rows,
    make_batches,
    train_model,
)
from cachelora.triplets import TEXT_FIELDS
from cachelora.verify import dir_md5
from tests.conftest import tiny_model_params, tiny_rows

ROOT = Path(__file__).resolve().parents[1]
BASE = "all-MiniLM-L6-v2"
# What training_info.json may hold: facts the inputs determine. Run facts go to metrics/train/<name>.json.
INPUT_FACTS = {"name", "base_model", "params", "data", "teacher", "triplets", "steps", FINAL_LOSS, "max_seq_length"}
RUN_FACTS = {"device", "precision", "threads", "wall_time_s", "triplets_per_s", "versions"}


def test_batches_have_no_false_negatives_and_cover_every_row():
    rows = tiny_rows(40)
    batches = make_batches(rows, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(40))
    for batch in batches:
        keys = [conflict_keys(rows[i]) for i in batch]
        assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1 :])


def test_batches_keep_rows_of_one_concept_apart():
    rows = tiny_rows(40)
    for batch in make_batches(rows, 8, random.Random(1)):
        concepts = [rows[i]["source_id"] for i in batch] + [rows[i]["negative_source_id"] for i in batch]
        assert len(concepts) == len(set(concepts))


def test_empty_train_split_is_an_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("")
    with pytest.raises(CacheloraError, match=r"train.jsonl: train split is empty"):
        load_training_rows([path])


def lora_weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "train.jsonl"
    write_jsonl(path, tiny_rows(24))
    return path


def test_training_is_seeded_and_deterministic(train_file):
    first = train_model("medical", tiny_model_params(), [train_file])
    second = train_model("medical", tiny_model_params(), [train_file])
    a, b = lora_weights(first.model), lora_weights(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.history == second.history
    per_epoch = len(make_batches(tiny_rows(24), 8, random.Random(3)))  # epochs 1, batch_size 8, seed 3
    assert first.info["steps"] == per_epoch and first.info["triplets"] == 24
    assert first.info["base_model"]["sha256"] and first.info["data"][str(train_file)]


def test_max_steps_caps_the_steps(train_file):
    capped = train_model("medical", tiny_model_params(max_steps=2, epochs=3), [train_file])
    assert capped.info["steps"] == len(capped.history) == 2


def test_length_ordered_passes_give_each_column_its_own_embeddings():
    """Regrouping texts by length only changes padding: the loss sees what per-column passes give."""
    params = tiny_model_params()
    model = load_base(params.base_model, "cpu", params.train.max_seq_length).eval()
    rows = [
        dict(r, anchor=r["anchor"] + " and what else should I know about it" * (i % 3))
        for i, r in enumerate(tiny_rows(8))
    ]
    tokens = Tokenised(model, [r[f] for r in rows for f in TEXT_FIELDS], params.train.max_seq_length)
    calls = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(args[0]["attention_mask"].shape))
    with torch.no_grad():
        regrouped = embed_columns(model, tokens, rows)
        calls_regrouped, calls[:] = list(calls), []
        columns = [model(tokens.batch([r[f] for r in rows], model.device))["sentence_embedding"] for f in TEXT_FIELDS]
    assert [c[0] for c in calls_regrouped] == [8, 8, 8]
    assert sum(c[0] * c[1] for c in calls_regrouped) < sum(c[0] * c[1] for c in calls)
    for ours, reference in zip(regrouped, columns, strict=True):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_a_training_step_sends_gradient_through_the_hard_negatives(train_file, monkeypatch):
    """The loss of a real training step depends on the negative column: its embeddings get a gradient."""
    import cachelora.training as training

    columns: list[list[torch.Tensor]] = []
    embed = training.embed_columns

    def recorded(*args, **kwargs):
        out = embed(*args, **kwargs)
        for tensor in out:
            tensor.retain_grad()
        columns.append(out)
        return out

    monkeypatch.setattr(training, "embed_columns", recorded)
    train_model("medical", tiny_model_params(epochs=0.3), [train_file])
    assert columns and all(len(step) == len(TEXT_FIELDS) for step in columns)
    for step in columns:
        anchor, positive, negative = (c.grad for c in step)
        assert negative is not None and float(negative.abs().sum()) > 0
        assert anchor is not None and positive is not None


@pytest.mark.parametrize("temperature", [0.05, 0.2])
def test_the_loss_is_mnrl_at_the_temperature_param(train_file, monkeypatch, temperature):
    """A step's loss is cross-entropy over each anchor's cosines to every positive and negative of the
    batch, divided by ``train.temperature`` (the default 0.05 is scale 20: a second value tells them apart)."""
    import cachelora.training as training

    columns: list[list[torch.Tensor]] = []
    embed = training.embed_columns
    monkeypatch.setattr(training, "embed_columns", lambda *a, **k: columns.append(embed(*a, **k)) or columns[-1])
    result = train_model("medical", tiny_model_params(temperature=temperature, max_steps=1), [train_file])
    anchor, positive, negative = (c.detach() for c in columns[0])
    candidates = torch.nn.functional.normalize(torch.cat([positive, negative]), dim=-1)
    scores = torch.nn.functional.normalize(anchor, dim=-1) @ candidates.T / temperature
    expected = torch.nn.functional.cross_entropy(scores, torch.arange(len(anchor)))
    assert result.history[0]["loss"] == pytest.approx(float(expected), abs=1e-4)


def test_training_moves_only_lora_weights(train_file):
    trained = train_model("medical", tiny_model_params(), [train_file])
    trainable = [n for n, p in trained.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_unknown_target_module_is_named(train_file):
    params = tiny_model_params().model_copy(
        update={"lora": tiny_model_params().lora.model_copy(update={"target_modules": ["query", "qkv_proj"]})}
    )
    with pytest.raises(CacheloraError, match=r"lora.target_modules: 'qkv_proj' matches no module"):
        train_model("medical", params, [train_file])


def test_fp16_on_cpu_is_refused(train_file):
    with pytest.raises(CacheloraError, match=r"train.precision: fp16 needs CUDA"):
        train_model("medical", tiny_model_params(precision="fp16"), [train_file])


@pytest.fixture(scope="module")
def trained(train_file):
    return train_model("medical", tiny_model_params(), [train_file])


def _hash_seed_with_another_set_order() -> str:
    """A PYTHONHASHSEED under which peft's set of target modules iterates in another order than here."""
    probe = "print(list(set(['query', 'value'])))"
    ours = str(list({"query", "value"}))
    for seed in range(200):
        env = {**os.environ, "PYTHONHASHSEED": str(seed)}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        if out.stdout.strip() != ours:
            return str(seed)
    raise AssertionError("no hash seed changes the set order")


TRAIN_AND_SAVE = """
import sys
import torch
from cachelora.adapters import save_adapter
from cachelora.training import train_model
from tests.conftest import tiny_model_params
torch.set_num_threads(int(sys.argv[3]))
trained = train_model("medical", tiny_model_params(), [sys.argv[1]])
save_adapter(trained.model, sys.argv[2], "all-MiniLM-L6-v2", trained.info, trained.probe)
"""


def test_same_inputs_give_the_same_adapter_directory_hash(trained, train_file, tmp_path):
    """Two runs on the same inputs (here and in a process with another hash seed) save the same bytes."""
    here, there = tmp_path / "here" / "medical", tmp_path / "there" / "medical"
    save_adapter(trained.model, here, BASE, trained.info, trained.probe)
    env = {**os.environ, "PYTHONHASHSEED": _hash_seed_with_another_set_order(), "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(
        [sys.executable, "-c", TRAIN_AND_SAVE, str(train_file), str(there), str(torch.get_num_threads())],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    files = {p.name: file_md5(p) for p in here.iterdir()}
    assert files == {p.name: file_md5(p) for p in there.iterdir()}, "files differ between two identical runs"
    assert dir_md5(here) == dir_md5(there)
    assert set(json.loads((here / INFO).read_text())) == INPUT_FACTS


def test_train_stage_keeps_run_facts_out_of_the_adapter(trained, train_file, tmp_path, monkeypatch):
    """training_info.json holds input facts; timings, device, threads and versions go to the stage metrics."""
    spec = importlib.util.spec_from_file_location("train_stage", ROOT / "stages" / "train.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    monkeypatch.setattr(stage, "load_params", tiny_model_params)
    monkeypatch.setattr(stage, "training_files", lambda name, params: [train_file])
    monkeypatch.setattr(stage, "train_model", lambda name, params, files, teacher, step_log: trained)
    monkeypatch.chdir(tmp_path)
    stage.main.main(["--name", "medical"], standalone_mode=False)
    info = json.loads(Path("models/medical/training_info.json").read_text())
    metrics = json.loads(Path("metrics/train/medical.json").read_text())
    assert set(info) == INPUT_FACTS
    assert set(metrics) == {"triplets", "steps", FINAL_LOSS} | RUN_FACTS
    assert [metrics[k] for k in ("triplets", "steps", FINAL_LOSS)] == [
        info[k] for k in ("triplets", "steps", FINAL_LOSS)
    ]
    assert info["triplets"] == 24 and info == trained.info
    assert metrics["triplets_per_s"] > 0 and metrics["device"] == "cpu" and metrics["versions"]["peft"]
    assert metrics["precision"] == pick_precision(tiny_model_params().train.precision, "cpu")  # as resolved here


def test_run_facts_record_the_resolved_precision(train_file):
    """`auto` is recorded as what it resolved to on this machine (bf16 or fp32), never as "auto"."""
    trained = train_model("medical", tiny_model_params(precision="auto", max_steps=1), [train_file])
    assert trained.run["precision"] == pick_precision("auto", "cpu") != "auto"
