import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cachelora import base_model
from cachelora.base_model import CPU_BF16_PROBES, HUB_IDS, model_sha256, pick_device, pick_precision, resolve_base


def test_offline_package_resolves_to_a_local_directory():
    path = Path(resolve_base("all-MiniLM-L6-v2"))
    assert path.is_dir() and (path / "config.json").is_file()


def test_local_directory_is_used_as_is(tmp_path):
    assert resolve_base(str(tmp_path)) == str(tmp_path.resolve())


def test_names_without_offline_weights_become_hub_ids():
    assert resolve_base("all-MiniLM-L12-v2") == HUB_IDS["all-MiniLM-L12-v2"]
    assert resolve_base("org/some-model") == "org/some-model"


def test_model_sha256_covers_every_file_that_defines_the_computation(tmp_path):
    source = Path(resolve_base("all-MiniLM-L6-v2"))
    digest = model_sha256("all-MiniLM-L6-v2")
    assert len(digest) == 64 and digest == model_sha256(str(source))
    for edited in ("config.json", "tokenizer.json", "1_Pooling/config.json", "model.safetensors"):
        copy = tmp_path / edited.replace("/", "_")
        shutil.copytree(source, copy)
        with (copy / edited).open("ab") as fh:
            fh.write(b" ")
        assert model_sha256(str(copy)) != digest, edited
    untouched = tmp_path / "readme_only"
    shutil.copytree(source, untouched)
    (untouched / "README.md").write_text("another model card")
    assert model_sha256(str(untouched)) == digest  # the card does not compute anything


def test_auto_device_without_cuda_is_cpu(monkeypatch):
    import torch

    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == "cpu"
    for present, expected in ((False, "cpu"), (True, "cuda")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda present=present: present)
        assert pick_device("auto") == expected
        assert [pick_device(d) for d in ("cpu", "cuda:1", "mps")] == ["cpu", "cuda:1", "mps"]


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    import torch

    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        for probe, present in zip(CPU_BF16_PROBES, (avx512_bf16, amx), strict=True):
            monkeypatch.setattr(torch.cpu, probe, lambda present=present: present, raising=False)
        assert pick_precision("auto", "cpu") == ("bf16" if avx512_bf16 or amx else "fp32")
    for probe in CPU_BF16_PROBES:
        monkeypatch.delattr(torch.cpu, probe, raising=False)  # an older torch without the probes: fp32
    assert pick_precision("auto", "cpu") == "fp32"
    for native in (False, True):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda native=native: native)
        assert pick_precision("auto", "cuda:0") == ("bf16" if native else "fp32")
    assert [pick_precision(p, "cpu") for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]


ORDER_SCRIPT = """
from cachelora.base_model import encode_unique
import numpy as np

class Recorder:
    def encode(self, texts, **kwargs):
        print("|".join(texts))
        return np.zeros((len(texts), 2))

encode_unique(Recorder(), ["bb", "aa", "cc", "a", "dd", "b", "aa"])
"""


def test_encode_batches_do_not_depend_on_the_hash_seed():
    """Equal-length texts in a different order change padding, hence the last digits of a metric."""
    orders = {
        subprocess.run(
            [sys.executable, "-c", ORDER_SCRIPT],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3", "4")
    }
    assert orders == {"a|b|aa|bb|cc|dd\n"}


def test_the_default_precision_reproduces_on_any_cpu(monkeypatch):
    """fp32 unless the user opts in: even on a CPU with native bf16 the default trains in fp32 (bf16
    kernels round differently on AVX512-BF16 and AMX CPUs, so bf16 adapters differ between machines)."""
    import torch

    from cachelora.params import TrainParams, load_params

    for probe in CPU_BF16_PROBES:
        monkeypatch.setattr(torch.cpu, probe, lambda: True, raising=False)
    assert TrainParams().precision == "fp32" and load_params().train.precision == "fp32"
    assert pick_precision(load_params().train.precision, "cpu") == "fp32"
    assert pick_precision("auto", "cpu") == "bf16"  # one -S away


@pytest.mark.parametrize(
    ("idle_share", "cpus", "usable", "expected"),
    [(1.0, 2, 2, 2), (0.9, 2, 2, 2), (0.6, 2, 2, 1), (0.5, 2, 2, 1), (0.0, 2, 2, 1), (1.0, 8, 2, 2), (0.5, 8, 8, 4)],
)
def test_auto_threads_are_the_usable_cpus_idle_now(monkeypatch, idle_share, cpus, usable, expected):
    """A busy machine gets fewer threads (at least 1); never more than the CPUs this process may use."""
    samples = iter([(100.0, 1000.0), (100.0 + idle_share * 50 * cpus, 1000.0 + 50 * cpus)])
    monkeypatch.setattr(base_model, "cpu_times", lambda: next(samples))
    monkeypatch.setattr(base_model.os, "cpu_count", lambda: cpus)
    monkeypatch.setattr(base_model.os, "sched_getaffinity", lambda pid: set(range(usable)), raising=False)
    assert base_model.idle_cpus(window=0) == expected


def test_cpu_times_read_idle_and_iowait_against_every_state(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 1 5 80 4 0 0 0 3 0\ncpu0 5 0 2 40 2 0 0 0 0 0\n")
    assert base_model.cpu_times(stat) == (84.0, 100.0)


def test_auto_threads_set_torch_to_the_idle_cpus(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setattr(base_model, "idle_cpus", lambda: 1)
    try:
        assert base_model.use_threads("auto") == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_encoding_and_scoring_read_the_same_at_any_thread_count():
    """What ``evaluate.threads: auto`` relies on: embeddings and cross-encoder scores are the same bits at
    1 and 2 threads (training is not: train.threads is a fixed count)."""
    import numpy as np
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

    from cachelora.base_model import load_base

    drinks = ["tea", "coffee", "wine", "milk", "a beer", "grapefruit juice", "food", "nothing"] * 3
    texts = [f"can I take {n} mg of ibuprofen with {w} after work" * (1 + n % 3) for n, w in enumerate(drinks)]
    pairs = list(zip(texts, texts[1:] + texts[:1], strict=True))
    model = load_base("all-MiniLM-L6-v2", "cpu", 64)
    torch.manual_seed(0)
    scorer = CrossEncoder(str(resolve_base("all-MiniLM-L6-v2")), num_labels=1, max_length=64, device="cpu")
    before = torch.get_num_threads()
    try:
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            vectors = model.encode(texts, batch_size=8, convert_to_numpy=True)
            scores = scorer.predict(pairs, batch_size=8, show_progress_bar=False)
            out[threads] = (np.asarray(vectors).tobytes(), np.asarray(scores).tobytes())
    finally:
        torch.set_num_threads(before)
    assert out[1][0] == out[2][0], "embeddings differ between 1 and 2 threads"
    assert out[1][1] == out[2][1], "cross-encoder scores differ between 1 and 2 threads"
