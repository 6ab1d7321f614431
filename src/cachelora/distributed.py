"""Training on N processes (``train.strategy: ddp``): torchrun launch, process group, rank helpers.

Every rank builds the same global batches (``make_batches``, same seed) and takes its own slice of
each; MultipleNegativesRankingLoss with ``gather_across_devices=True`` gathers every rank's
embeddings (with gradients), so each anchor still sees the whole global batch's positives and
negatives, exactly as one process would. The LoRA gradients are then averaged across ranks (one
all-reduce per step), so every rank takes the same optimizer step as one process on the global
batch. Only rank 0 writes outputs.

Without an initialised process group every helper is the identity: rank 0 of 1.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from cachelora.base_model import pick_device
from cachelora.errors import CacheloraError
from cachelora.params import TrainParams

log = logging.getLogger(__name__)


def active() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes outputs."""
    return rank() == 0


def launched() -> bool:
    """True when a launcher (torchrun) started this process as one rank of several."""
    return "WORLD_SIZE" in os.environ


def processes(tp: TrainParams) -> int:
    """How many ranks ``ddp`` runs: ``train.processes``, else one per visible GPU (at least 1)."""
    return tp.processes or torch.cuda.device_count() or 1


def torchrun(script: str, args: list[str], nproc: int) -> int:
    """Run ``script args`` under torchrun on ``nproc`` local processes; its exit status.

    ``--standalone`` rendezvous on a free local port, so parallel runs (queued experiments) never clash.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    log.info("ddp: %d processes under torchrun", nproc)
    return subprocess.call([*command, script, *args])


def local_device(device: str) -> str:
    """``device`` for this rank: ``cuda`` becomes this rank's GPU (``cuda:LOCAL_RANK``) under ddp."""
    if active() and device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


@contextmanager
def process_group(tp: TrainParams) -> Iterator[None]:
    """With ``train.strategy: ddp``, join the process group torchrun set up (nccl on CUDA, gloo on CPU)
    for the duration; with ``single``, nothing."""
    if tp.strategy != "ddp":
        yield
        return
    if not launched():
        raise CacheloraError("params.yaml: train.strategy: ddp runs under torchrun (WORLD_SIZE is not set)")
    size = int(os.environ["WORLD_SIZE"])
    if tp.batch_size % size:
        raise CacheloraError(f"params.yaml: train.batch_size: {tp.batch_size} is not a multiple of {size} processes")
    cuda = pick_device(tp.device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield
        dist.barrier()  # rank 0 has written its outputs before any rank leaves
    finally:
        dist.destroy_process_group()


def local_slices(batches: list[list[int]]) -> list[list[int]]:
    """This rank's equal share of each global batch (ranks in order: rank r takes the r-th slice).

    Gathering needs equal slices: a global batch whose size is not a multiple of the world size (only
    ``make_batches``' last, partly filled batches) loses its last ``size % world`` rows, and one
    smaller than the world size is skipped. With one process every batch is returned whole.
    """
    size = world_size()
    if size == 1:
        return batches
    start = rank()
    slices = []
    for batch in batches:
        share = len(batch) // size
        if share:
            slices.append(batch[start * share : (start + 1) * share])
    return slices


def broadcast_from_main(parameters: list[torch.Tensor]) -> None:
    """Every rank starts from rank 0's values (the same seed gives the same ones; this makes it certain)."""
    if world_size() > 1:
        for tensor in parameters:
            dist.broadcast(tensor.data, src=0)


def average_gradients(parameters: list[torch.Tensor]) -> None:
    """Replace each gradient by its mean across ranks, in one all-reduce."""
    size = world_size()
    if size == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def global_mean(value: torch.Tensor) -> float:
    """The mean of a scalar across ranks: the global batch's loss from each rank's share of it."""
    if world_size() == 1:
        return value.item()
    total = value.detach().clone().float()
    dist.all_reduce(total)
    return total.item() / world_size()
