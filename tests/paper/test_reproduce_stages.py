"""`genir-jax reproduce --stages`: recorded in the run's settings (a mismatch is refused), passed to every
experiment that uses stages, and described in the report (how automatic stages were fitted)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from genir_jax.base.errors import GenIRError
from genir_jax.cli.main import main
from genir_jax.paper import reproduce as rp

STAGED_EXPERIMENTS = ("table3", "table4", "table5", "figure5", "table6")


def _fake_pipeline(monkeypatch, calls: list):
    """The pipeline as two cheap steps (so a run is instant): one analysis, and the report."""
    def analysis(layout, settings):
        calls.append(settings)

    monkeypatch.setattr(rp, "steps", lambda settings: [rp.Step("analysis", analysis),
                                                       rp.Step("report", lambda layout, settings: None, always=True)])


def test_cli_stages_are_recorded_in_the_settings_and_a_mismatch_is_refused(tmp_path, monkeypatch, capsys):
    calls: list = []
    _fake_pipeline(monkeypatch, calls)
    out = str(tmp_path / "run")
    assert main(["reproduce", "--out", out, "--stages", "thirds", "--no-progress"]) == 0
    assert calls[0].stages == "thirds"
    assert json.loads((tmp_path / "run" / ".steps" / "settings.json").read_text())["stages"] == "thirds"
    capsys.readouterr()
    for other in (["--stages", "auto"], ["--stages", "0-1,2-5"], []):
        assert main(["reproduce", "--out", out, *other, "--no-progress"]) == 2
        error = capsys.readouterr().err
        assert "holds a reproduction with other settings" in error and "stages: 'thirds' there" in error
    assert main(["reproduce", "--out", out, "--stages", "Thirds", "--no-progress"]) == 0  # the same, normalised
    # ranges are normalised and checked before anything runs
    assert main(["reproduce", "--out", str(tmp_path / "r2"), "--stages", "0 - 1, 2-5", "--no-progress"]) == 0
    assert json.loads((tmp_path / "r2" / ".steps" / "settings.json").read_text())["stages"] == "0-1,2-5"
    assert main(["reproduce", "--out", str(tmp_path / "r3"), "--stages", "3-1", "--no-progress"]) == 2
    assert "--stages: range '3-1' is reversed" in capsys.readouterr().err
    assert not (tmp_path / "r3").exists()


def test_a_folder_from_before_the_stages_setting_is_a_default_stages_run(tmp_path, monkeypatch):
    _fake_pipeline(monkeypatch, [])
    settings = rp.Settings(dataset="squad-dev", preset="tiny")
    rp.reproduce(tmp_path, settings, log=lambda *_: None)
    record = json.loads((tmp_path / ".steps" / "settings.json").read_text())
    assert record["stages"] is None
    del record["stages"]
    (tmp_path / ".steps" / "settings.json").write_text(json.dumps(record))
    rp.reproduce(tmp_path, settings, log=lambda *_: None)
    with pytest.raises(GenIRError, match="stages: None there, 'auto' here"):
        rp.reproduce(tmp_path, dataclasses.replace(settings, stages="auto"), log=lambda *_: None)


def test_stages_reach_every_experiment_that_uses_stages():
    """Each experiment that resolves stages has a `stages` setting, and the pipeline's step runs it with
    reproduce's --stages (others unchanged; no --stages keeps each experiment's default)."""
    from genir_jax.paper.experiments import registry

    found = {experiment.id: experiment for experiment in registry()}
    for name in STAGED_EXPERIMENTS:
        config = found[name].config
        assert config.stages is None
        assert rp.experiment_config(config, rp.Settings("squad-dev", "tiny", stages="thirds")).stages == "thirds"
        assert rp.experiment_config(config, rp.Settings("squad-dev", "tiny")) is config
    robustness = found["stage-robustness"].config
    assert rp.experiment_config(robustness, rp.Settings("squad-dev", "tiny", stages="thirds")) is robustness

    seen = []
    experiment = dataclasses.replace(found["table3"], runs={"patch-stages": lambda layout, settings, config:
                                                            seen.append(config.stages)})
    step, = rp.experiment_steps(experiment, False)
    step.run(rp.Layout(None), rp.Settings("squad-dev", "tiny", stages="0-1,2-5"))
    assert seen == ["0-1,2-5"]


def test_report_says_which_stages_and_how_they_were_fitted(tmp_path):
    from genir_jax.analysis.stages import Stages
    from genir_jax.paper.report import write_report

    layout = rp.Layout(tmp_path)
    fit = {"k": 2, "k_selection": {"criterion": "c", "chosen": 2, "values": {"2": -40.0, "3": -35.5}},
           "stability": {"resamples": 50, "seed": 0, "boundaries": [
               {"first_layer_of_stage": 2, "layer": 3, "agreement": 0.9, "distribution": {"2": 5, "3": 45}}],
               "all_boundaries_agree": 0.9, "k_distribution": {"2": 48, "3": 2}},
           "split": {"seed": 0, "fit_queries": 10, "held_out_queries": 11, "fit_rows": [], "held_out_rows": []}}
    layout.analysis("patch-stages").mkdir(parents=True)
    Stages(((0, 1, 2), (3, 4, 5)), "auto", 6, fit=fit).write(layout.analysis("patch-stages"))
    report = write_report(layout, rp.Settings("squad-dev", "tiny", stages="auto")).read_text()
    assert "Decoder stages: `--stages auto`." in report
    assert ("fitted on 10 of the correct queries (seed 0); every table that uses them reports the other 11 only"
            in report)
    assert "k = 2 chosen by a penalised cost (BIC, penalty doubled: k=2: -40.0, k=3: -35.5; least wins)" in report
    assert "layer 3 (first of stage II) in 90%" in report and "k chosen 2 in 48, 3 in 2" in report
    Stages(((0, 1), (2, 3), (4, 5)), "thirds", 6).write(layout.analysis("patch-stages"))
    report = write_report(layout, rp.Settings("squad-dev", "tiny")).read_text()
    assert "Decoder stages: each experiment's default" in report and "I = layers 0-1" in report
    assert "equal thirds" in report
