"""Residual contributions and logit-lens ranks, checked against numbers computed another way (numpy from
the cache and the parameters, brute-force argsort, one unpadded query at a time)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.analysis.inputs import tokenize_for_analysis
from genir_jax.analysis.logit_lens import logit_lens, vocabulary_rank_stats
from genir_jax.analysis.residual import (
    LENS_SITES, PARTS, docid_mask, rank_rows, resid_rows, run_residual_rank, summary,
)
from genir_jax.core.model import forward_with_cache

QUERIES = ["who wrote the harry potter books", "what is the capital of france", "when did the war end",
           "how many legs does a spider have"]
DOC_IDS = ["d1", "d2", "d3", "d4", "d5", "d6"]
DIMS = dict(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2)
SITES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_cross_attn_out", "hook_resid_mid_cross",
         "hook_mlp_out", "hook_resid_post")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, t5_tokenizer):
    """A random 3-decoder-layer T5 with the real vocabulary and six docid tokens (random rows, scaled up so
    docids and words mix in the rankings), four queries and their cached decoder residuals."""
    from tests.hf_fixtures import HFCheckpointFactory

    factory = HFCheckpointFactory(tmp_path_factory.mktemp("residual"))
    directory, _ = factory("base", tokenizer=t5_tokenizer, **DIMS)
    model = gj.add_docid_tokens(gj.load_pretrained(directory), DOC_IDS, mean_resizing=False, seed=3)
    targets = gj.docid_token_ids(model.tokenizer, DOC_IDS[:len(QUERIES)])
    shared = np.array(model.params["shared"])
    shared[32100:] *= 4.0
    model = model.replace(params={**model.params, "shared": shared})
    ids, mask = tokenize_for_analysis(model.tokenizer, QUERIES)
    start = np.zeros((len(QUERIES), 1), np.int32)
    logits, cache = forward_with_cache(model.config, model.params, ids, mask, start,
                                       cache_sites=[f"decoder.*.{s}" for s in SITES])
    residuals = {s: np.stack([np.asarray(cache[f"decoder.{l}.{s}"])[:, 0] for l in range(3)], axis=1)
                 for s in SITES}  # [N, L, D]
    return model, ids, mask, targets, np.asarray(logits)[:, 0], residuals


@pytest.fixture(scope="module")
def result(tiny):
    model, ids, mask, targets, _, _ = tiny
    return run_residual_rank(model.config, model.params, ids, mask, targets,
                             docid_mask(model.tokenizer, model.config.vocab_size), query_ids=["a", "b", "c", "d"],
                             batch_size=3, progress=False)  # 2 chunks, the last one padded


def _numpy_lens(model, resid):
    """The logit lens in float64 numpy: final RMS norm with its scale, * d_model**-0.5, tied embedding."""
    config, params = model.config, model.params
    r = np.asarray(resid, np.float64)
    normed = r / np.sqrt(np.mean(r ** 2, axis=-1, keepdims=True) + config.layer_norm_epsilon)
    normed = normed * np.asarray(params["decoder"]["final_norm"]["scale"], np.float64)
    return (normed * config.d_model ** -0.5) @ np.asarray(params["shared"], np.float64).T


def _brute_ranks(logits):
    """0-based ranks of every token: position in a stable descending argsort."""
    order = np.argsort(-np.asarray(logits), axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(order.shape[-1])[None].repeat(order.shape[0], 0), axis=-1)
    return ranks


def test_component_outputs_sum_to_the_residual_delta(tiny):
    *_, r = tiny
    np.testing.assert_allclose(r["hook_attn_out"] + r["hook_cross_attn_out"] + r["hook_mlp_out"],
                               r["hook_resid_post"] - r["hook_resid_pre"], atol=1e-5)
    np.testing.assert_allclose(r["hook_resid_pre"] + r["hook_attn_out"], r["hook_resid_mid"], atol=1e-6)


def test_logit_lens_matches_numpy_and_the_model_at_the_last_layer(tiny):
    model, _, _, targets, logits, r = tiny
    lens = np.asarray(logit_lens(model.config, model.params, r["hook_resid_post"]))  # [N, L, V]
    np.testing.assert_allclose(lens, _numpy_lens(model, r["hook_resid_post"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lens[:, -1], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(_brute_ranks(lens[:, -1]), _brute_ranks(logits))


def test_ranks_equal_a_brute_force_argsort_of_the_lens(tiny, result):
    model, _, _, targets, logits, r = tiny
    rows = np.arange(len(QUERIES))
    for s, (site, _) in enumerate(LENS_SITES):
        lens = np.asarray(logit_lens(model.config, model.params, r[f"hook_{site}"]))
        for layer in range(3):
            ranks = _brute_ranks(lens[:, layer])
            np.testing.assert_array_equal(result.lens_ranks[:, layer, s], ranks[rows, targets], err_msg=site)
    # the lens of the last resid_post is the model: the relevant docid's rank there is the model's rank
    np.testing.assert_array_equal(result.lens_ranks[:, -1, -1], _brute_ranks(logits)[rows, targets])
    np.testing.assert_array_equal(result.final_ranks, _brute_ranks(logits)[rows, targets])
    # vocabulary statistics of the resid_post lens
    is_docid = np.zeros(model.config.vocab_size, bool)
    is_docid[32100:] = True
    lens = np.asarray(logit_lens(model.config, model.params, r["hook_resid_post"]))
    vocab = result.vocabulary_rows()
    for q in rows:
        for layer in range(3):
            ranks = _brute_ranks(lens[q, layer][None])[0]
            doc, non = ranks[is_docid], ranks[~is_docid]
            assert result.vocab_stats["docid_min"][q, layer] == doc.min()
            assert result.vocab_stats["docid_max"][q, layer] == doc.max()
            assert result.vocab_stats["docid_sum"][q, layer] == doc.sum()
            assert vocab["docid_mean"][q, layer] == pytest.approx(doc.mean(), abs=1e-9)
            assert vocab["non_docid_min"][q, layer] == non.min()
            assert vocab["non_docid_max"][q, layer] == non.max()
            assert vocab["non_docid_mean"][q, layer] == pytest.approx(non.mean(), abs=1e-9)
            assert result.vocab_stats["non_docid_median"][q, layer] == np.sort(non)[(non.size - 1) // 2]
    # sums of component outputs over layers
    for k, site in enumerate(("hook_mlp_out", "hook_cross_attn_out")):
        lens = np.asarray(logit_lens(model.config, model.params, r[site].sum(axis=1)))
        np.testing.assert_array_equal(result.sum_ranks[:, k], _brute_ranks(lens)[rows, targets])


def test_vocabulary_stats_on_ties_and_odd_counts():
    """Hand-made logits with ties (broken by token id) and an odd number of non-docids."""
    logits = np.asarray([[1.0, 3.0, 3.0, 0.5, 2.0, 3.0, -1.0]], np.float32)
    is_docid = np.asarray([0, 1, 0, 0, 1, 0, 1], bool)
    # stable descending order: 1, 2, 5, 4, 0, 3, 6 -> docid ranks: token1 0, token4 3, token6 6
    stats = {k: int(v[0]) for k, v in vocabulary_rank_stats(logits, is_docid).items()}
    assert (stats["docid_min"], stats["docid_max"]) == (0, 6)
    assert (stats["docid_sum_high"] << 2) + stats["docid_sum_low"] == 9  # rank_sum_bits(7) == 2
    # non-docid ranks: token2 1, token5 2, token0 4, token3 5 -> lower median 2
    assert (stats["non_docid_min"], stats["non_docid_max"], stats["non_docid_median"]) == (1, 5, 2)


def test_contributions_equal_numpy_from_the_cache(tiny, result):
    *_, r = tiny
    delta = r["hook_resid_post"] - r["hook_resid_pre"]
    post = r["hook_resid_post"]
    for p, (_, _, site) in enumerate(PARTS):
        part = r[site].astype(np.float64)
        norm = np.linalg.norm(part, axis=-1)
        np.testing.assert_allclose(result.contributions[:, :, 0, p], norm / np.linalg.norm(delta, axis=-1), rtol=1e-5)
        np.testing.assert_allclose(result.contributions[:, :, 1, p], norm, rtol=1e-5)
        cosine = np.sum(part * post, axis=-1) / (norm * np.linalg.norm(post, axis=-1))
        np.testing.assert_allclose(result.contributions[:, :, 2, p], cosine, rtol=1e-5, atol=1e-6)


def _near_ties(model, resid, target=None, tolerance=1e-5):
    """Float32 noise allowance from a float64 lens of `resid` [D]: tokens whose logit lies within `tolerance`
    (relative to the largest logit) of the target's; without a target, adjacent docid / non-docid pairs
    that close (only such swaps move the docid statistics)."""
    logits = _numpy_lens(model, resid)
    tol = tolerance * np.abs(logits).max()
    if target is not None:
        return int(np.sum(np.abs(logits - logits[target]) <= tol)) - 1
    order = np.argsort(-logits, kind="stable")
    is_doc = order >= 32100
    return int(np.sum((-np.diff(logits[order]) <= tol) & (is_doc[:-1] != is_doc[1:])))


def test_reference_mode_equals_one_unpadded_query_at_a_time(tiny, result):
    """The reference loops over queries, each tokenised alone (no padding); masked batches must agree: floats
    to float32 noise, ranks exactly except where two logits are closer than float32 noise (a near-tie that
    a float64 lens confirms). Reference mode also reports the lower MEDIAN as 'Mean Non-Doc-IDs' and a
    float32 docid mean."""
    model, ids, mask, targets, _, r = tiny
    is_docid = docid_mask(model.tokenizer, model.config.vocab_size, reference=True)
    batched = run_residual_rank(model.config, model.params, ids, mask, targets, is_docid, reference=True,
                                progress=False)
    exact, checked = 0, (1, 2)  # the queries with padding in the batch (query 0 is the longest)
    for q in checked:
        alone = np.asarray([model.tokenizer(QUERIES[q]).input_ids], np.int32)
        single = run_residual_rank(model.config, model.params, alone, np.ones_like(alone), targets[q:q + 1],
                                   is_docid, reference=True, progress=False)
        np.testing.assert_allclose(batched.contributions[q], single.contributions[0], rtol=1e-5, atol=1e-6)
        for layer in range(3):
            for s, (site, _) in enumerate(LENS_SITES):
                diff = abs(batched.lens_ranks[q, layer, s] - single.lens_ranks[0, layer, s])
                assert diff <= _near_ties(model, r[f"hook_{site}"][q, layer], targets[q]), (q, layer, site)
                exact += diff == 0
            allowed = _near_ties(model, r["hook_resid_post"][q, layer])
            for name, values in batched.vocab_stats.items():
                diff = abs(values[q, layer] - single.vocab_stats[name][0, layer])
                assert diff <= allowed, (q, layer, name, diff, allowed)
                exact += diff == 0
        for k, site in enumerate(("hook_mlp_out", "hook_cross_attn_out")):
            diff = abs(batched.sum_ranks[q, k] - single.sum_ranks[0, k])
            assert diff <= _near_ties(model, r[site][q].sum(axis=0), targets[q]), (q, site)
            exact += diff == 0
    assert exact >= 0.9 * len(checked) * (3 * (len(LENS_SITES) + len(batched.vocab_stats)) + 2)
    rows = batched.vocabulary_rows()
    np.testing.assert_array_equal(rows["non_docid_mean"], batched.vocab_stats["non_docid_median"])
    expected = (batched.vocab_stats["docid_sum"].astype(np.float32) / np.float32(len(DOC_IDS))).astype(np.float64)
    np.testing.assert_array_equal(rows["docid_mean"], expected)
    # default mode: the same tokens are docids here, and the non-docid row is the mean
    np.testing.assert_array_equal(result.vocab_stats["docid_sum"], batched.vocab_stats["docid_sum"])
    assert not np.array_equal(result.vocabulary_rows()["non_docid_mean"], rows["non_docid_mean"])


def test_reference_docid_mask_counts_every_id_from_the_first_docid(tiny):
    model = tiny[0]
    default = docid_mask(model.tokenizer, model.config.vocab_size)
    reference = docid_mask(model.tokenizer, model.config.vocab_size, reference=True)
    np.testing.assert_array_equal(np.flatnonzero(default), np.arange(32100, 32106))
    np.testing.assert_array_equal(default, reference)  # docids appended at the end: the two agree
    padded = docid_mask(model.tokenizer, model.config.vocab_size + 2, reference=True)
    assert padded[-2:].all() and padded.sum() == 8  # rows beyond the tokenizer count as docids, as the reference


def test_row_layout_and_summary(result):
    rows = list(resid_rows(result))
    assert len(rows) == 4 * 3 * 3 * 5
    assert rows[0][:4] == ("a", "Ratio to Delta of Residual", 0, "Self-Attn.")
    assert [r[3] for r in rows[:5]] == ["Self-Attn.", "Cross-Attn.", "MLP", "Residual In", "Residual Out"]
    assert rows[5][1] == "Absolute Value" and rows[10][1] == "Cosine Similarity" and rows[15][2] == 1
    assert float(rows[14][4]) == pytest.approx(1.0)  # cos(resid_post, resid_post)
    ranks = list(rank_rows(result))
    assert len(ranks) == 4 * 3 * 11
    assert [r[2] for r in ranks[:11]] == [
        "Residual Before Cr.Attn", "Residual After Cr.Attn", "Cross-Attn. Output", "MLP Output",
        "Residual After Layer", "first_doc", "last_doc", "Mean Doc-IDs", "first_non_doc", "last_non_doc",
        "Mean Non-Doc-IDs"]
    info = summary(result)
    assert info["num_queries"] == 4 and info["num_decoder_layers"] == 3
    np.testing.assert_allclose(info["contributions"]["cosine"]["mlp"]["mean"],
                               result.contributions[:, :, 2, 2].mean(axis=0))
    np.testing.assert_allclose(info["relevant_rank"]["resid_post"]["median"],
                               np.median(result.lens_ranks[:, :, 4], axis=0))
    assert info["component_sums"]["mlp"]["fraction_not_rank_0"] == np.mean(result.sum_ranks[:, 0] > 0)


def test_untied_v11_lens_equals_the_model_at_the_last_layer():
    config = gj.T5Config(**{**dict(vocab_size=64, d_model=8, d_kv=2, d_ff=16, num_layers=2, num_heads=2),
                            "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                            "scale_decoder_outputs": False})
    rng = np.random.default_rng(1)  # random parameters of the right shapes (cheaper than compiling init)
    params = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), gj.param_shapes(config))
    ids = np.asarray([[5, 9, 1]], np.int32)
    logits, cache = forward_with_cache(config, params, ids, np.ones_like(ids), np.zeros((1, 1), np.int32),
                                       cache_sites=["decoder.1.hook_resid_post"])
    lens = logit_lens(config, params, cache["decoder.1.hook_resid_post"][:, 0])
    np.testing.assert_allclose(np.asarray(lens), np.asarray(logits)[:, 0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The CLI: files, layouts and values; bad input
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    """The tiny model saved as an HF checkpoint, with validation queries and correct_valid.json."""
    import json

    root = tmp_path_factory.mktemp("residual-cli")
    gj.save_pretrained(root / "dsi", tiny[0])
    val = [{"id": 100 + i, "query": q, "relevant_docs": [DOC_IDS[i]]} for i, q in enumerate(QUERIES)]
    (root / "val.json").write_text(json.dumps(val))
    (root / "dsi" / "correct_valid.json").write_text(json.dumps([[gj.docid_token(DOC_IDS[i]), 100 + i]
                                                                 for i in range(len(QUERIES))]))
    return root


def _cli(root, *extra):
    from genir_jax.cli.main import main

    # a random model: its pairs are relevant, not its top tokens
    return main(["residual-rank", "-c", str(root / "dsi"), "--val-queries", str(root / "val.json"),
                 "--batch-size", "3", "--no-progress", "--allow-incorrect", *extra])


def _read_csv(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def test_cli_writes_the_reference_files(checkpoint, result, tmp_path):
    import json

    out = tmp_path / "out"
    assert _cli(checkpoint, "-o", str(out)) == 0
    resid = _read_csv(out / "all_dec_resid_results.csv")
    assert resid[0] == ["", "query", "func", "layer", "component", "value"]
    assert [int(r[0]) for r in resid[1:]] == list(range(len(resid) - 1))
    expected = [(q, f, str(l), c, v) for q, f, l, c, v in resid_rows(result)]
    ids = {"a": "100", "b": "101", "c": "102", "d": "103"}  # the fixture's run named its queries a-d
    assert [tuple(r[1:]) for r in resid[1:]] == [(ids[q], *rest) for q, *rest in expected]
    ranks = _read_csv(out / "all_ranks_correct_doc.csv")
    assert ranks[0] == ["", "query", "layer", "component", "value"]
    assert [tuple(r[1:]) for r in ranks[1:]] == [(ids[q], str(l), c, v) for q, l, c, v in rank_rows(result)]
    assert ranks[1][4] == f"{float(result.lens_ranks[0, 0, 0])!r}"  # ranks written as pandas floats, e.g. '43.0'
    sums = _read_csv(out / "ranks_component_sums.csv")
    assert sums[0] == ["", "query", "component", "value"]
    assert [r[1:3] for r in sums[1:3]] == [["100", "Sum of MLP Outputs"], ["100", "Sum of Cross-Attn. Outputs"]]
    assert [float(r[3]) for r in sums[1:]] == result.sum_ranks.reshape(-1).tolist()
    info = json.loads((out / "residual_rank_summary.json").read_text())
    assert info["schema"] == "genir-jax/residual-rank/1" and info["reference_mode"] is False
    assert info["labels"]["vocabulary_rank"]["non_docid_mean"] == "Mean Non-Doc-IDs"
    assert info["labels"]["contributions"]["parts"]["mlp"] == "MLP"
    assert info["labels"]["component_sums"]["mlp"] == "Sum of MLP Outputs"
    assert len(info["vocabulary_rank"]["non_docid_median"]["mean"]) == 3


def test_cli_reference_mode_and_the_reference_defaults(checkpoint, result):
    """--reference-padding: 'Mean Non-Doc-IDs' holds the median. Without -o / --correct-valid the files go to
    and come from the checkpoint directory, as the reference's '[checkpoint]' defaults."""
    assert _cli(checkpoint, "--reference-padding") == 0
    ranks = _read_csv(checkpoint / "dsi" / "all_ranks_correct_doc.csv")
    medians = [float(r[4]) for r in ranks[1:] if r[3] == "Mean Non-Doc-IDs"]
    assert medians == result.vocab_stats["non_docid_median"].reshape(-1).astype(float).tolist()
    means = [float(r[4]) for r in ranks[1:] if r[3] == "Mean Doc-IDs"]
    assert means == (result.vocab_stats["docid_sum"].astype(np.float32) / np.float32(6)).reshape(-1).tolist()


