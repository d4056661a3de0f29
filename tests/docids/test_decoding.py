"""Beam search (genir_jax.docids.decoding) against greedy decoding, exhaustive docid scoring and transformers' generate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.docids.decoding import DocidTrie, beam_search
from genir_jax.base.errors import GenIRError
from tests.hf_fixtures import build_torch_t5, padded_batch

CONFIG = gj.t5_v1_0(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                           num_heads=4, dropout_rate=0.0)
EOS = 1


@pytest.fixture(scope="module")
def params():
    params = gj.init_params(CONFIG, 0)
    # a larger EOS embedding makes EOS likely enough that sequences of several lengths are produced
    return {**params, "shared": params["shared"].at[EOS].multiply(5.0)}


def _random_docids(rng, count, lengths, tokens):
    """`count` distinct docids of `lengths` (EOS included) drawn from `tokens`: with few tokens they
    share prefixes."""
    seen = set()
    while len(seen) < count:
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        seen.add(tuple(int(t) for t in rng.choice(tokens, size=n - 1)) + (EOS,))
    return sorted(seen)


def _normalise_hf(sequences, num_return, length):
    """transformers' output [N * R, T'] -> [N, R, length] padded with 0 after EOS, like beam_search."""
    seqs = np.asarray(sequences).reshape(-1, num_return, sequences.shape[-1])
    out = np.zeros(seqs.shape[:2] + (length,), dtype=np.int64)
    out[:, :, :seqs.shape[2]] = seqs
    generated = out[:, :, 1:]
    after = np.cumsum(generated == EOS, axis=-1) - (generated == EOS)
    out[:, :, 1:] = np.where(after > 0, 0, generated)
    return out


# -------------------------------------------------------------------------------------------------
# DocidTrie validation
# -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("docids, message", [
    ([], "no docids"),
    ([[5, 1], [], [6, 1]], "docid 1 is empty"),
    ([[5, 6, 1], [7, 1], [5, 6, 1]], "docid 2 duplicates docid 0"),
    ([[7, 1], [5, 6, 1, 8, 1], [5, 6, 1]], "docid 2 .* proper prefix of docid 1"),
    ([[5, 6, 1], [7, 8]], "docid 1 .* does not end with EOS"),
    ([[5, 1, 6, 1]], "docid 0 .* EOS .* before its end"),
])
def test_trie_rejects_bad_docids(docids, message):
    with pytest.raises(GenIRError, match=message):
        DocidTrie(docids)


def test_trie_tables_and_lookup():
    docids = [[5, 6, 1], [5, 7, 1], [9, 1], [5, 6, 2, 1]]
    trie = DocidTrie(docids)
    assert trie.allowed([]) == [5, 9] and trie.allowed([5]) == [6, 7] and trie.allowed([5, 6]) == [1, 2]
    assert trie.allowed([5, 6, 1]) == [] and trie.allowed([4]) == [] and trie.max_children == 2
    assert trie.max_docid_length == 4 and len(trie) == 4
    sequences = np.array([[0, 5, 7, 1, 0], [0, 5, 6, 2, 1], [0, 9, 1, 0, 0], [0, 5, 1, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(trie.index_of(sequences), [1, 3, 2, -1, -1])
    with pytest.raises(GenIRError, match="longest docid has 4"):
        beam_search(CONFIG, None, np.ones((1, 3)), np.ones((1, 3)), max_length=4, trie=trie, num_beams=2)


# -------------------------------------------------------------------------------------------------
# Unconstrained: greedy decoding and transformers
# -------------------------------------------------------------------------------------------------

@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_single_beam_is_greedy_decoding(params):
    max_length = 8
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [6, 3, 9, 4, 7, 5, 8, 2], seed=3)
    out = beam_search(CONFIG, params, ids, mask, num_beams=1, max_length=max_length)
    assert out.sequences.shape == (8, 1, max_length) and out.scores.shape == (8, 1)

    decoder = np.zeros((len(ids), 1), dtype=np.int64)
    done = np.zeros(len(ids), bool)
    total = np.zeros(len(ids))
    length = np.zeros(len(ids))
    for _ in range(max_length - 1):
        logits = gj.forward(CONFIG, params, ids, mask, decoder)[:, -1]
        log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
        token = np.where(done, 0, log_probs.argmax(-1))
        total += np.where(done, 0.0, log_probs[np.arange(len(ids)), token])
        length += ~done
        done |= token == EOS
        decoder = np.concatenate([decoder, token[:, None]], axis=1)
    assert 0 < done.sum() < len(ids)  # both EOS-terminated and max_length-terminated sequences
    np.testing.assert_array_equal(np.asarray(out.sequences[:, 0]), decoder)
    np.testing.assert_allclose(np.asarray(out.scores[:, 0]), total / length, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A random transformers T5 (vocabulary 24, EOS made likely) and the same model loaded by genir-jax."""
    import torch

    model = build_torch_t5(seed=0, vocab_size=24)
    with torch.no_grad():
        model.shared.weight[EOS] *= 5.0
    directory = tmp_path_factory.mktemp("beam") / "ckpt"
    model.save_pretrained(directory)
    return model, gj.load_pretrained(str(directory), load_tokenizer=False)


