"""The paper's training regime: the NQ10k-style split (validation/test documents indexed only), the
indexing:retrieval ratio 32 and 32-token inputs on every preset, the t5-large recipe, and bad input."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

import genir_jax as gj
from genir_jax.cli.main import main
from genir_jax.data.dsi import INDEX, RETRIEVAL, build_dsi_examples
from genir_jax.data.prepare import build_prepared, load_prepared, prepare_dataset, restrict_documents
from genir_jax.base.errors import GenIRError
from genir_jax.training.presets import (PAPER_INPUT_LENGTH, PAPER_RATIO, PRESETS, T5_LARGE, TINY, is_paper_regime,
                                        paper_regime)
from tests.training.test_training_cli import make_base


def _documents_of(queries) -> set[str]:
    return {doc for query in queries for doc in query.relevant_docs}


def _assert_nq10k(documents, splits) -> None:
    """No validation/test document has a training query, and every one of them is indexed."""
    indexed = {doc.id for doc in documents}
    train_docs = _documents_of(splits["train"])
    for name in ("val", "test"):
        held_out = _documents_of(splits[name])
        assert held_out, name
        assert not held_out & train_docs, name
        assert held_out <= indexed, name


# --------------------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["nq-oracle", "squad-dev"])
def test_nq10k_split_leaves_held_out_documents_indexed_only(shared_data, dataset):
    prepared = build_prepared(dataset, shared_data, split="nq10k")
    _assert_nq10k(prepared.documents, prepared.splits)
    every = [q for queries in prepared.splits.values() for q in queries]
    assert len({q.id for q in every}) == len(every)                           # a partition of the queries
    small = restrict_documents(prepared, 300)                                  # the tiny preset's restriction
    _assert_nq10k(small.documents, small.splits)


def test_squad_default_split_is_unchanged_and_differs_from_nq10k(shared_data):
    default = build_prepared("squad-dev", shared_data)
    assert [len(default.splits[s]) for s in ("train", "val", "test")] == [8456, 1057, 1057]
    assert _documents_of(default.splits["val"]) <= _documents_of(default.splits["train"])  # seen with queries
    random = build_prepared("squad-dev", shared_data, split="random")
    assert sum(len(q) for q in random.splits.values()) == 10570


def test_paper_regime_prepare_data_records_the_split(shared_data, tmp_path, capsys):
    out = tmp_path / "nq"
    assert main(["prepare-data", "--dataset", "nq-oracle", "--paper-regime", "--max-documents", "300",
                 "--data-dir", str(shared_data), "-o", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / "prepare.json").read_text())
    assert printed["split"] == manifest["split"] and printed["regime"] == manifest["regime"] == "paper"
    assert manifest["options"]["split"] == "nq10k"
    documents, splits = load_prepared(out)
    _assert_nq10k(documents, splits)
    split = manifest["split"]
    for name in ("val", "test"):
        held_out = _documents_of(splits[name])
        assert split[f"{name}_documents"] == split[f"{name}_documents_indexed_only"] == len(held_out) > 0
        assert split[f"{name}_documents_with_train_queries"] == 0
    plain = prepare_dataset("squad-dev", tmp_path / "squad", shared_data, max_documents=40)
    assert plain["regime"] is None and plain["options"]["split"] == "per-document"
    assert plain["split"]["val_documents_with_train_queries"] == plain["split"]["val_documents"] > 0


# --------------------------------------------------------------------------------------------------
# Ratio and input length
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_paper_regime_on_every_preset(preset):
    settings = paper_regime(PRESETS[preset].dsi)
    assert (settings.ratio, settings.index_max_length, settings.query_max_length) == (32, 32, 32)
    assert dataclasses.replace(settings, ratio=None, index_max_length=0, query_max_length=0) == \
        dataclasses.replace(PRESETS[preset].dsi, ratio=None, index_max_length=0, query_max_length=0)
    assert is_paper_regime(settings) and paper_regime(settings) == settings
    assert is_paper_regime(PRESETS[preset].dsi) == (preset == "t5-large")


def test_examples_have_ratio_32_and_32_token_documents(shared_data, t5_tokenizer):
    prepared = restrict_documents(build_prepared("nq-oracle", shared_data, split="nq10k"), 120)
    settings = paper_regime(TINY.dsi)
    examples = build_dsi_examples(prepared.documents, prepared.splits["train"], ratio=settings.ratio)
    index = [e for e in examples if e.kind == INDEX]
    retrieval = [e for e in examples if e.kind == RETRIEVAL]
    assert len(retrieval) == len(prepared.splits["train"]) > 0
    assert abs(len(index) - PAPER_RATIO * len(retrieval)) <= 1                 # D < 32 Q: documents repeated
    assert {e.doc_id for e in index} == {d.id for d in prepared.documents}    # validation documents indexed too
    held_out = _documents_of(prepared.splits["val"] + prepared.splits["test"])
    assert held_out and not held_out & {e.doc_id for e in retrieval}

    from genir_jax.training.dsi import dsi_source

    tokenizer = copy.deepcopy(t5_tokenizer)
    tokenizer.add_tokens([gj.docid_token(d.id) for d in prepared.documents])
    source, stats = dsi_source(prepared.documents, prepared.splits["train"], tokenizer, settings, progress=False)
    assert stats["index_examples"] == len(index) and stats["retrieval_examples"] == len(retrieval)
    assert stats["index_longest"] == PAPER_INPUT_LENGTH                       # ~100-word passages, cut to 32
    assert stats["retrieval_longest"] <= PAPER_INPUT_LENGTH
    assert source.groups[0]["input_ids"].shape[1] == PAPER_INPUT_LENGTH


def test_t5_large_follows_the_paper_recipe():
    dsi = T5_LARGE.dsi
    assert is_paper_regime(dsi) and dsi.max_val_queries == 1024 and dsi.docid_init == "random"
    optimizer = dsi.run.optimizer
    assert (optimizer.name, optimizer.learning_rate, optimizer.schedule, optimizer.warmup_steps) == \
        ("adamw", 5e-4, "linear", 10_000)
    assert (optimizer.weight_decay, optimizer.end_fraction, optimizer.clip_norm) == (0.0, 0.0, 1.0)
    assert (dsi.run.batch_size, dsi.run.steps, dsi.run.bf16) == (128, 1_000_000, False)
    shape = T5_LARGE.model
    assert (shape.d_model, shape.num_layers, shape.num_decoder_layers, shape.num_heads, shape.d_ff) == \
        (1024, 24, 24, 16, 4096)


# --------------------------------------------------------------------------------------------------
# train --paper-regime end to end (a few steps of the tiny model)
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_train_paper_regime_records_its_settings(shared_data, t5_tokenizer, tmp_path, capsys):
    data = tmp_path / "nq"
    assert main(["prepare-data", "--dataset", "nq-oracle", "--paper-regime", "--max-documents", "60",
                 "--data-dir", str(shared_data), "-o", str(data)]) == 0
    base = make_base(tmp_path / "base", t5_tokenizer)
    out = tmp_path / "dsi"
    assert main(["train", "--data", str(data), "--base", str(base), "--preset", "tiny", "--paper-regime", "-o",
                 str(out), "--steps", "2", "--eval-every", "2", "--checkpoint-every", "2", "--no-progress"]) == 0
    summary = json.loads((out / "train.json").read_text())
    assert summary["regime"] == "paper"
    assert (summary["settings"]["ratio"], summary["settings"]["index_max_length"],
            summary["settings"]["query_max_length"]) == (32, 32, 32)
    assert summary["data_split"]["scheme"] == "nq10k"
    assert summary["data_split"]["val_documents_with_train_queries"] == 0
    _, splits = load_prepared(data)
    assert summary["data"]["retrieval_examples"] == len(splits["train"])
    assert abs(summary["data"]["index_examples"] - 32 * len(splits["train"])) <= 1
    assert summary["data"]["index_longest"] == 32
    capsys.readouterr()


# --------------------------------------------------------------------------------------------------
# Bad input: exit 2, nothing written
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["--dataset", "cranfield", "--split", "nq10k"], "needs exactly one relevant document per query"),
    (["--dataset", "cranfield", "--paper-regime"], "use --split random"),
    (["--dataset", "nq-oracle", "--split", "by-title"], "invalid choice: 'by-title'"),
    (["--dataset", "reference-json", "--paper-regime", "--documents", "d.json", "--train-queries", "t.json",
      "--val-queries", "v.json"], "do not apply to reference-json"),
])
def test_prepare_data_bad_split_exits_2(shared_data, tmp_path, capsys, argv, fragment):
    out = tmp_path / "out"
    assert _exit_code(["prepare-data", *argv, "--data-dir", str(shared_data), "-o", str(out)]) == 2
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_library_rejects_bad_split(shared_data):
    with pytest.raises(GenIRError, match="unknown split 'halves'"):
        build_prepared("nq-oracle", shared_data, split="halves")
    with pytest.raises(GenIRError, match="reference-json"):
        build_prepared("reference-json", shared_data, split="nq10k", documents="d", train_queries="t",
                       val_queries="v")


def test_train_paper_regime_conflicting_ratio_exits_2(tmp_path, capsys):
    out = tmp_path / "dsi"
    code = main(["train", "--data", str(tmp_path / "none"), "--base", str(tmp_path / "none"), "--preset", "tiny",
                 "--paper-regime", "--ratio", "4", "-o", str(out), "--no-progress"])
    assert code == 2
    assert "--paper-regime trains at ratio 32" in capsys.readouterr().err
    assert not out.exists()


def _exit_code(argv) -> int:
    """The CLI's exit code, whether `main` returns it or argparse exits with it (a bad choice)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code
