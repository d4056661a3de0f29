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

A checkpoint that cannot be read back (truncated or corrupted on disk after it was written: a copy cut
short, a full disk, bit rot) is skipped with a warning and the next older one is used (`_newest_readable`);
when none is readable, a `CheckpointError` names the directory and each step's error. orbax abandons the
other reads of a failed restore: their late errors (``Event loop is closed``, the same read error again,
"exception was never retrieved") can reach stderr at any moment once a read has failed, even before the error
itself has propagated, so `_quiet_abandoned_reads` drops those, and only those, from before the first read on
(the error itself is reported once, as above).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings
from typing import Any, Callable

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


def _abandoned_read_noise(exc: BaseException | None, origin: object) -> bool:
    """Whether an unreported error is a leftover of an orbax restore that already failed: a tensorstore read
    completing into the closed event loop, or an orbax read coroutine collected with its (reported) error."""
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
        return True
    code = getattr(origin, "cr_code", None)
    return code is not None and "orbax" in code.co_filename


_READ_MARKS = ("orbax", "OCDBT", "TensorStore", "while reading array index")


class _AbandonedReadLogFilter(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records for the reads of a failed orbax restore."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("never retrieved" in text and any(mark in text for mark in _READ_MARKS))


_QUIETED = False


def _quiet_abandoned_reads() -> None:
    """Install (once per process) the filters that drop a failed restore's late, already-reported errors;
    every other unraisable error and log record goes where it went before."""
    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _abandoned_read_noise(unraisable.exc_value, unraisable.object):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger(asyncio.__name__).addFilter(_AbandonedReadLogFilter())


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

    def _newest_readable(self, step: int, read: Callable[[int], Any], what: str) -> tuple[int, Any]:
        """(s, read(s)) for the newest checkpoint s <= `step` that `read` can read; each one skipped is warned
        about. orbax raises plain `Exception`s for torn files, hence the broad catch (the error is reported)."""
        # Before the first read, not after a failure: orbax closes its event loop while it raises, and a read it
        # abandoned can complete into that closed loop before the error reaches the `except` below (CI saw it).
        _quiet_abandoned_reads()
        failures = []
        for candidate in sorted((s for s in self.periodic.all_steps() if s <= step), reverse=True):
            try:
                value = read(candidate)
            except Exception as exc:  # noqa: BLE001 - orbax / tensorstore errors have no common type
                while exc.__cause__ is not None:  # the innermost error says what is wrong with the files
                    exc = exc.__cause__
                failures.append(f"step {candidate}: {type(exc).__name__}: {(str(exc) or '?').splitlines()[0][:300]}")
                continue
            if failures:
                warnings.warn(f"{self.run_dir}/checkpoints: {what} unreadable ({'; '.join(failures)}); "
                              f"using step {candidate}", stacklevel=3)
            return candidate, value
        raise CheckpointError(f"{self.run_dir}/checkpoints: no checkpoint at or before step {step} can be read "
                              f"(into this run's model and optimizer) ({'; '.join(failures) or 'none saved'})")

    def restore_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint `step` (cheap: no arrays are read); of the newest older readable
        one when `step`'s cannot be read."""
        def read(candidate):
            return dict(self.periodic.restore(candidate, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

        return self._newest_readable(step, read, "metadata")[1]

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default: the latest), placed like `abstract_state`. A checkpoint that
        cannot be restored is skipped for the next older one (warned about, then deleted, so the resumed run
        writes that step again); the meta's ``step`` says which was used."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.run_dir}/checkpoints: no checkpoint to resume from")

        def read(candidate):
            restored = self.periodic.restore(candidate, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            return restored["state"], {**dict(restored["meta"]), "step": candidate}

        used, (state, meta) = self._newest_readable(step, read, "newer checkpoint(s)")
        for bad in [s for s in self.periodic.all_steps() if used < s <= step]:
            self.periodic.delete(bad)
        return state, meta

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
