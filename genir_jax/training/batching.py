"""Data order: which examples form the batch of every training step, as a pure function of the step.

Examples come in groups (e.g. DSI indexing examples padded to 64 tokens and queries padded to 32); a
batch never mixes groups, so each group keeps its own array width and compiled shape. Epoch ``e`` is
planned by a numpy Generator seeded with ``(seed, e)``: every group is shuffled and cut into full
batches (the last one topped up from the start of the same shuffle, so every example is seen once or,
for at most ``batch_size - 1`` examples, twice per epoch), and the batches of all groups are shuffled
together. Because the plan depends only on (seed, step), resuming needs only the step number.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Protocol, Sequence

import numpy as np


class DataSource(Protocol):
    """What the trainer consumes: group sizes, batches by (group, indices, epoch), and a fingerprint.

    Row ``i`` of ``batch(group, indices, epoch)`` must depend only on ``(group, indices[i], epoch)``, not
    on the other rows: a process of a multi-process run asks for its rows of each batch only."""

    group_sizes: tuple[int, ...]

    def batch(self, group: int, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]: ...

    def fingerprint(self) -> str: ...


class BatchPlan:
    """The (group, example indices, epoch) of each step, for `group_sizes` and a fixed batch size."""

    def __init__(self, group_sizes: Sequence[int], batch_size: int, seed: int):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.group_sizes = tuple(int(n) for n in group_sizes)
        if not any(self.group_sizes):
            raise ValueError("no training examples")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.batches_per_group = tuple(-(-n // self.batch_size) for n in self.group_sizes)
        self.steps_per_epoch = sum(self.batches_per_group)
        self._cache: tuple[int, list[tuple[int, np.ndarray]]] | None = None

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The batches of one epoch, in order: (group, indices [batch_size])."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, int(epoch)])
        batches: list[tuple[int, np.ndarray]] = []
        for group, (size, count) in enumerate(zip(self.group_sizes, self.batches_per_group)):
            if size == 0:
                continue
            order = rng.permutation(size)
            rows = order[np.arange(count * self.batch_size) % size].reshape(count, self.batch_size)
            batches.extend((group, row) for row in rows)
        shuffled = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, shuffled)
        return shuffled

    def at(self, step: int) -> tuple[int, np.ndarray, int]:
        """(group, indices, epoch) of training step `step` (0-based)."""
        epoch, position = divmod(int(step), self.steps_per_epoch)
        group, indices = self.epoch_plan(epoch)[position]
        return group, indices, epoch


def fingerprint_arrays(arrays: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]], *extra) -> str:
    """A short sha256 of arrays (and extra values), to check a resumed run sees the same data."""
    digest = hashlib.sha256()
    groups = [arrays] if isinstance(arrays, Mapping) else list(arrays)
    for group in groups:
        for name in sorted(group):
            array = np.ascontiguousarray(group[name])
            digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    for value in extra:
        digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


class ArraySource:
    """Fixed example arrays per group (every array of a group has the same first dimension)."""

    def __init__(self, groups: Sequence[Mapping[str, np.ndarray]]):
        self.groups = [dict(group) for group in groups]
        sizes = []
        for index, group in enumerate(self.groups):
            lengths = {name: len(array) for name, array in group.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"group {index}: arrays differ in length: {lengths}")
            sizes.append(next(iter(lengths.values())) if lengths else 0)
        self.group_sizes = tuple(sizes)
        # The most scored positions of any row: a decoder-only step computes the head's logits only at that
        # many positions per row (`genir_jax.training.loop.causal_lm_loss`); None when nothing says.
        masks = [group["target_mask"] for group in self.groups if len(group.get("target_mask", ()))]
        self.scored_per_row = max(int(np.asarray(m).sum(axis=1).max()) for m in masks) if masks else None
        self._fingerprint: str | None = None

    def batch(self, group: int, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        return {name: array[indices] for name, array in self.groups[group].items()}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_arrays(self.groups)
        return self._fingerprint
