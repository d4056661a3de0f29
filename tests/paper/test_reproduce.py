"""`genir-jax reproduce`: step bookkeeping (skip, force, skipped analyses) and removed-document choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from genir_jax.paper import reproduce as rp
from genir_jax.base.errors import GenIRError


def test_choose_removed_documents_prefers_correct_queries_and_is_disjoint():
    correct = [[f"@DOC_ID_c{i}@", f"q{i}"] for i in range(25)] + [["@DOC_ID_c3@", "q99"]]
    val = [{"id": f"v{i}", "query": "x", "relevant_docs": [f"o{i}"]} for i in range(30)]
    sets = rp.choose_removed_documents(correct, val, count=4, per_model=10, seed=0)
    assert [len(s) for s in sets] == [10] * 4
    flat = [d for s in sets for d in s]
    assert len(set(flat)) == 40
    assert {d for d in flat if d.startswith("c")} == {f"c{i}" for i in range(25)}  # all 25 correct docs first
    assert all(d.startswith("c") for d in flat[:25])
    assert sets == rp.choose_removed_documents(correct, val, count=4, per_model=10, seed=0)
    few = rp.choose_removed_documents(correct[:3], val[:5], count=4, per_model=10, seed=0)
    assert [len(s) for s in few] == [2] * 4  # shrinks evenly when there are too few documents


def _fake_pipeline(monkeypatch, calls, correct):
    def make(name, action=None):
        def run(layout, settings):
            calls.append(name)
            if action:
                action(layout)
        return run

    def evaluate(layout):
        layout.eval_val.mkdir(parents=True, exist_ok=True)
        layout.correct_valid.write_text(json.dumps(correct))

    fake = [rp.Step("prepare", make("prepare")), rp.Step("evaluate-full", make("evaluate-full", evaluate)),
            rp.Step("patch-stages", make("patch-stages"), analysis=True),
            rp.Step("report", make("report"), always=True)]
    monkeypatch.setattr(rp, "steps", lambda settings: fake)


def test_finished_steps_are_skipped_and_force_redoes_one(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_pipeline(monkeypatch, calls, [["@DOC_ID_1@", "q1"]])
    settings = rp.Settings(dataset="squad-dev", preset="tiny")
    rp.reproduce(tmp_path, settings, log=lambda *_: None)
    assert calls == ["prepare", "evaluate-full", "patch-stages", "report"]
    assert json.loads((tmp_path / ".steps" / "prepare.json").read_text())["seconds"] >= 0
    calls.clear()
    rp.reproduce(tmp_path, settings, log=lambda *_: None)
    assert calls == ["report"]  # the report is always rewritten
    calls.clear()
    rp.reproduce(tmp_path, settings, force=("patch-stages",), log=lambda *_: None)
    assert calls == ["patch-stages", "report"]
    with pytest.raises(GenIRError, match=r"--force: unknown step\(s\) \['nope'\]"):
        rp.reproduce(tmp_path, settings, force=("nope",), log=lambda *_: None)
    with pytest.raises(GenIRError, match="holds a reproduction with"):
        rp.reproduce(tmp_path, rp.Settings(dataset="nq-oracle", preset="tiny"), log=lambda *_: None)


def test_analyses_are_skipped_without_correct_queries(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_pipeline(monkeypatch, calls, [])
    rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny"), log=lambda *_: None)
    assert calls == ["prepare", "evaluate-full", "report"]
    record = json.loads((tmp_path / ".steps" / "patch-stages.json").read_text())
    assert record["skipped"] == "the full model ranks no validation query correctly"


def test_registry_discovers_every_experiment_module_and_drives_the_steps():
    """Every module of the experiments package is in the registry (paper order), and the pipeline's analysis
    steps are exactly the experiments' runs: those needing the removed-document models after them."""
    import importlib
    import pathlib

    from genir_jax.paper import experiments

    modules = sorted(p.stem for p in pathlib.Path(experiments.__file__).parent.glob("*.py")
                     if not p.stem.startswith("_"))
    found = experiments.registry()
    assert len(found) == len(modules)
    assert all(importlib.import_module(f"genir_jax.paper.experiments.{name}").EXPERIMENT in found for name in modules)
    assert [e.position for e in found] == sorted(e.position for e in found)
    assert [e.id for e in found][:2] == ["table1", "table2"] and "stage-robustness" in [e.id for e in found]
    settings = rp.Settings(dataset="squad-dev", preset="tiny", removed_models=2)
    names = [step.name for step in rp.steps(settings)]
    # every experiment that handles atomic docids, but opt-in ones only when asked (none is, here)
    early = [step for e in found if not e.after_removed_models and e.chosen(settings) for step in e.runs]
    late = [step for e in found if e.after_removed_models and e.chosen(settings) for step in e.runs]
    assert [e for e in found if e.handles("atomic") and not e.chosen(settings)] == [
        e for e in found if e.handles("atomic") and e.opt_in]
    assert names == ["prepare", "pretrain", "train-full", "evaluate-full", "bm25", *early, "choose-removed",
                     "train-removed-0", "train-removed-1", *late, "report"]
    assert "stage-robustness" in early and late == ["swap-encoder"]


