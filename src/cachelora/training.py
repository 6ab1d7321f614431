"""LoRA training with MultipleNegativesRankingLoss over (anchor, positive, hard negative).

A plain loop over the sentence-transformers model and loss: texts are tokenised once, and no
batch holds two rows that would be each other's false negatives (same original query, or a text
shared between rows). A batch's anchors, positives and negatives are embedded in length order,
``batch_size`` texts per forward pass, so each pass pads to a similar length; the loss sees them
back in column order, exactly as if each column had been embedded on its own.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from tqdm import tqdm

from cachelora import distributed, paths
from cachelora.adapters import add_lora
from cachelora.base_model import load_base, model_sha256, pick_device, pick_precision, use_threads
from cachelora.distillation import Distillation
from cachelora.errors import CacheloraError
from cachelora.params import MULTI, Params
from cachelora.records import file_md5
from cachelora.training_log import TrainingLog
from cachelora.triplets import TEXT_FIELDS, normalise, read_triplets

log = logging.getLogger(__name__)

FINAL_LOSS = "final_loss_mean_last_10pct"  # mean loss over the last tenth of the steps (at least one step)


def training_domains(name: str, params: Params) -> list[str]:
    """The domains a model learns from: its own, or every domain for ``multi``."""
    return params.domains if name == MULTI else [params.check_domain(name)]


def training_files(name: str, params: Params) -> list[Path]:
    """The train splits a model learns from: its domain's, or every domain's for ``multi``."""
    return [paths.split_file(domain, "train") for domain in training_domains(name, params)]


def load_training_rows(files: list[Path]) -> list[dict[str, Any]]:
    """Every triplet in ``files``; an empty training set is an error naming the files."""
    rows = [row for path in files for row in read_triplets(path)]
    if not rows:
        raise CacheloraError(f"{', '.join(map(str, files))}: train split is empty")
    return rows


def conflict_keys(row: dict[str, Any]) -> set[str]:
    """Keys two rows in one batch must not share: their concepts and their texts."""
    keys = {f"text:{normalise(row[f])}" for f in TEXT_FIELDS}
    for field in ("source_id", "negative_source_id"):
        if row.get(field):
            keys.add(f"concept:{row[field]}")
    return keys


def make_batches(rows: list[dict[str, Any]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then fill batches greedily so no two rows in a batch share a conflict key."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    keys = [conflict_keys(row) for row in rows]
    open_batches: list[tuple[list[int], set[str]]] = []
    batches: list[list[int]] = []
    for index in order:
        for members, used in open_batches:
            if not keys[index] & used:
                members.append(index)
                used |= keys[index]
                break
        else:
            open_batches.append(([index], set(keys[index])))
        full = [b for b in open_batches if len(b[0]) == batch_size]
        batches.extend(members for members, _ in full)
        open_batches = [b for b in open_batches if len(b[0]) < batch_size]
    batches.extend(members for members, _ in open_batches if len(members) > 1)
    return batches


class Tokenised:
    """Each distinct text tokenised once; ``batch`` pads a list of texts to its longest."""

    def __init__(self, model: SentenceTransformer, texts: list[str], max_seq_length: int) -> None:
        self.tokenizer = model.tokenizer
        distinct = sorted(set(texts))
        encoded = self.tokenizer(distinct, truncation=True, max_length=max_seq_length)
        self.features = {text: {key: encoded[key][i] for key in encoded} for i, text in enumerate(distinct)}

    def batch(self, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        padded = self.tokenizer.pad([self.features[t] for t in texts], padding=True, return_tensors="pt")
        return {key: value.to(device) for key, value in padded.items()}

    def length(self, text: str) -> int:
        return len(self.features[text]["input_ids"])


def embed_columns(model: SentenceTransformer, tokens: Tokenised, batch: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Embeddings of each column of ``batch``, computed in forward passes of similar-length texts."""
    texts = [row[field] for field in TEXT_FIELDS for row in batch]
    order = sorted(range(len(texts)), key=lambda i: tokens.length(texts[i]))
    passes = [order[start : start + len(batch)] for start in range(0, len(order), len(batch))]
    embedded = torch.cat(
        [model(tokens.batch([texts[i] for i in part], model.device))["sentence_embedding"] for part in passes]
    )
    in_column_order = embedded[torch.argsort(torch.tensor(order, device=embedded.device))]
    return list(in_column_order.split(len(batch)))


def batch_loss(
    model: SentenceTransformer,
    loss_fn: Any,
    tokens: Tokenised,
    batch: list[dict[str, Any]],
    distillation: Distillation | None = None,
) -> torch.Tensor:
    """MNRL over the batch (each anchor against its positive, its hard negative and every other row's
    texts), plus the weighted ``distillation`` term against the teacher's vectors."""
    columns = embed_columns(model, tokens, batch)
    loss = loss_fn.compute_loss_from_embeddings(columns, labels=None)
    if distillation is not None and distillation.weight > 0:
        texts = [[row[field] for row in batch] for field in TEXT_FIELDS]
        loss = loss + distillation.weight * distillation(columns, texts)
    return loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainedAdapter:
    """A trained model, its training_info, facts about the run, loss per step, and texts to check a reload on.

    ``info`` is saved in the adapter directory, so it holds only what the inputs determine (same
    inputs, same bytes, same DVC hash); ``run`` holds what varies between runs (times, speed, device,
    threads, library versions) and goes to the stage's metrics file.
    """

    model: SentenceTransformer
    info: dict[str, Any]
    run: dict[str, Any]
    history: list[dict[str, float]]
    probe: list[str]


