"""The one way genir-jax cuts a query set into fixed-size batches.

Every batched loop (sweeps, attribution, caches and means, reading analyses, retrieval) uses `batches`:
batches have exactly `batch_size` rows, so each jitted function compiles once per shape; the last batch is
filled with copies of its own first row. Copies are real queries, so padded rows stay finite (no
all-masked attention rows) and callers simply keep the first ``len(batch.rows)`` results.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch: `rows` are the indices of its real queries (in order), `arrays` the inputs cut to those
    rows and padded to `batch_size` rows with copies of the batch's first row."""

    rows: np.ndarray
    arrays: tuple[np.ndarray, ...]

    @property
    def size(self) -> int:
        """Number of real (not padding) rows."""
        return len(self.rows)


def pad_rows(array: np.ndarray, size: int) -> np.ndarray:
    """`array` ([n, ...], n >= 1) filled up to `size` rows with copies of its first row."""
    missing = size - array.shape[0]
    if missing < 0:
        raise ValueError(f"pad_rows: {array.shape[0]} rows do not fit in {size}")
    if missing == 0:
        return array
    return np.concatenate([array, np.repeat(array[:1], missing, axis=0)], axis=0)


def batches(arrays: Sequence[np.ndarray], batch_size: int) -> Iterator[Batch]:
    """Consecutive batches of `batch_size` rows over arrays that share their first axis."""
    arrays = tuple(np.asarray(a) for a in arrays)
    if not arrays:
        raise ValueError("batches: no arrays given")
    count = arrays[0].shape[0]
    if any(a.shape[0] != count for a in arrays):
        raise ValueError(f"batches: arrays disagree on the number of rows: {[a.shape[0] for a in arrays]}")
    if batch_size < 1:
        raise ValueError(f"batches: batch_size must be >= 1, got {batch_size}")
    for start in range(0, count, batch_size):
        rows = np.arange(start, min(start + batch_size, count))
        yield Batch(rows, tuple(pad_rows(a[rows], batch_size) for a in arrays))


def num_batches(count: int, batch_size: int) -> int:
    return -(-count // batch_size)
