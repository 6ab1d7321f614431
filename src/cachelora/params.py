"""``params.yaml``: loaded once, checked against a schema, errors name the key at fault."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cachelora.errors import CacheloraError, from_validation
from cachelora.records import read_yaml

PARAMS_FILE = Path("params.yaml")
BASELINE = "baseline"  # the base model with no adapter
MULTI = "multi"  # one adapter trained on every domain's train split
MERGED = "merged"  # the domain adapters merged into one
# CPU threads for torch where they change timings only (encoding, scoring): a count (0 = torch's
# default) or "auto" (the CPUs idle when the stage starts: 1 on a busy machine, which then does not thrash).
Threads = Literal["auto"] | Annotated[int, Field(ge=0)]


class _Strict(BaseModel):
    """No unknown keys, no coercion (``true`` is not a rank, ``"3"`` not a count), no NaN or inf."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class OpenAIParams(_Strict):
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    prompt_version: str = "v1"
    concurrency: int = Field(64, ge=1)
    timeout: float = Field(60.0, gt=0)
    retries: int = Field(4, ge=0)
    temperature: float = Field(0.7, ge=0)
    queries_per_domain: int = Field(200, ge=1)
    triplets_per_query: int = Field(6, ge=1)
    cache_dir: str = "data/llm_cache"


class GenerateParams(_Strict):
    backend: Literal["offline", "openai"] = "offline"
    seed: int = Field(42, ge=0)
    triplets_per_domain: int = Field(1200, ge=1)
    sibling_negative_fraction: float = Field(0.2, ge=0, le=1)
    # share of rows whose negative becomes a near-miss: an edit of the anchor that changes its answer
    near_miss_fraction: float = Field(0.0, ge=0, le=1)
    corpus: str | None = "data/corpus"  # offline backend: natural originals, <corpus>/<domain>.jsonl (null = none)
    corpus_triplets_per_query: int = Field(6, ge=1)
    queries_file: str | None = None
    openai: OpenAIParams = OpenAIParams()


class ValidateParams(_Strict):
    min_rows: int = Field(100, ge=0)
    max_bad_fraction: float = Field(0.1, ge=0, le=1)
    min_chars: int = Field(8, ge=1)
    max_chars: int = Field(300, ge=1)
    max_neg_sim: float = Field(0.95, ge=-1, le=1)
    batch_size: int = Field(128, ge=1)


class SplitParams(_Strict):
    seed: int = Field(42, ge=0)
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.15, ge=0, le=1)
    test: float = Field(0.15, ge=0, le=1)
    group_by: Literal["topic", "source_id"] = "topic"

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitParams:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1 (got {total:g})")
        return self


class LoraParams(_Strict):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    # auto: the architecture's attention projections; all-linear: every linear layer of the encoder
    # (attention projections, attention output and feed-forward layers); or a list of module names
    target_modules: Literal["auto", "all-linear"] | list[str] = "all-linear"

    @model_validator(mode="after")
    def _some_target(self) -> LoraParams:
        if not self.target_modules:
            raise ValueError("target_modules: name at least one module, or auto, or all-linear")
        return self


class DistillParams(_Strict):
    teacher: str = "all-mpnet-base-v2"  # embeds every train text in the teacher stage
    weight: float = Field(0.0, ge=0)  # x the distillation loss beside MNRL; 0 = MNRL alone
    # matrix_mse: the in-batch cosine matrix; margin_mse: sentence-transformers' MarginMSELoss on each
    # row's cos(a,p) - cos(a,n); kl: its DistillKLDivLoss on each row's (positive, negative) scores
    loss: Literal["matrix_mse", "margin_mse", "kl"] = "matrix_mse"
    temperature: float = Field(0.05, gt=0)  # kl: both sides' scores are divided by it
    batch_size: int = Field(64, ge=1)  # teacher encoding


class TrainParams(_Strict):
    lr: float = Field(2e-3, gt=0)
    batch_size: int = Field(32, ge=2)
    epochs: float = Field(2, gt=0)
    max_steps: int = Field(0, ge=0)  # > 0: stop after this many steps (the scale benchmark's fixed budget)
    warmup: float = Field(0.1, ge=0, lt=1)
    max_seq_length: int = Field(256, ge=8, le=512)  # one window: training, evaluation, export
    temperature: float = Field(0.05, gt=0)
    seed: int = Field(42, ge=0)
    device: str = "auto"
    # fp32 reproduces bit for bit on any x86 CPU; auto (bf16 where the device computes it natively) is faster
    # but bf16 kernels round differently across CPUs (AVX512-BF16 vs AMX), so its adapters differ between them.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    # CPU threads for torch (0 = torch's default). A fixed count: another count sums gradients in another
    # order, so the adapters differ in their last bits (evaluation reads the same at any count: Threads).
    threads: int = Field(2, ge=0)
    distill: DistillParams = DistillParams()
    # single: one process | ddp: `processes` ranks under torchrun, one global batch (see distributed.py)
    strategy: Literal["single", "ddp"] = "single"
    processes: int = Field(0, ge=0)  # ddp ranks; 0 = one per visible GPU

    @model_validator(mode="after")
    def _batch_splits_across_processes(self) -> TrainParams:
        if self.strategy == "ddp" and self.processes and self.batch_size % self.processes:
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of processes {self.processes}")
        return self


