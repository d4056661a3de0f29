"""Streamed metrics (vocabulary blocks, no materialised logits) against the metrics of full logits."""

import jax.numpy as jnp
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp.metrics import METRICS, ranks_of_targets, streamed_target_metrics, target_metrics
from genir_jax.core.model import unembed, unembedding_rows


def _near_tie(logits: np.ndarray, target: int, tolerance: float) -> bool:
    """Another token's logit within `tolerance` of the target's: the two orders are both honest."""
    others = np.delete(logits, target)
    return bool(np.any(np.abs(others - logits[target]) <= tolerance))


@pytest.mark.parametrize("vocab,block", [(1000, 128), (1000, 1000), (777, 100), (64, 4096)])
def test_streamed_equals_materialised(vocab, block):
    rng = np.random.default_rng(vocab + block)
    rows, width = 48, 16
    hidden = rng.standard_normal((rows, width)).astype(np.float32)
    table = rng.standard_normal((vocab, width)).astype(np.float32)
    # ties on purpose: duplicated rows give equal logits, so the tie rule (lower id first) is exercised
    table[5] = table[3]
    table[vocab - 1] = table[3]
    hidden[1] = hidden[2] = hidden[0]
    targets = rng.integers(0, vocab, rows).astype(np.int32)
    targets[:4] = [3, 5, vocab - 1, 0]
    candidates = np.sort(rng.choice(vocab, 40, replace=False)).astype(np.int32)
    candidates[:3] = [3, 5, vocab - 1]
    candidates = np.unique(candidates)
    targets[4:8] = candidates[:4]
    foils = (targets + 1) % vocab
    logits = hidden @ table.T
    full = target_metrics(jnp.asarray(logits), jnp.asarray(targets), METRICS, candidates=jnp.asarray(candidates),
                          foils=jnp.asarray(foils))
    streamed = streamed_target_metrics(jnp.asarray(hidden), jnp.asarray(table), jnp.asarray(targets), METRICS,
                                       candidates=jnp.asarray(candidates), foils=jnp.asarray(foils), block=block)
    for name in ("logit", "logprob", "logit_diff"):
        np.testing.assert_allclose(np.asarray(streamed[name]), np.asarray(full[name]), atol=1e-5, err_msg=name)
    for name, scores in (("rank", logits), ("docid_rank", None)):
        a, b = np.asarray(full[name]), np.asarray(streamed[name])
        for row in np.flatnonzero(a != b):
            row_scores = logits[row] if scores is not None else logits[row][candidates]
            index = targets[row] if scores is not None else int(np.searchsorted(candidates, targets[row]))
            assert abs(int(a[row]) - int(b[row])) <= 2 and _near_tie(row_scores, index, 1e-5 * max(1.0, abs(row_scores[index]))), (name, row)
    # the duplicated rows are exact ties: the lower id is ranked first, as the reference's stable sort does
    assert int(streamed["rank"][1]) == int(streamed["rank"][0]) + 1
    assert int(streamed["rank"][2]) == int(streamed["rank"][0]) + 2
    assert int(np.sum(np.asarray(full["rank"]) != np.asarray(streamed["rank"]))) <= 2


@pytest.mark.parametrize("with_candidates", [False, True])
def test_streamed_top_k(with_candidates):
    rng = np.random.default_rng(1)
    vocab, rows, width = 1500, 10, 8
    hidden = jnp.asarray(rng.standard_normal((rows, width)).astype(np.float32))
    table = jnp.asarray(rng.standard_normal((vocab, width)).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, vocab, rows).astype(np.int32))
    candidates = jnp.asarray(np.arange(0, vocab, 7, dtype=np.int32)) if with_candidates else None
    logits = hidden @ table.T
    full = target_metrics(logits, targets, ("logit",), candidates=candidates, top_k=5)
    streamed = streamed_target_metrics(hidden, table, targets, ("logit",), candidates=candidates, top_k=5, block=256)
    np.testing.assert_array_equal(np.asarray(streamed["top"][0]), np.asarray(full["top"][0]))
    np.testing.assert_allclose(np.asarray(streamed["top"][1]), np.asarray(full["top"][1]), atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_unembedding_rows_reproduce_unembed(tied):
    config = gj.t5_v1_0(vocab_size=300, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                               tie_word_embeddings=tied)
    params = gj.init_params(config, 3)
    hidden = jnp.asarray(np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32))
    table, scale = unembedding_rows(config, params)
    np.testing.assert_allclose(np.asarray((hidden * scale) @ table.T), np.asarray(unembed(config, params, hidden)),
                               atol=1e-5)
    full_ranks, _ = ranks_of_targets(unembed(config, params, hidden), jnp.arange(5))
    streamed = streamed_target_metrics(hidden * scale, table, jnp.arange(5), ("rank",), block=64)
    np.testing.assert_array_equal(np.asarray(streamed["rank"]), np.asarray(full_ranks))


def test_non_finite_logits_never_rank_first():
    """A NaN target logit ranks last (V - 1, every other docid for docid_rank); a NaN elsewhere counts as
    ahead of the target; an all-NaN row is as bad as a row can be, in every way of computing the rank."""
    vocab = 6
    logits = jnp.asarray(np.array([
        [np.nan] * vocab,                        # all NaN (a NaN model)
        [5.0, np.nan, 1.0, 0.0, -1.0, -2.0],     # the target (0) is the best finite logit, one NaN
        [np.nan, 3.0, 2.0, 1.0, 0.0, -1.0],      # NaN target (0), finite others
        [1.0, 2.0, np.inf, 0.0, -np.inf, 0.5],   # infinities compare as numbers: target 1 is behind +inf
    ], np.float32))
    targets = jnp.asarray([0, 0, 0, 1], jnp.int32)
    candidates = jnp.asarray([0, 1, 2, 3], jnp.int32)
    ranks, _ = ranks_of_targets(logits, targets)
    assert np.asarray(ranks).tolist() == [vocab - 1, 1, vocab - 1, 1]
    docid = target_metrics(logits, targets, ("docid_rank",), candidates=candidates)["docid_rank"]
    assert np.asarray(docid).tolist() == [3, 1, 3, 1]
    # streamed (vocabulary blocks of 4): one NaN unembedding row is ahead of the best token; a NaN state ranks last
    rng = np.random.default_rng(0)
    table = rng.standard_normal((10, 8)).astype(np.float32)
    table[3] = np.nan
    hidden = rng.standard_normal((2, 8)).astype(np.float32)
    hidden[1] = np.nan
    finite = hidden[0] @ np.delete(table, 3, axis=0).T
    best = int(np.delete(np.arange(10), 3)[finite.argmax()])
    targets = jnp.asarray([best, best], jnp.int32)
    candidates = jnp.asarray([best, 3, 9 if best != 9 else 8], jnp.int32)
    streamed = streamed_target_metrics(jnp.asarray(hidden), jnp.asarray(table), targets, ("rank", "docid_rank"),
                                       candidates=candidates, block=4)
    assert np.asarray(streamed["rank"]).tolist() == [1, 10 - 1]
    assert np.asarray(streamed["docid_rank"]).tolist() == [1, 2]
