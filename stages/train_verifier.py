"""DVC stage train_verifier: the CrossEncoder that checks a candidate cache hit (models/verifier)."""

import click

from cachelora import paths
from cachelora.entrypoint import user_errors
from cachelora.params import load_params
from cachelora.records import write_json
from cachelora.triplets import read_triplets
from cachelora.verifier import VERIFIER, pair_quality, save_verifier, train_verifier, verifier_dir


@click.command()
@user_errors
def main() -> None:
    params = load_params()
    model, info, run, history = train_verifier(params)
    probe = [("is it safe to drive after a concussion", "can I drive the day after a concussion")] * 2
    save_verifier(model, verifier_dir(), info, probe)
    val = {d: read_triplets(paths.split_file(d, "val")) for d in params.domains}
    quality = {d: pair_quality(model, rows) for d, rows in val.items()}
    quality["all"] = pair_quality(model, [r for rows in val.values() for r in rows])
    write_json(paths.stage_metrics(VERIFIER, "train"), {**info, **run, "val": quality})
    write_json(paths.loss_plot(VERIFIER), history)


if __name__ == "__main__":
    main()
