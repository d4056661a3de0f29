"""One output folder, one run: a second run into a folder another run is writing exits 2 naming it, and a run
with other settings into a finished run's folder is refused unless --overwrite, which leaves no file of the
earlier run (issue 24 class 9, issue 23 bug 2). Re-running or resuming the same run is not another run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from genir_jax.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SITES = ["--sites", "decoder.*.cross_attn.hook_z[head]"]


def _sweep(root, out, *extra):
    return ["sweep", "--checkpoint", str(root / "dsi"), "--val-queries", str(root / "val.json"), "--correct-valid",
            str(root / "correct.json"), "-o", str(out), "--no-progress", *SITES, *extra,
            "--allow-incorrect"]  # a random model: its pairs are relevant, not its top tokens


def _contents(out):
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_sweep_with_other_settings_is_refused_unless_overwrite(dsi_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_sweep(dsi_root, out, "--mode", "zero", "--per-query")) == 0
    first = _contents(out)
    assert "per_query.npz" in first
    capsys.readouterr()

    assert main(_sweep(dsi_root, out, "--mode", "mean")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out) in err and "holds the outputs of another run" in err
    assert 'mode: stored "zero", now "mean"' in err and "--overwrite" in err
    assert _contents(out) == first  # untouched

    assert main(_sweep(dsi_root, out, "--mode", "zero", "--per-query")) == 0  # the same run again: its own outputs
    assert sorted(_contents(out)) == sorted(first)

    assert main(_sweep(dsi_root, out, "--mode", "mean", "--overwrite")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["clean.json", "heatmap_logit.png", "heatmap_rank.png", "results.csv", "sweep.json"]  # no per_query
    settings = json.loads((out / "sweep.json").read_text())["settings"]
    assert settings["mode"] == "mean" and settings["per_query"] is False
    assert json.loads((out / "clean.json").read_text())["settings"] == settings


def test_a_sweep_into_its_checkpoint_folder_leaves_the_checkpoint_alone(dsi_root, tmp_path):
    """The reference's default output is the checkpoint directory: its files are not another run's outputs,
    and --overwrite never removes them."""
    import shutil

    checkpoint = tmp_path / "dsi"
    shutil.copytree(dsi_root / "dsi", checkpoint)
    before = sorted(p.name for p in checkpoint.iterdir())
    args = ["sweep", "--checkpoint", str(checkpoint), "--val-queries", str(dsi_root / "val.json"), "--correct-valid",
            str(dsi_root / "correct.json"), "--no-progress", *SITES, "--allow-incorrect"]  # a random model
    assert main(args) == 0
    assert main(args + ["--mode", "mean"]) == 2
    assert main(args + ["--mode", "mean", "--overwrite"]) == 0
    assert set(before) <= {p.name for p in checkpoint.iterdir()}


def test_a_killed_sweep_with_other_settings_restarts_with_overwrite(dsi_root, tmp_path, monkeypatch, capsys):
    from genir_jax.interp import sweep_store

    out = tmp_path / "out"
    original_put = sweep_store.DirectoryStore.put

    def dying_put(self, key, arrays):
        if self.puts:
            raise KeyboardInterrupt  # the kill, after one finished chunk
        original_put(self, key, arrays)

    monkeypatch.setattr(sweep_store.DirectoryStore, "put", dying_put)
    assert main(_sweep(dsi_root, out, "--mode", "zero", "--config-chunk", "2")) == 130
    monkeypatch.setattr(sweep_store.DirectoryStore, "put", original_put)
    assert sorted(p.name for p in out.iterdir()) == [".sweep-chunks"]
    assert main(_sweep(dsi_root, out, "--mode", "mean", "--config-chunk", "2")) == 2  # the store's own refusal
    assert "holds a partial run with other settings" in capsys.readouterr().err
    assert main(_sweep(dsi_root, out, "--mode", "mean", "--config-chunk", "2", "--overwrite")) == 0
    assert json.loads((out / "sweep.json").read_text())["settings"]["mode"] == "mean"


@pytest.mark.slow
def test_two_sweeps_at_once_into_one_folder(dsi_root, tmp_path, capsys):
    """The first sweep (another process) is held just before it commits; the second, started meanwhile into
    the same folder, exits 2 with one line naming it and writes nothing; the first then finishes whole."""
    out, go = tmp_path / "out", tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "from genir_jax.cli.commands import sweep\n"
        "write = sweep.write_sweep_outputs\n"
        "def held(*args, **kwargs):\n"
        "    print('computed', flush=True)\n"
        f"    while not os.path.exists({str(go)!r}):\n"
        "        time.sleep(0.05)\n"
        "    return write(*args, **kwargs)\n"
        "sweep.write_sweep_outputs = held\n"
        "from genir_jax.cli.main import main\n"
        f"sys.exit(main({_sweep(dsi_root, out, '--mode', 'zero')!r}))\n"
    )
    env = dict(os.environ, GENIR_JAX_CACHE="off")
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                             env=env)
    try:
        assert first.stdout.readline().strip() == b"computed", first.stderr.read().decode()[-2000:]
        assert main(_sweep(dsi_root, out, "--mode", "mean")) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"-o/--output {out}: another genir-jax run (process {first.pid})" in err
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr.decode()[-2000:]
    assert json.loads((out / "sweep.json").read_text())["settings"]["mode"] == "zero"
    assert sorted(p.name for p in out.iterdir()) == ["clean.json", "heatmap_logit.png", "heatmap_rank.png",
                                                    "results.csv", "sweep.json"]
