"""The trained verifier on disk: where it lives, loading it with plain ``CrossEncoder``, and scoring
(query, cached query) pairs with it. Reading it needs none of the training code (``verifier``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cachelora import paths

VERIFIER = "verifier"


def verifier_dir() -> Path:
    return paths.MODELS_DIR / VERIFIER


def load_verifier(path: str | Path = "") -> Any:
    """The trained verifier from ``path`` (default ``models/verifier``), on CPU, in eval mode."""
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(str(path or verifier_dir()), device="cpu")
    model.eval()
    return model


def scorer(model: Any, batch_size: int = 64) -> Any:
    """(query, cached) pairs -> probabilities that the cached answer serves the query. Each distinct
    pair is read once per scorer (a stage's models ask about many of the same pairs): later calls
    reuse the score of the batch it first came in."""
    known: dict[tuple[str, str], float] = {}

    def score(pairs: list[tuple[str, str]]) -> np.ndarray:
        new = [p for p in dict.fromkeys(pairs) if p not in known]
        if new:
            values = model.predict(new, batch_size=batch_size, show_progress_bar=False)
            known.update(zip(new, np.asarray(values, dtype=np.float64).tolist(), strict=True))
        return np.array([known[p] for p in pairs], dtype=np.float64)

    return score
