"""Span corruption: T5's counts, sentinels, EOS, reconstruction, determinism, packing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genir_jax.training.span_corruption import (SpanCorruption, corrupt, noise_counts, pack_tokens,
                                                random_spans_noise_mask, tokens_length_for_inputs, uncorrupt)

SENTINELS = tuple(range(32099, 31999, -1))  # <extra_id_0> = 32099, <extra_id_1> = 32098, ...
EOS = 1


def _spans(mask: np.ndarray) -> int:
    """Number of maximal runs of True."""
    return int(np.sum(mask & ~np.concatenate([[False], mask[:-1]])))


def test_t5_reference_lengths():
    # T5's default pre-training: 568 raw tokens -> 512 encoder tokens and 114 decoder tokens.
    assert tokens_length_for_inputs(512) == 568
    assert noise_counts(568) == (85, 28)
    corruption = SpanCorruption(SENTINELS, EOS, 568, random_roll=False)
    assert (corruption.inputs_length, corruption.targets_length) == (512, 114)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(2, 600), seed=st.integers(0, 2**31 - 1), roll=st.booleans())
def test_mask_counts(length, seed, roll):
    mask = random_spans_noise_mask(length, np.random.default_rng(seed), random_roll=roll)
    num_noise, num_spans = noise_counts(length)
    assert mask.shape == (length,) and mask.dtype == bool
    assert mask.sum() == num_noise  # the noise fraction is exact: round(0.15 * length)
    assert abs(num_noise - 0.15 * length) <= 0.5 or num_noise in (1, length - 1)
    spans = _spans(mask)
    if roll:  # a rotation can cut the span that wraps around the end in two
        assert spans in (num_spans, num_spans + 1)
        assert spans == num_spans + 1 or not (mask[0] and mask[-1])
    else:  # T5's layout: non-noise first, a noise span last
        assert spans == num_spans and not mask[0] and mask[-1]


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.integers(2, 31999), min_size=2, max_size=300), seed=st.integers(0, 2**31 - 1))
def test_corrupt_roundtrip_and_format(tokens, seed):
    tokens = np.asarray(tokens, dtype=np.int32)
    mask = random_spans_noise_mask(len(tokens), np.random.default_rng(seed))
    inputs, targets = corrupt(tokens, mask, SENTINELS, EOS)
    assert uncorrupt(inputs, targets, SENTINELS, EOS) == tokens.tolist()
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans = _spans(mask)
    # Sentinels appear in order <extra_id_0>, <extra_id_1>, ... in both, once per span.
    assert [t for t in inputs.tolist() if t in SENTINELS] == list(SENTINELS[:spans])
    assert [t for t in targets.tolist() if t in SENTINELS] == list(SENTINELS[:spans])
    assert targets[0] == SENTINELS[0]
    assert len(inputs) == (~mask).sum() + spans + 1
    assert len(targets) == mask.sum() + spans + 1
    # The inputs keep every non-noise token in order.
    assert [t for t in inputs[:-1].tolist() if t not in SENTINELS] == tokens[~mask].tolist()


def test_corrupt_by_hand():
    tokens = np.array([10, 11, 12, 13, 14, 15, 16, 17])
    mask = np.array([0, 1, 1, 0, 0, 1, 0, 0], dtype=bool)
    inputs, targets = corrupt(tokens, mask, SENTINELS, EOS)
    assert inputs.tolist() == [10, 32099, 13, 14, 32098, 16, 17, EOS]
    assert targets.tolist() == [32099, 11, 12, 32098, 15, EOS]


def test_batch_is_seeded_and_fits():
    rng = np.random.default_rng(0)
    chunks = rng.integers(2, 30000, size=(12, 70)).astype(np.int32)
    lengths = np.full(12, 70, np.int32)
    lengths[-1] = 23  # a short final chunk
    corruption = SpanCorruption(SENTINELS, EOS, 70)
    indices = np.arange(12)
    a = corruption.batch(chunks, lengths, indices, (5, 0))
    b = corruption.batch(chunks, lengths, indices, (5, 0))
    c = corruption.batch(chunks, lengths, indices, (5, 1))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["input_ids"], c["input_ids"])  # a new epoch draws new noise
    assert a["input_ids"].shape == (12, corruption.inputs_length)
    assert a["targets"].shape == (12, corruption.targets_length)
    np.testing.assert_array_equal(a["attention_mask"], a["input_ids"] != 0)
    np.testing.assert_array_equal(a["target_mask"], a["targets"] != 0)
    for row, index in enumerate(indices):
        inputs = a["input_ids"][row][a["attention_mask"][row] == 1]
        targets = a["targets"][row][a["target_mask"][row] == 1]
        assert uncorrupt(inputs, targets, SENTINELS, EOS) == chunks[index, :lengths[index]].tolist()
    # The same example gets the same noise whatever batch it is in.
    single = corruption.batch(chunks, lengths, np.array([3]), (5, 0))
    np.testing.assert_array_equal(single["input_ids"][0], a["input_ids"][3])


def test_pack_tokens():
    texts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    chunks, lengths = pack_tokens(texts, 4)
    assert chunks.tolist() == [[5, 6, 7, 8], [9, 10, 11, 12]]  # a 1-token tail cannot be corrupted: dropped
    assert lengths.tolist() == [4, 4]
    chunks, lengths = pack_tokens(texts, 3)
    assert chunks.tolist() == [[5, 6, 7], [8, 9, 10], [11, 12, 13]] and lengths.tolist() == [3, 3, 3]
    chunks, lengths = pack_tokens([[5, 6, 7, 8, 9]], 3)
    assert chunks.tolist() == [[5, 6, 7], [8, 9, 0]] and lengths.tolist() == [3, 2]
    with pytest.raises(ValueError):
        pack_tokens([[5]], 4)


def test_real_tokenizer_sentinels(t5_tokenizer):
    from genir_jax.training.pretrain import sentinel_ids

    ids = sentinel_ids(t5_tokenizer)
    assert ids[0] == 32099 and ids[99] == 32000 and len(set(ids)) == 100
    assert t5_tokenizer.convert_ids_to_tokens(ids[1]) == "<extra_id_1>"
