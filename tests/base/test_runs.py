"""One output folder, one run (`genir_jax.base.runs`) and interrupts honoured at commits
(`genir_jax.base.interrupts`, `genir_jax.base.io`)."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from genir_jax.base import interrupts, io, runs
from genir_jax.base.errors import GenIRError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hold_lock(path):
    """A process that holds `path`'s run lock until it is killed."""
    code = ("import sys, time\nfrom genir_jax.base.runs import output_lock\n"
            f"with output_lock({str(path)!r}):\n    print('locked', flush=True)\n    time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=ROOT)
    assert process.stdout.readline().strip() == b"locked"
    return process


def test_a_held_lock_refuses_a_second_run_and_dies_with_its_process(tmp_path):
    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        with pytest.raises(GenIRError, match=rf"-o/--output {out}: another genir-jax run \(process {holder.pid}\) is "
                                             "writing into this folder"):
            with runs.output_lock(out):
                pass
        with pytest.raises(GenIRError):  # a link to the folder is the same folder
            os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-link")
            with runs.output_lock(tmp_path.parent / f"{tmp_path.name}-link" / "out"):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
        (tmp_path.parent / f"{tmp_path.name}-link").unlink(missing_ok=True)
    with runs.output_lock(out):
        with runs.output_lock(out):  # re-entrant in one process
            pass
    assert list(tmp_path.iterdir()) == []  # the lock lives outside the output and its parent
    assert not os.path.exists(runs.lock_file(out))  # and is removed after use


def test_claim_output_tells_own_outputs_from_another_runs(tmp_path):
    out = tmp_path / "out"
    outputs = ("run.json", "table.csv", "heatmap_*.png")
    assert runs.claim_output(out, "run.json", {"mode": "zero"}, outputs) == []  # no folder
    out.mkdir()
    (out / "config.json").write_text("{}")  # not an output of this command (a checkpoint the folder holds)
    assert runs.claim_output(out, "run.json", {"mode": "zero"}, outputs) == []
    (out / "run.json").write_text(json.dumps({"settings": {"mode": "zero", "sites": ("a",)}}))
    (out / "heatmap_rank.png").write_bytes(b"png")
    assert runs.claim_output(out, "run.json", {"mode": "zero", "sites": ("a",)}, outputs) == []  # the same run
    with pytest.raises(GenIRError, match=r"-o/--output .*out: holds the outputs of another run \(mode: stored "
                                         r"\"zero\", now \"mean\"\); pass --overwrite"):
        runs.claim_output(out, "run.json", {"mode": "mean", "sites": ["a"]}, outputs)
    assert runs.claim_output(out, "run.json", {"mode": "mean"}, outputs, overwrite=True) == ["heatmap_rank.png",
                                                                                            "run.json"]
    (out / "run.json").unlink()
    with pytest.raises(GenIRError, match=r"holds the outputs of another run \(heatmap_rank.png but no run.json"):
        runs.claim_output(out, "run.json", {"mode": "zero"}, outputs)


def test_atomic_directory_removes_the_stale_outputs_it_is_given(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("old.csv", "keep.json", "same.json"):
        (out / name).write_text("old")
    (out / "old_dir").mkdir()
    with io.atomic_directory(out, stale=["old.csv", "old_dir", "same.json", "gone.txt"]) as staging:
        with open(os.path.join(staging, "same.json"), "w") as handle:
            handle.write("new")
    assert sorted(p.name for p in out.iterdir()) == ["keep.json", "same.json"]
    assert (out / "same.json").read_text() == "new"


def test_nothing_is_committed_after_an_interrupt_some_handler_swallowed(tmp_path):
    interrupts.clear_interrupt()
    try:
        with interrupts.console_interrupts():
            interrupts.note_interrupt()  # what the SIGINT handler does before its KeyboardInterrupt is swallowed
            with pytest.raises(KeyboardInterrupt):
                with io.atomic_directory(tmp_path / "out") as staging:
                    with open(os.path.join(staging, "a.json"), "w") as handle:
                        handle.write("{}")
            with pytest.raises(KeyboardInterrupt):
                io.write_text(tmp_path / "b.txt", "text")
        assert list(tmp_path.iterdir()) == []
        # outside the command line (a library user's notebook) a past interrupt does not block later commits
        io.write_text(tmp_path / "b.txt", "text")
        assert (tmp_path / "b.txt").read_text() == "text"
    finally:
        interrupts.clear_interrupt()


def test_an_interrupt_dropped_in_a_gc_callback_is_raised_again(capsys):
    """What JAX's `_xla_gc_callback` did to a Ctrl-C: the KeyboardInterrupt raised inside a gc callback is
    printed as "Exception ignored" and lost. Under `console_interrupts` it reaches the ordinary code."""
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs here, inside the callback
                pass

    interrupts.clear_interrupt()
    before = signal.getsignal(signal.SIGINT)  # Python's default handler; SIG_IGN when started in the background
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts.console_interrupts():
                gc.callbacks.append(callback)  # here: a collection before the block would fire it unwatched
                gc.collect()
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    time.sleep(0.01)
    finally:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)
        interrupts.clear_interrupt()
    assert fired and "Exception ignored" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before  # the handler found on entry is back


def test_the_lock_file_does_not_depend_on_the_environment(tmp_path, monkeypatch):
    """Two sessions of one user with other $TMPDIR / $XDG_RUNTIME_DIR must find the same lock."""
    import tempfile

    first = runs.lock_file(tmp_path / "out")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert runs.lock_file(tmp_path / "out") == first
    assert runs.lock_file(tmp_path / "other") != first
