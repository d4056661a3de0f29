"""Beam search for decoder-only models (genir_jax.docids.decoding.beam_search with a `DecoderConfig`) against
transformers' generate on random GPT-2 and Llama checkpoints, with and without a docid trie."""

from __future__ import annotations

import numpy as np
import pytest

from genir_jax.base.errors import GenIRError
from genir_jax.docids.decoding import DocidTrie, beam_search
from tests.decoder_fixtures import build_torch_causal_lm, padded_causal_batch, save_causal_lm

EOS = 2
LENGTHS = [5, 3, 7, 4, 6, 2]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request, tmp_path_factory):
    """A random transformers causal LM (EOS id 2, made likely) and the same checkpoint loaded by genir-jax."""
    import torch

    from genir_jax.checkpoints.decoder_hf import load_decoder_only

    kind = request.param
    model = build_torch_causal_lm(kind, seed=0, vocab_size=24, eos_token_id=EOS, bos_token_id=1)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[EOS] *= 3.0
    directory = save_causal_lm(model, tmp_path_factory.mktemp("dec-beam") / kind)
    return model, load_decoder_only(str(directory), load_tokenizer=False)


def _generate(model, ids, mask, max_new_tokens, **kwargs):
    import torch

    with torch.no_grad():
        return model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                              max_new_tokens=max_new_tokens, pad_token_id=EOS, eos_token_id=EOS,
                              output_scores=True, return_dict_in_generate=True, **kwargs)


def _expected(ref, ids, mask, beams, max_new_tokens):
    """transformers' sequences (prompt + generated) as beam_search returns them: [N, R, 1 + max_new_tokens],
    column 0 each prompt's last token, EOS-padded after the first EOS; and the scores [N, R]."""
    prompt = ids.shape[1]
    generated = ref.sequences.numpy()[:, prompt:].reshape(len(ids), beams, -1)
    out = np.full(generated.shape[:2] + (1 + max_new_tokens,), EOS, dtype=np.int64)
    out[:, :, 1:1 + generated.shape[2]] = generated
    out[:, :, 0] = ids[:, -1][:, None]  # left-padded: the last column is every prompt's last token
    return out, ref.sequences_scores.numpy().reshape(len(ids), beams)


def _random_docids(rng, count, lengths, tokens):
    seen = set()
    while len(seen) < count:
        n = int(rng.integers(lengths[0], lengths[1] + 1))
        seen.add(tuple(int(t) for t in rng.choice(tokens, size=n - 1)) + (EOS,))
    return sorted(seen)


@pytest.mark.parametrize("early_stopping, length_penalty", [(False, 1.0), (True, 1.0), ("never", 2.0)])
def test_beam_search_equals_transformers_generate(models, early_stopping, length_penalty):
    torch_model, model = models
    ids, mask = padded_causal_batch(24, LENGTHS, "left", seed=1)
    beams, new = 4, 6
    ref = _generate(torch_model, ids, mask, new, num_beams=beams, num_return_sequences=beams,
                    early_stopping=early_stopping, length_penalty=length_penalty)
    out = beam_search(model.config, model.params, ids, mask, num_beams=beams, max_length=new + 1,
                      early_stopping=early_stopping, length_penalty=length_penalty)
    sequences, scores = _expected(ref, ids, mask, beams, new)
    np.testing.assert_array_equal(np.asarray(out.sequences), sequences)
    np.testing.assert_allclose(np.asarray(out.scores), scores, rtol=0, atol=1e-4)
    assert (sequences[:, :, 1:] == EOS).any(-1).sum() >= 3  # finished hypotheses took part


def test_trie_beam_search_equals_transformers_prefix_allowed_tokens(models):
    """Right-padded prompts (the DSI layout) give what transformers gives the same prompts left-padded."""
    torch_model, model = models
    trie = DocidTrie(_random_docids(np.random.default_rng(5), 25, (2, 5), np.arange(3, 9)), eos_id=EOS)
    ids, mask = padded_causal_batch(24, LENGTHS, "left", seed=2)
    prompt = ids.shape[1]

    def allowed(_, prefix):
        return trie.allowed(prefix[prompt:].tolist()) or [0]  # dead beams (score -inf) never matter

    ref = _generate(torch_model, ids, mask, 5, num_beams=4, num_return_sequences=4, prefix_allowed_tokens_fn=allowed)
    sequences, scores = _expected(ref, ids, mask, 4, 5)
    assert np.isfinite(scores).all()
    out = beam_search(model.config, model.params, ids, mask, num_beams=4, max_length=6, trie=trie)
    np.testing.assert_array_equal(np.asarray(out.sequences), sequences)
    np.testing.assert_allclose(np.asarray(out.scores), scores, rtol=0, atol=1e-4)

    right_ids, right_mask = np.zeros_like(ids), np.zeros_like(mask)
    for row, length in enumerate(LENGTHS):
        right_ids[row, :length], right_mask[row, :length] = ids[row, -length:], 1
    right = beam_search(model.config, model.params, right_ids, right_mask, num_beams=4, max_length=6, trie=trie)
    np.testing.assert_array_equal(np.asarray(right.sequences), sequences)
    np.testing.assert_allclose(np.asarray(right.scores), scores, rtol=0, atol=1e-4)
    assert (trie.index_of(sequences) >= 0).all()


