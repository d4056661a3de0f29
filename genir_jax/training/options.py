"""Settings shared by pretraining and DSI training (`run_pretraining`, `train_dsi`): preset overrides, resume
mode and output checks, and the command-line options of `genir-jax pretrain` / `genir-jax train` that set them."""

from __future__ import annotations

from genir_jax.base.options import LISTED, POSITIVE, ROWS, SEED, STEPS, STEP_INTERVAL, bounded_float
import argparse
import dataclasses
import os

import jax

from genir_jax.base.errors import GenIRError, SettingError
from genir_jax.training.optim import OPTIMIZERS, SCHEDULES, OptimizerSpec
from genir_jax.training.presets import PRESETS
from genir_jax.training.trainer import RunSpec


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset and the overrides of its `RunSpec`, plus --resume / --devices / --no-progress / --json /
    --tensorboard."""
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                        help="model shape and training settings (default: cpu); see genir_jax.training.presets")
    group = parser.add_argument_group("overrides of the preset")
    group.add_argument("--steps", type=STEPS, help="number of updates")
    group.add_argument("--batch-size", type=ROWS, help="global batch size (split over the devices)")
    group.add_argument("--optimizer", choices=OPTIMIZERS,
                       help="adafactor (T5/DSI, the presets' default) or adamw (with the preset's AdamW settings)")
    group.add_argument("--learning-rate", type=bounded_float(0, open_low=True), help="peak learning rate")
    group.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule after the warmup")
    group.add_argument("--warmup-steps", type=STEP_INTERVAL, help="linear warmup length in updates")
    group.add_argument("--seed", type=SEED, help="seed of initialisation, data order, noise and dropout")
    group.add_argument("--bf16", action="store_true", default=None,
                       help="compute in bfloat16 (float32 master weights)")
    group.add_argument("--no-dropout", action="store_true", help="train without dropout")
    group.add_argument("--unroll-layers", action=argparse.BooleanOptionalAction, default=None,
                       help="run each stack's layers as straight-line code instead of a loop: faster steps for "
                            "a few small layers, longer compilation for many (default: the preset's; tiny and "
                            "cpu unroll)")
    group.add_argument("--eval-every", type=STEP_INTERVAL, help="validate every N updates (0: only at the end)")
    group.add_argument("--checkpoint-every", type=STEPS, help="checkpoint every N updates")
    group.add_argument("--keep-checkpoints", type=LISTED, help="number of newest checkpoints kept")
    group.add_argument("--log-every", type=STEPS, help="write a metrics line every N updates")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the output directory (same settings); "
                             "refused when there is none")
    parser.add_argument("--resume-if-any", action="store_true", help=argparse.SUPPRESS)  # reproduce: resume or start
    parser.add_argument("--devices", type=POSITIVE, default=None,
                        help="train data-parallel on the first N local devices (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true",
                        help="print each metrics.jsonl record and the final summary as JSON lines on stdout "
                             "(default: labelled lines at the end)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also write the metrics as TensorBoard event files into OUTPUT/tensorboard/")


RESUME_MODES = ("never", "required", "if-any")

# Settings named by the errors of this module as `genir-jax pretrain` / `train` spell them (`RunSpec.validate`
# names its fields as the preset does: 'steps', ...).
FLAGS = {"resume": "--resume", "devices": "--devices"}


@dataclasses.dataclass(frozen=True)
class RunOverrides:
    """Changes to a preset's `RunSpec` (None: the preset's value); what the command-line overrides set."""

    steps: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None
    learning_rate: float | None = None
    schedule: str | None = None
    warmup_steps: int | None = None
    seed: int | None = None
    bf16: bool | None = None
    no_dropout: bool = False
    unroll_layers: bool | None = None
    eval_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = None
    log_every: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunOverrides":
        """The overrides of a parsed command line (`add_run_arguments`)."""
        return cls(**{field.name: getattr(args, field.name, field.default) for field in dataclasses.fields(cls)})


def resume_setting(args: argparse.Namespace) -> str:
    """The `RESUME_MODES` entry of ``--resume`` / the hidden ``--resume-if-any``."""
    if getattr(args, "resume_if_any", False):
        return "if-any"
    return "required" if args.resume else "never"


def resume_flags(resume: str) -> tuple[bool, bool]:
    """(resume, require_checkpoint) of a `RESUME_MODES` entry: ``required`` needs a checkpoint in the output
    directory; ``if-any`` (what `genir-jax reproduce` uses) resumes one if there is one, else starts afresh."""
    if resume not in RESUME_MODES:
        raise SettingError("{0} must be one of %s, got %r" % (", ".join(RESUME_MODES), resume), "resume")
    return resume != "never", resume == "required"


def resolve_run(args, preset_run: RunSpec, adamw: OptimizerSpec) -> RunSpec:
    """The preset's `RunSpec` with the overrides in `args` (`RunOverrides` or a parsed command line) applied
    (validated)."""
    optimizer = preset_run.optimizer
    if args.optimizer and args.optimizer != optimizer.name:
        optimizer = adamw if args.optimizer == "adamw" else OptimizerSpec("adafactor")
    changes = {name: value for name, value in (
        ("learning_rate", args.learning_rate), ("schedule", args.schedule), ("warmup_steps", args.warmup_steps),
    ) if value is not None}
    optimizer = optimizer.replace(**changes)
    run_changes = {name: getattr(args, name) for name in (
        "steps", "batch_size", "seed", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every",
    ) if getattr(args, name) is not None}
    if args.bf16:
        run_changes["bf16"] = True
    if args.no_dropout:
        run_changes["dropout"] = False
    if getattr(args, "unroll_layers", None) is not None:
        run_changes["unroll_layers"] = args.unroll_layers
    run = dataclasses.replace(preset_run, optimizer=optimizer, **run_changes)
    run.validate()
    return run


def select_devices(count: int | None):
    """The first `count` local devices (None: all)."""
    devices = jax.local_devices()
    if count is None:
        return None
    if not 1 <= count <= len(devices):
        raise SettingError("{0} %s: there are %d local devices" % (count, len(devices)), "devices")
    return devices[:count]


def has_checkpoint(path: str) -> bool:
    """Whether a run directory holds a periodic checkpoint (``<path>/checkpoints/<step>``) to resume from."""
    directory = os.path.join(path, "checkpoints")
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    return any(name.isdigit() and os.path.isdir(os.path.join(directory, name)) for name in names)


def resume_mode(args: argparse.Namespace) -> tuple[bool, bool]:
    """(resume, require_checkpoint): ``--resume`` needs a checkpoint in the output directory; the hidden
    ``--resume-if-any`` (what `genir-jax reproduce` passes) resumes one if there is one, else starts afresh."""
    return resume_flags(resume_setting(args))


def check_output_dir(path: str, resume: bool, require_checkpoint: bool = True) -> None:
    """Refuse to train into a non-empty directory unless resuming, and to resume (with `require_checkpoint`)
    where there is no checkpoint (nothing is written before this)."""
    if os.path.isfile(path):
        raise GenIRError(f"{path}: the output must be a directory, found a file")
    if resume and require_checkpoint and not has_checkpoint(path):
        raise SettingError("{0}: %s holds no checkpoint to resume from (no %s/<step>); drop {0} to start a new run"
                           % (path, os.path.join(path, "checkpoints")), "resume")
    if os.path.isdir(path) and os.listdir(path) and not resume:
        raise SettingError("%s: output directory exists and is not empty; pass {0} to continue a run there, or "
                           "choose a new directory" % path, "resume")


def print_summary(summary: dict, args: argparse.Namespace) -> None:
    """A finished run's summary on stdout: one JSON line with ``--json`` (after the metrics records), else
    labelled lines (`genir_jax.training.reporting.training_lines`) ending with the output directory."""
    from genir_jax.training.reporting import json_line, training_lines

    if args.json:
        print(json_line({"event": "summary", **summary}))
    else:
        print("\n".join(training_lines(summary, args.output)))
