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
    """(query, cached) pairs -> probabilities that the cached answer serves the query."""

    def score(pairs: list[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0)
        return np.asarray(model.predict(pairs, batch_size=batch_size, show_progress_bar=False), dtype=np.float64)

    return score
