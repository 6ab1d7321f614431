"""What every command shares: logging set-up, user errors as one line with exit status 1, and
Ctrl-C as one line saying how to restore what DVC removed."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from cachelora.errors import CacheloraError


def configure_logging() -> None:
    """Log INFO to stderr (CACHELORA_LOG_LEVEL overrides); quiet the chattiest libraries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.basicConfig(
        level=os.environ.get("CACHELORA_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices between our pinned libraries
    # peft looks for the base model's config on the hub when it saves or loads an adapter of a base named
    # offline (never used: the embeddings are not resized); said once per adapter, 13 times an experiment
    warnings.filterwarnings("ignore", message=r"(Could not find a config file in|Unable to fetch remote file)")
    for noisy in ("httpx", "great_expectations", "sentence_transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# DVC removes a stage's outputs before it runs the stage: after Ctrl-C they are gone from the workspace
# (never from DVC's cache), and `dvc checkout` puts back every output as dvc.lock records it.
INTERRUPTED = (
    "interrupted: nothing half-written was kept; if DVC ran this stage, `dvc checkout` restores its outputs"
    " as dvc.lock records them"
)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` with logging configured; a CacheloraError prints ``error: ...`` and exits 1, as does
    an OSError (a full disk, a read-only folder), naming its file. Writes are atomic, so such a
    failure leaves the previous file in place. Ctrl-C prints how to restore the outputs and exits 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        configure_logging()
        try:
            return fn(*args, **kwargs)
        except CacheloraError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            print(INTERRUPTED, file=sys.stderr)
            sys.exit(130)

    return wrapper
