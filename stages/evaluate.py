"""DVC stage evaluate: baseline, every adapter, multi and merged on every domain's test split."""

import click

from cachelora.entrypoint import user_errors
from cachelora.evaluation import pipeline_evaluation
from cachelora.params import load_params


@click.command()
@user_errors
def main() -> None:
    pipeline_evaluation(load_params())


if __name__ == "__main__":
    main()