def _hf_generate(model, ids, mask, **kwargs):
    import torch

    with torch.no_grad():
        return model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                              decoder_start_token_id=0, output_scores=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("early_stopping, length_penalty", [(False, 1.0), (True, 1.0), ("never", 2.0), (False, 0.0)])
def test_beam_search_equals_transformers_generate(hf_model, early_stopping, length_penalty):
    torch_model, model = hf_model
    ids, mask, _ = padded_batch(24, [5, 3, 7, 4, 6, 2, 8, 5, 3, 6], seed=1)
    max_length, beams = 9, 4
    ref = _hf_generate(torch_model, ids, mask, num_beams=beams, num_return_sequences=beams, max_length=max_length,
                       early_stopping=early_stopping, length_penalty=length_penalty)
    out = beam_search(model.config, model.params, ids, mask, num_beams=beams, max_length=max_length,
                      early_stopping=early_stopping, length_penalty=length_penalty)
    sequences = np.asarray(out.sequences)
    np.testing.assert_array_equal(sequences, _normalise_hf(ref.sequences.numpy(), beams, max_length))
    np.testing.assert_allclose(np.asarray(out.scores), ref.sequences_scores.numpy().reshape(-1, beams),
                               rtol=0, atol=1e-4)
    assert (sequences == EOS).any(-1).sum() >= 5  # finished hypotheses of several lengths took part


def test_trie_beam_search_equals_transformers_prefix_allowed_tokens(hf_model):
    """Masking after the log-softmax (renormalize=False) is transformers' prefix_allowed_tokens_fn; with
    more docids than beams the search really prunes."""
    torch_model, model = hf_model
    trie = DocidTrie(_random_docids(np.random.default_rng(5), 25, (2, 5), np.arange(2, 8)))
    ids, mask, _ = padded_batch(24, [5, 3, 7, 4, 6, 2], seed=2)

    def allowed(_, prefix):
        return trie.allowed(prefix[1:].tolist()) or [0]  # dead beams (score -inf) never matter

    ref = _hf_generate(torch_model, ids, mask, num_beams=4, num_return_sequences=4, max_length=6,
                       prefix_allowed_tokens_fn=allowed)
    out = beam_search(model.config, model.params, ids, mask, num_beams=4, max_length=6, trie=trie)
    ref_scores = ref.sequences_scores.numpy().reshape(-1, 4)
    assert np.isfinite(ref_scores).all()
    np.testing.assert_array_equal(np.asarray(out.sequences), _normalise_hf(ref.sequences.numpy(), 4, 6))
    np.testing.assert_allclose(np.asarray(out.scores), ref_scores, rtol=0, atol=1e-4)


# -------------------------------------------------------------------------------------------------
# Constrained: exhaustive scoring, validity
# -------------------------------------------------------------------------------------------------

