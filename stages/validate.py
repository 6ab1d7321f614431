"""DVC stage validate@<domain>: Great Expectations gate -> validated rows, quarantine, counts."""

import click

from cachelora import paths
from cachelora.base_model import load_base, model_sha256
from cachelora.entrypoint import user_errors
from cachelora.params import load_params
from cachelora.quality import check_triplets, negative_similarity
from cachelora.records import read_jsonl, write_json, write_jsonl


@click.command()
@click.option("--domain", required=True, help="Domain to validate.")
@user_errors
def main(domain: str) -> None:
    params = load_params()
    params.check_domain(domain)
    source = paths.triplets(domain)
    rows = read_jsonl(source)
    neg_sim = negative_similarity(rows, load_base(params.base_model), params.validate_.batch_size)
    report = check_triplets(rows, params.validate_, domain, neg_sim, str(source))
    write_jsonl(paths.quarantine(domain), report.quarantined)
    write_jsonl(paths.validated(domain), report.passed)
    metrics = {**report.metrics, "base_model": {"name": params.base_model, "sha256": model_sha256(params.base_model)}}
    write_json(paths.stage_metrics("validate", domain), metrics)


if __name__ == "__main__":
    main()
