"""Ctrl-C: SIGINT during a command's work exits 130 with one line, no traceback and no (partial) output;
SIGINT during the commit of an output directory lets the commit finish, then interrupts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from genir_jax.base import io


def test_sigint_during_work_exits_130_without_traceback_or_output(dsi_root, tmp_path):
    """The console command (`python -m genir_jax.cli.main`, argv from sys.argv) is interrupted once its progress
    bar shows that it is computing."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "genir_jax.cli.main", "patch-stages", "-c", str(dsi_root / "dsi"), "--val-queries",
               str(dsi_root / "val.json"), "--correct-valid", str(dsi_root / "correct.json"), "-o", str(out),
               "--stages", "thirds", "--allow-incorrect"]
    env = dict(os.environ, GENIR_JAX_CACHE="off", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    seen = b""
    deadline = time.monotonic() + 120
    while b"|" not in seen and time.monotonic() < deadline:  # tqdm's bar: the work has started
        chunk = os.read(process.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert b"|" in seen, seen.decode(errors="replace")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    stderr = (seen + stderr).decode(errors="replace")
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "genir-jax patch-stages: interrupted" in stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging directory left


def test_sigint_during_a_commit_finishes_it_then_interrupts(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_replace = os.replace
    calls = []

    def replace_and_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives between the first and the second file
        return real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", replace_and_interrupt)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_directory(out) as staging:
            for name in ("a.json", "b.json", "c.json"):
                with open(os.path.join(staging, name), "w") as handle:
                    handle.write("{}")
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json", "c.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_sigint_in_process_returns_130(dsi_root, tmp_path, monkeypatch, capsys):
    """`genir_jax.cli.main.main([...])` returns 130 (no os._exit when called with an argument list)."""
    from genir_jax.analysis import stage_patching
    from genir_jax.cli.main import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(stage_patching, "run_stage_patching", interrupted)
    assert main(["patch-stages", "-c", str(dsi_root / "dsi"), "--val-queries", str(dsi_root / "val.json"),
                 "--correct-valid", str(dsi_root / "correct.json"), "-o", str(tmp_path / "out"), "--stages", "thirds",
                 "--no-progress", "--allow-incorrect"]) == 130
    assert "interrupted" in capsys.readouterr().err and not (tmp_path / "out").exists()


COMMANDS = {
    "sweep": ["--sites", "decoder.*.cross_attn.hook_z[head]", "--allow-incorrect"],
    "patch-stages": ["--stages", "thirds", "--allow-incorrect"],
}
PAIRS_WARNING = "pairs are not correct"  # --allow-incorrect's line on the fixture's random model
OUTPUTS = {"sweep": "sweep.json", "patch-stages": "stages.json"}  # the last file a finished run commits


@pytest.mark.slow
@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigint_at_any_early_moment_exits_130_with_one_line_and_no_output(dsi_root, tmp_path, command):
    """Ctrl-C while Python loads the modules, while JAX starts, inside JAX's gc callback (where a KeyboardInterrupt
    used to be printed as "Exception ignored" and dropped, the command then finishing and writing its outputs)
    or in its exit clean-up: exit 130 with the one line and nothing written, or exit 0 with complete outputs
    when the command had truly finished."""
    env = dict(os.environ, GENIR_JAX_CACHE="off", PYTHONUNBUFFERED="1")
    seen = {}
    for delay in (0.05, 0.2, 0.5, 1.0, 2.0, 3.5):
        out = tmp_path / f"out-{delay}"
        argv = [command, "-c", str(dsi_root / "dsi"), "--val-queries", str(dsi_root / "val.json"), "--correct-valid",
                str(dsi_root / "correct.json"), "-o", str(out), "--no-progress", *COMMANDS[command]]
        # `python -m genir_jax.cli.main ARGV`, with the delay counted from the moment the interpreter has started
        # and imported the parent packages (a busy machine can take longer than the shortest delay to get there;
        # a Ctrl-C in Python's own start-up is Python's to report)
        code = ("import runpy, sys\nimport genir_jax.cli\nprint('started', flush=True)\n"
                f"sys.argv = ['-m'] + {argv!r}\nrunpy.run_module('genir_jax.cli.main', run_name='__main__', "
                "alter_sys=True)\n")
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env=env)
        assert process.stdout.readline().strip() == b"started"
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
        stderr = stderr.decode(errors="replace")
        seen[delay] = process.returncode
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, (delay, stderr[-3000:])
        if process.returncode == 130:
            lines = [line for line in stderr.strip().splitlines() if PAIRS_WARNING not in line]
            assert lines == [f"genir-jax {command}: interrupted"], (delay, stderr[-3000:])
            # nothing, or only the resumable store of a sweep that had finished chunks (a rerun resumes them)
            assert not out.exists() or os.listdir(out) == [".sweep-chunks"], (delay, sorted(os.listdir(out)))
        else:
            assert process.returncode == 0, (delay, process.returncode, stderr[-3000:])
            assert (out / OUTPUTS[command]).is_file(), delay
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]  # no staging left
    assert seen[0.05] == seen[0.2] == 130, seen
