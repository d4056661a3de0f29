"""correct_valid.json pairs are checked against relevance and rank wherever they are read
(`genir_jax.analysis.inputs.check_correct_pairs`, through `load_analysis_inputs`): `sweep`, `attribute` and
`patch-stages` on atomic and naive docids refuse a pair whose docid is not relevant to its query, or that the
model does not rank first (evaluate's rule), with one line naming the file, the pair and the count;
`--allow-incorrect` keeps them with a warning."""

from __future__ import annotations

import json

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.cli.main import main

DOCS = ["d0", "d1", "d2", "d3", "d4"]
QUERIES = ["who wrote the iliad", "capital city of peru", "speed of light in water", "largest moon of saturn"]
DIMS = dict(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=3, num_heads=2)
COMMANDS = {"sweep": ["--sites", "decoder.*.mlp"], "attribute": ["--sites", "decoder.*.mlp"],
            "patch-stages": ["--modes", "zero", "--stages", "thirds"]}


@pytest.fixture(scope="module")
def atomic(tmp_path_factory, t5_tokenizer):
    """A DSI model that ranks d0..d3 first for queries q0..q3 (`answering_model`); q3's relevant document is d4,
    so [d3, q3] is ranked first but not relevant and [d4, q3] relevant but not ranked first."""
    from tests.dsi_fixtures import answering_model
    from tests.hf_fixtures import HFCheckpointFactory

    root = tmp_path_factory.mktemp("pairs")
    directory, _ = HFCheckpointFactory(root)("base", tokenizer=t5_tokenizer, **DIMS)
    model = gj.add_docid_tokens(gj.load_pretrained(directory), DOCS)
    gj.save_pretrained(root / "model", answering_model(model, QUERIES, DOCS[:4]))
    val = [{"id": f"q{i}", "query": q, "relevant_docs": [DOCS[4 if i == 3 else i]]} for i, q in enumerate(QUERIES)]
    (root / "val.json").write_text(json.dumps(val))
    return root, {"good": [[gj.docid_token(DOCS[i]), f"q{i}"] for i in (2, 0, 1)],
                  "not_relevant": [[gj.docid_token("d0"), "q0"], [gj.docid_token("d3"), "q3"]],
                  "not_first": [[gj.docid_token("d0"), "q0"], [gj.docid_token("d4"), "q3"]]}


@pytest.fixture(scope="module")
def naive(tmp_path_factory, t5_tokenizer):
    """A random T5 with naive docids: greedy decoding gives none of the docids, so every relevant pair is not
    ranked first; [DOCS[1], q0] is not relevant either."""
    from genir_jax.checkpoints.hf import PretrainedModel, save_pretrained
    from genir_jax.core.config import t5_v1_0
    from genir_jax.core.model import init_params
    from genir_jax.docids.schemes import DOCIDS_FILE, naive_scheme, write_scheme

    root = tmp_path_factory.mktemp("naive-pairs")
    docs = ["101", "2345", "77", "9"]
    config = t5_v1_0(**{k: v for k, v in DIMS.items()})
    save_pretrained(root / "model", PretrainedModel(config, init_params(config, 2), t5_tokenizer))
    write_scheme(root / "model" / DOCIDS_FILE, naive_scheme(docs))
    val = [{"id": f"q{i}", "query": q, "relevant_docs": [docs[i]]} for i, q in enumerate(QUERIES)]
    (root / "val.json").write_text(json.dumps(val))
    return root, {"not_relevant": [[docs[1], "q0"]], "not_first": [[docs[2], "q2"], [docs[0], "q0"]]}


def _run(root, pairs, command, out, *extra):
    (root / f"{out.name}.json").write_text(json.dumps(pairs))
    naive = (root / "model" / "docids.json").is_file()
    options = COMMANDS[command] + (["--metric", "logprob"] if command == "attribute" and naive else [])
    return main([command, "--checkpoint", str(root / "model"), "--val-queries", str(root / "val.json"),
                 "--correct-valid", str(root / f"{out.name}.json"), "-o", str(out), "--no-progress", *options,
                 *extra])


