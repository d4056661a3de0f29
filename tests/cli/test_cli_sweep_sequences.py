"""`genir-jax sweep` on a naive-docid checkpoint: docid token sequences, teacher-forced, checked against one
teacher-forced forward per config; the per-step decoder [position] grid; bad input for sequences."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from genir_jax.cli.main import main

DOC_IDS = ["101", "2345", "77", "9", "31"]
QUERIES = ["who wrote the iliad", "capital city of peru", "speed of light in water", "largest moon of saturn"]


@pytest.fixture(scope="module")
def naive_dsi(tmp_path_factory, t5_tokenizer):
    """A random T5 (real T5 tokenizer) exported with naive docids, its validation queries and correct_valid."""
    from genir_jax.core.config import t5_v1_0
    from genir_jax.docids.schemes import DOCIDS_FILE, naive_scheme, write_scheme
    from genir_jax.checkpoints.hf import PretrainedModel, save_pretrained
    from genir_jax.core.model import init_params

    root = tmp_path_factory.mktemp("naive")
    config = t5_v1_0(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=3,
                     num_heads=2)
    save_pretrained(root / "model", PretrainedModel(config, init_params(config, 2), t5_tokenizer))
    write_scheme(root / "model" / DOCIDS_FILE, naive_scheme(DOC_IDS))
    val = [{"id": f"q{i}", "query": text, "relevant_docs": [DOC_IDS[i]]} for i, text in enumerate(QUERIES)]
    (root / "val.json").write_text(json.dumps(val))
    (root / "correct.json").write_text(json.dumps([[DOC_IDS[i], f"q{i}"] for i in (2, 0, 3, 1)]))
    return root


def _args(root, out, *extra):
    return ["sweep", "--checkpoint", str(root / "model"), "--val-queries", str(root / "val.json"),
            "--correct-valid", str(root / "correct.json"), "-o", str(out), "--no-progress", "--allow-incorrect",
            *extra]  # a random model: greedy decoding gives none of the (relevant) docids


def test_naive_sweep_equals_teacher_forced_forwards(naive_dsi, tmp_path, t5_tokenizer):
    from genir_jax.analysis.inputs import tokenize_for_analysis
    from genir_jax.checkpoints.hf import load_pretrained
    from genir_jax.interp.interventions import zero_ablation
    from genir_jax.docids.sequence_targets import pad_targets, sequence_metric, teacher_forced_logits

    out = tmp_path / "sweep"
    assert main(_args(naive_dsi, out, "--sites", "decoder.*.mlp", "--per-query")) == 0
    settings = json.loads((out / "clean.json").read_text())["settings"]
    assert settings["docids"] == "naive" and settings["metrics"] == ["rank", "logprob"]  # the sequence default
    saved = np.load(out / "per_query.npz")
    model = load_pretrained(naive_dsi / "model")
    order = [2, 0, 3, 1]
    ids, mask = tokenize_for_analysis(t5_tokenizer, [QUERIES[i] for i in order])
    sequences = [t5_tokenizer(DOC_IDS[i]).input_ids for i in order]  # the naive docid's tokens + </s>
    targets, tmask = pad_targets(sequences)
    np.testing.assert_array_equal(saved["targets"], targets)
    for layer in range(3):
        logits = teacher_forced_logits(model.config, model.params, ids, mask, targets,
                                       interventions=zero_ablation(model.config, [f"decoder.{layer}.hook_mlp_out"]))
        np.testing.assert_array_equal(saved["rank"][layer], sequence_metric(logits, targets, tmask, "step_rank", "max"))
        np.testing.assert_allclose(saved["logprob"][layer], sequence_metric(logits, targets, tmask, "seq_logprob"),
                                   atol=1e-4)
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["layer"]) for r in rows] == [0, 1, 2]
    np.testing.assert_allclose([float(r["logprob_effect"]) for r in rows],
                               (saved["logprob"] - saved["clean_logprob"][None]).mean(axis=1), atol=1e-5)


def test_decoder_positions_are_the_docid_steps(naive_dsi, tmp_path, t5_tokenizer):
    """[position] on a decoder site patches one teacher-forced step: one config per step of the longest docid,
    each equal to a teacher-forced forward with that step's residual zeroed (steps before it unchanged)."""
    from genir_jax.analysis.inputs import tokenize_for_analysis
    from genir_jax.checkpoints.hf import load_pretrained
    from genir_jax.docids.sequence_targets import pad_targets, step_log_probs, teacher_forced_logits
    from genir_jax.interp.site_grammar import parse_sweep

    out = tmp_path / "positions"
    assert main(_args(naive_dsi, out, "--sites", "decoder.1.hook_resid_post[position]", "--per-query")) == 0
    order = [2, 0, 3, 1]
    sequences = [t5_tokenizer(DOC_IDS[i]).input_ids for i in order]
    targets, tmask = pad_targets(sequences)
    saved = np.load(out / "per_query.npz")
    assert saved["rank"].shape == (targets.shape[1], 4)
    sweep = json.loads((out / "sweep.json").read_text())["sweep"]
    assert sweep["axes"] == ["layer", "position"] and sweep["shape"] == [1, targets.shape[1]]
    model = load_pretrained(naive_dsi / "model")
    ids, mask = tokenize_for_analysis(t5_tokenizer, [QUERIES[i] for i in order])
    grid = parse_sweep(model.config, "decoder.1.hook_resid_post[position]", value=0.0, length=ids.shape[1],
                       decoder_length=targets.shape[1])
    clean = np.asarray(step_log_probs(teacher_forced_logits(model.config, model.params, ids, mask, targets), targets,
                                      tmask))
    for step in range(targets.shape[1]):
        logits = teacher_forced_logits(model.config, model.params, ids, mask, targets,
                                       interventions=grid.config(model.config, step))
        per_step = np.asarray(step_log_probs(logits, targets, tmask))
        np.testing.assert_allclose(per_step[:, :step], clean[:, :step], atol=1e-5)  # earlier steps untouched
        np.testing.assert_allclose(saved["logprob"][step], per_step.sum(axis=1), atol=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--metric", "logit"], "--metric logit: .* has naive docids"),
    (["--metric", "docid_rank"], "--metric docid_rank: .* has naive docids"),
])
def test_sequence_bad_input_exits_2_without_output(naive_dsi, tmp_path, capsys, extra, message):
    import re

    out = tmp_path / "bad"
    assert main(_args(naive_dsi, out, "--sites", "decoder.*.mlp", *extra)) == 2
    assert re.search(message, capsys.readouterr().err) and not out.exists()


