"""Command-line options shared by `genir-jax pretrain` and `genir-jax train`: preset overrides and outputs."""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

from genir_jax.base.errors import ConfigError, GenIRError
from genir_jax.training.optim import OPTIMIZERS, SCHEDULES, OptimizerSpec
from genir_jax.training.presets import PRESETS
from genir_jax.training.trainer import RunSpec


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset and the overrides of its `RunSpec`, plus --resume / --devices / --no-progress."""
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS),
                        help="model shape and training settings (default: cpu); see genir_jax.training.presets")
    group = parser.add_argument_group("overrides of the preset")
    group.add_argument("--steps", type=int, help="number of updates")
    group.add_argument("--batch-size", type=int, help="global batch size (split over the devices)")
    group.add_argument("--optimizer", choices=OPTIMIZERS,
                       help="adafactor (T5/DSI, the presets' default) or adamw (with the preset's AdamW settings)")
    group.add_argument("--learning-rate", type=float, help="peak learning rate")
    group.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule after the warmup")
    group.add_argument("--warmup-steps", type=int, help="linear warmup length in updates")
    group.add_argument("--seed", type=int, help="seed of initialisation, data order, noise and dropout")
    group.add_argument("--bf16", action="store_true", default=None,
                       help="compute in bfloat16 (float32 master weights)")
    group.add_argument("--no-dropout", action="store_true", help="train without dropout")
    group.add_argument("--unroll-layers", action=argparse.BooleanOptionalAction, default=None,
                       help="run each stack's layers as straight-line code instead of a loop: faster steps for "
                            "a few small layers, longer compilation for many (default: the preset's; tiny and "
                            "cpu unroll)")
    group.add_argument("--eval-every", type=int, help="validate every N updates (0: only at the end)")
    group.add_argument("--checkpoint-every", type=int, help="checkpoint every N updates")
    group.add_argument("--keep-checkpoints", type=int, help="number of newest checkpoints kept")
    group.add_argument("--log-every", type=int, help="write a metrics line every N updates")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in the output directory (same settings); "
                             "refused when there is none")
    parser.add_argument("--resume-if-any", action="store_true", help=argparse.SUPPRESS)  # reproduce: resume or start
    parser.add_argument("--devices", type=int, default=None,
                        help="train data-parallel on the first N local devices (default: all)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_run(args: argparse.Namespace, preset_run: RunSpec, adamw: OptimizerSpec) -> RunSpec:
    """The preset's `RunSpec` with the command-line overrides applied (validated)."""
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
        raise ConfigError(f"--devices {count}: there are {len(devices)} local devices")
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
    if_any = bool(getattr(args, "resume_if_any", False))
    return bool(args.resume) or if_any, bool(args.resume) and not if_any


def check_output_dir(path: str, resume: bool, require_checkpoint: bool = True) -> None:
    """Refuse to train into a non-empty directory unless resuming, and to resume (with `require_checkpoint`)
    where there is no checkpoint (nothing is written before this)."""
    if os.path.isfile(path):
        raise GenIRError(f"{path}: the output must be a directory, found a file")
    if resume and require_checkpoint and not has_checkpoint(path):
        raise GenIRError(f"--resume: {path} holds no checkpoint to resume from (no {os.path.join(path, 'checkpoints')}"
                         "/<step>); drop --resume to start a new run")
    if os.path.isdir(path) and os.listdir(path) and not resume:
        raise GenIRError(f"{path}: output directory exists and is not empty; pass --resume to continue a run "
                         "there, or choose a new directory")