def test_truly_correct_pairs_pass_without_a_warning(atomic, capsys):
    from genir_jax.analysis.inputs import check_correct_pairs, load_analysis_inputs

    root, pairs = atomic
    (root / "good.json").write_text(json.dumps(pairs["good"]))
    inputs = load_analysis_inputs(root / "model", root / "val.json", root / "good.json")
    assert [q.query_id for q in inputs.queries] == ["q2", "q0", "q1"] and capsys.readouterr().err == ""
    assert check_correct_pairs(inputs, root / "good.json", root / "val.json").all()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_atomic_pairs_must_be_relevant_and_ranked_first(atomic, tmp_path, capsys, command):
    root, pairs = atomic
    assert _run(root, pairs["not_relevant"], command, tmp_path / "not_relevant") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not_relevant.json: record index 1: field 0 (docid_token) '@DOC_ID_d3@' " \
        "is not a relevant document of query 'q3' (1 of 2 pairs are not correct: 1 not relevant" in err
    assert "--allow-incorrect" in err and not (tmp_path / "not_relevant").exists()
    assert _run(root, pairs["not_first"], command, tmp_path / "not_first") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not_first.json: record index 1: field 0 (docid_token) '@DOC_ID_d4@' is " \
        "at rank" in err and "not first, for query 'q3' (1 of 2 pairs are not correct: 0 not relevant" in err
    assert "--allow-incorrect" in err and not (tmp_path / "not_first").exists()
    both = pairs["good"] + [pairs["not_relevant"][1], pairs["not_first"][1]]
    assert _run(root, both, command, tmp_path / "both", "--allow-incorrect") == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "both.json: 2 of 5 pairs are not correct: 1 not relevant to their query in " in err
    assert "1 not ranked first by the model; kept (--allow-incorrect)" in err


def test_sequence_pairs_are_checked_where_the_reproduction_reads_them(naive, capsys):
    """Naive / semantic analyses (the reproduction's Table 3 included) load their pairs with
    `load_analysis_inputs(sequences=True)`: a pair is correct when greedy decoding gives its docid."""
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.base.errors import DataError
    from genir_jax.docids.sequence_targets import greedy_consistent

    root, pairs = naive
    for name in ("not_relevant", "not_first"):
        (root / f"{name}.json").write_text(json.dumps(pairs[name]))
        with pytest.raises(DataError, match=f"{name}.json: record index 0: .*--allow-incorrect accepts them"):
            load_analysis_inputs(root / "model", root / "val.json", root / f"{name}.json", sequences=True)
    inputs = load_analysis_inputs(root / "model", root / "val.json", root / "not_first.json", sequences=True,
                                  allow_incorrect=True)
    assert "not_first.json: 2 of 2 pairs are not correct" in capsys.readouterr().err
    assert not greedy_consistent(inputs.model.config, inputs.model.params, inputs.input_ids,
                                 inputs.attention_mask, [q.tokens for q in inputs.queries]).any()


@pytest.mark.parametrize("command", ["sweep", "attribute"])  # patch-stages reads atomic docids only
def test_sequence_pairs_must_be_relevant_and_ranked_first(naive, tmp_path, capsys, command):
    root, pairs = naive
    assert _run(root, pairs["not_relevant"], command, tmp_path / "not_relevant") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not_relevant.json: record index 0: field 0 (docid) '2345' is not a " \
        "relevant document of query 'q0' (1 of 1 pairs are not correct: 1 not relevant" in err
    assert _run(root, pairs["not_first"], command, tmp_path / "not_first") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not_first.json: record index 0: field 0 (docid) '77' is at rank" in err
    assert "not first, for query 'q2' (its worst step) (2 of 2 pairs are not correct: 0 not relevant" in err
    assert not (tmp_path / "not_first").exists()
    assert _run(root, pairs["not_relevant"] + pairs["not_first"], command, tmp_path / "both", "--allow-incorrect") == 0
    err = capsys.readouterr().err
    assert "both.json: 3 of 3 pairs are not correct: 1 not relevant to their query in " in err
    assert "3 not ranked first by the model; kept (--allow-incorrect)" in err


def test_every_command_that_reads_the_pairs_takes_allow_incorrect():
    """The one option helper reaches every command with --correct-valid."""
    import argparse

    from genir_jax.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices  # noqa: SLF001
    readers = [name for name, sub in commands.items() if "--correct-valid" in sub._option_string_actions]
    assert {"sweep", "attribute", "patch-stages", "head-logit-lens", "neuron-reading", "residual-rank", "circuit",
            "swap-encoder", "crattn-writes"} <= set(readers)
    assert [name for name in readers if "--allow-incorrect" not in commands[name]._option_string_actions] == []
