"""DVC stage generate@<domain>: lexicon (or LLM) -> data/triplets/<domain>.jsonl."""

import click

from cachelora import paths
from cachelora.entrypoint import user_errors
from cachelora.generation import generate_domain
from cachelora.params import load_params


@click.command()
@click.option("--domain", required=True, help="Domain to generate (one of params.yaml: domains).")
@user_errors
def main(domain: str) -> None:
    generate_domain(load_params(), domain, paths.triplets(domain), paths.SEED_DIR)


if __name__ == "__main__":
    main()
