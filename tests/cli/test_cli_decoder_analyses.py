"""The analyses on a decoder-only DSI checkpoint end to end: a tiny GPT-2 trained with `genir-jax train --model-type
decoder` (atomic docids), its correct queries from `genir-jax evaluate --model-type decoder`; the analysis commands
detect the family from the checkpoint (no --model-type). Checked against independent computations with
`decoder_only.forward`; the cross-attention analyses are refused as not applicable."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from genir_jax.cli.main import main
from tests.decoder_fixtures import save_decoder_base, train_tokenizer
from tests.training.test_training_cli import make_prepared

NOT_APPLICABLE = "is not applicable to decoder-only models: a decoder-only model has no"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, queries file, correct_valid.json): a GPT-2 DSI model trained on 8 documents until it ranks
    its training queries right (200 steps, about 15 s on 2 cores), evaluated on them: the validation queries of
    so small a model are mostly wrong, its training queries are all correct, and the analyses need correct
    pairs."""
    from genir_jax.data.prepare import load_prepared

    root = tmp_path_factory.mktemp("decoder-dsi")
    prepared = make_prepared(root / "prepared", documents=8)
    documents, splits = load_prepared(prepared)
    base = save_decoder_base(root / "base", "gpt2", train_tokenizer([d.text for d in documents] +
                                                                    [q.text for q in splits["train"]]))
    assert main(["train", "--model-type", "decoder", "--data", str(prepared), "--base", str(base), "--preset", "tiny",
                 "-o", str(root / "dsi"), "--steps", "200", "--batch-size", "8", "--log-every", "50",
                 "--eval-every", "200", "--checkpoint-every", "200", "--no-progress"]) == 0
    assert main(["evaluate", "--model-type", "decoder", "--checkpoint", str(root / "dsi"), "--prepared",
                 str(prepared), "--split", "train", "--name", "valid", "-o", str(root / "eval"), "--json"]) == 0
    correct = root / "eval" / "correct_valid.json"
    assert len(json.loads(correct.read_text())) >= 8  # most training queries are ranked first
    return root / "dsi", prepared / "train_queries.json", correct


def _prompt_logits(model, ids, mask, interventions=None):
    """Logits [N, V] at each prompt's last real token, from plain `decoder_only.forward` calls."""
    from genir_jax.core import decoder_only as do

    last = np.asarray(do.last_positions(mask))
    return np.asarray(do.forward(model.config, model.params, ids, mask, interventions))[np.arange(len(ids)), last]


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_analysis_inputs_of_a_decoder_only_checkpoint(trained, tmp_path, capsys):
    """The rows `evaluate` ranks, the docid token as target, every pair correct by evaluate's rule; a pair that
    is not correct is refused, naming it."""
    from genir_jax.analysis.inputs import docid_ranks, load_analysis_inputs
    from genir_jax.base.errors import DataError, GenIRError
    from genir_jax.checkpoints.decoder_hf import PretrainedDecoder
    from genir_jax.checkpoints.hf import checkpoint_is_decoder_only
    from genir_jax.data.corpus import read_queries
    from genir_jax.training.decoder_dsi import encode_prompts

    checkpoint, queries, correct = trained
    assert checkpoint_is_decoder_only(checkpoint) and not checkpoint_is_decoder_only(tmp_path)
    inputs = load_analysis_inputs(checkpoint, queries, correct)
    assert isinstance(inputs.model, PretrainedDecoder)
    pairs = json.loads(correct.read_text())
    texts = {q.id: q.text for q in read_queries(queries)}
    assert [q.query_id for q in inputs.queries] == [query for _, query in pairs]
    ids, mask = encode_prompts([texts[query] for _, query in pairs], inputs.model.tokenizer, 128)
    np.testing.assert_array_equal(inputs.input_ids, ids)
    np.testing.assert_array_equal(inputs.attention_mask, mask)
    vocab = inputs.model.tokenizer.get_vocab()
    np.testing.assert_array_equal(inputs.targets, [vocab[token] for token, _ in pairs])
    logits = _prompt_logits(inputs.model, ids, mask)
    np.testing.assert_array_equal(logits.argmax(-1), inputs.targets)  # each docid the top token
    # the rank rule: tokens scoring higher, plus equal-scoring tokens of lower id
    target = logits[np.arange(len(ids)), inputs.targets][:, None]
    wrong = (inputs.targets + 1) % logits.shape[1]
    expected = ((logits > logits[np.arange(len(ids)), wrong][:, None]) |
                ((logits == logits[np.arange(len(ids)), wrong][:, None]) & (np.arange(logits.shape[1]) < wrong[:, None])))
    np.testing.assert_array_equal(docid_ranks(inputs.model, ids, mask, wrong), expected.sum(1))
    assert (docid_ranks(inputs.model, ids, mask, inputs.targets) == 0).all() and (logits <= target).all()

    other = [pairs[1][0] if pairs[1][0] != pairs[0][0] else pairs[-1][0], pairs[0][1]]  # another document's docid
    bad = tmp_path / "correct_valid.json"
    bad.write_text(json.dumps([other] + pairs[1:]))
    with pytest.raises(DataError, match=r"record index 0: field 0 \(docid_token\) .* is not a relevant document"):
        load_analysis_inputs(checkpoint, queries, bad)
    kept = load_analysis_inputs(checkpoint, queries, bad, allow_incorrect=True)
    assert len(kept.queries) == len(pairs) and "1 of" in capsys.readouterr().err
    with pytest.raises(GenIRError, match="reference padding .* not applicable to decoder-only models"):
        load_analysis_inputs(checkpoint, queries, correct, reference_padding=True)


