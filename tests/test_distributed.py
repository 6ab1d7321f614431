"""train.strategy: ddp on 2 CPU processes (gloo) against one process on the same global batches."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cachelora import distributed
from cachelora.adapters import load_adapter_model
from cachelora.base_model import load_base
from cachelora.errors import CacheloraError
from cachelora.params import Params, TrainParams
from cachelora.records import write_jsonl
from cachelora.training import make_batches, train_model
from tests.conftest import tiny_model_params, tiny_rows

ROOT = Path(__file__).resolve().parents[1]
BASE = "all-MiniLM-L6-v2"
WORLD = 2
ROWS, BATCH, SEED = 32, 4, 3  # 8 global batches of exactly 4 rows: 2 per rank, none trimmed
# One process and two see the same batches and the same embeddings up to float32 rounding: a rank
# pads its 2-row slice to its own longest text (one process pads 4 rows), the gathered similarity
# matrix and the all-reduced gradients are summed in another order, and torch uses 1 thread per rank
# against 2. Those differ by ~1e-7 per value; after 8 Adam steps the losses differ by at most 6e-6 and
# the embeddings by 2e-6 (measured), so 1e-4 leaves a 15x margin. A real difference (a rank without
# the other's in-batch negatives, unaveraged gradients) moves the loss by > 1e-2.
LOSS_ATOL = 1e-4
EMBEDDING_ATOL = 1e-4


def ddp_params(strategy: str = "ddp") -> Params:
    return tiny_model_params(
        batch_size=BATCH,
        seed=SEED,
        lr=5e-3,
        warmup=0.0,
        strategy=strategy,
        processes=WORLD if strategy == "ddp" else 0,
        distill={"weight": 0.0},  # the distillation term stays per rank (not gathered): MNRL alone here
        precision="fp32",  # the curves agree to 1e-4 in fp32; under bf16 autocast they differ by up to 1/64
    )


def without_dropout(load_base):
    """``load_base`` with the base model's own dropout (BERT's 0.1) off: dropout draws a mask per row, so
    2 ranks of 2 rows and one process of 4 rows would draw different masks from the same seed."""

    def load(*args, **kwargs):
        model = load_base(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    return load


def make_project(root: Path, params: Params) -> Path:
    """A directory the train stage can run in: params.yaml and the medical train split."""
    (root / "data/splits/medical").mkdir(parents=True)
    write_jsonl(root / "data/splits/medical/train.jsonl", tiny_rows(ROWS))
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return root


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, dirs: list[str]) -> None:
    """One rank, as torchrun would start it, running the train stage in its own directory."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    os.environ["TQDM_DISABLE"] = "1"
    os.chdir(dirs[rank])
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    sys.path.insert(0, str(ROOT / "stages"))
    import train  # stages/train.py

    import cachelora.training

    cachelora.training.load_base = without_dropout(cachelora.training.load_base)
    train.main(["--name", "medical"], standalone_mode=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process on the global batches: the reference."""
    import cachelora.training

    root = make_project(tmp_path_factory.mktemp("single"), ddp_params("single"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cachelora.training, "load_base", without_dropout(cachelora.training.load_base))
        return train_model("medical", ddp_params("single"), [root / "data/splits/medical/train.jsonl"])


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Two gloo ranks, each in its own copy of the project directory, so each one's writes show."""
    dirs = [make_project(tmp_path_factory.mktemp(f"rank{r}"), ddp_params()) for r in range(WORLD)]
    before = [files_under(d) for d in dirs]
    torch.multiprocessing.spawn(_rank, args=(free_port(), [str(d) for d in dirs]), nprocs=WORLD, join=True)
    return dirs, before


def logged(root: Path, metric: str) -> list[float]:
    """A training run's values of ``metric`` per step, from its DVCLive log."""
    lines = (root / f"metrics/train/medical/plots/metrics/{metric}.tsv").read_text().splitlines()
    column = lines[0].split("\t").index(metric)
    return [float(line.split("\t")[column]) for line in lines[1:]]


def test_global_batches_are_whole_and_split_evenly():
    """The comparison below is exact only if no rank trims a batch: every global batch holds BATCH rows."""
    batches = make_batches(tiny_rows(ROWS), BATCH, random.Random(SEED))
    assert [len(b) for b in batches] == [BATCH] * (ROWS // BATCH)


def test_two_ranks_follow_the_single_process_loss_curve(single, ranks):
    dirs, _ = ranks
    ddp = logged(dirs[0], "loss")
    assert len(ddp) == len(single.history) == ROWS // BATCH
    ours, reference = ddp, [h["loss"] for h in single.history]
    assert ours == pytest.approx(reference, abs=LOSS_ATOL, rel=0), list(zip(ours, reference, strict=True))
    print("step, loss 2 ranks, loss 1 process:", *zip(range(1, 9), ours, reference, strict=True), sep="\n")
    assert logged(dirs[0], "lr") == pytest.approx([h["lr"] for h in single.history])

    texts = [row["anchor"] for row in tiny_rows(ROWS)[:8]]
    saved = load_adapter_model(dirs[0] / "models/medical").encode(texts, convert_to_tensor=True)
    single.model.eval()
    with torch.no_grad():
        expected = single.model.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(saved, expected, atol=EMBEDDING_ATOL, rtol=0)
    base = load_base(BASE, "cpu").encode(texts, convert_to_tensor=True)
    assert float((saved - base).abs().max()) > 100 * EMBEDDING_ATOL  # training moved: the match is not trivial
    print("max |embedding difference| 2 ranks vs 1 process:", float((saved - expected).abs().max()))

    metrics = json.loads((dirs[0] / "metrics/train/medical.json").read_text())
    assert metrics["steps"] == ROWS // BATCH and metrics["triplets"] == ROWS


def test_only_rank_zero_writes(ranks):
    dirs, before = ranks
    written = files_under(dirs[0]) - before[0]
    assert {"metrics/train/medical.json", "metrics/train/medical/plots/metrics/loss.tsv"} <= written
    assert "models/medical/adapter_model.safetensors" in written
    assert files_under(dirs[1]) == before[1]


def test_slices_are_equal_and_in_rank_order(monkeypatch):
    batches = [list(range(8)), list(range(10, 17)), [20]]  # 8 rows, 7 rows (one trimmed), 1 row (skipped)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    slices = []
    for r in range(2):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        slices.append(distributed.local_slices(batches))
    assert slices == [[[0, 1, 2, 3], [10, 11, 12]], [[4, 5, 6, 7], [13, 14, 15]]]


def test_batch_size_must_split_across_processes():
    with pytest.raises(ValueError, match="batch_size 6 must be a multiple of processes 4"):
        TrainParams(strategy="ddp", processes=4, batch_size=6)
    TrainParams(strategy="single", processes=4, batch_size=6)


def test_ddp_outside_torchrun_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = distributed.process_group(TrainParams(strategy="ddp", processes=2))
    with pytest.raises(CacheloraError, match=r"train\.strategy: ddp runs under torchrun"), group:
        pass


@pytest.mark.slow  # three more Python processes start (torchrun and its 2 ranks): ~25 s
def test_the_stage_relaunches_itself_under_torchrun(tmp_path):
    """`python stages/train.py` with strategy ddp starts torchrun with train.processes ranks (the base
    model's dropout on, as in the pipeline: the loss curve is the run's own, checked above without it)."""
    root = make_project(tmp_path, ddp_params())
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
        "CACHELORA_LOG_LEVEL": "INFO",
    }
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "stages/train.py"), "--name", "medical"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"ddp: {WORLD} processes under torchrun" in proc.stderr
    assert proc.stderr.count("train medical: 32 triplets, 8 steps of 4 on cpu") == WORLD
    assert len(logged(root, "loss")) == ROWS // BATCH
    assert (root / "models/medical/adapter_model.safetensors").is_file()
