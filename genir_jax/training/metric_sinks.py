"""Where a training run's metric records go besides ``metrics.jsonl``: standard output as JSON lines (``--json``)
and TensorBoard event files in ``<run>/tensorboard/`` (``--tensorboard``).

A sink is a callable taking each record `genir_jax.training.trainer.train_loop` writes (``{"event": "train" |
"eval", "step", ...}``), with an optional ``close()`` called when the run ends. Only the process that writes
``metrics.jsonl`` (process 0) feeds them.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Mapping

from genir_jax.training.reporting import json_line

TENSORBOARD_DIR = "tensorboard"

Sink = Callable[[Mapping[str, Any]], None]


class JsonLines:
    """Each record as one JSON line on `stream` (default: the current standard output), flushed at once."""

    def __init__(self, stream=None):
        self.stream = stream

    def __call__(self, record: Mapping[str, Any]) -> None:
        print(json_line(record), file=self.stream or sys.stdout, flush=True)


class TensorBoard:
    """Each numeric entry of a record as the scalar ``<event>/<name>`` (``train/loss``, ``eval/Hits_1``, ...:
    TensorBoard's tags allow no ``@``) at the record's step, written with tensorboardX into
    ``<run_dir>/tensorboard/``. The writer opens at the first
    record, so nothing is written before training starts (the run directory is checked to be empty first); a
    resumed run adds a new event file, and TensorBoard shows the re-run steps twice."""

    def __init__(self, run_dir: str | os.PathLike):
        self.directory = os.path.join(os.fspath(run_dir), TENSORBOARD_DIR)
        self._writer = None

    def __call__(self, record: Mapping[str, Any]) -> None:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self.directory)
        step = int(record["step"])
        event = record.get("event", "train")
        for name, value in record.items():
            if name not in ("event", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{event}/{name.replace('@', '_')}", value, step)
        self._writer.flush()  # a killed run keeps what it logged

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def metric_sinks(run_dir: str | os.PathLike, *, json_lines: bool = False, tensorboard: bool = False) -> list[Sink]:
    """The sinks a command's ``--json`` and ``--tensorboard`` ask for."""
    return ([JsonLines()] if json_lines else []) + ([TensorBoard(run_dir)] if tensorboard else [])
