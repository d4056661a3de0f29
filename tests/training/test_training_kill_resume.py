"""A `genir-jax train` run killed with SIGKILL mid-way and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.training.test_training_cli import make_base, make_prepared

STEPS = 60


def _state_arrays(run_dir, step: int) -> dict[str, np.ndarray]:
    """Every array of the checkpointed training state at `step`, by path."""
    import jax
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(str(run_dir / "checkpoints"), item_names=("state", "meta"))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        manager.close()
    flat = jax.tree_util.tree_flatten_with_path(restored)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _safetensors(path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def _evals(run_dir) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line["event"] == "eval"]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, t5_tokenizer):
    prepared = make_prepared(tmp_path / "prepared")
    base = make_base(tmp_path / "base", t5_tokenizer)
    args = [sys.executable, "-m", "genir_jax.cli.main", "train", "--data", str(prepared), "--base", str(base),
            "--preset", "tiny", "--steps", str(STEPS), "--checkpoint-every", "10", "--eval-every", "20",
            "--keep-checkpoints", "2", "--log-every", "5", "--no-progress"]
    env = dict(os.environ)  # same XLA_FLAGS (4 simulated devices) for every run

    uninterrupted = tmp_path / "uninterrupted"
    done = subprocess.run(args + ["-o", str(uninterrupted)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(args + ["-o", str(killed)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    first = killed / "checkpoints" / "10"
    deadline = time.monotonic() + 600
    while not first.is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    steps_on_disk = sorted(int(name) for name in os.listdir(killed / "checkpoints") if name.isdigit())
    assert steps_on_disk and steps_on_disk[-1] < STEPS
    assert not (killed / "model.safetensors").exists()

    resumed = subprocess.run(args + ["-o", str(killed), "--resume"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads((killed / "train.json").read_text())
    assert summary["resumed_from"] is not None and summary["resumed_from"] < STEPS

    final_a, final_b = _state_arrays(uninterrupted, STEPS), _state_arrays(killed, STEPS)
    assert final_a.keys() == final_b.keys()
    for name in final_a:  # parameters, optimizer state, step and PRNG key: bit for bit
        np.testing.assert_array_equal(final_a[name], final_b[name], err_msg=name)
    export_a, export_b = _safetensors(uninterrupted), _safetensors(killed)
    assert export_a.keys() == export_b.keys()
    for name in export_a:
        np.testing.assert_array_equal(export_a[name], export_b[name], err_msg=name)
    strip = [{k: v for k, v in e.items()} for e in _evals(uninterrupted)]
    assert strip == _evals(killed)  # the same validation curve, without duplicated lines


@pytest.mark.slow
def test_resume_from_a_truncated_checkpoint_falls_back_or_exits_2(tmp_path, t5_tokenizer):
    """`train --resume` whose newest checkpoint was truncated on disk resumes from the previous one (a warning,
    the same final state as an uninterrupted run); with every checkpoint truncated it exits 2 with one line
    naming the checkpoint directory, not an orbax traceback."""
    from tests.training.test_checkpointing import _truncate

    steps = 20
    prepared = make_prepared(tmp_path / "prepared")
    base = make_base(tmp_path / "base", t5_tokenizer)
    args = [sys.executable, "-m", "genir_jax.cli.main", "train", "--data", str(prepared), "--base", str(base),
            "--preset", "tiny", "--steps", str(steps), "--checkpoint-every", "10", "--keep-checkpoints", "2",
            "--log-every", "5", "--no-progress"]
    run = tmp_path / "run"
    done = subprocess.run(args + ["-o", str(run)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = _state_arrays(run, steps)
    _truncate(run, steps)

    resumed = subprocess.run(args + ["-o", str(run), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"checkpoints: newer checkpoint(s) unreadable (step {steps}: " in resumed.stderr
    assert json.loads((run / "train.json").read_text())["resumed_from"] == 10
    again = _state_arrays(run, steps)
    for name in reference:
        np.testing.assert_array_equal(reference[name], again[name], err_msg=name)

    for step in (10, steps):
        _truncate(run, step)
    failed = subprocess.run(args + ["-o", str(run), "--resume"], capture_output=True, text=True, timeout=600)
    lines = [line for line in failed.stderr.splitlines() if "Warning" not in line and line.strip()]
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert any(f"{run}/checkpoints: no checkpoint at or before step {steps} can be read" in line for line in lines)
