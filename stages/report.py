"""DVC stage report: RESULTS.md and README's results block, generated from the metrics."""

import click

from cachelora.entrypoint import user_errors
from cachelora.params import load_params
from cachelora.report import write_report


@click.command()
@user_errors
def main() -> None:
    write_report(load_params())


if __name__ == "__main__":
    main()