def train_model(
    name: str,
    params: Params,
    files: list[Path],
    teacher: dict[str, torch.Tensor] | None = None,
    step_log: TrainingLog | None = None,
) -> TrainedAdapter:
    """Train one LoRA adapter on the triplets in ``files`` (distilling from ``teacher``'s vectors
    when given and ``train.distill.weight`` > 0), each step's loss and lr to ``step_log`` when given."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import get_linear_schedule_with_warmup

    tp = params.train
    rows = load_training_rows(files)
    device = distributed.local_device(pick_device(tp.device))
    precision = pick_precision(tp.precision, device)
    if precision == "fp16" and device == "cpu":
        raise CacheloraError("params.yaml: train.precision: fp16 needs CUDA; use bf16 or fp32 on CPU")
    use_threads(tp.threads)
    seed_everything(tp.seed)
    model = load_base(params.base_model, device, tp.max_seq_length)
    add_lora(model, params.lora)
    # Under ddp each rank embeds its slice of the global batch and MNRL gathers every rank's embeddings
    # (with gradients): the same in-batch negatives as one process. The distillation term stays per rank,
    # on the rank's own slice (its cosine matrix is not gathered).
    loss_fn = MultipleNegativesRankingLoss(
        model, scale=1.0 / tp.temperature, gather_across_devices=distributed.world_size() > 1
    )
    tokens = Tokenised(model, [row[f] for row in rows for f in TEXT_FIELDS], tp.max_seq_length)
    distillation = Distillation(tp.distill, model, teacher) if teacher is not None else None

    rng = random.Random(tp.seed)
    per_epoch = len(distributed.local_slices(make_batches(rows, tp.batch_size, random.Random(tp.seed))))
    total_steps = max(1, math.ceil(per_epoch * tp.epochs))
    if tp.max_steps:
        total_steps = min(total_steps, tp.max_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    distributed.broadcast_from_main(trainable)
    optimizer = torch.optim.AdamW(trainable, lr=tp.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(tp.warmup * total_steps), total_steps)
    autocast = torch.autocast(
        device_type="cuda" if device.startswith("cuda") else "cpu",
        dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
        enabled=precision != "fp32",
    )
    log.info(
        "train %s: %d triplets, %d steps of %d on %s (%s)",
        name,
        len(rows),
        total_steps,
        tp.batch_size,
        device,
        precision,
    )

    model.train()
    history: list[dict[str, float]] = []
    seen = 0
    batches: list[list[int]] = []
    started = time.perf_counter()
    with tqdm(total=total_steps, desc=f"train {name}", unit="step") as bar:
        for step in range(1, total_steps + 1):
            if not batches:
                batches = distributed.local_slices(make_batches(rows, tp.batch_size, rng))
            batch = [rows[i] for i in batches.pop(0)]
            with autocast:
                loss = batch_loss(model, loss_fn, tokens, batch, distillation)
            loss.backward()
            distributed.average_gradients(trainable)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(batch) * distributed.world_size()
            value = distributed.global_mean(loss)
            history.append({"step": step, "loss": round(value, 6), "lr": scheduler.get_last_lr()[0]})
            if step_log is not None:
                step_log.step(value, scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update()
            if step % 50 == 0 or step == total_steps:
                log.info("train %s: step %d/%d loss %.4f", name, step, total_steps, value)
    wall = time.perf_counter() - started

    tail = history[-max(1, len(history) // 10) :]
    info = {
        "name": name,
        "base_model": {"name": params.base_model, "sha256": model_sha256(params.base_model)},
        "params": {"lora": params.lora.model_dump(), "train": tp.model_dump()},
        "teacher": (
            {"name": tp.distill.teacher, "sha256": model_sha256(tp.distill.teacher)} if teacher is not None else None
        ),
        "data": {str(path): file_md5(path) for path in files},
        "triplets": len(rows),
        "steps": total_steps,
        FINAL_LOSS: round(sum(h["loss"] for h in tail) / len(tail), 6),
        "max_seq_length": tp.max_seq_length,
    }
    run = {
        "device": device,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "wall_time_s": round(wall, 3),
        "triplets_per_s": round(seen / wall, 3),
        "versions": _versions(),
    }
    if step_log is not None:
        step_log.settings({"device": device, "precision": precision, "threads": run["threads"], "steps": total_steps})
    return TrainedAdapter(model, info, run, history, probe=[row["anchor"] for row in rows[:16]])


def _versions() -> dict[str, str]:
    import peft
    import sentence_transformers
    import transformers

    return {
        "torch": torch.__version__,
        "peft": peft.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
    }
