"""DVC stage teacher@<domain>: the teacher model's embeddings of every text in the domain's train split."""

import click

from cachelora.distillation import embed_domain, teacher_file
from cachelora.entrypoint import user_errors
from cachelora.params import load_params


@click.command()
@click.option("--domain", required=True)
@user_errors
def main(domain: str) -> None:
    params = load_params()
    params.check_domain(domain)
    embed_domain(params, domain, teacher_file(domain))


if __name__ == "__main__":
    main()
