"""Distillation from a teacher model: its embeddings of every training text, and the loss that
pulls the student's similarities towards the teacher's.

The teacher (``train.distill.teacher``, all-mpnet-base-v2 by default) embeds each domain's train
texts once, in the ``teacher`` stage, into ``data/teacher/<domain>.safetensors`` (vectors, and the
teacher, its checksum and the texts in order in its metadata: one key of canonical JSON, since
safetensors writes several keys in a different order on each write). Training adds ``weight`` x one
of these to MultipleNegativesRankingLoss (``train.distill.loss``):

- ``matrix_mse``: the mean squared difference between the student's and the teacher's cosine
  matrices of a batch (anchors against anchors, positives and negatives): the teacher's geometry,
  absolute similarities included;
- ``margin_mse``: sentence-transformers' ``MarginMSELoss`` on each row's teacher margin
  cos(a, p) - cos(a, n): how far the teacher puts the hard negative below the positive;
- ``kl``: its ``DistillKLDivLoss`` on each row's teacher scores of (positive, negative) at
  ``temperature``: the teacher's preference between them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from cachelora import paths
from cachelora.base_model import encode_unique, load_base, model_sha256
from cachelora.errors import CacheloraError
from cachelora.params import DistillParams, Params
from cachelora.records import atomic_path
from cachelora.triplets import TEXT_FIELDS, read_triplets

log = logging.getLogger(__name__)

METADATA = "cachelora.teacher"  # the metadata key: {"teacher", "sha256", "texts"} as canonical JSON
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
    about = {"teacher": distill.teacher, "sha256": model_sha256(distill.teacher), "texts": texts}
    metadata = {METADATA: json.dumps(about, sort_keys=True, ensure_ascii=False)}
    stacked = np.stack([vectors[t] for t in texts]) if texts else np.zeros((0, 0), dtype=np.float32)
    with atomic_path(out) as tmp:
        save_file({"vectors": stacked}, str(tmp), metadata=metadata)
    return len(texts)


def load_teacher(files: list[Path], teacher: str) -> dict[str, torch.Tensor]:
    """text -> teacher vector, from the teacher stage's files (each checked to be ``teacher``'s)."""
    from safetensors import safe_open

    vectors: dict[str, torch.Tensor] = {}
    sha = model_sha256(teacher)
    for path in files:
        if not path.is_file():
            raise CacheloraError(f"{path}: teacher embeddings not found (run `dvc repro teacher`)")
        with safe_open(str(path), framework="pt") as st:
            about = json.loads((st.metadata() or {}).get(METADATA, "{}"))
            if about.get("sha256") != sha:
                raise CacheloraError(f"{path}: embedded by another teacher than '{teacher}' (run `dvc repro teacher`)")
            vectors.update(zip(about["texts"], st.get_tensor("vectors"), strict=True))
    return vectors


def similarity_matrix(columns: list[torch.Tensor]) -> torch.Tensor:
    """Cosines of each anchor with every anchor, positive and negative of the batch."""
    anchors, *others = (torch.nn.functional.normalize(c, dim=-1) for c in columns)
    return anchors @ torch.cat([anchors, *others]).T


def teacher_columns(texts: list[list[str]], teacher: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The teacher's vectors of a batch's columns; a text it never embedded is an error."""
    missing = next((t for column in texts for t in column if t not in teacher), None)
    if missing is not None:
        raise CacheloraError(f"no teacher vector for training text {missing!r} (run `dvc repro teacher`)")
    return [torch.stack([teacher[t] for t in column]) for column in texts]


def row_scores(columns: list[torch.Tensor]) -> torch.Tensor:
    """Per row: cos(anchor, positive), cos(anchor, negative), as a (rows, 2) matrix."""
    anchors, *others = (torch.nn.functional.normalize(c, dim=-1) for c in columns)
    return torch.stack([(anchors * other).sum(-1) for other in others], dim=1)


class Distillation:
    """The teacher term of the training loss: ``distill.loss`` between the student's embeddings of a
    batch's columns and the teacher's vectors of the same texts."""

    def __init__(self, distill: DistillParams, model: torch.nn.Module, teacher: dict[str, torch.Tensor]) -> None:
        from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss, MarginMSELoss
        from sentence_transformers.util import pairwise_cos_sim

        self.teacher, self.weight = teacher, distill.weight
        self.library: torch.nn.Module | None = None
        if distill.loss == "margin_mse":
            self.library = MarginMSELoss(model, similarity_fct=pairwise_cos_sim)
        elif distill.loss == "kl":
            self.library = DistillKLDivLoss(model, similarity_fct=pairwise_cos_sim, temperature=distill.temperature)

    def __call__(self, student: list[torch.Tensor], texts: list[list[str]]) -> torch.Tensor:
        """The unweighted loss of one batch (``weight`` is the caller's)."""
        target = [column.to(student[0].device) for column in teacher_columns(texts, self.teacher)]
        if self.library is None:
            return SCALE * torch.mean((similarity_matrix(student) - similarity_matrix(target)) ** 2)
        return self.library.compute_loss_from_embeddings(student, row_scores(target))
