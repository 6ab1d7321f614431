"""DVC stage split@<domain>: grouped, seeded train/val/test with a leakage check."""

import click

from cachelora import paths
from cachelora.entrypoint import user_errors
from cachelora.params import load_params
from cachelora.records import atomic_dir, read_triplets, write_json, write_jsonl
from cachelora.splitting import split_rows


@click.command()
@click.option("--domain", required=True, help="Domain to split.")
@user_errors
def main(domain: str) -> None:
    params = load_params()
    params.check_domain(domain)
    splits, metrics = split_rows(read_triplets(paths.validated(domain)), params.split, salt=domain)
    with atomic_dir(paths.split_dir(domain)) as tmp:
        for name, rows in splits.items():
            write_jsonl(tmp / f"{name}.jsonl", rows)
    write_json(paths.stage_metrics("split", domain), metrics)


if __name__ == "__main__":
    main()
