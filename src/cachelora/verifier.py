"""The verifier: a sentence-transformers ``CrossEncoder`` that reads (new query, cached query) together
and says whether the cached answer serves the new query.

It is built from the base model's own weights (a fresh one-logit head on the first
``verifier.layers`` layers) and trained with BinaryCrossEntropyLoss on two sources of pairs:

- the natural traffic train set (``data/natural/traffic/train/``, written apart from dev and test),
  when ``verifier.natural_pairs``: re-asks of one question are 1 (original with re-ask, re-ask with
  re-ask); each near-miss against its original and every re-ask is 0; each re-ask and near-miss
  against the most word-sharing text of another group in its domain is 0 (what a cache retrieves
  for a question it has not seen);
- every domain's generated train split, up to ``verifier.max_pairs``: (anchor, positive) is a re-ask
  (1); (anchor, negative) is not (0), the negatives holding near-miss edits (a
  ``verifier.near_miss_fraction`` share of anchors, drawn as ``generate`` draws them) beside
  other-aspect and sibling-topic questions; a near-miss row also gives (positive, negative) = 0.

Half the pairs, drawn seeded, are presented the other way round, so the order in which a cache
passes the two queries does not matter. The cache asks it only about candidate hits.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from cachelora import paths
from cachelora.base_model import model_sha256, resolve_base, use_threads
from cachelora.params import Params
from cachelora.records import file_md5
from cachelora.traffic import TRAIN_SET, AnswerGroup, check_traffic, read_traffic, traffic_file, words
from cachelora.training_log import TrainingLog
from cachelora.triplets import read_triplets
from cachelora.verifier_model import VERIFIER, load_verifier, scorer

log = logging.getLogger(__name__)


def row_pairs(row: dict[str, Any]) -> list[tuple[str, str, int]]:
    """A row's (text, text, label) pairs: (anchor, positive) is a re-ask (1), (anchor, negative) is not
    (0); a near-miss row also gives (positive, negative) = 0: a near-miss of one phrasing read against
    the other phrasing, as when a re-ask finds a near-miss of its original cached before it."""
    pairs = [(row["anchor"], row["positive"], 1), (row["anchor"], row["negative"], 0)]
    if "near_miss_of" in row:
        pairs.append((row["positive"], row["negative"], 0))
    return pairs


def group_pairs(groups: list[AnswerGroup]) -> list[tuple[str, str, int]]:
    """(text, text, label) pairs of one domain's traffic answer groups: the original with each re-ask
    and the re-asks with each other are 1; each near-miss with the original and with each re-ask is
    0; each re-ask and near-miss with the text of another group that shares most words with it
    (Jaccard) is 0: what a cache retrieves for a question it has not seen."""
    pairs: list[tuple[str, str, int]] = []
    for g in groups:
        asks = [g.original, *g.reasks]
        pairs += [(a, b, 1) for i, a in enumerate(asks) for b in asks[i + 1 :]]
        pairs += [(miss, a, 0) for miss, _ in g.near_misses for a in asks]
    nearest = nearest_other_group(groups)
    several = len({g.group_id for g in groups}) > 1
    met: set[frozenset[str]] = set()
    for g in groups:
        for text in g.texts[1:] if several else ():
            pair = frozenset((text, nearest[text]))
            if pair not in met:  # two texts each other's nearest: one pair
                met.add(pair)
                pairs.append((text, nearest[text], 0))
    return pairs


def nearest_other_group(groups: list[AnswerGroup]) -> dict[str, str]:
    """Each text's nearest text of another group by word Jaccard (ties: the larger text, as ``max``
    orders strings), from one sparse product of the texts' word sets."""
    from scipy.sparse import csr_matrix

    owner = {t: g.group_id for g in groups for t in g.texts}
    texts = list(owner)
    vocabulary = [sorted(words(t)) for t in texts]
    columns = {w: k for k, w in enumerate(sorted({w for v in vocabulary for w in v}))}
    rows = [i for i, v in enumerate(vocabulary) for _ in v]
    cols = [columns[w] for v in vocabulary for w in v]
    onehot = csr_matrix((np.ones(len(rows), dtype=np.int64), (rows, cols)), shape=(len(texts), len(columns)))
    shared = (onehot @ onehot.T).toarray()
    sizes = np.array([len(v) for v in vocabulary])
    jaccard = shared / (sizes[:, None] + sizes[None, :] - shared)
    group_of = np.array([owner[t] for t in texts], dtype=object)
    jaccard[group_of[:, None] == group_of[None, :]] = -1.0  # a text's own group is never its nearest
    rank = np.empty(len(texts), dtype=np.int64)
    rank[sorted(range(len(texts)), key=texts.__getitem__)] = np.arange(len(texts))
    out = {}
    for i, text in enumerate(texts):
        ties = np.flatnonzero(jaccard[i] == jaccard[i].max())
        out[text] = texts[ties[np.argmax(rank[ties])]]
    return out


