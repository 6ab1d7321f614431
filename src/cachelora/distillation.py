"""Distillation from a teacher model: its embeddings of every training text, and the loss that
pulls the student's in-batch similarities towards the teacher's.

The teacher (``train.distill.teacher``, all-mpnet-base-v2 by default) embeds each domain's train
texts once, in the ``teacher`` stage, into ``data/teacher/<domain>.safetensors`` (vectors, and the
texts in order in its metadata). Training adds ``weight`` x the mean squared difference between the
student's and the teacher's cosine matrices of a batch (anchors against anchors, positives and
negatives) to MultipleNegativesRankingLoss: the student keeps the teacher's geometry, absolute
similarities included, which is what one cache threshold relies on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from cachelora import paths
from cachelora.base_model import encode_unique, load_base, weights_sha256
from cachelora.errors import CacheloraError
from cachelora.params import Params
from cachelora.records import atomic_path
from cachelora.triplets import TEXT_FIELDS, read_triplets

log = logging.getLogger(__name__)

SCALE = 100.0  # cosine differences are small: the squared error is scaled to MNRL's order of magnitude


def teacher_file(domain: str) -> Path:
    return Path("data/teacher") / f"{domain}.safetensors"


def embed_domain(params: Params, domain: str, out: Path) -> int:
    """Embed every text of ``domain``'s train split with the teacher; return how many. With
    ``train.distill.weight`` 0 nothing trains on them: the file holds no vectors (and costs nothing)."""
    from safetensors.numpy import save_file

    distill = params.train.distill
    vectors: dict[str, np.ndarray] = {}
    if distill.weight > 0:
        rows = read_triplets(paths.split_file(domain, "train"))
        vectors = encode_unique(
            load_base(distill.teacher, params.train.device, params.train.max_seq_length),
            [row[f] for row in rows for f in TEXT_FIELDS],
            distill.batch_size,
            desc=f"teacher {domain}",
        )
    texts = sorted(vectors)
    metadata = {"teacher": distill.teacher, "sha256": weights_sha256(distill.teacher), "texts": json.dumps(texts)}
    stacked = np.stack([vectors[t] for t in texts]) if texts else np.zeros((0, 0), dtype=np.float32)
    with atomic_path(out) as tmp:
        save_file({"vectors": stacked}, str(tmp), metadata=metadata)
    return len(texts)


def load_teacher(files: list[Path], teacher: str) -> dict[str, torch.Tensor]:
    """text -> teacher vector, from the teacher stage's files (each checked to be ``teacher``'s)."""
    from safetensors import safe_open

    vectors: dict[str, torch.Tensor] = {}
    sha = weights_sha256(teacher)
    for path in files:
        if not path.is_file():
            raise CacheloraError(f"{path}: teacher embeddings not found (run `dvc repro teacher`)")
        with safe_open(str(path), framework="pt") as st:
            meta = st.metadata() or {}
            if meta.get("sha256") != sha:
                raise CacheloraError(f"{path}: embedded by another teacher than '{teacher}' (run `dvc repro teacher`)")
            vectors.update(zip(json.loads(meta["texts"]), st.get_tensor("vectors"), strict=True))
    return vectors


def similarity_matrix(columns: list[torch.Tensor]) -> torch.Tensor:
    """Cosines of each anchor with every anchor, positive and negative of the batch."""
    anchors, *others = (torch.nn.functional.normalize(c, dim=-1) for c in columns)
    return anchors @ torch.cat([anchors, *others]).T


def distillation_loss(
    student: list[torch.Tensor], texts: list[list[str]], teacher: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Scaled mean squared difference between the student's and the teacher's cosine matrices;
    ``texts`` are the batch's columns (anchors, positives, negatives)."""
    missing = next((t for column in texts for t in column if t not in teacher), None)
    if missing is not None:
        raise CacheloraError(f"no teacher vector for training text {missing!r} (run `dvc repro teacher`)")
    target = similarity_matrix([torch.stack([teacher[t] for t in column]) for column in texts])
    return SCALE * torch.mean((similarity_matrix(student) - target.to(student[0].device)) ** 2)