def _exhaustive_scores(params, trie, ids, mask, length_penalty, renormalize, interventions=None):
    """[Q, D] score of every docid for every query, teacher-forced through `genir_jax.forward` (with
    `interventions`, their per-position values cut to the docids' width)."""
    docids = trie.docids
    width = max(len(d) for d in docids)
    decoder = np.zeros((len(docids), width), dtype=np.int64)  # start token, then the docid without EOS
    for j, d in enumerate(docids):
        decoder[j, 1:len(d)] = d[:-1]
    q, n = len(ids), len(docids)
    logits = np.asarray(gj.forward(CONFIG, params, np.repeat(ids, n, 0), np.repeat(mask, n, 0),
                                   np.tile(decoder, (q, 1)), interventions=_cut(interventions, width))
                        ).reshape(q, n, width, -1)
    scores = np.zeros((q, n))
    for j, d in enumerate(docids):
        for step, token in enumerate(d):
            step_logits = jnp.asarray(logits[:, j, step])
            if renormalize:
                allowed = np.zeros(CONFIG.vocab_size, bool)
                allowed[trie.allowed(list(d[:step]))] = True
                log_probs = jax.nn.log_softmax(jnp.where(allowed, step_logits, -jnp.inf), axis=-1)
            else:
                log_probs = jax.nn.log_softmax(step_logits, axis=-1)
            scores[:, j] += np.asarray(log_probs[:, token], dtype=np.float64)
        scores[:, j] /= len(d) ** length_penalty
    return scores


@pytest.mark.parametrize("renormalize, length_penalty", [(False, 1.0), (True, 0.0)])
def test_wide_trie_beam_search_equals_exhaustive_scoring(params, renormalize, length_penalty):
    trie = DocidTrie(_random_docids(np.random.default_rng(0), 30, (2, 4), np.arange(2, 9)))
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [6, 3, 9, 4, 7], seed=7)
    out = beam_search(CONFIG, params, ids, mask, num_beams=32, num_return=10, max_length=5, trie=trie,
                      length_penalty=length_penalty, renormalize=renormalize)
    expected = _exhaustive_scores(params, trie, ids, mask, length_penalty, renormalize)
    order = np.argsort(-expected, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(trie.index_of(np.asarray(out.sequences)), order)
    np.testing.assert_allclose(np.asarray(out.scores), np.take_along_axis(expected, order, 1), rtol=0, atol=1e-5)


def test_trie_only_emits_valid_docids(params):
    rng = np.random.default_rng(1)
    trie = DocidTrie(_random_docids(rng, 60, (2, 5), np.arange(2, 12)))
    lengths = [int(n) for n in rng.integers(2, 12, size=48)]
    ids, mask, _ = padded_batch(CONFIG.vocab_size, lengths, seed=11)
    out = beam_search(CONFIG, params, ids, mask, num_beams=6, max_length=7, trie=trie)
    sequences, scores = np.asarray(out.sequences), np.asarray(out.scores)
    index = trie.index_of(sequences)
    assert np.isfinite(scores).all() and (index >= 0).all()
    assert all(len(set(row)) == len(row) for row in index.tolist())  # no docid twice for one query
    assert (np.diff(scores, axis=1) <= 0).all()
    for row, i in zip(sequences.reshape(-1, 7), index.reshape(-1)):  # nothing but the docid, then padding
        d = trie.docids[i]
        assert row[0] == 0 and tuple(row[1:1 + len(d)]) == d and not row[1 + len(d):].any()

    # fewer docids than returned beams: the rest are empty rows scored -inf
    small = DocidTrie([[3, 1], [4, 5, 1], [4, 6, 1]])
    out = beam_search(CONFIG, params, ids[:8], mask[:8], num_beams=5, max_length=4, trie=small)
    sequences, scores = np.asarray(out.sequences), np.asarray(out.scores)
    assert np.isfinite(scores[:, :3]).all() and np.isneginf(scores[:, 3:]).all()
    assert not sequences[:, 3:].any()
    assert all(sorted(row) == [0, 1, 2] for row in small.index_of(sequences[:, :3]).tolist())


# -------------------------------------------------------------------------------------------------
# Interventions during decoding
# -------------------------------------------------------------------------------------------------

def _cut(interventions, length):
    """`interventions` with per-position values cut to the first `length` decoder positions."""
    from genir_jax.core.taps import Patch

    if interventions is None:
        return None
    out = {}
    for stack, sites in interventions.items():
        out[stack] = {}
        for local, patches in sites.items():
            patches = (patches,) if isinstance(patches, Patch) else tuple(patches)
            out[stack][local] = tuple(Patch(p.mask, p.value if np.ndim(p.value) == 0 else np.asarray(p.value)[:, :, :length])
                                      for p in patches)
    return out


def _circuit_like(params, max_length):
    """Zeroed MLP in decoder layer 0 and cross-attention replaced by its per-position mean in layer 1 (means
    over a few teacher-forced sequences), as the circuit's patches are."""
    from genir_jax.interp import interventions as ivs

    ids, mask, _ = padded_batch(CONFIG.vocab_size, [5, 7, 4, 6], seed=21)
    decoder = np.random.default_rng(2).integers(2, 9, size=(4, max_length - 1))
    decoder[:, 0] = 0
    means = ivs.mean_activations(CONFIG, params, ids, mask, ["decoder.1.hook_cross_attn_out"],
                                 decoder_input_ids=decoder, progress=False)
    return ivs.combine(ivs.zero_ablation(CONFIG, ["decoder.0.hook_mlp_out"]),
                       ivs.mean_ablation(CONFIG, means, sites=["decoder.1.hook_cross_attn_out"]))


def test_single_beam_with_interventions_is_patched_greedy_decoding(params):
    max_length = 6
    patches = _circuit_like(params, max_length)
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [6, 3, 9, 4, 7], seed=3)
    out = beam_search(CONFIG, params, ids, mask, num_beams=1, max_length=max_length, interventions=patches)
    decoder = np.zeros((len(ids), 1), dtype=np.int64)
    done = np.zeros(len(ids), bool)
    for step in range(max_length - 1):
        logits = gj.forward(CONFIG, params, ids, mask, decoder, interventions=_cut(patches, step + 1))[:, -1]
        token = np.where(done, 0, np.asarray(logits).argmax(-1))
        done |= token == EOS
        decoder = np.concatenate([decoder, token[:, None]], axis=1)
    np.testing.assert_array_equal(np.asarray(out.sequences[:, 0]), decoder)
    plain = beam_search(CONFIG, params, ids, mask, num_beams=1, max_length=max_length)
    assert not np.array_equal(np.asarray(plain.sequences), np.asarray(out.sequences))  # the patches matter