def with_verifier_near_misses(rows: list[dict[str, Any]], params: Params) -> list[dict[str, Any]]:
    """The train splits' rows, a ``verifier.near_miss_fraction`` share of them with a lexicon near-miss
    edit of the anchor as the negative, drawn as ``generate`` draws them (the seed and the row's id),
    so the verifier learns the same edits whatever ``generate.near_miss_fraction`` gave the adapters.
    Rows already edited (``near_miss_of``) keep their edit; the order is kept."""
    from cachelora.lexicon import load_lexicons
    from cachelora.near_miss import with_near_misses
    from cachelora.splitting import SplitPlan

    fraction = params.verifier.near_miss_fraction
    if not fraction:
        return rows
    lexicons = load_lexicons(params.domains, paths.SEED_DIR)
    plan = SplitPlan.of(lexicons, params.split)
    out = list(rows)
    for domain in params.domains:
        index = [i for i, row in enumerate(rows) if row["domain"] == domain and "near_miss_of" not in row]
        edited = with_near_misses([rows[i] for i in index], lexicons[domain], fraction, params.generate.seed, plan)
        for i, row in zip(index, edited, strict=True):
            out[i] = row
    return out


def training_pairs(
    rows: list[dict[str, Any]], max_pairs: int, seed: int, natural: list[tuple[str, str, int]] = ()
) -> list[tuple[str, str, int]]:
    """(query, cached, label) pairs: every ``natural`` pair, then the rows' (:func:`row_pairs`) up to
    ``max_pairs`` of them (0 = all; rows are taken whole, in a seeded order); a seeded half of all
    pairs is presented the other way round."""
    rng = random.Random(f"{seed}:{VERIFIER}")
    order = list(range(len(rows)))
    rng.shuffle(order)
    generated: list[tuple[str, str, int]] = []
    for i in order:
        new = row_pairs(rows[i])
        if max_pairs and len(generated) + len(new) > max_pairs:
            break
        generated += new
    pairs = [(a, b, label) if rng.random() < 0.5 else (b, a, label) for a, b, label in [*natural, *generated]]
    rng.shuffle(pairs)
    return pairs


def new_cross_encoder(params: Params) -> Any:
    """A CrossEncoder on the base model's weights: its first ``verifier.layers`` layers (0 = all) and
    a new one-logit head."""
    from sentence_transformers.cross_encoder import CrossEncoder

    vp = params.verifier
    config = {"num_hidden_layers": vp.layers} if vp.layers else {}
    return CrossEncoder(
        resolve_base(params.base_model), num_labels=1, max_length=vp.max_length, config_kwargs=config, device="cpu"
    )


