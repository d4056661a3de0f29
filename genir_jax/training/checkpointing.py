"""Training checkpoints with orbax: every K steps, keep the newest N, atomic, exact resume.

A checkpoint is one orbax step directory with two items: ``state`` (the `TrainState` pytree: step,
parameters, optimizer state, PRNG key; arrays stored exactly) and ``meta`` (JSON: the step, the data
fingerprint, the best validation result so far and anything else the trainer records). orbax writes a
step into a temporary directory and renames it when complete, so a run killed mid-save leaves either
the previous checkpoints or the new one, never a torn one; leftover temporaries are removed on the next
start. The data position needs no storage of its own: batches are a pure function of (seed, step)
(`genir_jax.training.batching`).

The best parameters (by validation) live in a second manager under ``best/`` that keeps one step.

Sharded states: orbax writes each array's shards as they lie on the devices (every process its own) and
restores into the shardings of the target (`abstract_like` with the run's state shardings), so a model
split over a ``model`` axis is never gathered onto one host.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from genir_jax.base.errors import CheckpointError


def _manager(directory: str, *, every: int | None, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every or 1,
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=("state", "meta"))


class Checkpoints:
    """The checkpoints of one run: periodic ones in ``<dir>/checkpoints``, the best in ``<dir>/best``."""

    def __init__(self, run_dir: str, *, every: int, keep: int):
        if every <= 0 or keep <= 0:
            raise CheckpointError(f"{run_dir}: checkpoint interval and count must be positive "
                                  f"(got every={every}, keep={keep})")
        self.run_dir = run_dir
        self.every = every
        self.periodic = _manager(os.path.join(run_dir, "checkpoints"), every=every, keep=keep)
        self.best = _manager(os.path.join(run_dir, "best"), every=None, keep=1)

    # -------------------------------------------------------------------------------- periodic
    def latest_step(self) -> int | None:
        return self.periodic.latest_step()

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        """Save if `step` is a multiple of the interval (or `force`); True if saved."""
        if step in self.periodic.all_steps():
            return False
        saved = self.periodic.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 meta=ocp.args.JsonSave(meta)), force=force)
        self.periodic.wait_until_finished()
        return bool(saved)

    def restore_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint `step` (cheap: no arrays are read)."""
        try:
            restored = self.periodic.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise CheckpointError(f"{self.run_dir}/checkpoints/{step}: unreadable metadata ({exc})") from exc
        return dict(restored["meta"])

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: the latest), placed like `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.run_dir}/checkpoints: no checkpoint to resume from")
        try:
            restored = self.periodic.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as exc:
            raise CheckpointError(f"{self.run_dir}/checkpoints/{step}: cannot be restored into this run's "
                                  f"model and optimizer ({exc})") from exc
        return restored["state"], dict(restored["meta"])

    # -------------------------------------------------------------------------------- best
    def save_best(self, step: int, params, meta: dict) -> None:
        """Replace the best parameters by those of `step`."""
        for old in self.best.all_steps():
            if old >= step:
                self.best.delete(old)
        self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                                     meta=ocp.args.JsonSave(meta)), force=True)
        self.best.wait_until_finished()

    def best_step(self) -> int | None:
        return self.best.latest_step()

    def restore_best(self, abstract_params) -> tuple[Any, dict]:
        step = self.best_step()
        if step is None:
            raise CheckpointError(f"{self.run_dir}/best: no best checkpoint")
        restored = self.best.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def discard_after(self, step: int) -> None:
        """Forget best checkpoints newer than `step` (written by a run that was killed before its next
        periodic checkpoint; the resumed run recomputes them identically)."""
        for old in self.best.all_steps():
            if old > step:
                self.best.delete(old)

    def close(self) -> None:
        self.periodic.close()
        self.best.close()


def abstract_like(tree, sharding=None):
    """`jax.ShapeDtypeStruct` leaves for a restore target: `sharding` is one sharding for every leaf or a
    pytree of them shaped like `tree` (orbax then reads each device's shard only); None keeps each leaf's."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None
                                           else getattr(x, "sharding", None)), tree)
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding)
