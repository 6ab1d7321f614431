"""DVC stage train@<name>: one LoRA adapter per domain, and `multi` on all domains together.

With ``train.strategy: ddp`` the stage runs itself again under torchrun (``train.processes`` ranks)
unless a launcher already started it; only rank 0 writes outputs."""

import click

from cachelora import distributed, paths
from cachelora.adapters import save_adapter
from cachelora.distillation import load_teacher, teacher_file
from cachelora.entrypoint import user_errors
from cachelora.params import load_params
from cachelora.records import write_json
from cachelora.training import FINAL_LOSS, train_model, training_domains, training_files
from cachelora.training_log import training_log


@click.command()
@click.option("--name", required=True, help="A domain, or 'multi' for all domains.")
@user_errors
def main(name: str) -> None:
    params = load_params()
    params.check_model(name)
    if params.train.strategy == "ddp" and not distributed.launched():
        raise SystemExit(distributed.torchrun(__file__, ["--name", name], distributed.processes(params.train)))
    distill = params.train.distill
    teacher = (
        load_teacher([teacher_file(d) for d in training_domains(name, params)], distill.teacher)
        if distill.weight > 0
        else None
    )
    with distributed.process_group(params.train), training_log(name, write=distributed.is_main()) as log:
        trained = train_model(name, params, training_files(name, params), teacher, log)
        if distributed.is_main():
            save_adapter(trained.model, paths.model_dir(name), params.base_model, trained.info, trained.probe)
            # The adapter directory holds only what the inputs determine; timings and other run facts go here.
            summary = {key: trained.info[key] for key in ("triplets", "steps", FINAL_LOSS)} | trained.run
            write_json(paths.stage_metrics("train", name), summary)


if __name__ == "__main__":
    main()