def test_a_new_experiment_is_a_step_run_with_its_config_and_a_report_section(tmp_path, monkeypatch):
    """An experiment added to the registry (nothing else) becomes a pipeline step that runs with its
    configuration and a section of the report; without correct queries it is skipped like every analysis."""
    import dataclasses

    from genir_jax.paper import experiments
    from genir_jax.paper.report import Experiment, Section, record_settings

    @dataclasses.dataclass(frozen=True)
    class Config:
        alpha: int = 3

    def run(layout, settings, config):
        output = layout.analysis("toy")
        return record_settings(output, "toy", config, stages=[[0], [1]])

    def render(layout):
        record = json.loads((layout.analysis("toy") / "experiment.json").read_text())
        return Section(f"toy alpha={record['config']['alpha']} stages={record['stages']}")

    toy = Experiment(id="toy", title="Toy check", paper_ref="nowhere", command="none", paper={}, render=render,
                     position=1000, config=Config(alpha=7), runs={"toy": run})
    monkeypatch.setattr(experiments, "registry", lambda: (toy,))
    layout = rp.Layout(tmp_path)
    layout.eval_val.mkdir(parents=True)
    layout.correct_valid.write_text(json.dumps([["@DOC_ID_1@", "q1"]]))
    names = [step.name for step in rp.steps(rp.Settings(dataset="squad-dev", preset="tiny", removed_models=1))]
    assert names.index("toy") == names.index("bm25") + 1
    toy_step = next(step for step in rp.steps(rp.Settings(dataset="squad-dev", preset="tiny")) if step.name == "toy")
    assert toy_step.analysis
    details = toy_step.run(layout, rp.Settings(dataset="squad-dev", preset="tiny"))
    assert details["config"] == {"alpha": 7} and details["stages"] == [[0], [1]]
    (layout.steps).mkdir(parents=True, exist_ok=True)
    (layout.steps / "toy.json").write_text(json.dumps({"seconds": 1, **details}))
    from genir_jax.paper.report import write_report

    report = write_report(layout, rp.Settings(dataset="squad-dev", preset="tiny")).read_text()
    assert "## Toy check (nowhere)" in report and "toy alpha=7 stages=[[0], [1]]" in report


