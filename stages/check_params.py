"""DVC stage check_params: check params.yaml before any stage runs, so a bad value deletes nothing.

DVC removes a stage's outputs before it runs the stage; every stage depends on this one's
output, so an invalid params.yaml stops `dvc repro` here, with one line naming the key, while
every earlier output is still in place. The output's content does not depend on the values, so
a valid change re-runs only the stages that read the changed keys.
"""

import click

from cachelora import paths
from cachelora.entrypoint import user_errors
from cachelora.params import PARAMS_FILE, load_params
from cachelora.records import write_json


@click.command()
@user_errors
def main() -> None:
    load_params()
    write_json(paths.PARAMS_CHECK, {"checked": str(PARAMS_FILE)})


if __name__ == "__main__":
    main()
