"""Numerical parity of the decoder-only models with transformers' GPT2LMHeadModel, LlamaForCausalLM and
Qwen2ForCausalLM on random-weight checkpoints loaded through our loader: padded batches on either side, and
key/value-cached decoding equal to the full forward."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from genir_jax.checkpoints.decoder_hf import load_decoder_only
from genir_jax.core import decoder_only as do
from tests.decoder_fixtures import build_torch_causal_lm, padded_causal_batch, save_causal_lm, torch_causal_logits

TOLERANCE = 1e-4
KINDS = ("gpt2", "llama", "qwen2")
LENGTHS = [9, 4, 6, 1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{kind: (our loaded model, the torch model)}, built once for the module."""
    out = {}
    for kind in KINDS:
        torch_model = build_torch_causal_lm(kind, seed=KINDS.index(kind))
        directory = save_causal_lm(torch_model, tmp_path_factory.mktemp(kind))
        out[kind] = (load_decoder_only(directory), torch_model)
    return out


def test_positions_from_mask_are_generates():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = np.array([[1, 1, 0, 1, 2], [0, 1, 2, 1, 1], [0, 1, 2, 3, 4]])  # cumsum - 1, padding at 1
    np.testing.assert_array_equal(np.asarray(do.positions_from_mask(mask)), expected)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_padded_logits_match_transformers(checkpoints, kind, side):
    model, torch_model = checkpoints[kind]
    ids, mask = padded_causal_batch(model.config.vocab_size, LENGTHS, side, seed=1)
    real = mask.astype(bool)  # padded positions' logits are not defined by either implementation
    positions = np.asarray(do.positions_from_mask(mask))
    # Right padding: transformers' own default positions (0, 1, ...); left padding: as generate passes them.
    expected = torch_causal_logits(torch_model, ids, mask, None if side == "right" else positions)
    ours = np.asarray(do.forward(model.config, model.params, ids, mask))
    assert ours.shape == expected.shape == ids.shape + (model.config.vocab_size,)
    diff = float(np.abs(ours - expected)[real].max())
    print(f"{kind} {side}: max |logit diff| {diff:.3g} (max |logit| {np.abs(expected).max():.3g})")
    assert diff <= TOLERANCE
    explicit = np.asarray(do.forward(model.config, model.params, ids, mask, positions=positions))
    np.testing.assert_array_equal(explicit, ours)


def test_left_padded_row_equals_the_row_alone(checkpoints):
    model, _ = checkpoints["llama"]
    ids, mask = padded_causal_batch(model.config.vocab_size, LENGTHS, "left", seed=2)
    batched = np.asarray(do.forward(model.config, model.params, ids, mask))
    row, length = 1, LENGTHS[1]
    alone = np.asarray(do.forward(model.config, model.params, ids[row:row + 1, -length:]))
    np.testing.assert_allclose(batched[row, -length:], alone[0], atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_the_full_forward(checkpoints, kind):
    """Prefill a left-padded prompt into the cache, then decode three tokens one at a time: every step's
    logits equal our full forward over the longer sequence and transformers' on it."""
    model, torch_model = checkpoints[kind]
    cfg, params = model.config, model.params
    steps = 3
    prompt, prompt_mask = padded_causal_batch(cfg.vocab_size, LENGTHS, "left", seed=3)
    new = np.random.default_rng(4).integers(1, cfg.vocab_size, size=(len(LENGTHS), steps))
    ids = np.concatenate([prompt, new], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(new)], axis=1)
    full = np.asarray(do.forward(cfg, params, ids, mask))
    reference = torch_causal_logits(torch_model, ids, mask, np.asarray(do.positions_from_mask(mask)))
    width = prompt.shape[1]
    cache = do.init_kv_cache(cfg, len(LENGTHS), width + steps + 2)  # spare slots are never attended
    key_mask = np.concatenate([mask, np.ones((len(LENGTHS), 2), mask.dtype)], axis=1)
    logits, cache = do.decode_step(cfg, params, prompt, cache, 0, key_mask)
    pieces = [np.asarray(logits)]
    for step in range(steps):
        logits, cache = do.decode_step(cfg, params, new[:, step:step + 1], cache, width + step, key_mask)
        pieces.append(np.asarray(logits))
    cached = np.concatenate(pieces, axis=1)
    real = mask.astype(bool)
    assert float(np.abs(cached - full)[real].max()) <= 1e-5
    assert float(np.abs(cached - reference)[real].max()) <= TOLERANCE


def test_bfloat16_compute_is_finite_and_close(checkpoints):
    model, _ = checkpoints["qwen2"]
    ids, mask = padded_causal_batch(model.config.vocab_size, LENGTHS, "left", seed=5)
    fp32 = np.asarray(do.forward(model.config, model.params, ids, mask))
    bf16 = np.asarray(do.forward(model.config, model.params, ids, mask, dtype=jnp.bfloat16).astype(jnp.float32))
    real = mask.astype(bool)
    assert np.isfinite(bf16).all()
    assert float(np.abs(bf16 - fp32)[real].max()) <= 0.05 * float(np.abs(fp32).max())