def _genir_jax(args: list[str]) -> subprocess.CompletedProcess:
    """The command in a fresh process on ONE CPU device, as `genir-jax reproduce` runs on a laptop."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, "-m", "genir_jax.cli.main", *args], capture_output=True, text=True,
                          timeout=1800, env=env)


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_tiny_reproduction_end_to_end(tmp_path, shared_data):
    """The real pipeline (one removed-document model to keep it short): every step runs, the report holds every
    table and figure, and a second run skips everything but the report.

    It runs in its own process on one CPU device: with four simulated CPU devices on two busy cores its DSI
    training has been seen to stall at a data-parallel all-reduce rendezvous (XLA's CPU runtime then aborts
    the whole test run), in the test process and in a fresh one alike. Multi-device training is covered by
    tests/test_training_*.py; this test covers the pipeline."""
    out = tmp_path / "run"
    args = ["reproduce", "--preset", "tiny", "--removed-models", "1", "--out", str(out), "--data-dir",
            str(shared_data), "--no-progress"]
    first = _genir_jax(args)
    assert first.returncode == 0, first.stderr[-3000:]
    names = [step.name for step in rp.steps(rp.Settings(dataset="squad-dev", preset="tiny", removed_models=1))]
    records = {name: json.loads((out / ".steps" / f"{name}.json").read_text()) for name in names}
    assert not [name for name, record in records.items() if "skipped" in record]  # every analysis ran
    correct = json.loads((out / "eval" / "full-val" / "correct_valid.json").read_text())
    assert len(correct) >= 10
    report = (out / "report.md").read_text()
    for heading in ("Table 1", "Table 2", "Fig. 3", "Table 3", "Table 4", "Fig. 4", "Fig. 5", "Table 5", "Table 6"):
        assert heading in report, heading
    for figure in ("figure3_residual_contributions", "figure4_rank_development", "figure5_reading"):
        png = out / "figures" / f"{figure}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{figure}.png" in report
    # The report's Table 1 DSI row is the evaluation's test metrics.
    test_metrics = json.loads((out / "eval" / "full-test" / "metrics.json").read_text())["metrics"]
    assert f"| DSI (ours, test) | {100 * test_metrics['Hits@1']:.2f} [" in report  # with its 95% interval
    # A 3-layer decoder's default stages are automatic: fitted on half the correct queries, reported on the rest.
    stages = json.loads((out / "analysis" / "patch-stages" / "stages.json").read_text())
    held_out = stages["split"]["held_out_queries"]
    assert stages["method"] == "auto" and stages["split"]["fit_queries"] + held_out == len(correct)
    assert f"every table that uses them reports the other {held_out} only" in report
    assert records["patch-stages"]["queries"] == held_out
    second = _genir_jax(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skipped") == len(names) - 1


def test_base_is_a_saved_t5_used_for_training_t5_mode_and_the_swap(tmp_path, monkeypatch, hf_checkpoint, t5_tokenizer):
    """`reproduce --base`: a T5 saved by transformers (with its tokenizer) replaces the pretrain step; every
    step that fine-tunes from or compares with the base T5 is handed that directory."""
    directory, _ = hf_checkpoint("pretrained-t5", tokenizer=t5_tokenizer, vocab_size=len(t5_tokenizer))
    base = rp.resolve_base(str(directory))
    assert base == os.path.abspath(directory)
    calls = _record_pipeline_calls(monkeypatch)
    loads = _record_base_loads(monkeypatch)
    layout = rp.Layout(tmp_path / "run")
    settings = rp.Settings(dataset="squad-dev", preset="tiny", base=base)
    assert rp._pretrain(layout, settings) == {"skipped_for_base": base}
    assert calls == []  # nothing pretrained
    rp._train_full(layout, settings)
    layout.removed_documents.parent.mkdir(parents=True, exist_ok=True)
    layout.removed_documents.write_text(json.dumps({"removed-0": ["d1"]}))
    rp._train_removed(0)(layout, settings)
    (step, train_full), (_, train_removed) = calls
    assert step == "train_dsi" and str(train_full["base"]) == base and str(train_removed["base"]) == base
    assert train_full["output"] == layout.full and train_removed["output"] == layout.removed(0)
    assert list(train_removed["remove"]) == ["d1"] and train_full["resume"] == "if-any"
    pipeline = {step.name: step for step in rp.steps(settings)}
    for name in ("patch-stages", "swap-encoder"):  # T5-mode patching and the base encoder swap load the given T5
        with pytest.raises(_BaseLoaded):
            pipeline[name].run(layout, settings)
    assert loads == [base, base]
    # without --base, the pretrain step's own model is the base everywhere
    loads.clear()
    own = rp.Settings(dataset="squad-dev", preset="tiny")
    with pytest.raises(_BaseLoaded):
        {step.name: step for step in rp.steps(own)}["patch-stages"].run(layout, own)
    assert loads == [str(layout.base)]


class _BaseLoaded(Exception):
    """Raised by `_record_base_loads`' loader: the run got as far as loading its base T5."""


def _record_base_loads(monkeypatch) -> list[str]:
    """Make the experiments that compare with the base T5 record the checkpoint they load as the base (they
    load it first, without a tokenizer) and stop there."""
    from genir_jax.paper.experiments import table2_encoder_swap, table3_stage_patching

    loads: list[str] = []

    def load_model(path, *, tokenizer=True):
        assert not tokenizer  # the base T5 is loaded without its tokenizer, before the analysed model
        loads.append(str(path))
        raise _BaseLoaded(path)

    for module in (table2_encoder_swap, table3_stage_patching):
        monkeypatch.setattr(module, "load_model", load_model)
    return loads


def test_base_without_tokenizer_or_missing_is_refused(tmp_path, hf_checkpoint):
    directory, _ = hf_checkpoint("no-tokenizer")
    with pytest.raises(GenIRError, match="no tokenizer"):
        rp.resolve_base(str(directory))
    with pytest.raises(GenIRError, match="not a hub id in the local Hugging Face cache|does not exist"):
        rp.resolve_base(str(tmp_path / "missing"))
    with pytest.raises(GenIRError, match="not a hub id in the local Hugging Face cache"):
        rp.resolve_base("nobody/no-such-t5")


