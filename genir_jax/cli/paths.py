"""The ``[checkpoint]`` placeholder of path options, resolved for every command in one place."""

from __future__ import annotations

import argparse
import os

from genir_jax.base.errors import GenIRError

CHECKPOINT = "[checkpoint]"  # placeholder in path options, as the reference's scripts use it


def resolve_placeholders(args: argparse.Namespace) -> None:
    """Replace ``[checkpoint]`` in every string option by the checkpoint directory, for every command in one
    place (as the reference's scripts do): the directory is the option ``args.checkpoint_option`` names
    (default ``checkpoint``). A placeholder in a command without a checkpoint is refused."""
    source = getattr(args, "checkpoint_option", "checkpoint")
    checkpoint = getattr(args, source, None)
    for name, value in sorted(vars(args).items()):
        if isinstance(value, str) and CHECKPOINT in value and name != source:
            if checkpoint is None:
                raise GenIRError(f"--{name.replace('_', '-')}: {CHECKPOINT} stands for the checkpoint directory, "
                                 "which this command does not take")
            setattr(args, name, value.replace(CHECKPOINT, os.fspath(checkpoint)))
