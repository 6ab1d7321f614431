import os
import shutil
import subprocess
import sys
from pathlib import Path

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
