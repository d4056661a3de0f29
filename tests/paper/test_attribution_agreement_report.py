"""The opt-in experiment "Attribution against exact patching": a pipeline step only with
``reproduce --attribution-agreement``, and a report section whose every cell is the stored statistic with its
interval and query count, the verdict computed from the interval."""

from __future__ import annotations

import json

import pytest

from genir_jax.analysis import attribution_agreement as agreement
from genir_jax.analysis.evidence import Interval
from genir_jax.paper import reproduce as rp


def _row(family, mode, method, signed, items=12):
    return agreement.AgreementRow(family, mode, method, items, agreement.top_k(items), signed,
                                  Interval(0.3, 0.1, 0.5, 40), Interval(2 / 3, 1 / 3, 1.0, 40))


def test_the_step_runs_only_when_asked():
    plain = rp.Settings(dataset="squad-dev", preset="tiny")
    asked = rp.Settings(dataset="squad-dev", preset="tiny", attribution_agreement=True)
    assert "attribution-agreement" not in [s.name for s in rp.steps(plain)]
    names = [s.name for s in rp.steps(asked)]
    assert names.index("stage-robustness") < names.index("attribution-agreement") < names.index("choose-removed")
    assert "attribution_agreement" not in asked.record  # an addition: it does not bind the folder
    naive = rp.Settings(dataset="squad-dev", preset="tiny", docids="naive", attribution_agreement=True)
    assert "attribution-agreement" not in [s.name for s in rp.steps(naive)]  # single-token logits only


def test_the_cli_flag_reaches_the_settings(monkeypatch, tmp_path):
    from genir_jax.cli.main import main

    seen = {}

    def fake(out, settings, force=(), overwrite=False):
        seen["settings"] = settings
        return rp.Layout(tmp_path)

    monkeypatch.setattr(rp, "reproduce", fake)
    assert main(["reproduce", "--out", str(tmp_path / "run"), "--attribution-agreement"]) == 0
    assert seen["settings"].attribution_agreement is True
    assert main(["reproduce", "--out", str(tmp_path / "run")]) == 0
    assert seen["settings"].attribution_agreement is False


def test_report_section_cells_carry_intervals_and_a_computed_verdict(tmp_path):
    from genir_jax.paper.report import write_report

    layout = rp.Layout(tmp_path)
    plain = rp.Settings(dataset="squad-dev", preset="tiny")
    report = write_report(layout, plain).read_text()
    assert ("Not run: opt-in; add `--attribution-agreement` to `genir-jax reproduce`, or run it on this folder "
            "with `python -m experiments attribution-agreement --run OUT`.") in report
    rows = (_row("cross-attention heads", "zero", "atp", Interval(0.9, 0.7, 0.95, 40)),   # above 0.5: holds
            _row("neurons", "mean", "atp*", Interval(0.6, 0.4, 0.8, 40), items=768),     # straddles: does not hold
            _row("layer x component", "zero", "atp", Interval(0.5, -0.2, 0.9, 40), items=9))  # too wide
    agreement.write_attribution_agreement(layout.analysis("attribution-agreement"),
                                          agreement.AttributionAgreement(rows, 40))
    (layout.steps).mkdir(parents=True, exist_ok=True)
    (layout.steps / "attribution-agreement.json").write_text(json.dumps({"seconds": 1.0}))
    report = write_report(layout, plain).read_text()  # rendered once run, whatever this run's flags
    section = report[report.index("## Attribution against exact patching"):]
    lines = [line for line in section.splitlines() if line.startswith("| ")][1:4]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == ["cross-attention heads", "zero", "AtP", "12", "3", "0.90 [0.70, 0.95] (n=40)",
                        "abs(AtP): 0.30 [0.10, 0.50] (n=40)", "0.67 [0.33, 1.00] (n=40)", "holds"]
    assert cells[1][:5] == ["neurons", "mean", "AtP*", "768", "77"]
    assert cells[1][6].startswith("GradDrop: ") and cells[1][8] == "does not hold"
    assert cells[2][8] == "undetermined"
    assert "40 correct validation queries" in section and agreement.ORDER_RULE in section


def test_record_round_trip(tmp_path):
    result = agreement.AttributionAgreement((_row("neurons", "zero", "atp", Interval(0.9, 0.8, 0.95, 40)),), 40)
    path = agreement.write_attribution_agreement(tmp_path, result)
    stored = json.loads(path.read_text())
    assert stored["rows"][0]["signed"]["method"] == "percentile bootstrap over queries"
    assert stored["rows"][0]["queries"] == 40 and stored["rows"][0]["verdict"] == "holds"
    assert agreement.read_attribution_agreement(tmp_path) == result
    with pytest.raises(FileNotFoundError):
        agreement.read_attribution_agreement(tmp_path / "missing")


@pytest.mark.slow  # a minute or more on 2 cores (every family's sweep and attributions compiled)
def test_the_step_runs_the_analysis_on_the_full_model_and_renders(tmp_path, monkeypatch):
    """The experiment's step on a small random model standing in for the full model and its correct queries:
    it writes agreement.json and experiment.json, records its query count, and the section renders every row."""
    import types

    import numpy as np

    import genir_jax as gj
    from genir_jax.paper.experiments import attribution_agreement as experiment
    from tests.hf_fixtures import padded_batch

    config = gj.t5_v1_0(vocab_size=160, d_model=16, d_kv=4, d_ff=8, num_layers=1, num_decoder_layers=2,
                        num_heads=2, dropout_rate=0.0)
    params = gj.init_params(config, 0)
    ids, mask, _ = padded_batch(config.vocab_size, [5, 3, 7, 4, 6], seed=1)
    logits = np.asarray(gj.forward(config, params, ids, mask, np.zeros((5, 1), np.int32)))[:, 0]
    inputs = types.SimpleNamespace(model=types.SimpleNamespace(config=config, params=params), input_ids=ids,
                                   attention_mask=mask, targets=logits.argmax(-1).astype(np.int32))
    monkeypatch.setattr(experiment, "correct_inputs", lambda layout: inputs)
    layout = rp.Layout(tmp_path)
    settings = rp.Settings(dataset="squad-dev", preset="tiny", progress=False, attribution_agreement=True)
    record = experiment.EXPERIMENT.runs[experiment.STEP](layout, settings, experiment.Config(modes=("zero",)))
    assert record["queries"] == 5 and list(record["config"]["modes"]) == ["zero"]
    stored = agreement.read_attribution_agreement(layout.analysis(experiment.STEP))
    assert [(r.family, r.items) for r in stored.rows[::2]] == [
        ("cross-attention heads", 4), ("self-attention heads", 4), ("neurons", 16), ("layer x component", 6)]
    text = experiment.EXPERIMENT.render(layout).markdown
    assert text.count("(n=5)") == 3 * len(stored.rows)