@pytest.mark.parametrize("problem, message", [
    ("unknown_query", "record index 1: query id '999' is not in"),
    ("unknown_docid", "docid token '@DOC_ID_zzz@' is not in the model's vocabulary"),
    ("not_a_list", "expected a JSON list of [docid_token, query_id] pairs"),
    ("bad_batch", "--batch-size must be in 1..65536, got 0"),
    ("no_checkpoint", "config file not found"),
])
def test_cli_bad_input_exits_2_without_outputs(checkpoint, tmp_path, capsys, problem, message):
    import json

    correct = [[gj.docid_token("d1"), 100], [gj.docid_token("d2"), 101]]
    if problem == "unknown_query":
        correct[1][1] = 999
    if problem == "unknown_docid":
        correct[0][0] = "@DOC_ID_zzz@"
    path = tmp_path / "correct.json"
    path.write_text(json.dumps({"pairs": correct} if problem == "not_a_list" else correct))
    args = ["--correct-valid", str(path), "-o", str(tmp_path / "never")]
    if problem == "bad_batch":
        args += ["--batch-size", "0"]
    root = tmp_path if problem == "no_checkpoint" else checkpoint
    if problem == "no_checkpoint":
        (tmp_path / "dsi").mkdir()
    from genir_jax.cli.main import main

    code = main(["residual-rank", "-c", str(root / "dsi"), "--val-queries", str(checkpoint / "val.json"),
                 "--no-progress", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
