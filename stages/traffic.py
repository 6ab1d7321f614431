"""DVC stage traffic: every model's traffic replay on the natural traffic sets, alone and with the verifier."""

import click

from cachelora.entrypoint import user_errors
from cachelora.params import load_params
from cachelora.traffic_evaluation import pipeline_traffic


@click.command()
@user_errors
def main() -> None:
    pipeline_traffic(load_params())


if __name__ == "__main__":
    main()