def test_sweep_of_a_decoder_only_checkpoint(trained, tmp_path, capsys):
    """`genir-jax sweep` over every head (TransformerLens site names): each row's mean logit is that of plain
    forwards with the head zeroed."""
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.interp import interventions as ivs

    checkpoint, queries, correct = trained
    out = tmp_path / "heads"
    assert main(["sweep", "-c", str(checkpoint), "--val-queries", str(queries), "--correct-valid", str(correct),
                 "--sites", "blocks.*.attn.hook_z[head]", "--metric", "rank,logit", "-o", str(out),
                 "--no-progress"]) == 0
    inputs = load_analysis_inputs(checkpoint, queries, correct)
    model = inputs.model
    rows = _rows(out / "results.csv")
    assert len(rows) == model.config.num_layers * model.config.num_heads
    for row in rows:
        zeroed = ivs.zero_ablation(model.config, [row["site"]], heads=[int(row["head"])])
        logits = _prompt_logits(model, inputs.input_ids, inputs.attention_mask, zeroed)
        expected = logits[np.arange(len(logits)), inputs.targets].mean()
        assert float(row["logit"]) == pytest.approx(expected, abs=1e-4), row
    assert json.loads((out / "clean.json").read_text())["clean"]["hits@1"] == 1.0
    assert (out / "heatmap_logit.png").is_file()