class MergeParams(_Strict):
    method: Literal[
        "cat",
        "linear",
        "svd",
        "ties",
        "ties_svd",
        "dare_linear",
        "dare_ties",
        "dare_linear_svd",
        "dare_ties_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
    ] = "cat"
    weights: list[float] | None = None
    density: float = Field(0.5, gt=0, le=1)
    seed: int = Field(42, ge=0)


class EvaluateParams(_Strict):
    target_precision: float = Field(0.95, gt=0, le=1)
    min_rows: int = Field(5, ge=2)
    bootstrap: int = Field(1000, ge=100)
    seed: int = Field(42, ge=0)
    batch_size: int = Field(128, ge=1)
    # Models scored beside the pipeline's (no adapter, own val thresholds): is a bigger model the answer?
    reference_models: list[str] = ["all-mpnet-base-v2"]
    cost_repeats: int = Field(3, ge=1)  # timed passes per batch size (the median is reported)
    # A generated val/test split larger than this is scored on a seeded sample of it (0 = every row).
    max_triplets_per_domain: int = Field(1000, ge=0)
    # The set that picks the deploy model (ties: val's hit rate, then the earlier model): val or
    # natural_dev by the cross-domain cache hit rate at that set's own operating point (natural_dev
    # asks how people type); traffic_dev by the re-asks the cache answers with the verifier, at the
    # settings chosen there (it asks what the shipped two-stage cache does with near-misses).
    deploy_on: Literal["val", "natural_dev", "traffic_dev"] = "natural_dev"
    threads: Threads = "auto"  # CPU threads for torch in evaluate and traffic: the same figures at any count


class VerifierParams(_Strict):
    """The CrossEncoder that checks a candidate hit (its own stage, ``train_verifier``)."""

    layers: int = Field(0, ge=0)  # the base model's first N layers (0 = all): fewer is cheaper per lookup
    max_length: int = Field(64, ge=8, le=512)  # tokens of the (query, cached query) pair
    batch_size: int = Field(32, ge=2)
    lr: float = Field(5e-5, gt=0)
    epochs: int = Field(1, ge=1)
    warmup: float = Field(0.1, ge=0, lt=1)
    max_pairs: int = Field(8000, ge=0)  # generated pairs (0 = every pair of the train splits)
    natural_pairs: bool = True  # also train on the natural traffic train set's pairs
    near_miss_fraction: float = Field(0.5, ge=0, le=1)  # train rows given a near-miss edit, as generate draws
    seed: int = Field(42, ge=0)


class TrafficParams(_Strict):
    """Traffic replay on the natural traffic sets (``data/natural/traffic/``)."""

    seed: int = Field(42, ge=0)  # the order re-asks and near-misses arrive in
    near_miss_share: float = Field(0.1, ge=0, le=1)  # the share the stated hit precision assumes
    min_groups: int = Field(60, ge=1)  # answer groups each traffic file must hold
    # with the verifier: when the next-nearest cached entry is within this cosine of the nearest (and at
    # the embedding threshold), the lookup misses without asking the verifier (null: no rival check)
    rival_window: float | None = Field(0.02, ge=0, le=2)


class Params(_Strict):
    domains: list[str] = Field(min_length=1)
    train_models: list[str]
    train_data: dict[str, str] | None = None
    base_model: str = "all-MiniLM-L6-v2"
    generate: GenerateParams = GenerateParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    split: SplitParams = SplitParams()
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    merge: MergeParams = MergeParams()
    evaluate: EvaluateParams = EvaluateParams()
    verifier: VerifierParams = VerifierParams()
    traffic: TrafficParams = TrafficParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _train_models_cover_domains(self) -> Params:
        if len(set(self.domains)) != len(self.domains):
            raise ValueError("domains: listed twice")
        expected = [*self.domains, MULTI]
        if self.train_models != expected:
            raise ValueError(f"train_models must be the domains followed by '{MULTI}': {expected}")
        wanted = {**{d: f"data/splits/{d}" for d in self.domains}, MULTI: "data/splits"}
        if self.train_data is not None and self.train_data != wanted:
            raise ValueError(f"train_data must map each model to the splits it trains on: {wanted}")
        if self.merge.weights is not None and len(self.merge.weights) != len(self.domains):
            raise ValueError(f"merge.weights: need one weight per domain ({len(self.domains)})")
        return self

    def check_model(self, name: str) -> str:
        """Return ``name`` if it is one of ``train_models``, else fail naming the key."""
        if name not in self.train_models:
            raise CacheloraError(f"{PARAMS_FILE}: train_models: unknown model '{name}' (have {self.train_models})")
        return name

    def check_domain(self, domain: str) -> str:
        """Return ``domain`` if params list it, else fail naming the key."""
        if domain not in self.domains:
            raise CacheloraError(f"{PARAMS_FILE}: domains: unknown domain '{domain}' (have {self.domains})")
        return domain


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Load and check ``params.yaml``; the first problem is reported as ``file: key: message``."""
    try:
        return Params.model_validate(read_yaml(path))
    except ValidationError as exc:
        raise from_validation(path, exc) from None
