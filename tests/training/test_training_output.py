"""What training and evaluation print: labelled lines by default, JSON lines with --json, TensorBoard event
files with --tensorboard, integer counts, and quiet libraries (no transformers advisory without torch, no
bm25s debug lines) unless -v."""

from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from genir_jax.training.metric_sinks import TENSORBOARD_DIR, JsonLines, TensorBoard
from genir_jax.training.reporting import metrics_line, training_lines
from genir_jax.training.trainer import evaluate_everywhere
from tests.training.test_training_cli import make_base, make_prepared

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# Runs the command line as the console command does, in a Python where `import torch` fails (a user's
# machine without PyTorch, where transformers logs its advisory when imported).
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; from genir_jax.cli.main import main; "
                 "sys.argv[0] = 'genir-jax'; sys.exit(main())")
ADVISORY = "PyTorch was not found"


def _command(*argv) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *map(str, argv)], capture_output=True, text=True,
                            cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_scalars(directory: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `directory`: tag -> [(step, value), ...], read from the
    TFRecord framing (length, crc, Event protobuf, crc) with tensorboardX's protobufs."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_metrics_line_labels_percentages_and_integer_counts():
    line = metrics_line("validation", {"Hits@1": 0.1234, "Hits@10": 0.5, "queries": 86, "queries_per_s": 12.345})
    assert line == "validation: Hits@1 12.34 Hits@10 50.00 (n=86 queries, 12.3 queries/s)"
    assert metrics_line("best validation (step 3)", {"step": 3, "val_loss": 2.5, "queries": 64.0}) == \
        "best validation (step 3): val_loss 2.5000 (n=64 queries)"
    lines = training_lines({"best": None, "final": {"val": {"Hits@1": 1.0, "queries": 4}}, "train_seconds": 1.0,
                            "examples_per_s": None, "wall_seconds": 2.0}, "out")
    assert lines == ["validation: Hits@1 100.00 (n=4 queries)", "training: 1.0 s in steps, 2.0 s in all",
                     "model: out"]
    assert training_lines(dict.fromkeys(("best", "final", "train_seconds", "wall_seconds"))) == []


def test_validation_keeps_the_query_count_an_integer():
    result = evaluate_everywhere(lambda params: {"Hits@1": np.float32(0.5), "queries": 64}, None)
    assert result == {"Hits@1": 0.5, "queries": 64} and isinstance(result["queries"], int)


def test_sinks_write_json_lines_and_tensorboard_scalars(tmp_path, capsys):
    records = [{"event": "train", "step": 2, "epoch": 1.0, "loss": 10.5, "examples_per_s": None},
               {"event": "eval", "step": 2, "Hits@1": 0.25, "queries": 16, "best": True},
               {"event": "train", "step": 4, "epoch": 2.0, "loss": 9.75, "examples_per_s": 100.0}]
    sink = TensorBoard(tmp_path)
    assert not (tmp_path / TENSORBOARD_DIR).exists()  # nothing before the first record
    for record in records:
        sink(record)
        JsonLines()(record)
    sink.close()
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == records
    scalars = read_scalars(tmp_path / TENSORBOARD_DIR)
    assert scalars["train/loss"] == [(2, 10.5), (4, 9.75)]
    assert scalars["eval/Hits_1"] == [(2, 0.25)] and scalars["eval/queries"] == [(2, 16.0)]
    assert "eval/best" not in scalars and scalars["train/examples_per_s"] == [(4, 100.0)]


def test_libraries_are_quiet_unless_verbose():
    """transformers' import-time advisory (torch missing) and bm25s' debug lines (with a root handler, as
    JAX's absl logging sets up) appear only with verbose logging."""
    code = ("import sys, logging; sys.modules['torch'] = None\n"
            "from genir_jax.base.verbosity import set_verbosity\n"
            "set_verbosity(sys.argv[1] == 'verbose'); logging.basicConfig()\n"
            "import transformers, bm25s\n"
            "bm25s.BM25().index([['a', 'b'], ['b', 'c']], show_progress=False)\n")
    for mode, shown in (("quiet", False), ("verbose", True)):
        err = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, cwd=REPO_ROOT,
                             check=True).stderr
        assert (ADVISORY in err) is shown and ("Building index from tokens" in err) is shown, err


def test_bm25_command_is_quiet_and_labelled_and_verbose_shows_debug(tmp_path):
    prepared = make_prepared(tmp_path / "prepared")
    quiet = _command("bm25", "--prepared", prepared, "-o", tmp_path / "quiet")
    assert "bm25s" not in quiet.stderr and ADVISORY not in quiet.stderr
    assert "Split strings" not in quiet.stderr and "Create Vocab" not in quiet.stderr  # one bar: retrieval
    assert quiet.stdout.splitlines() == [
        "test: Hits@1 100.00 Hits@10 100.00 Recall@5 100.00 MRR@10 100.00 nDCG@10 100.00 (n=16 queries)",
        f"outputs: {tmp_path / 'quiet'}"]
    verbose = _command("-v", "bm25", "--prepared", prepared, "-o", tmp_path / "verbose", "--json")
    assert "DEBUG:bm25s: Building index from tokens" in verbose.stderr
    assert json.loads(verbose.stdout)["queries"] == 16


@pytest.mark.slow  # two tiny training runs in subprocesses: about a minute on 2 cores
def test_train_prints_labelled_lines_or_json_lines_and_writes_tensorboard(tmp_path, t5_tokenizer):
    prepared = make_prepared(tmp_path / "prepared")
    base = make_base(tmp_path / "base", t5_tokenizer)
    common = ["train", "--data", prepared, "--base", base, "--preset", "tiny", "--steps", "4", "--eval-every", "2",
              "--checkpoint-every", "4", "--log-every", "1"]

    quiet = _command(*common, "-o", tmp_path / "quiet")
    assert ADVISORY not in quiet.stderr and "compiling the step" in quiet.stderr
    assert "evaluating the best model" in quiet.stderr
    lines = quiet.stdout.splitlines()
    assert not any(line.lstrip().startswith(("{", "}", '"')) for line in lines), quiet.stdout
    assert lines[0].startswith("best validation (step ") and lines[0].endswith("(n=16 queries)")
    assert lines[1].startswith("validation: Hits@1 ") and lines[2].startswith("test: Hits@1 ")
    assert lines[-1] == f"model: {tmp_path / 'quiet'}"
    assert not (tmp_path / "quiet" / TENSORBOARD_DIR).exists()

    run = tmp_path / "json"
    loud = _command(*common, "-o", run, "--json", "--tensorboard", "--no-progress")
    printed = [json.loads(line) for line in loud.stdout.splitlines()]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert printed[:-1] == logged and [r["step"] for r in logged if r["event"] == "train"] == [1, 2, 3, 4]
    assert printed[-1]["event"] == "summary" and printed[-1]["final"]["val"]["queries"] == 16
    assert printed[-1]["best"]["queries"] == 16  # an integer, as in "final"
    scalars = read_scalars(run / TENSORBOARD_DIR)
    assert scalars["train/loss"] == [(r["step"], pytest.approx(r["loss"])) for r in logged if r["event"] == "train"]
    assert scalars["eval/Hits_1"] == [(r["step"], pytest.approx(r["Hits@1"])) for r in logged if r["event"] == "eval"]
