"""What `genir-jax reproduce` prints for its training steps, and that --tensorboard reaches their training."""

from __future__ import annotations

import pathlib

import genir_jax.training.dsi as dsi
from genir_jax.paper import reproduce as rp
from genir_jax.training.metric_sinks import TensorBoard

SUMMARY = {"docids": "atomic", "best": {"step": 4, "Hits@1": 0.5, "queries": 8},
           "final": {"val": {"Hits@1": 0.5, "queries": 8}, "test": {"Hits@1": 0.25, "queries": 8}},
           "examples_per_s": 10.0, "train_seconds": 1.0, "wall_seconds": 3.0}


def test_train_step_prints_labelled_lines_and_passes_tensorboard(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_train_dsi(data, base, output, **options):
        calls.append((output, options["sinks"]))
        return SUMMARY

    monkeypatch.setattr(dsi, "train_dsi", fake_train_dsi)
    layout = rp.Layout(tmp_path)
    for tensorboard in (False, True):
        settings = rp.Settings(dataset="squad-dev", preset="tiny", base=str(tmp_path / "t5"), tensorboard=tensorboard)
        step = next(step for step in rp.steps(settings) if step.name == "train-full")
        step.run(layout, settings)
    assert calls[0][1] == []
    assert [type(sink) for sink in calls[1][1]] == [TensorBoard]
    assert calls[1][1][0].directory == str(pathlib.Path(layout.full) / "tensorboard")
    out = capsys.readouterr().out.splitlines()
    assert out[:5] == ["best validation (step 4): Hits@1 50.00 (n=8 queries)", "validation: Hits@1 50.00 (n=8 queries)",
                       "test: Hits@1 25.00 (n=8 queries)", "training: 1.0 s in steps (10.0 examples/s), 3.0 s in all",
                       f"model: {layout.full}"]
