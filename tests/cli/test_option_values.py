"""Numeric options are validated in one place (`genir_jax.base.options`): every integer and float option of every
command refuses an out-of-range, non-finite or non-numeric value while parsing, exit 2 naming the flag and its
range; multi-process settings that contradict each other name the real problem."""

from __future__ import annotations

import argparse

import pytest

from genir_jax.base.options import bounded_float, bounded_int
from genir_jax.cli.main import COMMANDS, build_parser, main
from genir_jax.scale.distributed import DistributedError, settings_from


def _numeric_options():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    for name in COMMANDS:
        for action in commands.choices[name]._actions:  # noqa: SLF001
            if action.option_strings and getattr(action.type, "__name__", "") in ("int", "float", "integer",
                                                                                  "number"):
                yield name, action


OPTIONS = [(name, action.option_strings[-1], action.type) for name, action in _numeric_options()]


def test_no_numeric_option_is_a_bare_int_or_float():
    bare = [(name, flag) for name, flag, kind in OPTIONS if kind in (int, float)]
    assert not bare and len(OPTIONS) > 30


# Numeric options without an upper bound, and why no value of theirs makes memory or time grow without limit.
UNBOUNDED = {
    "--max-documents": "a cap: it only ever reduces the corpus",
    "--semantic-c": "the largest leaf cluster: a larger value splits less",
    "--devices": "checked against the devices there are",
    "--process-id": "checked against --num-processes",
    "--total-queries": "plan: a count in the projected time's arithmetic, nothing allocated",
    "--learning-rate": "not a size", "--k1": "not a size",
    "--heatmap-vmax": "a colour scale: not a size",
}


def test_every_size_like_option_has_an_upper_bound():
    """Every numeric option whose value sets how much is allocated or computed (batch sizes, chunks, steps,
    lengths, result counts, beams, multipliers) has an upper bound; the others are listed with the reason."""
    unbounded = sorted({flag for _, flag, kind in OPTIONS if getattr(kind, "high", None) is None})
    assert unbounded == sorted(UNBOUNDED)


@pytest.mark.parametrize("command, flag", [(name, flag) for name, flag, _ in OPTIONS])
@pytest.mark.parametrize("value", ["-1", "nan", "x"])
def test_every_numeric_option_refuses_a_bad_value_naming_the_flag(capsys, command, flag, value):
    assert main([command, f"{flag}={value}"]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be " in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--seed", "-1"], "--seed must be in 0..4294967295, got -1"),
    (["prepare-data", "--seed=-1"], "--seed must be in 0..4294967295, got -1"),
    (["train", "--seed=-1"], "--seed must be in 0..4294967295, got -1"),
    (["train", "--learning-rate", "0"], "--learning-rate must be a finite number > 0, got 0"),
    (["prepare-data", "--val-fraction", "1"], "--val-fraction must be a finite number in [0, 1), got 1"),
    (["evaluate", "--num-beams", "0"], "--num-beams must be in 1..1024, got 0"),
    (["sweep", "--num-processes", "0"], "--num-processes must be in 1..65536, got 0"),
    (["evaluate", "--batch-size", "2.5"], "--batch-size must be an integer in 1..65536, got '2.5'"),
    (["sweep", "--coordinator-timeout", "86401"], "--coordinator-timeout must be in 1..86400, got 86401"),
    # size-like options beyond their upper bound
    (["evaluate", "--max-length", "8193"], "--max-length must be in 1..8192, got 8193"),
    (["bm25", "--k", "10001"], "--k must be in 1..10000, got 10001"),
    (["sweep", "--query-chunk", "65537"], "--query-chunk must be in 1..65536, got 65537"),
    (["train", "--steps", "2147483648"], "--steps must be in 1..2147483647, got 2147483648"),
    (["train", "--ratio", "1025"], "--ratio must be in 0..1024, got 1025"),
    (["evaluate", "--num-beams", "1025"], "--num-beams must be in 1..1024, got 1025"),
    (["plan", "--total-configs", "1048577"], "--total-configs must be in 1..1048576, got 1048577"),
])
def test_messages_name_flag_and_range(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bounds_at_the_edges():
    assert bounded_int(1, 3)("3") == 3 and bounded_float(0, 1)("1") == 1.0
    for parse, text in ((bounded_int(1, 3), "4"), (bounded_float(0, 1, open_high=True), "1"),
                        (bounded_float(0, open_low=True), "0"), (bounded_float(0), "inf")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=0, process_id=0), "--num-processes must be >= 1, got 0"),
    (dict(num_processes=2, process_id=2), "--process-id 2 must be in 0..1"),
    (dict(num_processes=2, process_id=0, coordinator="host:0"), "port in 1..65535"),
    (dict(num_processes=2, process_id=0, coordinator="host:70000"), "port in 1..65535"),
])
def test_multi_process_settings_name_the_real_problem(kwargs, message):
    with pytest.raises(DistributedError, match=message.replace(".", r"\.")):
        settings_from(**{"coordinator": "host:1234", **kwargs}, environ={})
