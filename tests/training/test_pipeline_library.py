"""The pipeline steps as library calls (no CLI): what `prepare_dataset`, `run_pretraining`, `train_dsi`,
`evaluate_checkpoint` and `run_bm25` write and return, the same as their commands print; errors name settings
(the commands, flags)."""

from __future__ import annotations

import json
import os

import pytest

import genir_jax as gj
from genir_jax.base.errors import GenIRError, SettingError
from genir_jax.cli.main import main
from genir_jax.data.prepare import prepare_dataset
from genir_jax.training.evaluation import evaluate_checkpoint, run_bm25
from tests.dsi_fixtures import tiny_dsi_model
from tests.training.test_training_cli import make_prepared

DOC_IDS = [f"d{i}" for i in range(30)]


def _write(path, data) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


@pytest.fixture
def reference_files(tmp_path) -> dict[str, str]:
    documents = [{"id": d, "text": f"document {d} about topic {i % 7}"} for i, d in enumerate(DOC_IDS)]
    train = [{"id": f"t{i}", "query": f"topic {i % 7} question {i}", "relevant_docs": [DOC_IDS[i]]} for i in range(20)]
    val = [{"id": f"v{i}", "query": f"what about document {DOC_IDS[i]} topic {i % 7}",
            "relevant_docs": [DOC_IDS[i]]} for i in range(20, 30)]
    return {"documents": _write(tmp_path / "docs.json", documents),
            "train_queries": _write(tmp_path / "train.json", train), "val_queries": _write(tmp_path / "val.json", val)}