def test_report_says_whether_t5_rows_are_comparable(tmp_path):
    from genir_jax.paper.report import _header

    layout = rp.Layout(tmp_path)
    own = _header(layout, rp.Settings(dataset="squad-dev", preset="tiny"))
    assert "NOT comparable" in own
    given = _header(layout, rp.Settings(dataset="squad-dev", preset="tiny", base="/models/t5-large"))
    assert "/models/t5-large" in given and "NOT comparable" not in given


def test_tiny_nq_oracle_keeps_enough_validation_queries(tmp_path, shared_data):
    """The tiny preset's document subset leaves enough validation queries on both datasets (nq-oracle has
    about one question per passage: its first 64 passages once left 4)."""
    from genir_jax.cli.main import main

    for dataset in rp.DATASETS:
        out = tmp_path / dataset
        assert main(["prepare-data", "--dataset", dataset, "--data-dir", str(shared_data), "--max-documents",
                     str(rp.TINY_MAX_DOCUMENTS[dataset]), "-o", str(out)]) == 0
        val = json.loads((out / "val_queries.json").read_text())
        assert len(val) >= rp.FEW_QUERIES, (dataset, len(val))


def test_report_warns_when_analyses_rest_on_few_queries(tmp_path):
    from genir_jax.paper.report import _header

    layout = rp.Layout(tmp_path)
    layout.eval_val.mkdir(parents=True)
    layout.correct_valid.write_text(json.dumps([["@DOC_ID_1@", "q1"]]))
    assert "rests on 1 correct validation query" in _header(layout, rp.Settings(dataset="nq-oracle", preset="tiny"))
    layout.correct_valid.write_text(json.dumps([[f"@DOC_ID_{i}@", f"q{i}"] for i in range(rp.FEW_QUERIES)]))
    assert "Warning" not in _header(layout, rp.Settings(dataset="nq-oracle", preset="tiny"))


def test_docids_and_paper_regime_reach_prepare_and_every_training(tmp_path, monkeypatch):
    """`reproduce --docids naive --paper-regime`: prepare-data gets both, every `train` the regime (the docid
    scheme it reads from the prepared data); the steps are the experiments that handle multi-token docids,
    without the removed-document models (only the atomic encoder swap needs them)."""
    calls = _record_pipeline_calls(monkeypatch)
    layout = rp.Layout(tmp_path / "run")
    settings = rp.Settings(dataset="nq-oracle", preset="tiny", docids="naive", paper_regime=True)
    rp._prepare(layout, settings)
    rp._train_full(layout, settings)
    layout.removed_documents.parent.mkdir(parents=True, exist_ok=True)
    layout.removed_documents.write_text(json.dumps({"removed-0": ["d1"]}))
    rp._train_removed(0)(layout, settings)
    (_, prepare), (_, train_full), (_, train_removed) = calls
    assert prepare["docids"] == "naive" and prepare["paper_regime"] is True
    assert prepare["max_documents"] == rp.TINY_MAX_DOCUMENTS["nq-oracle"]
    assert train_full["paper_regime"] is True and train_removed["paper_regime"] is True
    assert "docids" not in train_full  # train takes the scheme from prepare.json
    names = [step.name for step in rp.steps(settings)]
    assert names == ["prepare", "pretrain", "train-full", "evaluate-full", "bm25", "patch-stages", "circuit",
                     "steps-logit-lens", "report"]
    atomic = [step.name for step in rp.steps(rp.Settings(dataset="nq-oracle", preset="tiny"))]
    assert "swap-encoder" in atomic and "train-removed-0" in atomic
    calls.clear()
    rp._prepare(layout, rp.Settings(dataset="nq-oracle", preset="tiny"))
    assert calls[0][1]["docids"] == "atomic" and calls[0][1]["paper_regime"] is False