def test_trie_beam_search_with_interventions_equals_patched_exhaustive_scoring(params):
    trie = DocidTrie(_random_docids(np.random.default_rng(0), 30, (2, 4), np.arange(2, 9)))
    patches = _circuit_like(params, 5)
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [6, 3, 9, 4, 7], seed=7)
    out = beam_search(CONFIG, params, ids, mask, num_beams=32, num_return=10, max_length=5, trie=trie,
                      interventions=patches)
    expected = _exhaustive_scores(params, trie, ids, mask, 1.0, False, interventions=patches)
    order = np.argsort(-expected, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(trie.index_of(np.asarray(out.sequences)), order)
    np.testing.assert_allclose(np.asarray(out.scores), np.take_along_axis(expected, order, 1), rtol=0, atol=1e-5)


def test_interventions_that_do_not_fit_are_refused_by_the_core_validation(params):
    from genir_jax.core.taps import Patch

    ids, mask, _ = padded_batch(CONFIG.vocab_size, [4, 5], seed=1)
    # max_length 4: 3 decoder positions, so a mask over 4 positions does not fit
    per_position = {"decoder": {"hook_mlp_out": Patch(np.zeros((3, 1, 4, 1), np.float32), 0.0)}}
    for bad, message in ((per_position, r"decoder\.\*\.hook_mlp_out.*does not broadcast"),
                         ({"middle": {}}, "unknown stack"),
                         ({"decoder": {"hook_nope": Patch(1.0, 0.0)}}, "unknown site 'decoder.0.hook_nope'")):
        with pytest.raises(GenIRError, match=message):
            beam_search(CONFIG, params, ids, mask, num_beams=2, max_length=4, interventions=bad)