def _printed(capsys, argv) -> dict:
    """What a command prints with --json (one JSON line)."""
    capsys.readouterr()
    assert main([str(a) for a in argv] + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_prepare_dataset_returns_the_manifest_of_what_it_wrote(reference_files, tmp_path):
    out = tmp_path / "prepared"
    manifest = prepare_dataset("reference-json", out, **reference_files)
    assert sorted(os.listdir(out)) == manifest["files"]
    assert json.loads((out / "prepare.json").read_text()) == manifest
    assert manifest["counts"]["documents"] == 30 and manifest["counts"]["val_queries"] == 10


@pytest.mark.parametrize("options, settings, message", [
    (dict(dataset="squad-dev", val_fraction=1.5), ("val_fraction",), "val_fraction must be a number in [0, 1)"),
    (dict(dataset="squad-dev", val_fraction=0.5, test_fraction=0.5), ("val_fraction", "test_fraction"),
     "val_fraction + test_fraction must be < 1"),
    (dict(dataset="squad-dev", max_documents=0), ("max_documents",), "max_documents must be a positive integer"),
    (dict(dataset="reference-json", split="random"), ("split", "paper_regime"), "split / paper_regime do not apply"),
    (dict(dataset="squad-dev", docids="atomic", semantic_k=3), ("semantic_mapping", "semantic_k", "semantic_c",
                                                                 "docids"), "need docids semantic"),
])
def test_prepare_dataset_errors_name_the_setting(tmp_path, shared_data, options, settings, message):
    out = tmp_path / "never"
    with pytest.raises(SettingError) as caught:
        prepare_dataset(options.pop("dataset"), out, shared_data, **options)
    assert message in str(caught.value) and caught.value.settings == settings
    assert not out.exists()


def test_evaluate_checkpoint_and_run_bm25_equal_their_commands(reference_files, hf_checkpoint, t5_tokenizer,
                                                               tmp_path, capsys):
    prepared = tmp_path / "prepared"
    prepare_dataset("reference-json", prepared, **reference_files)
    model, _ = tiny_dsi_model(hf_checkpoint, t5_tokenizer, DOC_IDS)
    checkpoint = tmp_path / "dsi"
    gj.save_pretrained(checkpoint, model)

    result = evaluate_checkpoint(checkpoint, tmp_path / "eval", prepared=prepared, split="val", k=5, max_length=16,
                                 batch_size=4)
    assert sorted(os.listdir(tmp_path / "eval")) == sorted(result.files) == \
        ["correct_valid.json", "metrics.json", "run.trec"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == result.report
    assert json.loads((tmp_path / "eval" / "correct_valid.json").read_text()) == result.correct
    assert result.metrics["queries"] == 10 and result.report["correct_first"] == len(result.correct)
    printed = _printed(capsys, ["evaluate", "--checkpoint", checkpoint, "--prepared", prepared, "--split", "val",
                                "-o", tmp_path / "eval-cli", "--k", "5", "--max-length", "16", "--batch-size", "4"])
    assert printed == result.printed() == result.metrics
    assert (tmp_path / "eval-cli" / "run.trec").read_text() == (tmp_path / "eval" / "run.trec").read_text()

    test_named = evaluate_checkpoint(checkpoint, tmp_path / "eval-train", prepared=prepared, split="train")
    assert "correct_train.json" in test_named.files  # the default name of a split other than val

    bm25 = run_bm25(tmp_path / "bm25", prepared=prepared, split="val", k=10)
    assert sorted(os.listdir(tmp_path / "bm25")) == sorted(bm25.files) == ["metrics.json", "run.trec"]
    assert bm25.report["system"] == "bm25" and bm25.report["k"] == 10 and bm25.correct is None
    printed = _printed(capsys, ["bm25", "--prepared", prepared, "--split", "val", "--k", "10", "-o",
                                tmp_path / "bm25-cli"])
    assert printed == bm25.printed() == bm25.metrics


def test_library_errors_name_settings_and_commands_name_flags(reference_files, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    prepare_dataset("reference-json", prepared, **reference_files)
    with pytest.raises(SettingError, match="k, batch_size and num_beams must be >= 1"):
        evaluate_checkpoint(tmp_path / "missing", tmp_path / "out", prepared=prepared, k=0)
    with pytest.raises(SettingError, match=r"give prepared DIR \(and split\), or the input files explicitly "
                                           r"\(documents and queries\)"):
        run_bm25(tmp_path / "out")
    with pytest.raises(SettingError, match="b must be a number in"):
        run_bm25(tmp_path / "out", prepared=prepared, b=2.0)
    with pytest.raises(SettingError, match="name must be a plain file-name part"):
        evaluate_checkpoint(tmp_path / "missing", tmp_path / "out", prepared=prepared, name="../x")
    assert not (tmp_path / "out").exists()
    assert main(["bm25", "-o", str(tmp_path / "out")]) == 2
    assert "give --prepared DIR (and --split), or the input files explicitly (--documents and --queries)" in \
        capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing"), "--prepared", str(prepared), "-o",
                 str(tmp_path / "out"), "--name", "../x"]) == 2
    assert "--name must be a plain file-name part" in capsys.readouterr().err


def test_training_errors_name_settings(tmp_path, shared_data):
    from genir_jax.training.dsi import train_dsi
    from genir_jax.training.options import RunOverrides
    from genir_jax.training.pretrain import run_pretraining

    prepared = make_prepared(tmp_path / "prepared")
    with pytest.raises(SettingError, match="tokenizer directory not found \\(pass tokenizer or set GENIR_JAX_DATA"):
        run_pretraining(prepared, tmp_path / "base", preset="tiny", tokenizer=tmp_path / "none")
    with pytest.raises(SettingError, match="resume: .* holds no checkpoint to resume from"):
        run_pretraining(prepared, tmp_path / "base", preset="tiny", tokenizer=shared_data / "t5-tokenizer",
                        resume="required")
    with pytest.raises(SettingError, match="resume must be one of never, required, if-any"):
        train_dsi(prepared, tmp_path / "nobase", tmp_path / "dsi", resume="yes")
    with pytest.raises(SettingError, match="ratio must be >= 0"):
        train_dsi(prepared, tmp_path / "nobase", tmp_path / "dsi", ratio=-1)
    with pytest.raises(SettingError, match=r"remove: documents \['d99'\] are not in"):
        train_dsi(prepared, tmp_path / "nobase", tmp_path / "dsi", preset="tiny", remove="d1, d99")
    with pytest.raises(GenIRError, match="'steps' must be a positive integer"):
        train_dsi(prepared, tmp_path / "nobase", tmp_path / "dsi", overrides=RunOverrides(steps=0))
    assert not (tmp_path / "base").exists() and not (tmp_path / "dsi").exists()


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_pretrain_train_evaluate_as_library_calls(tmp_path, shared_data, capsys):
    """prepare -> run_pretraining -> train_dsi -> evaluate_checkpoint, each returning what it wrote; the
    evaluation's metrics are what `genir-jax evaluate` prints for the same model and queries."""
    from genir_jax.training.dsi import train_dsi, training_summary
    from genir_jax.training.options import RunOverrides
    from genir_jax.training.pretrain import pretraining_summary, run_pretraining

    prepared = make_prepared(tmp_path / "prepared")
    short = RunOverrides(steps=4, eval_every=4, checkpoint_every=4)
    base = tmp_path / "base"
    pretrained = run_pretraining(prepared, base, preset="tiny", tokenizer=shared_data / "t5-tokenizer",
                                 overrides=short, progress=False)
    assert json.loads((base / "pretrain.json").read_text()) == json.loads(json.dumps(pretrained))
    assert pretrained["data"]["texts"] == 16 + 32 and set(pretraining_summary(pretrained)) == {
        "best", "examples_per_s", "train_seconds", "wall_seconds"}
    model_dir = tmp_path / "dsi"
    trained = train_dsi(prepared, base, model_dir, preset="tiny", remove=["d3"], overrides=short, progress=False)
    assert json.loads((model_dir / "train.json").read_text()) == json.loads(json.dumps(trained))
    assert trained["removed"] == ["d3"] and trained["docids"] == "atomic" and trained["base"] == str(base)
    assert set(training_summary(trained)) == {"docids", "best", "final", "examples_per_s", "train_seconds",
                                              "wall_seconds"}
    again = train_dsi(prepared, base, model_dir, preset="tiny", remove=["d3"], overrides=short, progress=False,
                      resume="if-any")
    assert again["resumed_from"] == 4
    result = evaluate_checkpoint(model_dir, tmp_path / "eval", prepared=prepared, split="test")
    assert result.metrics["queries"] == 16 and "correct_test.json" in result.files
    printed = _printed(capsys, ["evaluate", "--checkpoint", model_dir, "--prepared", prepared, "--split", "test",
                                "-o", tmp_path / "eval-cli"])
    assert printed == result.metrics