def train_verifier(
    params: Params, step_log: TrainingLog | None = None
) -> tuple[Any, dict[str, Any], dict[str, Any], list[dict[str, float]]]:
    """Train the verifier on every domain's train split: the model, the facts its inputs determine
    (saved beside it), the run's facts (timings: the stage's metrics only) and the loss per step
    (also to ``step_log`` when given)."""
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss
    from transformers import get_linear_schedule_with_warmup

    vp = params.verifier
    use_threads(params.train.threads)
    random.seed(vp.seed)
    torch.manual_seed(vp.seed)
    files = [paths.split_file(d, "train") for d in params.domains]
    rows = with_verifier_near_misses([row for f in files for row in read_triplets(f)], params)
    natural: list[tuple[str, str, int]] = []
    if vp.natural_pairs:
        for d in params.domains:
            path = traffic_file(TRAIN_SET, d)
            groups = read_traffic(path, d)
            check_traffic(groups, str(path), params.traffic.min_groups)
            natural += group_pairs(groups)
            files.append(path)
    pairs = training_pairs(rows, vp.max_pairs, vp.seed, natural)
    model = new_cross_encoder(params)
    loss_fn = BinaryCrossEntropyLoss(model)
    steps = max(1, math.ceil(len(pairs) / vp.batch_size) * vp.epochs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=vp.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(vp.warmup * steps), steps)
    rng = random.Random(vp.seed)
    log.info("train verifier: %d pairs, %d steps of %d", len(pairs), steps, vp.batch_size)
    model.train()
    history, order = [], []
    started = time.perf_counter()
    with tqdm(total=steps, desc="train verifier", unit="step") as bar:
        for step in range(1, steps + 1):
            if not order:
                order = list(range(len(pairs)))
                rng.shuffle(order)
            batch = [pairs[i] for i in order[: vp.batch_size]]
            del order[: vp.batch_size]
            queries, cached, labels = zip(*batch, strict=True)
            loss = loss_fn([list(queries), list(cached)], torch.tensor(labels, dtype=torch.float32))
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step, "loss": round(float(loss), 6), "lr": scheduler.get_last_lr()[0]})
            if step_log is not None:
                step_log.step(float(loss), scheduler.get_last_lr()[0])
            bar.set_postfix(loss=f"{float(loss):.4f}")
            bar.update()
    model.eval()
    wall = time.perf_counter() - started
    info = {
        "name": VERIFIER,
        "base_model": {"name": params.base_model, "sha256": model_sha256(params.base_model)},
        "params": vp.model_dump(),
        "data": {str(f): file_md5(f) for f in files},
        "pairs": len(pairs),
        "natural_pairs": len(natural),
        "near_miss_rows": sum("near_miss_of" in row for row in rows),
        "steps": steps,
    }
    run = {"wall_time_s": round(wall, 3), "pairs_per_s": round(steps * vp.batch_size / wall, 3)}
    if step_log is not None:
        step_log.settings({"device": "cpu", "threads": torch.get_num_threads(), "steps": steps, "pairs": len(pairs)})
    return model, info, run, history


def pair_quality(score: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The verifier (a :func:`~cachelora.verifier_model.scorer`) on held-out triplets (a val split):
    ROC AUC of (anchor, positive) against (anchor, negative) over every row, and over the near-miss
    rows alone, with the row counts."""
    from sklearn.metrics import roc_auc_score

    def auc(subset: list[dict[str, Any]]) -> float | None:
        if not subset:
            return None
        pairs = [(r["anchor"], r["positive"]) for r in subset] + [(r["anchor"], r["negative"]) for r in subset]
        labels = [1] * len(subset) + [0] * len(subset)
        return round(float(roc_auc_score(labels, score(pairs))), 6)

    near = [r for r in rows if "near_miss_of" in r]
    return {"rows": len(rows), "near_miss_rows": len(near), "roc_auc": auc(rows), "near_miss_roc_auc": auc(near)}


def save_verifier(model: Any, out_dir: Path, info: dict[str, Any], probe: list[tuple[str, str]]) -> None:
    """Save into a temp dir, reload with plain ``CrossEncoder``, compare scores, then rename into place."""
    from cachelora.errors import CacheloraError
    from cachelora.records import atomic_dir, write_json

    with atomic_dir(out_dir) as tmp:
        model.save(str(tmp))
        (tmp / "README.md").unlink(missing_ok=True)  # a generated model card with run-dependent text
        write_json(tmp / "training_info.json", info)
        diff = float(np.abs(scorer(model)(probe) - scorer(load_verifier(tmp))(probe)).max())
        if not diff <= 1e-5:  # NaN too
            raise CacheloraError(f"{out_dir}: reloaded verifier differs from the trained one (max |Δ| = {diff:.2e})")
    log.info("saved %s (reload check max |Δ| = %.1e)", out_dir, diff)
