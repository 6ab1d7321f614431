"""A training run's log through DVCLive: loss and learning rate per step, and the settings the run
resolved (device, precision, threads, steps), in ``metrics/train/<name>/``.

DVC reads it as it is written: ``dvc exp show`` lists each experiment's last loss (``metrics.json``)
and settings (``params.yaml``), and ``dvc plots diff`` draws the loss curves
(``plots/metrics/loss.tsv``) of several experiments on one chart.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cachelora import paths


class TrainingLog:
    """One run's DVCLive logger: ``step`` after each optimiser step, ``settings`` once they are known."""

    def __init__(self, live: Any) -> None:
        self._live = live

    def step(self, loss: float, lr: float) -> None:
        self._live.log_metric("loss", round(loss, 6))
        self._live.log_metric("lr", lr)
        self._live.next_step()

    def settings(self, values: dict[str, Any]) -> None:
        self._live.log_params(values)

    def result(self, name: str, value: float) -> None:
        """A figure measured after training (in metrics.json beside the last loss; no plot)."""
        self._live.log_metric(name, value, plot=False)


@contextmanager
def training_log(name: str, write: bool = True) -> Iterator[TrainingLog | None]:
    """DVCLive into ``metrics/train/<name>/``, as a DVC stage's output: dvc.yaml declares its files,
    so DVCLive neither edits dvc.yaml nor saves an experiment of its own. ``write`` False (a ddp
    rank other than the first: each rank has the same global loss) gives None."""
    if not write:
        yield None
        return
    from dvclive import Live

    with Live(dir=str(paths.train_log(name)), save_dvc_exp=False, dvcyaml=False) as live:
        yield TrainingLog(live)
