"""The one query batching iterator (`genir_jax.base.batching`) and callers that use it, checked against numbers
computed another way (the whole query set in one forward, numpy)."""

from __future__ import annotations

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import interventions as ivs
from genir_jax.analysis.reading import query_batches
from genir_jax.base.batching import Batch, batches, num_batches, pad_rows
from genir_jax.docids.retrieval import rank_docids
from tests.hf_fixtures import padded_batch

# --------------------------------------------------------------------------------------------------
# The iterator
# --------------------------------------------------------------------------------------------------


def _arrays(count: int):
    """Three arrays sharing their first axis: 2-d int, 1-d float, 3-d bool; every row distinct."""
    ids = np.arange(count * 4, dtype=np.int32).reshape(count, 4)
    weights = np.linspace(0.5, 1.5, count).astype(np.float32)
    flags = (np.arange(count * 6).reshape(count, 2, 3) % 3 == 0)
    return ids, weights, flags


@pytest.mark.parametrize("count", [1, 2, 5, 7, 12])
@pytest.mark.parametrize("batch_size", [1, 3, 5, 12, 20])
def test_batches_cover_every_row_once_in_order_padded_with_the_first_row(count, batch_size):
    arrays = _arrays(count)
    plan = list(batches(arrays, batch_size))
    assert len(plan) == num_batches(count, batch_size) == -(-count // batch_size)
    assert all(isinstance(b, Batch) for b in plan)
    # every row exactly once, in order, consecutive
    np.testing.assert_array_equal(np.concatenate([b.rows for b in plan]), np.arange(count))
    # full batches, then one short batch of the remainder (if any)
    sizes = [b.size for b in plan]
    assert sizes[:-1] == [batch_size] * (len(plan) - 1)
    assert sizes[-1] == count - batch_size * (len(plan) - 1)
    for batch in plan:
        assert len(batch.arrays) == len(arrays)
        for padded, source in zip(batch.arrays, arrays):
            # one batch size -> one shape (and the dtype is kept)
            assert padded.shape == (batch_size,) + source.shape[1:]
            assert padded.dtype == source.dtype
            np.testing.assert_array_equal(padded[:batch.size], source[batch.rows])
            # padding rows are copies of the batch's first (real) row
            for extra in padded[batch.size:]:
                np.testing.assert_array_equal(extra, source[batch.rows[0]])


def test_one_batch_size_gives_one_shape_for_every_batch():
    ids, weights, flags = _arrays(11)
    shapes = {tuple(a.shape for a in b.arrays) for b in batches((ids, weights, flags), 4)}
    assert shapes == {((4, 4), (4,), (4, 2, 3))}


def test_batches_accept_lists_and_keep_the_inputs_unchanged():
    ids = [[1, 2], [3, 4], [5, 6]]
    plan = list(batches([ids], 2))
    np.testing.assert_array_equal(plan[1].arrays[0], [[5, 6], [5, 6]])
    assert ids == [[1, 2], [3, 4], [5, 6]]
    source = np.arange(6).reshape(3, 2)
    for batch in batches([source], 2):
        batch.arrays[0][...] = -1    # writing into a batch never reaches the caller's array
    np.testing.assert_array_equal(source, np.arange(6).reshape(3, 2))


def test_pad_rows():
    rows = np.array([[1, 2], [3, 4]])
    assert pad_rows(rows, 2) is rows                      # already full: unchanged
    np.testing.assert_array_equal(pad_rows(rows, 4), [[1, 2], [3, 4], [1, 2], [1, 2]])
    np.testing.assert_array_equal(pad_rows(np.array([7]), 3), [7, 7, 7])
    with pytest.raises(ValueError, match="3 rows do not fit in 2"):
        pad_rows(np.zeros((3, 1)), 2)


@pytest.mark.parametrize("arrays, batch_size, message", [
    ((), 2, "no arrays given"),
    ((np.zeros((3, 2)), np.zeros(4)), 2, r"disagree on the number of rows: \[3, 4\]"),
    ((np.zeros((3, 2)),), 0, "batch_size must be >= 1, got 0"),
    ((np.zeros((3, 2)),), -2, "batch_size must be >= 1, got -2"),
])
def test_bad_input_errors(arrays, batch_size, message):
    with pytest.raises(ValueError, match=message):
        list(batches(arrays, batch_size))


def test_num_batches():
    assert [num_batches(n, 3) for n in range(8)] == [0, 1, 1, 1, 2, 2, 2, 3]
    assert num_batches(5, 1) == 5 and num_batches(5, 100) == 1


# --------------------------------------------------------------------------------------------------
# reading.query_batches: plain (masked, padded to the longest) and reference (grouped by length) modes
# --------------------------------------------------------------------------------------------------

class _WordTokenizer:
    """A stand-in tokenizer: one id per word (its length + 10), then </s> (1); pad id 0."""

    pad_token_id = 0

    class _Encoded:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text):
        return self._Encoded([len(word) + 10 for word in text.split()] + [1])


TEXTS = ["a bb", "ccc", "d ee fff", "gg h", "iiii", "j k l", "mm", "n o"]  # token lengths 3 2 4 3 2 4 2 3


