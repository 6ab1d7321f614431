"""Training throughput: cachelora.training.train_model against a stock SentenceTransformerTrainer.

Same LoRA (cachelora.adapters.add_lora), data, batch size, max_seq_length, lr, warm-up, seed and
torch threads; the two run alternated (A B A B ...) in one process, one epoch each.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import at_repo_root, finish, matmul_peak, median, theoretical_peak, triplet_rows

TIMING = (
    "triplets_per_s = triplets / end-to-end wall time of one training run (both include one base-model load, "
    "the LoRA wrap, tokenisation and the loop; the first load is warmed up untimed). loop_s: ours = "
    "training_info wall_time_s (loop only; texts are tokenised before it), stock = trainer.train() (tokenises "
    "in the collator). tokens_per_s and FLOP shares use loop_s."
)
FLOPS = "4 x N x tokens: 2N forward + 2N backward (activation gradients) per token; frozen base, LoRA weight "
FLOPS += "gradients and attention score matmuls ignored; N = base encoder parameters outside embeddings and pooler"


def run_ours(params: Any, train_file: Path) -> dict[str, float]:
    from cachelora.training import train_model

    start = time.perf_counter()
    trained = train_model("bench", params, [train_file])
    return {"wall_s": time.perf_counter() - start, "loop_s": trained.run["wall_time_s"]}


def run_stock(params: Any, rows: list[dict], device: str, out_dir: str, counts: dict[str, int]) -> dict[str, float]:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers

    from cachelora.adapters import add_lora
    from cachelora.base_model import load_base

    tp = params.train
    start = time.perf_counter()
    torch.manual_seed(tp.seed)
    model = load_base(params.base_model, device, tp.max_seq_length)
    add_lora(model, params.lora)
    loss = MultipleNegativesRankingLoss(model, scale=1.0 / tp.temperature)

    def count(_module: Any, args: tuple, kwargs: dict) -> None:
        features = args[0] if args else kwargs["sentence_features"]
        counts["triplets"] += int(features[0]["attention_mask"].shape[0])
        counts["tokens"] += sum(int(f["attention_mask"].sum()) for f in features)

    loss.register_forward_pre_hook(count, with_kwargs=True)
    data = Dataset.from_dict({f: [r[f] for r in rows] for f in ("anchor", "positive", "negative")})
    args = SentenceTransformerTrainingArguments(
        output_dir=out_dir, num_train_epochs=tp.epochs, per_device_train_batch_size=tp.batch_size,
        learning_rate=tp.lr, warmup_steps=tp.warmup, seed=tp.seed, batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no", report_to="none", use_cpu=device == "cpu", bf16=tp.precision == "bf16",
        disable_tqdm=True, logging_strategy="no",
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    loop_start = time.perf_counter()
    trainer.train()
    end = time.perf_counter()
    return {"wall_s": end - start, "loop_s": end - loop_start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    for flag, kind in (("--domain", str), ("--triplets", int), ("--rounds", int), ("--batch-size", int),
                       ("--threads", int), ("--out", str)):  # fmt: skip
        parser.add_argument(flag, type=kind)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--quick", action="store_true", help="16 triplets, 2 rounds, batch 8 (a smoke test)")
    opts = parser.parse_args()
    at_repo_root()
    import torch

    from cachelora.base_model import load_base, model_sha256, pick_device, pick_precision
    from cachelora.params import load_params
    from cachelora.records import write_jsonl
    from cachelora.training import make_batches
    from cachelora.triplets import TEXT_FIELDS

    params = load_params()
    quick = {"triplets": 16, "rounds": 2, "batch_size": 8} if opts.quick else {"triplets": 256, "rounds": 3}
    domain = opts.domain or params.domains[0]
    count, rounds = opts.triplets or quick["triplets"], opts.rounds or quick["rounds"]
    threads = opts.threads or params.train.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    batch_size = opts.batch_size or quick.get("batch_size", params.train.batch_size)
    device = pick_device(opts.device or params.train.device)
    precision = pick_precision(opts.precision or params.train.precision, device)  # both sides train in it
    update = {"batch_size": batch_size, "threads": threads, "epochs": 1, "device": device, "precision": precision}
    params = params.model_copy(update={"train": (train := params.train.model_copy(update=update))})
    rows, source = triplet_rows(params, domain, count)

    base = load_base(params.base_model, device, train.max_seq_length)  # untimed warm-up: imports, page cache
    model_sha256(params.base_model)  # cached: train_model's call is then free, as in round 2+
    n_params = sum(p.numel() for n, p in base[0].auto_model.named_parameters() if n.split(".")[0] not in
                   ("embeddings", "pooler"))  # fmt: skip
    batches = make_batches(rows, train.batch_size, random.Random(train.seed))
    seen = [rows[i] for b in batches for i in b]
    lengths = base.tokenizer([r[f] for r in seen for f in TEXT_FIELDS], truncation=True,
                             max_length=train.max_seq_length)["input_ids"]  # fmt: skip
    ours_work = {"triplets": len(seen), "tokens": sum(map(len, lengths))}
    del base

    times: dict[str, list[dict[str, float]]] = {"ours": [], "stock": []}
    counts = {"triplets": 0, "tokens": 0}
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.jsonl"
        write_jsonl(train_file, rows)
        warm = Path(tmp) / "warm.jsonl"  # untimed: first-call imports and lazy set-up of both paths
        write_jsonl(warm, rows[: 2 * train.batch_size])
        run_ours(params, warm)
        run_stock(params, rows[: 2 * train.batch_size], device, str(Path(tmp) / "stock"), dict(counts))
        for _ in range(rounds):
            times["ours"].append(run_ours(params, train_file))
            counts.update(triplets=0, tokens=0)
            times["stock"].append(run_stock(params, rows, device, str(Path(tmp) / "stock"), counts))
    work = {"ours": ours_work, "stock": dict(counts)}

    peak = theoretical_peak(threads) if device == "cpu" else {"fp32_peak_flops": None}
    size, reps = (512, 2) if opts.quick else (2048, 5)
    achieved = matmul_peak(device, size, reps)
    result: dict[str, Any] = {}
    for name, runs in times.items():
        wall, loop = median([r["wall_s"] for r in runs]), median([r["loop_s"] for r in runs])
        flops = 4 * n_params * work[name]["tokens"] / loop
        result[name] = {
            **work[name], "rounds": runs, "wall_s_median": wall, "loop_s_median": loop,
            "triplets_per_s": work[name]["triplets"] / wall,
            "triplets_per_s_all": [work[name]["triplets"] / r["wall_s"] for r in runs],
            "loop_triplets_per_s": work[name]["triplets"] / loop, "tokens_per_s": work[name]["tokens"] / loop,
            "flops_per_s": flops, "share_of_matmul_peak": flops / achieved["fp32_flops"],
            "share_of_theoretical_peak": flops / peak["fp32_peak_flops"] if peak["fp32_peak_flops"] else None,
        }  # fmt: skip
    ratio = result["ours"]["triplets_per_s"] / result["stock"]["triplets_per_s"]
    finish("train", opts.out, {
        **result, "ratio_ours_over_stock": ratio, "timing": TIMING, "flop_formula": FLOPS, "n_params": n_params,
        "data": {"domain": domain, "source": source, "triplets": len(rows)}, "device": device, "threads": threads,
        "train": train.model_dump(), "lora": params.lora.model_dump(), "theoretical_peak": peak,
        "matmul_peak": achieved, "quick": opts.quick, "torch": torch.__version__,
    }, [
        ("ours triplets/s (end-to-end, median)", f"{result['ours']['triplets_per_s']:.1f}"),
        ("stock triplets/s (end-to-end, median)", f"{result['stock']['triplets_per_s']:.1f}"),
        ("ratio ours/stock", f"{ratio:.2f}"),
        ("ours tokens/s (loop)", f"{result['ours']['tokens_per_s']:.0f}"),
        ("ours share of matmul peak", f"{result['ours']['share_of_matmul_peak']:.1%}"),
        ("ours share of theoretical fp32 peak", f"{result['ours']['share_of_theoretical_peak'] or 0:.1%}"),
        ("setup", f"{device}, {threads} threads, {len(rows)} triplets, batch {train.batch_size}, {rounds} rounds"),
    ])  # fmt: skip


if __name__ == "__main__":
    main()