def test_resample_sweep_and_receivers_on_a_decoder_only_checkpoint(trained, tmp_path, capsys):
    """`genir-jax sweep --mode resample` over the layer components: each row's mean logit is that of plain
    forwards with the component's output replaced by the deranged prompts' (seed 0); with ``--receivers all``
    the same rows (path patching along every path), with ``--receivers none`` the clean logit."""
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.core import decoder_only as do
    from genir_jax.interp import interventions as ivs
    from genir_jax.interp.patching import derangement

    checkpoint, queries, correct = trained
    runs = {}
    for name, extra in (("plain", []), ("all", ["--receivers", "all"]), ("none", ["--receivers", "none"])):
        out = tmp_path / name
        assert main(["sweep", "-c", str(checkpoint), "--val-queries", str(queries), "--correct-valid", str(correct),
                     "--sites", "blocks.*.*", "--mode", "resample", "--seed", "0", "--metric", "rank,logit", "-o",
                     str(out), "--no-progress", *extra]) == 0
        runs[name] = (_rows(out / "results.csv"), json.loads((out / "clean.json").read_text()))
    inputs = load_analysis_inputs(checkpoint, queries, correct)
    model, ids, mask = inputs.model, inputs.input_ids, inputs.attention_mask
    permutation = derangement(len(ids), 0)
    rows = runs["plain"][0]
    assert len(rows) == 2 * model.config.num_layers
    _, cache = do.forward_with_cache(model.config, model.params, ids[permutation], mask[permutation],
                                     cache_sites=[row["site"] for row in rows])
    clean = _prompt_logits(model, ids, mask)[np.arange(len(ids)), inputs.targets].mean()
    changed = 0
    for plain, every, none in zip(rows, runs["all"][0], runs["none"][0]):
        patched = ivs.replacement(model.config, {plain["site"]: np.asarray(cache[plain["site"]])})
        logits = _prompt_logits(model, ids, mask, patched)
        expected = logits[np.arange(len(logits)), inputs.targets].mean()
        assert float(plain["logit"]) == pytest.approx(expected, abs=1e-4), plain
        assert float(every["logit"]) == pytest.approx(expected, abs=1e-4), every
        assert float(none["logit"]) == pytest.approx(clean, abs=1e-4), none
        changed += abs(expected - clean) > 1e-3
    assert changed > 0


def test_source_sweep_on_a_decoder_only_checkpoint(trained, tmp_path):
    """`genir-jax sweep --mode source --source-model BASE`: each layer component's output replaced by the one the
    pre-DSI base model (the GPT-2 the DSI model was fine-tuned from) computes on the same prompts; each row's
    mean logit equals plain forwards with that replacement."""
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.checkpoints.decoder_hf import load_decoder_only
    from genir_jax.core import decoder_only as do
    from genir_jax.interp import interventions as ivs

    checkpoint, queries, correct = trained
    base_dir = checkpoint.parent / "base"
    out = tmp_path / "source"
    assert main(["sweep", "-c", str(checkpoint), "--val-queries", str(queries), "--correct-valid", str(correct),
                 "--sites", "blocks.*.*", "--mode", "source", "--source-model", str(base_dir), "--metric",
                 "rank,logit", "-o", str(out), "--no-progress"]) == 0
    rows = _rows(out / "results.csv")
    inputs = load_analysis_inputs(checkpoint, queries, correct)
    model, ids, mask = inputs.model, inputs.input_ids, inputs.attention_mask
    assert len(rows) == 2 * model.config.num_layers
    base = load_decoder_only(base_dir)
    _, cache = do.forward_with_cache(base.config, base.params, ids, mask, cache_sites=[row["site"] for row in rows])
    clean = _prompt_logits(model, ids, mask)[np.arange(len(ids)), inputs.targets].mean()
    changed = 0
    for row in rows:
        patched = ivs.replacement(model.config, {row["site"]: np.asarray(cache[row["site"]])})
        logits = _prompt_logits(model, ids, mask, patched)
        expected = logits[np.arange(len(logits)), inputs.targets].mean()
        assert float(row["logit"]) == pytest.approx(expected, abs=1e-4), row
        changed += abs(expected - clean) > 1e-3
    assert changed > 0


def test_a_source_model_of_the_other_family_or_shape_is_refused(trained, tmp_path, capsys):
    """`--mode source` with a T5, or with a decoder-only model of another shape, exits 2 naming why."""
    from tests.decoder_fixtures import build_torch_causal_lm, save_causal_lm
    from tests.hf_fixtures import build_torch_t5

    checkpoint, queries, correct = trained
    build_torch_t5().save_pretrained(tmp_path / "t5")
    wider = save_causal_lm(build_torch_causal_lm("gpt2", n_embd=64, n_positions=128, vocab_size=1000), tmp_path / "wide")
    for source, message in ((tmp_path / "t5", "the source model is a T5"), (wider, "the source model's d_model=64")):
        code = main(["sweep", "-c", str(checkpoint), "--val-queries", str(queries), "--correct-valid", str(correct),
                     "--sites", "blocks.*.*", "--mode", "source", "--source-model", str(source), "-o",
                     str(tmp_path / "out"), "--no-progress"])
        assert code == 2 and message in capsys.readouterr().err, source


