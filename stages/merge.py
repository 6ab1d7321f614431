"""DVC stage merge: the per-domain adapters combined into models/merged."""

import click

from cachelora import paths
from cachelora.adapters import save_adapter
from cachelora.entrypoint import user_errors
from cachelora.merging import merge_adapters
from cachelora.params import MERGED, load_params
from cachelora.triplets import read_triplets


@click.command()
@user_errors
def main() -> None:
    params = load_params()
    model, info = merge_adapters(params)
    probe = [row["anchor"] for domain in params.domains for row in read_triplets(paths.split_file(domain, "val"))[:4]]
    save_adapter(model, paths.model_dir(MERGED), params.base_model, info, probe)


if __name__ == "__main__":
    main()
