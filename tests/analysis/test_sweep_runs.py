"""A whole sweep with its resumable store, run from Python (`genir_jax.analysis.sweep_runs`), writes what
`genir-jax sweep` writes; its option errors name the library's settings."""

from __future__ import annotations

import pytest

from genir_jax.analysis.sweep_runs import (
    SweepOptions, prepare_sweep, run_with_store, write_sweep_outputs,
)
from genir_jax.base.errors import SettingError
from genir_jax.cli.main import main

SITES = ["decoder.*.cross_attn.hook_z[head]", "encoder.hook_out"]


def test_library_sweep_writes_the_commands_results(dsi, tmp_path):
    root, _, _ = dsi
    paths = [str(root / "dsi"), str(root / "val.json"), str(root / "correct.json")]
    options = SweepOptions(sites=SITES, metrics=["rank", "logit"], mode="mean")
    prep = prepare_sweep(*paths, str(tmp_path / "library"), options, allow_incorrect=True, progress=False,
                         extra={"hits": [1, 10], "per_query": False, "method": "exact"})
    result, store = run_with_store(prep, [1, 10], per_query=False)
    write_sweep_outputs(prep, result, [1, 10], per_query=False)
    store.clear()
    assert result.sweep.size == 7

    command = ["sweep", "--checkpoint", paths[0], "--val-queries", paths[1], "--correct-valid", paths[2],
               "-o", str(tmp_path / "command"), "--no-progress", "--allow-incorrect", "--mode", "mean",
               "--metric", "rank,logit", *[arg for site in SITES for arg in ("--sites", site)]]
    assert main(command) == 0
    assert (tmp_path / "library" / "results.csv").read_text() == (tmp_path / "command" / "results.csv").read_text()
    assert sorted(p.name for p in (tmp_path / "library").iterdir()) == sorted(
        p.name for p in (tmp_path / "command").iterdir())


def test_option_errors_name_the_settings(dsi, tmp_path):
    root, _, _ = dsi
    paths = [str(root / "dsi"), str(root / "val.json"), str(root / "correct.json"), str(tmp_path / "out")]
    with pytest.raises(SettingError, match="^mode source needs source_model CHECKPOINT_DIR"):
        prepare_sweep(*paths, SweepOptions(sites=SITES, metrics=["rank"], mode="source"))
    with pytest.raises(SettingError, match="^metrics logit_diff needs foil runner-up"):
        prepare_sweep(*paths, SweepOptions(sites=SITES, metrics=["logit_diff"]))
    assert not (tmp_path / "out").exists()
