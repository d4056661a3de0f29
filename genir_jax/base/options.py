"""Numeric command-line options validated in one place: argparse ``type=`` callables with ranges.

Every integer and float option of every command (and of the experiments' entry points) takes its type from
here, so a bad value is refused while parsing, naming the flag and the range ("--seed must be >= 0, got -1"),
before anything is loaded or computed. Values that depend on another option (a process id below
``--num-processes``) are checked after parsing by the library that takes them.
"""

from __future__ import annotations

import argparse
import math


def _interval(low, high, open_low: bool, open_high: bool) -> str:
    if high is None:
        return f"{'>' if open_low else '>='} {low}"
    if isinstance(low, int) and isinstance(high, int) and not (open_low or open_high):
        return f"in {low}..{high}"
    return f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"


def bounded_int(low: int, high: int | None = None):
    """An argparse type: an integer in ``low..high`` (``high`` None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {_interval(low, high, False, False)}, "
                                             f"got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_interval(low, high, False, False)}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def bounded_float(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False):
    """An argparse type: a finite number from ``low`` to ``high`` (``high`` None: no upper bound); `open_low` /
    `open_high` exclude the bound itself (a learning rate > 0, a fraction in [0, 1))."""

    def parse(text: str) -> float:
        where = _interval(low, high, open_low, open_high)
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {where}, got {text!r}") from None
        below = value <= low if open_low else value < low
        above = high is not None and (value >= high if open_high else value > high)
        if not math.isfinite(value) or below or above:
            raise argparse.ArgumentTypeError(f"must be a finite number {where}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


SEED = bounded_int(0, 2**32 - 1)  # numpy's and JAX's seeds: unsigned 32-bit
POSITIVE = bounded_int(1)  # counts, batch sizes, steps, beams, top-k
NON_NEGATIVE = bounded_int(0)  # "0: off / as is" options (warmup, eval interval, ratio)
