"""Numeric command-line options validated in one place: argparse ``type=`` callables with ranges.

Every integer and float option of every command (and of the experiments' entry points) takes its type from
here, so a bad value is refused while parsing, naming the flag and the range ("--seed must be >= 0, got -1"),
before anything is loaded or computed. Values that depend on another option (a process id below
``--num-processes``) are checked after parsing by the library that takes them. `MODEL_TYPES` (the values of
``train`` / ``evaluate --model-type``) lives here too, so the commands can offer it without loading the library.
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
    parse.high = high  # what `tests/cli/test_option_values.py` checks every size-like option has
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
    parse.high = high
    return parse


MODEL_TYPES = ("encoder-decoder", "decoder")  # T5, or decoder-only (GPT-2 / Llama / Qwen2): the reference's names

MAX_SEED = 2**32 - 1  # numpy's and JAX's seeds: unsigned 32-bit
SEED = bounded_int(0, MAX_SEED)
POSITIVE = bounded_int(1)  # counts with no size behind them (a cap such as --max-documents, --devices)
NON_NEGATIVE = bounded_int(0)  # "0: off / as is" options without a size behind them (--process-id)

# Upper bounds of the options whose value sets how much is allocated or computed, so that no value makes
# memory or time grow without limit (each far beyond what a T5 run needs):
MAX_STEPS = 2**31 - 1     # updates, and step intervals: the training state counts steps in int32
MAX_ROWS = 1 << 16        # rows per step: batch sizes, query and config chunks
MAX_TOKENS = 8192         # tokens per input or target (T5 was pre-trained at 512)
MAX_LISTED = 10_000       # results per query or listed: --k, --top, --queries-per-file
MAX_BEAMS = 1024          # beams of a beam search (each keeps a row of the decoder)
MAX_FACTOR = 1024         # multipliers of the data: --ratio, clusters per level, removed-document models
MAX_PROCESSES = 65_536    # processes of a multi-process run
# The most configurations one sweep may hold (`genir_jax.interp.sweep`): its per-config tables (a few
# integers per term, and the labels: about 1.4 KB a config for one grid, 2.2 KB for a product of three) are
# built on the host before any chunking, so this bounds them (to about 2 GB) and the time to build them;
# every MLP neuron of T5-large's both stacks (196,608) and of T5-3B's decoder (393,216) fits.
MAX_CONFIGS = 1 << 20

STEPS = bounded_int(1, MAX_STEPS)
STEP_INTERVAL = bounded_int(0, MAX_STEPS)  # 0: off
ROWS = bounded_int(1, MAX_ROWS)
TOKENS = bounded_int(1, MAX_TOKENS)
LISTED = bounded_int(1, MAX_LISTED)
BEAMS = bounded_int(1, MAX_BEAMS)
FACTOR = bounded_int(1, MAX_FACTOR)