def test_query_batches_plain_mode_pads_with_the_first_row():
    tok = _WordTokenizer()
    plan = query_batches(tok, TEXTS, 3)
    np.testing.assert_array_equal(np.concatenate([b.rows for b in plan]), np.arange(len(TEXTS)))
    for batch in plan:
        ids, mask = batch.arrays
        assert ids.shape == mask.shape == (3, 4)
        for row, r in zip(ids[:batch.size], batch.rows):
            expected = tok(TEXTS[r]).input_ids
            np.testing.assert_array_equal(row, expected + [0] * (4 - len(expected)))
        for pad_ids, pad_mask in zip(ids[batch.size:], mask[batch.size:]):
            np.testing.assert_array_equal(pad_ids, ids[0])
            np.testing.assert_array_equal(pad_mask, mask[0])   # a real query's mask: never an all-masked row
    np.testing.assert_array_equal(plan[-1].rows, [6, 7])
    np.testing.assert_array_equal(plan[-1].arrays[1], [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize("block", [None, 4])
def test_query_batches_reference_mode_groups_by_length(block):
    tok = _WordTokenizer()
    plan = query_batches(tok, TEXTS, 2, reference_padding=True, block=block)
    rows = np.concatenate([b.rows for b in plan])
    assert sorted(rows.tolist()) == list(range(len(TEXTS)))           # every query exactly once
    assert [int(b.rows[0]) for b in plan] == sorted(int(b.rows[0]) for b in plan)
    for batch in plan:
        ids, mask = batch.arrays
        assert ids.shape[0] == 2 and (mask == 1).all()
        assert list(batch.rows) == sorted(batch.rows)                  # in order within a batch
        for row, r in zip(ids[:batch.size], batch.rows):
            np.testing.assert_array_equal(row, tok(TEXTS[r]).input_ids)  # unpadded: one length per batch
        for extra in ids[batch.size:]:
            np.testing.assert_array_equal(extra, ids[0])
        if block:                                                      # a batch never spans two blocks
            assert len({int(r) // block for r in batch.rows}) == 1
    if block:  # results complete block by block: the first block's rows come first
        assert set(rows[:4].tolist()) == {0, 1, 2, 3}
    expected = {None: [[0, 3], [1, 4], [2, 5], [6], [7]], 4: [[0, 3], [1], [2], [4, 6], [5], [7]]}[block]
    assert [b.rows.tolist() for b in plan] == expected


# --------------------------------------------------------------------------------------------------
# Callers: batch size 1, 3 and all at once give the same results as one unbatched computation
# --------------------------------------------------------------------------------------------------

CONFIG = gj.t5_v1_0(vocab_size=96, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=2,
                           num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=20,
                           dropout_rate=0.0)
LENGTHS = [9, 5, 7, 3, 8, 6, 4]  # 7 queries: batches of 3 leave a last batch of 1 real + 2 padding rows


@pytest.fixture(scope="module")
def model():
    params = gj.init_params(CONFIG, 5)
    ids, mask, _ = padded_batch(CONFIG.vocab_size, LENGTHS, seed=2)
    return params, ids.astype(np.int32), mask.astype(np.int32)


def test_rank_docids_is_the_same_for_every_batch_size(model):
    params, ids, mask = model
    columns = np.arange(40, CONFIG.vocab_size)
    start = np.zeros((len(LENGTHS), 1), np.int32)
    logits = np.asarray(gj.forward(CONFIG, params, ids, mask, start))[:, 0, :]
    expected = np.argsort(-logits[:, columns], axis=1, kind="stable")[:, :10]
    results = {size: rank_docids(CONFIG, params, ids, mask, columns, k=10, batch_size=size, progress=False,
                                 return_top_token=True)
               for size in (1, 3, len(LENGTHS), 100)}
    for size, (indices, scores, top_token) in results.items():
        np.testing.assert_array_equal(indices, expected, err_msg=f"batch size {size}")
        np.testing.assert_allclose(scores, np.take_along_axis(logits[:, columns], expected, axis=1),
                                   rtol=1e-5, atol=1e-5, err_msg=f"batch size {size}")
        np.testing.assert_array_equal(top_token, logits.argmax(-1), err_msg=f"batch size {size}")
        np.testing.assert_allclose(scores, results[1][1], rtol=1e-6, atol=1e-6, err_msg=f"batch size {size}")


def test_mean_activations_is_the_same_for_every_batch_size(model):
    """Padding rows (copies of a batch's first query) must not count: with 7 queries in batches of 3 the
    last batch has 2 of them, which would pull the mean towards query 6 if they did."""
    params, ids, mask = model
    sites = ["decoder.*.hook_mlp_out", "encoder.1.hook_resid_post", "decoder.1.cross_attn.hook_pattern"]
    names = gj.expand_site_patterns(CONFIG, sites)
    start = np.zeros((len(LENGTHS), 1), np.int32)
    _, cache = gj.forward_with_cache(CONFIG, params, ids, mask, start, cache_sites=names)
    for size in (1, 3, len(LENGTHS), 64):
        means = ivs.mean_activations(CONFIG, params, ids, mask, sites, batch_size=size, progress=False)
        assert sorted(means) == sorted(names)
        for name, mean in means.items():
            expected = np.asarray(cache[name], np.float64).mean(0)
            np.testing.assert_allclose(np.asarray(mean), expected, rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}, batch size {size}")
    with pytest.raises(ivs.InterventionError, match="batch_size must be >= 1"):
        ivs.mean_activations(CONFIG, params, ids, mask, sites, batch_size=0, progress=False)
