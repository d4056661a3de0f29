"""Deterministic train / validation / test splits of grouped items.

Items come in groups (SQuAD: the questions of one paragraph; NQ: one group of documents; Cranfield: one
group of queries). How many items of each group go to validation and test is decided by *cumulative
rounding*, which is exact overall and fair per group:

- after the groups 1..p, holding C_p items together, validation should hold ``round_half_up(f_val * C_p)``
  items and test ``round_half_up(f_test * C_p)`` (fractions are taken exactly: 0.1 is 1/10);
- group p gives each split the difference between that target and what the split already holds, but never
  more than ``size - min_train`` items together (``min_train = 1`` keeps a training item in every group);
  when both want more than fits, slots go one at a time to the split with the larger shortfall (ties:
  validation first); a shortfall is carried to the next groups, because the targets are cumulative.

So a single group of n items gets ``round_half_up(f * n)`` validation and test items, and with many small
groups the totals still match the fractions (SQuAD: 10570 questions -> 1057 / 1057 / 8456).

Which items: one ``numpy.random.default_rng(seed)`` draws ``rng.permutation(size)`` for every group in
order (also for groups that give nothing away, so the stream never depends on the counts); the first
`val` positions of the permutation go to validation, the next `test` to test, the rest to training.
Within each split, items keep their original order.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence, TypeVar

import numpy as np

from genir_jax.base.errors import GenIRError

T = TypeVar("T")
SPLITS = ("train", "val", "test")


def as_fraction(value: float | str | Fraction, name: str) -> Fraction:
    """An exact fraction of a float given in decimal (0.1 -> 1/10), checked to lie in [0, 1)."""
    try:
        fraction = Fraction(str(value)) if isinstance(value, float) else Fraction(value)
    except (ValueError, OverflowError, TypeError, ZeroDivisionError):  # nan, inf, not a number
        raise GenIRError(f"{name} must be a number in [0, 1), got {value}") from None
    if not 0 <= fraction < 1:
        raise GenIRError(f"{name} must be in [0, 1), got {value}")
    return fraction


def round_half_up(value: Fraction) -> int:
    """Round to the nearest integer, halves up (an exact Fraction in, no float error)."""
    return int((value + Fraction(1, 2)).__floor__())


def allocate(sizes: Sequence[int], val_fraction, test_fraction, min_train: int = 0) -> list[tuple[int, int, int]]:
    """(train, val, test) counts per group by cumulative rounding (see the module docstring)."""
    f_val = as_fraction(val_fraction, "val_fraction")
    f_test = as_fraction(test_fraction, "test_fraction")
    if f_val + f_test >= 1:
        raise GenIRError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    counts = []
    seen = given_val = given_test = 0
    for size in sizes:
        seen += size
        want_val = max(0, round_half_up(f_val * seen) - given_val)
        want_test = max(0, round_half_up(f_test * seen) - given_test)
        capacity = max(0, size - min_train)
        if want_val + want_test > capacity:
            val = test = 0
            for _ in range(capacity):
                if want_val - val >= want_test - test:
                    val += 1
                else:
                    test += 1
            want_val, want_test = val, test
        given_val += want_val
        given_test += want_test
        counts.append((size - want_val - want_test, want_val, want_test))
    return counts


def split_groups(groups: Sequence[Sequence[T]], val_fraction, test_fraction, seed: int = 0,
                 min_train: int = 0) -> dict[str, list[T]]:
    """``{"train": [...], "val": [...], "test": [...]}``: the items of `groups` split as documented above."""
    rng = np.random.default_rng(seed)
    labels: list[list[str]] = []
    for group, (_, val, test) in zip(groups, allocate([len(g) for g in groups], val_fraction, test_fraction,
                                                        min_train)):
        order = rng.permutation(len(group))
        group_labels = ["train"] * len(group)
        for position, item in enumerate(order):
            if position < val:
                group_labels[item] = "val"
            elif position < val + test:
                group_labels[item] = "test"
        labels.append(group_labels)
    result: dict[str, list[T]] = {name: [] for name in SPLITS}
    for group, group_labels in zip(groups, labels):
        for item, label in zip(group, group_labels):
            result[label].append(item)
    return result
