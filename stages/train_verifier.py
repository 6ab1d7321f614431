"""DVC stage train_verifier: the CrossEncoder that checks a candidate cache hit (models/verifier)."""

import click

from cachelora import paths
from cachelora.entrypoint import user_errors
from cachelora.params import load_params
from cachelora.records import write_json
from cachelora.training_log import training_log
from cachelora.triplets import read_triplets
from cachelora.verifier import pair_quality, save_verifier, train_verifier, with_verifier_near_misses
from cachelora.verifier_model import VERIFIER, scorer, verifier_dir


@click.command()
@user_errors
def main() -> None:
    params = load_params()
    with training_log(VERIFIER) as log:
        model, info, run, _ = train_verifier(params, log)
        probe = [("is it safe to drive after a concussion", "can I drive the day after a concussion")] * 2
        save_verifier(model, verifier_dir(), info, probe)
        rows = [row for d in params.domains for row in read_triplets(paths.split_file(d, "val"))]
        edited = with_verifier_near_misses(rows, params)  # once: it loads every lexicon
        val = {d: [row for row in edited if row["domain"] == d] for d in params.domains}
        score = scorer(model)  # each val pair read once: "all" reuses the domains' scores
        quality = {d: pair_quality(score, rows) for d, rows in val.items()}
        quality["all"] = pair_quality(score, [r for rows in val.values() for r in rows])
        for key in ("roc_auc", "near_miss_roc_auc"):
            if quality["all"][key] is not None:
                log.result(f"val_{key}", quality["all"][key])
    write_json(paths.stage_metrics(VERIFIER, "train"), {**info, **run, "val": quality})


if __name__ == "__main__":
    main()