def _record_pipeline_calls(monkeypatch) -> list[tuple[str, dict]]:
    """Replace the library functions the pipeline steps call by recorders of their arguments."""
    from genir_jax.data import prepare
    from genir_jax.training import dsi, pretrain

    calls: list[tuple[str, dict]] = []

    def prepare_dataset(name, out_dir, data_dir=None, **options):
        calls.append(("prepare_dataset", {"name": name, "output": out_dir, "data_dir": data_dir, **options}))
        return {"dataset": name, "counts": {"documents": 0}, "split": None, "regime": None, "notes": []}

    def trainer(step, keys):
        def train(*args, **options):
            calls.append((step, {**dict(zip(keys, args)), **options}))
            return dict.fromkeys(("docids", "best", "final", "examples_per_s", "train_seconds", "wall_seconds"))
        return train

    monkeypatch.setattr(prepare, "prepare_dataset", prepare_dataset)
    monkeypatch.setattr(dsi, "train_dsi", trainer("train_dsi", ("data", "base", "output")))
    monkeypatch.setattr(pretrain, "run_pretraining", trainer("run_pretraining", ("data", "output")))
    return calls


def test_a_run_directory_is_bound_to_its_docids_and_regime(tmp_path, monkeypatch):
    calls: list[str] = []
    _fake_pipeline(monkeypatch, calls, [["@DOC_ID_1@", "q1"]])
    rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny"), log=lambda *_: None)
    for other in (dict(docids="naive"), dict(paper_regime=True)):
        with pytest.raises(GenIRError, match="holds a reproduction with"):
            rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny", **other), log=lambda *_: None)
    # a directory from before these settings existed (no docids / paper_regime recorded) is an atomic one
    record = json.loads((tmp_path / ".steps" / "settings.json").read_text())
    del record["docids"], record["paper_regime"]
    (tmp_path / ".steps" / "settings.json").write_text(json.dumps(record))
    rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny"), log=lambda *_: None)


def test_overwrite_replaces_a_reproduction_with_other_settings(tmp_path, monkeypatch):
    """--overwrite: another reproduction in --out is removed whole (no step record or file of it stays);
    with the same settings it changes nothing (finished steps are still skipped)."""
    calls: list[str] = []
    _fake_pipeline(monkeypatch, calls, [["@DOC_ID_1@", "q1"]])
    rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny"), log=lambda *_: None)
    (tmp_path / "stale.txt").write_text("of the first run")
    calls.clear()
    rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny"), log=lambda *_: None, overwrite=True)
    assert calls == ["report"] and (tmp_path / "stale.txt").exists()
    rp.reproduce(tmp_path, rp.Settings(dataset="squad-dev", preset="tiny", docids="naive"), log=lambda *_: None,
                 overwrite=True)
    assert not (tmp_path / "stale.txt").exists()
    assert json.loads((tmp_path / ".steps" / "settings.json").read_text())["docids"] == "naive"