def test_single_beam_with_interventions_is_patched_greedy_decoding(models):
    """A zeroed MLP and a per-query replacement of a residual stream (its batch axis following the beams) apply
    to the prompt and to every step, as in a forward over the whole sequence."""
    from genir_jax.core.decoder_only import forward
    from genir_jax.core.taps import Patch
    from genir_jax.interp import interventions as ivs

    _, model = models
    config = model.config
    ids = np.random.default_rng(8).integers(3, 24, size=(4, 5))
    mask = np.ones_like(ids)
    layers = config.num_layers
    blend = np.zeros((layers, 4, 1, 1), np.float32)
    blend[1] = 0.7
    value = np.random.default_rng(9).normal(size=(layers, 4, 1, config.d_model)).astype(np.float32)
    patches = ivs.combine(ivs.zero_ablation(config, ["blocks.0.hook_mlp_out"]),
                          {"blocks": {"hook_resid_post": Patch(blend, value)}})
    new = 5
    out = beam_search(config, model.params, ids, mask, num_beams=1, max_length=new + 1, interventions=patches)
    sequence, done = ids.copy(), np.zeros(len(ids), bool)
    for _ in range(new):
        logits = np.asarray(forward(config, model.params, sequence, interventions=patches))[:, -1]
        token = np.where(done, EOS, logits.argmax(-1))
        done |= token == EOS
        sequence = np.concatenate([sequence, token[:, None]], axis=1)
    expected = np.concatenate([ids[:, -1:], sequence[:, ids.shape[1]:]], axis=1)
    np.testing.assert_array_equal(np.asarray(out.sequences[:, 0]), expected)
    plain = beam_search(config, model.params, ids, mask, num_beams=1, max_length=new + 1)
    assert not np.array_equal(np.asarray(plain.sequences), np.asarray(out.sequences))  # the patches matter
    beams = beam_search(config, model.params, ids, mask, num_beams=3, max_length=new + 1, interventions=patches)
    for row in range(len(ids)):  # each query alone, with its own patch value: what its beams saw in the batch
        alone = ivs.combine(ivs.zero_ablation(config, ["blocks.0.hook_mlp_out"]),
                            {"blocks": {"hook_resid_post": Patch(blend[:, row:row + 1], value[:, row:row + 1])}})
        single = beam_search(config, model.params, ids[row:row + 1], mask[row:row + 1], num_beams=3,
                             max_length=new + 1, interventions=alone)
        np.testing.assert_array_equal(np.asarray(single.sequences[0]), np.asarray(beams.sequences[row]))
        np.testing.assert_allclose(np.asarray(single.scores[0]), np.asarray(beams.scores[row]), rtol=0, atol=1e-5)


def test_decoder_only_refusals(models):
    _, model = models
    ids, mask = padded_causal_batch(24, [3, 2], "left")
    with pytest.raises(GenIRError, match="EOS id 1 is not the model's"):
        beam_search(model.config, model.params, ids, mask, num_beams=2, max_length=3, trie=DocidTrie([[3, 1]]))
    with pytest.raises(GenIRError, match="unknown site"):
        beam_search(model.config, model.params, ids, mask, num_beams=2, max_length=3,
                    interventions={"blocks": {"hook_nope": None}})


def test_worst_step_ranks_of_a_decoder_only_model_equal_a_loop_of_single_forwards(models):
    """Teacher-forced prompt + docid tokens (one forward, prompts right- or left-padded) against one forward of
    the prompt and the gold prefix per step, ranking the gold token over the whole vocabulary."""
    from genir_jax.core.decoder_only import forward
    from genir_jax.docids.sequence_targets import greedy_consistent, worst_step_ranks

    _, model = models
    ids, mask = padded_causal_batch(24, LENGTHS, "right", seed=4)
    rng = np.random.default_rng(3)
    sequences = [[int(t) for t in rng.integers(3, 24, size=n - 1)] + [EOS] for n in (1, 3, 2, 4, 3, 2)]
    expected = []
    for row, sequence in enumerate(sequences):
        prompt = ids[row, :LENGTHS[row]].tolist()
        worst = 0
        for step, token in enumerate(sequence):
            logits = np.asarray(forward(model.config, model.params, np.array([prompt + sequence[:step]])))[0, -1]
            worst = max(worst, int((logits > logits[token]).sum()))
        expected.append(worst)
    assert max(expected) > 0
    ranks = worst_step_ranks(model.config, model.params, ids, mask, sequences, batch_size=4)
    np.testing.assert_array_equal(ranks, expected)
    left_ids, left_mask = np.zeros_like(ids), np.zeros_like(mask)
    for row, length in enumerate(LENGTHS):
        left_ids[row, -length:], left_mask[row, -length:] = ids[row, :length], 1
    np.testing.assert_array_equal(worst_step_ranks(model.config, model.params, left_ids, left_mask, sequences),
                                  expected)
    # the greedy (top-1 at every step) docid of each prompt is consistent; its beam-1 search finds it
    out = beam_search(model.config, model.params, ids, mask, num_beams=1, max_length=5)
    greedy = [[int(t) for t in row[1:]] for row in np.asarray(out.sequences)[:, 0]]
    greedy = [row[:row.index(EOS) + 1] if EOS in row else row for row in greedy]
    assert greedy_consistent(model.config, model.params, ids, mask, greedy).all()