def test_attribute_of_a_decoder_only_checkpoint(trained, tmp_path, capsys):
    """`genir-jax attribute --method atp*` over layer x component: the library's estimates, checked exactly."""
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.interp.attribution import attribute
    from genir_jax.interp.site_grammar import parse_sweep

    checkpoint, queries, correct = trained
    out = tmp_path / "atp"
    assert main(["attribute", "-c", str(checkpoint), "--val-queries", str(queries), "--correct-valid", str(correct),
                 "--sites", "blocks.*.*", "--method", "atp*", "--metric", "logprob", "--check-exact", "3",
                 "-o", str(out), "--no-progress"]) == 0
    inputs = load_analysis_inputs(checkpoint, queries, correct)
    config = inputs.model.config
    expected = attribute(config, inputs.model.params, inputs.input_ids, inputs.attention_mask, inputs.targets,
                         parse_sweep(config, "blocks.*.*"), method="atp*", metric="logprob", progress=False)
    rows = _rows(out / "attribution.csv")
    assert [(r["site"]) for r in rows] == [f"blocks.{l}.hook_{c}_out" for l in range(config.num_layers)
                                           for c in ("attn", "mlp")]
    np.testing.assert_allclose([float(r["score"]) for r in rows], expected.scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose([float(r["magnitude"]) for r in rows], expected.magnitudes, rtol=1e-4, atol=1e-6)
    record = json.loads((out / "attribution.json").read_text())
    assert record["exact_check"]["configs"] == 3 and record["method"] == "atp*"


@pytest.mark.parametrize("command", ["swap-encoder", "crattn-reading", "crattn-writes", "crattn-head-tokens",
                                     "head-logit-lens"])
def test_cross_attention_analyses_are_not_applicable(trained, tmp_path, capsys, command):
    checkpoint, queries, correct = trained
    argv = {"swap-encoder": ["--complete-model-path", str(checkpoint), "--val-queries", str(queries)],
            "crattn-head-tokens": ["-c", str(checkpoint), "--queries", str(queries), "--heads", "0.0"]}.get(
        command, ["-c", str(checkpoint), "--val-queries", str(queries)])
    capsys.readouterr()
    assert main([command, *argv, "--correct-valid", str(correct), "-o", str(tmp_path / "out")]
                if command != "crattn-head-tokens" else [command, *argv, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{command} {NOT_APPLICABLE}" in err, err
    assert not (tmp_path / "out").exists()


def test_neuron_reading_is_refused_as_not_yet_supported(trained, tmp_path, capsys):
    checkpoint, queries, correct = trained
    assert main(["neuron-reading", "-c", str(checkpoint), "--val-queries", str(queries), "--correct-valid",
                 str(correct), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "neuron-reading does not run on decoder-only models yet" in err, err


def test_patch_stages_of_a_decoder_only_checkpoint(trained, tmp_path, capsys):
    """`genir-jax patch-stages` with fixed stages: attn and mlp rows (no cross_attn), zero and mean; each row's
    share of queries knocked off rank 0 is that of plain forwards with the stage's outputs patched."""
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.interp import interventions as ivs

    checkpoint, queries, correct = trained
    out = tmp_path / "stages"
    assert main(["patch-stages", "-c", str(checkpoint), "--val-queries", str(queries), "--correct-valid",
                 str(correct), "--stages", "0,1", "-o", str(out), "--no-progress"]) == 0
    inputs = load_analysis_inputs(checkpoint, queries, correct)
    model, ids, mask = inputs.model, inputs.input_ids, inputs.attention_mask
    sites = [f"blocks.{layer}.hook_{c}_out" for c in ("attn", "mlp") for layer in (0, 1)]
    means = ivs.mean_activations(model.config, model.params, ids, mask, sites, progress=False)
    rows = _rows(out / "patching_results_single_combis.csv")
    assert [(r["component"], r["stage"], r["mode"]) for r in rows] == [
        (c, s, m) for m in ("mean", "zero") for c in ("mlp", "attn") for s in ("0", "1")]
    for row in rows:
        site = f"blocks.{row['stage']}.hook_{row['component']}_out"
        patch = (ivs.zero_ablation(model.config, [site]) if row["mode"] == "zero" else
                 ivs.mean_ablation(model.config, means, sites=[site]))
        logits = _prompt_logits(model, ids, mask, patch)
        assert float(row["!=0"]) == pytest.approx(np.mean(logits.argmax(-1) != inputs.targets)), row
    assert json.loads((out / "stages.json").read_text())["stages"] == [[0], [1]]
    capsys.readouterr()
    assert main(["patch-stages", "-c", str(checkpoint), "--val-queries", str(queries), "--correct-valid",
                 str(correct), "--stages", "0,1", "--modes", "t5", "--t5", str(checkpoint), "-o",
                 str(tmp_path / "t5"), "--no-progress"]) == 2
    assert "t5 mode is not applicable to decoder-only models" in capsys.readouterr().err


def test_residual_rank_of_a_decoder_only_checkpoint(trained, tmp_path, capsys):
    """`genir-jax residual-rank`: contributions and logit-lens ranks at the prompt's last token, recomputed here
    with numpy from the recorded sites (GPT-2's final LayerNorm and tied unembedding written out); no
    cross-attention rows."""
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.core import decoder_only as do

    checkpoint, queries, correct = trained
    out = tmp_path / "residual"
    assert main(["residual-rank", "-c", str(checkpoint), "--val-queries", str(queries), "--correct-valid",
                 str(correct), "-o", str(out), "--no-progress"]) == 0
    inputs = load_analysis_inputs(checkpoint, queries, correct)
    model, ids, mask = inputs.model, inputs.input_ids, inputs.attention_mask
    config, params = model.config, model.params
    sites = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"]
    _, cache = do.forward_with_cache(config, params, ids, mask, cache_sites=[f"blocks.*.{s}" for s in sites])
    last = np.asarray(do.last_positions(mask))
    rows = np.arange(len(ids))
    scale, bias = (np.asarray(params["final_norm"][k], np.float64) for k in ("scale", "bias"))
    embed = np.asarray(params["embed"], np.float64)

    def lens_rank(x, target):  # rank of the target in unembed(LayerNorm(x)), ties: lower id first
        normed = (x - x.mean()) / np.sqrt(x.var() + config.norm_epsilon) * scale + bias
        logits = embed @ normed
        return int(np.sum((logits > logits[target]) | ((logits == logits[target]) &
                                                        (np.arange(len(logits)) < target))))

    ranks = {(r["query"], int(r["layer"]), r["component"]): float(r["value"])
             for r in _rows(out / "all_ranks_correct_doc.csv")}
    contributions = {(r["query"], int(r["layer"]), r["func"], r["component"]): float(r["value"])
                     for r in _rows(out / "all_dec_resid_results.csv")}
    assert {c for _, _, c in ranks} >= {"Residual Before Cr.Attn", "MLP Output", "Residual After Layer"}
    assert not {c for _, _, c in ranks} & {"Residual After Cr.Attn", "Cross-Attn. Output"}
    assert "Cross-Attn." not in {c for *_, c in contributions}
    for layer in range(config.num_layers):
        x = {s: np.asarray(cache[f"blocks.{layer}.{s}"], np.float64)[rows, last] for s in sites}
        for q, query in enumerate(inputs.queries):
            key = (query.query_id, layer)
            for site, label in (("hook_resid_mid", "Residual Before Cr.Attn"), ("hook_mlp_out", "MLP Output"),
                                ("hook_resid_post", "Residual After Layer")):
                assert ranks[key + (label,)] == lens_rank(x[site][q], inputs.targets[q]), key + (label,)
            delta = np.linalg.norm(x["hook_resid_post"][q] - x["hook_resid_pre"][q])
            for site, label in (("hook_attn_out", "Self-Attn."), ("hook_mlp_out", "MLP")):
                assert contributions[key + ("Ratio to Delta of Residual", label)] == pytest.approx(
                    np.linalg.norm(x[site][q]) / delta, rel=1e-4)
    summary = json.loads((out / "residual_rank_summary.json").read_text())
    assert summary["queries_not_at_rank_0"] == 0 and list(summary["component_sums"]) == ["mlp"]


def test_automatic_stages_of_a_decoder_only_checkpoint(trained, tmp_path, capsys):
    """patch-stages' default for a 2-layer model: automatic stages, fitted on the attn and mlp curves (no
    cross-attention columns), the table reported on the held-out half."""
    checkpoint, queries, correct = trained
    out = tmp_path / "auto"
    assert main(["patch-stages", "-c", str(checkpoint), "--val-queries", str(queries), "--correct-valid",
                 str(correct), "-o", str(out), "--no-progress"]) == 0
    record = json.loads((out / "stages.json").read_text())
    assert record["method"] == "auto" and sorted(sum(record["stages"], [])) == [0, 1]
    assert sorted(record["features"]) == sorted(["ratio_attn", "ratio_mlp", "lens_log1p_rank", "zero_drop_attn",
                                                  "zero_drop_mlp"])
    held_out = len(json.loads((out / "ranks_correct_queries_patching_single_combis.json").read_text())
                   ["0-attn-zero"])
    assert 0 < held_out < len(json.loads(correct.read_text()))


def test_circuit_of_a_decoder_only_checkpoint(trained, tmp_path, capsys):
    """`genir-jax circuit` with a circuit file (layer 0's MLP mean-replaced): Hits@1 over the docid tokens with
    the circuit is that of plain forwards with the mean patched in; the paper's default circuit is refused."""
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.data.corpus import read_queries
    from genir_jax.docids.tokens import docid_vocabulary
    from genir_jax.interp import interventions as ivs
    from genir_jax.training.decoder_dsi import encode_prompts

    checkpoint, queries, correct = trained
    circuit = tmp_path / "circuit.json"
    circuit.write_text(json.dumps({"name": "mlp0", "patches": [{"component": "mlp", "stages": [0], "mode": "mean"}]}))
    argv = ["circuit", "-c", str(checkpoint), "--test-queries", str(queries), "--val-queries", str(queries),
            "--correct-valid", str(correct), "--stages", "0,1", "--no-progress"]
    assert main(argv + ["--circuit", str(circuit), "-o", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "minimal_circuit.json").read_text())
    inputs = load_analysis_inputs(checkpoint, queries, correct)
    model = inputs.model
    means = ivs.mean_activations(model.config, model.params, inputs.input_ids, inputs.attention_mask,
                                 ["blocks.0.hook_mlp_out"], progress=False)
    test = read_queries(queries)
    ids, mask = encode_prompts(test, model.tokenizer, 128)
    vocabulary = docid_vocabulary(model.tokenizer)
    columns = np.asarray(sorted(vocabulary))
    for name, patch in (("unpatched", None), ("patched", ivs.mean_ablation(model.config, means))):
        best = columns[_prompt_logits(model, ids, mask, patch)[:, columns].argmax(-1)]
        hits = np.mean([vocabulary[int(token)] in q.relevant_docs for token, q in zip(best, test)])
        assert report["rankings"]["docid tokens only"][name]["Hits@1"] == pytest.approx(hits), name
    capsys.readouterr()
    assert main(argv + ["-o", str(tmp_path / "paper")]) == 2
    assert "the paper's circuit is not applicable to decoder-only models" in capsys.readouterr().err
    circuit.write_text(json.dumps({"patches": [{"component": "cross_attn", "stages": [0], "mode": "zero"}]}))
    assert main(argv + ["--circuit", str(circuit), "-o", str(tmp_path / "cross")]) == 2
    assert "component 'cross_attn' is not in a decoder-only model" in capsys.readouterr().err