def test_report_of_a_naive_run_names_the_experiments_it_skips(tmp_path):
    from genir_jax.paper.experiments import registry
    from genir_jax.paper.report import write_report

    layout = rp.Layout(tmp_path)
    report = write_report(layout, rp.Settings(dataset="squad-dev", preset="tiny", docids="naive")).read_text()
    skipped = [e for e in registry() if not e.handles("naive")]
    assert skipped and {e.id for e in registry() if e.handles("naive")} == {"table1", "table3", "table4",
                                                                               "figure4-steps"}
    assert report.count("Not run: this analysis handles atomic docids; this reproduction trains naive "
                        "docids.") == len(skipped)
    atomic = write_report(layout, rp.Settings(dataset="squad-dev", preset="tiny")).read_text()
    assert atomic.count("Not run: this analysis handles naive and semantic docids; this reproduction trains "
                        "atomic docids.") == 1  # the per-step logit lens


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_tiny_naive_reproduction_reports_stage_patching_over_docid_sequences(tmp_path, shared_data):
    """`reproduce --docids naive`: the naive model is trained and evaluated, Table 3 runs over the teacher-forced
    docids and the report holds it and the per-step logit lens. Zero-ablating a stage's MLPs is checked another
    way: the same MLP output weights set to zero, then `greedy_consistent` (does greedy decoding still give
    the docid?) on every correct query."""
    import csv

    import numpy as np

    from genir_jax.paper.experiments._common import correct_sequence_inputs
    from genir_jax.docids.sequence_targets import greedy_consistent

    out = tmp_path / "run"
    args = ["reproduce", "--preset", "tiny", "--docids", "naive", "--out", str(out), "--data-dir", str(shared_data),
            "--no-progress"]
    run = _genir_jax(args)
    assert run.returncode == 0, run.stderr[-3000:]
    layout = rp.Layout(out)
    names = [step.name for step in rp.steps(rp.Settings(dataset="squad-dev", preset="tiny", docids="naive"))]
    assert names == ["prepare", "pretrain", "train-full", "evaluate-full", "bm25", "patch-stages", "circuit",
                     "steps-logit-lens", "report"]
    assert not [n for n in names if "skipped" in json.loads((out / ".steps" / f"{n}.json").read_text())]
    assert json.loads((out / "models" / "full" / "docids.json").read_text())["scheme"] == "naive"
    inputs = correct_sequence_inputs(layout)
    assert len(inputs.queries) >= 10
    record = json.loads((layout.analysis("patch-stages") / "stages.json").read_text())
    stages = record["stages"]
    with open(layout.analysis("patch-stages") / "patching_results_single_combis.csv", newline="") as handle:
        rows = {(r["mode"], r["component"], int(r["stage"])): float(r["!=0"]) for r in csv.DictReader(handle)}
    model = inputs.model
    sequences = [list(q.tokens) for q in inputs.queries]
    assert greedy_consistent(model.config, model.params, inputs.input_ids, inputs.attention_mask, sequences).all()
    if record.get("split"):  # automatic stages: Table 3 reports on the held-out half of the correct queries
        held_out = record["split"]["held_out_rows"]
        inputs = inputs.subset(held_out)
        sequences = [sequences[row] for row in held_out]
    for index, stage in enumerate(stages):
        wo = np.array(model.params["decoder"]["layers"]["mlp"]["wo"])
        wo[stage] = 0.0
        layers = {**model.params["decoder"]["layers"], "mlp": {**model.params["decoder"]["layers"]["mlp"], "wo": wo}}
        zeroed = {**model.params, "decoder": {**model.params["decoder"], "layers": layers}}
        still = greedy_consistent(model.config, zeroed, inputs.input_ids, inputs.attention_mask, sequences)
        assert rows[("zero", "mlp", index)] == pytest.approx(1.0 - still.mean()), stage
    report = (out / "report.md").read_text()
    assert "**Naive docids**" in report and "Rank development per decoding step" in report
    from genir_jax.paper.experiments import registry

    atomic_only = [e for e in registry() if not e.handles("naive")]
    assert len(atomic_only) == 10  # every analysis but Tables 1, 3, 4 and the per-step logit lens (claims and the
    # opt-in attribution agreement included)
    assert report.count("Not run: this analysis handles atomic docids") == len(atomic_only)
    circuit = json.loads((layout.analysis("circuit") / "minimal_circuit.json").read_text())
    test_queries = json.loads((out / "data" / "test_queries.json").read_text())
    assert circuit["docids"] == "naive" and circuit["queries"] == len(test_queries)
    worst = np.asarray(circuit["per_query"]["worst_rank"])
    assert circuit["unpatched"]["greedy Hits@1"] == pytest.approx(float(np.mean(worst[0] == 0)))
    evaluated = json.loads((out / "eval" / "full-test" / "metrics.json").read_text())["metrics"]
    for metric in ("Hits@1", "Recall@5", "Hits@10", "MRR@10"):  # unpatched beam search = `evaluate`'s
        assert circuit["unpatched"][metric] == pytest.approx(evaluated[metric]), metric
    from genir_jax.analysis.inputs import tokenize_for_analysis
    from genir_jax.docids.schemes import docid_token_sequences

    test_ids, test_mask = tokenize_for_analysis(model.tokenizer, [q["query"] for q in test_queries])
    test_sequences = docid_token_sequences(inputs.scheme, model.tokenizer,
                                           [q["relevant_docs"][0] for q in test_queries], "test")
    greedy = greedy_consistent(model.config, model.params, test_ids, test_mask, test_sequences)
    np.testing.assert_array_equal(worst[0] == 0, greedy)  # unpatched: greedy decoding gives the docid
    assert "every step (greedy Hits@1)" in report  # Table 4's per-step shares
    assert (out / "figures" / "figure4_steps_rank_development.png").read_bytes()[:4] == b"\x89PNG"


def test_report_header_names_the_data_regime_and_docids(tmp_path):
    from genir_jax.paper.report import _header

    layout = rp.Layout(tmp_path)
    paper = _header(layout, rp.Settings(dataset="nq-oracle", preset="cpu", paper_regime=True, docids="naive"))
    assert "Data regime: the paper's (`--paper-regime`" in paper and "Docids: naive (token sequences" in paper
    own = _header(layout, rp.Settings(dataset="squad-dev", preset="tiny"))
    assert "Data regime: the `tiny` preset's" in own and "Docids: atomic (one new token" in own
