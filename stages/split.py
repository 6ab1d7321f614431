"""DVC stage split@<domain>: rows to train/val/test by the split plan; fails if a topic or template crosses."""

import click

from cachelora import paths
from cachelora.entrypoint import user_errors
from cachelora.lexicon import load_lexicons
from cachelora.params import load_params
from cachelora.records import atomic_dir, write_json, write_jsonl
from cachelora.splitting import SplitPlan, check_unseen, split_rows, unseen_check
from cachelora.triplets import read_triplets


@click.command()
@click.option("--domain", required=True, help="Domain to split.")
@user_errors
def main(domain: str) -> None:
    params = load_params()
    params.check_domain(domain)
    plan = SplitPlan.of(load_lexicons(params.domains, paths.SEED_DIR), params.split)
    splits, metrics = split_rows(read_triplets(paths.validated(domain)), params.split, domain, plan)
    others = {d: split_rows(read_triplets(paths.validated(d)), params.split, d, plan)[0] for d in params.domains}
    metrics["unseen"] = check_unseen(domain, unseen_check(domain, {**others, domain: splits}, plan))
    with atomic_dir(paths.split_dir(domain)) as tmp:
        for name, rows in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
    write_json(paths.stage_metrics("split", domain), metrics)


if __name__ == "__main__":
    main()
