"""What the embedding window (``train.max_seq_length``) costs and gains: CPU ms per query at batch 1
for a short natural query and a long pasted one at windows 48, 128, 256 and 512, how many of the
repo's natural and corpus texts each window cuts, and the baseline's natural-test AP at each window.

The router reads up to 512 tokens; the export's tokenizer.json truncates at the window, so the
router embeds what evaluate measured.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time

from _common import at_repo_root, finish

WINDOWS = (48, 128, 256, 512)


def texts_of(path: str) -> list[str]:
    """Every query text in a natural, traffic or corpus JSONL file."""
    out = []
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    for row in rows:
        for key in ("anchor", "positive", "negative", "query", "original"):
            if isinstance(row.get(key), str):
                out.append(row[key])
        for key in ("paraphrases", "negatives", "reasks"):
            out += [t for t in row.get(key) or [] if isinstance(t, str)]
        out += [n["text"] for n in row.get("near_misses") or [] if isinstance(n, dict) and "text" in n]
    return out


def ms_per_query(model, text: str, repeats: int) -> float:
    model.encode([text])
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.encode([text], normalize_embeddings=True)
        runs.append((time.perf_counter() - started) * 1000)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out")
    opts = parser.parse_args()
    at_repo_root()
    import numpy as np
    from sklearn.metrics import average_precision_score

    from cachelora.base_model import load_base, use_threads
    from cachelora.evaluation import Scores, natural_rows
    from cachelora.params import load_params

    params = load_params()
    use_threads(params.evaluate.threads)
    model = load_base(params.base_model, "cpu")
    texts = sorted(
        {
            t
            for f in glob.glob("data/natural/**/*.jsonl", recursive=True) + glob.glob("data/corpus/*.jsonl")
            for t in texts_of(f)
        }
    )
    lengths = np.array([len(model.tokenizer(t)["input_ids"]) for t in texts])
    natural = natural_rows(
        __import__("pathlib").Path("data/natural/test.jsonl"), params.domains, params.evaluate.min_rows
    )
    rows = [r for rs in natural.values() for r in rs]
    short = rows[0]["anchor"]
    long = " ".join(r["anchor"] for r in rows[:40])  # a pasted log or a long prompt: several hundred tokens
    result = {"texts": len(texts), "threads": params.evaluate.threads, "windows": {}}
    for window in WINDOWS:
        model.max_seq_length = window
        distinct = sorted({r[f] for r in rows for f in ("anchor", "positive", "negative")})
        vectors = dict(zip(distinct, model.encode(distinct, batch_size=128, normalize_embeddings=True), strict=True))
        labels, scores = Scores.of(rows, vectors).labels_and_scores
        result["windows"][window] = {
            "texts_cut": int((lengths > window).sum()),
            "short_query_ms_batch_1": round(ms_per_query(model, short, opts.repeats), 2),
            "long_query_ms_batch_1": round(ms_per_query(model, long, opts.repeats), 2),
            "natural_test_ap_baseline": round(float(average_precision_score(labels, scores)), 6),
        }
    result["long_query_tokens"] = len(model.tokenizer(long)["input_ids"])
    table = [
        (
            f"window {w}: texts cut / short ms / long ms / natural AP",
            f"{v['texts_cut']} / {v['short_query_ms_batch_1']:.2f} / {v['long_query_ms_batch_1']:.2f}"
            f" / {v['natural_test_ap_baseline']:.4f}",
        )
        for w, v in result["windows"].items()
    ]
    table.append(("texts (natural + corpus) / long query tokens", f"{len(texts)} / {result['long_query_tokens']}"))
    finish("seq_length", opts.out, result, table)


if __name__ == "__main__":
    main()
