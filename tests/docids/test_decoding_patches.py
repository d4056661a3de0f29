"""Beam search under head, neuron, position and per-query patches: its scores are the patched model's own
teacher-forced log-probabilities of the sequences it returns (one decoder, run cached or teacher-forced)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.core.sites import STACK_SITES
from genir_jax.core.taps import Patch
from genir_jax.docids.decoding import DocidTrie, beam_search
from genir_jax.interp import interventions as ivs
from tests.hf_fixtures import padded_batch

CONFIG = gj.t5_v1_0(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                    num_heads=4, dropout_rate=0.0)
EOS, MAX_LENGTH, BEAMS = 1, 6, 4
STEPS = MAX_LENGTH - 1


@pytest.fixture(scope="module")
def params():
    params = gj.init_params(CONFIG, 0)
    return {**params, "shared": params["shared"].at[EOS].multiply(4.0)}  # sequences of several lengths


@pytest.fixture(scope="module")
def queries():
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [6, 3, 9, 4, 7, 5], seed=11)
    return ids, mask


def _teacher_forced_scores(params, ids, mask, sequences, interventions, length_penalty, per_query=()):
    """[N, R] patched teacher-forced scores of beam search's sequences [N, R, T]: summed log-softmax of each
    generated token up to its EOS, divided by the generated length ** length_penalty. `per_query`: decoder
    sites whose patch values have a batch axis of N (repeated for the R sequences of each query)."""
    sequences = np.asarray(sequences)
    n, r, t = sequences.shape
    iv = interventions
    if per_query:
        iv = {stack: dict(sites) for stack, sites in interventions.items()}
        for local in per_query:
            patch = iv["decoder"][local]
            axis = 0 if local in STACK_SITES else 1
            iv["decoder"][local] = Patch(patch.mask, np.repeat(np.asarray(patch.value), r, axis=axis))
    logits = gj.forward(CONFIG, params, np.repeat(ids, r, 0), np.repeat(mask, r, 0),
                        sequences.reshape(n * r, t)[:, :-1], interventions=iv)
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64).reshape(n, r, t - 1, -1)
    scores = np.zeros((n, r))
    for q in range(n):
        for j in range(r):
            generated = [int(x) for x in sequences[q, j, 1:]]
            length = generated.index(EOS) + 1 if EOS in generated else t - 1
            scores[q, j] = sum(log_probs[q, j, p, generated[p]] for p in range(length)) / length ** length_penalty
    return scores


def _cases(config, ids):
    rng = np.random.default_rng(5)
    value = rng.normal(size=(len(ids), STEPS, config.d_model)).astype(np.float32) * 3.0
    return {
        "cross-attention heads": (ivs.head_ablation(config, {"decoder.1.cross_attn": [0, 1, 2],
                                                             "decoder.2.cross_attn": [1, 3]}), ()),
        "self-attention heads": (ivs.head_ablation(config, {"decoder.0.attn": [0, 1, 2, 3],
                                                            "decoder.2.attn": [2]}), ()),
        "neurons": (ivs.neuron_ablation(config, {"decoder.1.mlp": list(range(0, 64, 2)),
                                                 "decoder.2.mlp": list(range(40))}), ()),
        "one position": (ivs.zero_ablation(config, ["decoder.1.hook_resid_mid", "decoder.2.hook_mlp_out"],
                                           positions=[1], length=STEPS), ()),
        "per-query values at one position": (ivs.replacement(config, {"decoder.2.hook_resid_post": value},
                                                             positions=[2], length=STEPS),
                                             ("hook_resid_post",)),
    }


@pytest.mark.parametrize("case", ["cross-attention heads", "self-attention heads", "neurons", "one position",
                                  "per-query values at one position"])
def test_patched_beam_search_scores_are_patched_teacher_forced_log_probs(params, queries, case):
    ids, mask = queries
    interventions, per_query = _cases(CONFIG, ids)[case]
    out = beam_search(CONFIG, params, ids, mask, num_beams=BEAMS, max_length=MAX_LENGTH, length_penalty=1.0,
                      interventions=interventions)
    expected = _teacher_forced_scores(params, ids, mask, out.sequences, interventions, 1.0, per_query)
    np.testing.assert_allclose(np.asarray(out.scores), expected, rtol=0, atol=1e-5)
    plain = beam_search(CONFIG, params, ids, mask, num_beams=BEAMS, max_length=MAX_LENGTH)
    # the patch changes some query's best sequence (else this test could not tell patched from plain)
    assert not np.array_equal(np.asarray(plain.sequences[:, 0]), np.asarray(out.sequences[:, 0]))


def test_patched_trie_beam_search_scores_are_patched_teacher_forced_log_probs(params, queries):
    ids, mask = queries
    rng = np.random.default_rng(3)
    docids = sorted({tuple(int(t) for t in rng.choice(np.arange(2, 9), size=int(rng.integers(1, 4)))) + (EOS,)
                     for _ in range(40)})
    trie = DocidTrie(docids)
    interventions = ivs.combine(ivs.head_ablation(CONFIG, {"decoder.1.cross_attn": [0, 3]}),
                                ivs.zero_ablation(CONFIG, ["decoder.0.mlp.hook_post"], positions=[0, 2],
                                                  neurons=[1, 5, 9], length=STEPS))
    out = beam_search(CONFIG, params, ids, mask, num_beams=BEAMS, max_length=MAX_LENGTH, trie=trie,
                      length_penalty=0.5, interventions=interventions)
    assert (trie.index_of(np.asarray(out.sequences)) >= 0).all()
    expected = _teacher_forced_scores(params, ids, mask, out.sequences, interventions, 0.5)
    np.testing.assert_allclose(np.asarray(out.scores), expected, rtol=0, atol=1e-5)
