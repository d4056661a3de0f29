"""`genir-jax reproduce --model-type decoder`: the pipeline on decoder-only models. The steps are the experiments
that handle the family (no encoder swap, cross-attention, minimal circuit or removed-document models), the
family is bound to the run's folder, refusals are one line, and the report lists every left-out experiment with
its reason from `genir_jax.analysis.applicability`; one slow test runs the tiny pipeline end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from genir_jax.analysis.applicability import NOT_APPLICABLE_TO_DECODER_ONLY, NOT_YET_ON_DECODER_ONLY
from genir_jax.base.errors import GenIRError
from genir_jax.cli.main import main
from genir_jax.paper import reproduce as rp

DECODER_STEPS = ["prepare", "pretrain", "train-full", "evaluate-full", "bm25", "residual-rank", "patch-stages",
                 "report"]


def _decoder(**options) -> rp.Settings:
    return rp.Settings(dataset="squad-dev", preset="tiny", model_type="decoder", **options)


def test_decoder_steps_are_the_experiments_of_the_family():
    """Only experiments that handle decoder-only models run; every experiment left out (and handling atomic
    docids) names its reasons, each a key of the applicability tables."""
    from genir_jax.paper.experiments import registry

    assert [step.name for step in rp.steps(_decoder())] == DECODER_STEPS
    assert [step.name for step in rp.steps(_decoder(removed_models=2, seeds=1))] == DECODER_STEPS
    t5 = [step.name for step in rp.steps(rp.Settings(dataset="squad-dev", preset="tiny"))]
    assert {"swap-encoder", "circuit", "crattn-writes", "head-tokens", "neuron-reading", "crattn-reading",
            "head-logit-lens", "stage-robustness", "choose-removed", "train-removed-0"} <= set(t5) - set(DECODER_STEPS)
    ran = {e.id for e in registry() if e.handles_family("decoder")}
    assert ran == {"table1", "table3", "figure3", "figure4", "claims"}
    for experiment in registry():
        if experiment.handles_family("decoder") or not experiment.handles("atomic"):
            continue
        names = [name for name, _ in experiment.family_reasons()]
        assert names, experiment.id
        assert all(name in NOT_APPLICABLE_TO_DECODER_ONLY or name in NOT_YET_ON_DECODER_ONLY for name in names)
    # several seeds: per seed the same steps
    seeded = rp.run_steps(_decoder(seeds=2))
    assert [step.name for folder, step in seeded if folder == "seed-0"] == DECODER_STEPS[2:]


def test_default_folder_names_the_family():
    assert rp.default_out(_decoder()) == "runs/squad-dev-tiny-decoder"
    assert rp.default_out(rp.Settings(dataset="squad-dev", preset="tiny")) == "runs/squad-dev-tiny"
    assert rp.default_out(_decoder(paper_regime=True)) == "runs/squad-dev-tiny-decoder-paper-regime"


def _fake_pipeline(monkeypatch, calls):
    def run(layout, settings):
        calls.append(settings.model_type)

    monkeypatch.setattr(rp, "steps", lambda settings: [rp.Step("prepare", run), rp.Step("report", run, always=True)])


def test_a_run_folder_is_bound_to_its_model_family(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_pipeline(monkeypatch, calls)
    rp.reproduce(tmp_path, _decoder(), log=lambda *_: None)
    assert json.loads((tmp_path / ".steps" / "settings.json").read_text())["model_type"] == "decoder"
    with pytest.raises(GenIRError, match="model_type: 'decoder' there, 'encoder-decoder' here"):
        rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny"), log=lambda *_: None)
    rp.reproduce(tmp_path, _decoder(), log=lambda *_: None)  # the same settings: resumed
    assert calls == ["decoder", "decoder", "decoder"]
    # a folder from before the setting existed holds an encoder-decoder run
    old = tmp_path / "old"
    rp.reproduce(old, rp.Settings(dataset="squad-dev", preset="tiny"), log=lambda *_: None)
    record = json.loads((old / ".steps" / "settings.json").read_text())
    del record["model_type"]
    (old / ".steps" / "settings.json").write_text(json.dumps(record))
    with pytest.raises(GenIRError, match="model_type: 'encoder-decoder' there, 'decoder' here"):
        rp.reproduce(old, _decoder(), log=lambda *_: None)
    rp.reproduce(old, rp.Settings(dataset="squad-dev", preset="tiny"), log=lambda *_: None)


@pytest.mark.parametrize("args, message", [
    (["--preset", "t5-large"], "--preset t5-large has no settings for decoder-only models (--model-type decoder); "
                               "choose one of tiny, cpu"),
    (["--docids", "naive"], "--docids naive with --model-type decoder: the analyses of decoder-only models take "
                            "atomic docids only (their inputs refuse docid sequences)"),
    (["--attribution-agreement"], "--attribution-agreement with --model-type decoder: attribution-agreement: not on "
                                  "decoder-only models yet: " + NOT_YET_ON_DECODER_ONLY["attribution-agreement"]),
])
def test_settings_a_decoder_run_cannot_take_are_refused_in_one_line(tmp_path, capsys, args, message):
    for extra in ([], ["--list-steps"]):
        out = tmp_path / f"run{len(extra)}"
        assert main(["reproduce", "--model-type", "decoder", "--out", str(out), *args, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not out.exists()


def test_a_base_of_the_other_family_is_refused(tmp_path):
    for family, model_type in (("t5", "decoder"), ("llama", "encoder-decoder")):
        base = tmp_path / family
        base.mkdir()
        (base / "config.json").write_text(json.dumps({"model_type": family}))
        settings = rp.Settings(dataset="squad-dev", preset="tiny", model_type=model_type, base=str(base))
        with pytest.raises(GenIRError, match=f"--base {base} is .*; --model-type {model_type} needs"):
            rp.reproduce(tmp_path / "run", settings, log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_training_steps_take_the_model_family(tmp_path, monkeypatch):
    """pretrain, train-full and evaluate-full hand ``model_type`` to the library functions their commands call."""
    from genir_jax.training import dsi, evaluation, pretrain

    calls = {}

    def recorder(name, result):
        def record(*args, **options):
            calls[name] = options.get("model_type")
            return result(*args) if callable(result) else result
        return record

    class Evaluated:
        def lines(self, label):
            return [label]

    def evaluated(checkpoint, output):
        output.mkdir(parents=True, exist_ok=True)
        (output / "correct_valid.json").write_text("[]")
        return Evaluated()

    summary = dict.fromkeys(("docids", "best", "final", "examples_per_s", "train_seconds", "wall_seconds"))
    monkeypatch.setattr(pretrain, "run_pretraining", recorder("pretrain", summary))
    monkeypatch.setattr(pretrain, "pretraining_summary", lambda summary: summary)
    monkeypatch.setattr(dsi, "train_dsi", recorder("train", summary))
    monkeypatch.setattr(dsi, "training_summary", lambda summary: summary)
    monkeypatch.setattr(evaluation, "evaluate_checkpoint", recorder("evaluate", evaluated))
    from genir_jax.training import reporting

    monkeypatch.setattr(reporting, "training_lines", lambda summary, output: [])
    layout = rp.Layout(tmp_path)
    for model_type in ("decoder", "encoder-decoder"):
        settings = rp.Settings(dataset="squad-dev", preset="tiny", model_type=model_type)
        rp._pretrain(layout, settings)
        rp._train_full(layout, settings)
        rp._evaluate_full(layout, settings)
        assert calls == {"pretrain": model_type, "train": model_type, "evaluate": model_type}


def test_report_of_a_decoder_run_lists_what_does_not_apply_with_the_reasons(tmp_path):
    """The header says the family; one table lists each left-out experiment with its reasons, verbatim from the
    applicability tables; each left-out section points to it; an encoder-decoder report has neither."""
    from genir_jax.paper.experiments import registry
    from genir_jax.paper.report import NOT_APPLICABLE_HEADING, write_report

    layout = rp.Layout(tmp_path)
    report = write_report(layout, _decoder(), rp.steps(_decoder())).read_text()
    assert "# genir-jax reproduction: squad-dev, preset tiny, decoder-only models" in report
    assert report.count(NOT_APPLICABLE_HEADING) == 1
    section = report.split(NOT_APPLICABLE_HEADING)[1].split("\n## ")[0]
    left_out = [e for e in registry() if not e.handles_family("decoder") and e.handles("atomic")]
    for experiment in left_out:
        for name, reason in experiment.family_reasons():
            assert f"| {experiment.title} ({experiment.paper_ref}) | `{name}` | {reason} |" in section
    for name in ("swap-encoder", "crattn-reading", "crattn-writes", "crattn-head-tokens", "head-logit-lens",
                 "minimal-circuit"):
        assert NOT_APPLICABLE_TO_DECODER_ONLY[name] in section, name
    for name in ("neuron-reading", "stage-robustness", "attribution-agreement"):
        assert NOT_YET_ON_DECODER_ONLY[name] in section, name
    assert report.count("Not run: not applicable to decoder-only models") == len(left_out)
    stage_patching = report.split("## Stage patching")[1].split("\n## ")[0]
    assert "Produced by `genir-jax patch-stages --modes zero,mean`." in stage_patching  # no T5 mode here
    t5 = write_report(layout, rp.Settings(dataset="squad-dev", preset="tiny")).read_text()
    assert NOT_APPLICABLE_HEADING not in t5 and "not applicable to decoder-only" not in t5
    assert "Produced by `genir-jax patch-stages --modes zero,mean,t5`." in t5


def test_a_left_out_experiment_is_refused_on_a_decoder_folder(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_pipeline(monkeypatch, calls)
    rp.reproduce(tmp_path, _decoder(), log=lambda *_: None)
    with pytest.raises(GenIRError, match="experiment 'table2' does not run on the decoder models of .*swap-encoder: "
                                         "a decoder-only model has no encoder to swap"):
        rp.run_experiment(tmp_path, "table2", log=lambda *_: None)


def test_decoder_claims_are_the_applicable_ones_by_the_same_rule(tmp_path):
    """A decoder-only run's claims table: the self-attention and MLP stage claims and the MLP-sum claim, each
    row the one the encoder-decoder rule computes from the same files; the others are named as omitted."""
    from genir_jax.analysis.evidence import share
    from genir_jax.analysis.residual import SUMS_CSV
    from genir_jax.analysis.stage_patching import RANKS_JSON
    from genir_jax.paper.experiments import claims

    layout = rp.Layout(tmp_path)
    rng = np.random.default_rng(0)
    ranks = {f"{stage}-{component}-zero": rng.integers(0, 3, 40).tolist()
             for stage in range(3) for component in ("attn", "mlp", "cross_attn")}
    layout.analysis("patch-stages").mkdir(parents=True)
    (layout.analysis("patch-stages") / RANKS_JSON).write_text(json.dumps(ranks))
    mlp_sums = rng.integers(0, 30, 40)
    layout.analysis("residual-rank").mkdir(parents=True)
    (layout.analysis("residual-rank") / SUMS_CSV).write_text(
        ",query,component,value\n" + "".join(f"{i},q{i},Sum of MLP Outputs,{v}\n" for i, v in enumerate(mlp_sums)))
    rows = claims.claim_rows(layout, decoder=True)
    texts = [row[0] for row in rows]
    assert texts == [*(c[-1] for c in claims.STAGE_CLAIMS if c[0] != "cross_attn"), claims.MLP_SUM_CLAIM]
    assert not set(texts) & set(claims.decoder_omitted_claims())
    attn_stage_2 = rows[2]
    assert attn_stage_2[2] == share(np.asarray(ranks["2-attn-zero"]) != 0).scaled(100).format(2)
    assert rows[-1][2] == share(mlp_sums > 10).scaled(100).format(2)
    (layout.steps).mkdir(parents=True)
    (layout.steps / "settings.json").write_text(json.dumps(_decoder().record))
    text = claims.render(layout).markdown
    assert "Omitted for decoder-only models" in text
    assert all(claim in text.split("Omitted for decoder-only models")[1] for claim in claims.decoder_omitted_claims())


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_tiny_decoder_reproduction_end_to_end(tmp_path, shared_data):
    """`reproduce --model-type decoder --preset tiny`: every step of the family runs (no T5-only step), the
    report has its sections and the not-applicable list, Table 1's Hits@1 is the evaluation's, and one Table 3
    cell (stage I's MLPs zeroed) is recomputed with plain decoder-only forwards of the trained model."""
    from genir_jax.analysis.evidence import share
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.core import decoder_only as do
    from genir_jax.interp import interventions as ivs
    from genir_jax.paper.report import NOT_APPLICABLE_HEADING
    from genir_jax.paper.experiments.table3_stage_patching import DECODER_ONLY_NOTE
    from tests.paper.test_reproduce import _genir_jax

    out = tmp_path / "run"
    run = _genir_jax(["reproduce", "--model-type", "decoder", "--preset", "tiny", "--out", str(out), "--data-dir",
                      str(shared_data), "--no-progress"])
    assert run.returncode == 0, run.stderr[-3000:]
    records = {name: json.loads((out / ".steps" / f"{name}.json").read_text()) for name in DECODER_STEPS}
    assert not [name for name, record in records.items() if "skipped" in record]  # every analysis ran
    assert sorted(p.stem for p in (out / ".steps").glob("*.json")) == sorted([*DECODER_STEPS, "settings"])
    assert json.loads((out / "models" / "full" / "config.json").read_text())["model_type"] == "llama"
    report = (out / "report.md").read_text()
    for heading in ("## Retrieval effectiveness (Table 1)", "## Residual stream contributions (Sec. 5, Fig. 3)",
                    "## Stage patching (Sec. 5.1, Table 3)", "## Rank development (logit lens) (Sec. 5.2, Fig. 4)",
                    NOT_APPLICABLE_HEADING, "Omitted for decoder-only models"):
        assert heading in report, heading
    for reason in (NOT_APPLICABLE_TO_DECODER_ONLY["swap-encoder"], NOT_APPLICABLE_TO_DECODER_ONLY["minimal-circuit"],
                   NOT_YET_ON_DECODER_ONLY["stage-robustness"]):
        assert reason in report
    for figure in ("figure3_residual_contributions", "figure4_rank_development"):
        assert (out / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    test_metrics = json.loads((out / "eval" / "full-test" / "metrics.json").read_text())["metrics"]
    assert f"| DSI (ours, test) | {100 * test_metrics['Hits@1']:.2f} [" in report
    # Table 3, stage I's MLPs zeroed: plain forwards with those layers' MLP outputs set to zero, on the queries
    # the table reports (the held-out half for automatic stages)
    stages = json.loads((out / "analysis" / "patch-stages" / "stages.json").read_text())
    inputs = load_analysis_inputs(out / "models" / "full", out / "data" / "val_queries.json",
                                  out / "eval" / "full-val" / "correct_valid.json")
    if stages.get("split"):
        inputs = inputs.subset(stages["split"]["held_out_rows"])
    model = inputs.model
    patch = ivs.zero_ablation(model.config, [f"blocks.{layer}.hook_mlp_out" for layer in stages["stages"][0]])
    last = np.asarray(do.last_positions(inputs.attention_mask))
    logits = np.asarray(do.forward(model.config, model.params, inputs.input_ids, inputs.attention_mask, patch))
    knocked = logits[np.arange(len(last)), last].argmax(-1) != inputs.targets
    cell = share(knocked).scaled(100).format(2)
    assert f"| zero | mlp | {cell} (92.86) |" in report, cell
    assert DECODER_ONLY_NOTE in report
    with open(out / "analysis" / "patch-stages" / "patching_results_single_combis.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["mode"], r["component"]) for r in rows} == {(m, c) for m in ("zero", "mean") for c in ("attn", "mlp")}