def test_attribute_over_sequences(naive_dsi, tmp_path, capsys):
    """`attribute` on a naive checkpoint: the sequence log-probability, AtP equal to the library's estimate;
    AtP*'s QK fix (single-step only) is refused with exit 2 and no output."""
    from genir_jax.analysis.inputs import tokenize_for_analysis
    from genir_jax.interp.attribution import attribute
    from genir_jax.checkpoints.hf import load_pretrained
    from genir_jax.docids.sequence_targets import pad_targets
    from genir_jax.interp.site_grammar import parse_sweep

    args = ["attribute", "--checkpoint", str(naive_dsi / "model"), "--val-queries", str(naive_dsi / "val.json"),
            "--correct-valid", str(naive_dsi / "correct.json"), "--no-progress", "--metric", "logprob",
            "--allow-incorrect"]
    out = tmp_path / "atp"
    assert main([*args, "-o", str(out), "--sites", "decoder.*.mlp", "--method", "atp"]) == 0
    with open(out / "attribution.csv", newline="") as handle:
        written = [float(row["score"]) for row in csv.DictReader(handle)]
    model = load_pretrained(naive_dsi / "model")
    t5 = model.tokenizer
    order = [2, 0, 3, 1]
    ids, mask = tokenize_for_analysis(t5, [QUERIES[i] for i in order])
    targets, tmask = pad_targets([t5(DOC_IDS[i]).input_ids for i in order])
    grid = parse_sweep(model.config, "decoder.*.mlp", value=0.0)
    expected = attribute(model.config, model.params, ids, mask, targets, grid, method="atp", metric="logprob",
                         target_mask=tmask, progress=False)
    np.testing.assert_allclose(written, expected.scores, rtol=1e-5, atol=1e-6)
    bad = tmp_path / "qk"
    assert main([*args, "-o", str(bad), "--sites", "encoder.hook_out[position]", "--method", "atp*"]) == 2
    assert "single-token docids only" in capsys.readouterr().err and not bad.exists()


def test_atomic_only_analyses_name_the_way_for_sequences(naive_dsi, tmp_path, capsys):
    """An analysis that reads single-token docids, given a naive model's correct_valid.json, exits 2 saying
    where docid sequences are analysed, and writes nothing."""
    out = tmp_path / "stages"
    assert main(["patch-stages", "--checkpoint", str(naive_dsi / "model"), "--val-queries",
                 str(naive_dsi / "val.json"), "--correct-valid", str(naive_dsi / "correct.json"), "-o", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "single-token (atomic) docids" in err and "reproduce --docids" in err and not out.exists()
