"""Numerical parity with transformers' PyTorch T5 on random-weight checkpoints loaded through our code."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genir_jax as gj
from tests.hf_fixtures import padded_batch, torch_logits

FLOAT32_TOLERANCE = 1e-4
# bfloat16 has an 8-bit mantissa: after a few layers logits carry ~1% relative error. The documented
# bound (docs/reference-agreement.md, "Parity with transformers"): max |bf16 - fp32| <= 0.05 * max |fp32 logit|.
BFLOAT16_RELATIVE_TOLERANCE = 0.05

CASES = {
    # (a) T5 v1.0: ReLU, tied embeddings, d_model**-0.5 rescale of the decoder output.
    "v1_0_relu_tied": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # (b) T5 v1.1 / Flan-T5: gated-GELU, separate lm_head, no rescale (hub-style config.json).
    "v1_1_gated_gelu_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, config_style="hf4"),
    # (c) encoder and decoder of different depths.
    "different_depths": dict(num_layers=3, num_decoder_layers=1),
    "deeper_decoder": dict(num_layers=1, num_decoder_layers=4, feed_forward_proj="gated-gelu",
                           tie_word_embeddings=False),
    # (e) non-default relative attention buckets / distance.
    "custom_buckets": dict(relative_attention_num_buckets=8, relative_attention_max_distance=12),
    "many_buckets": dict(relative_attention_num_buckets=64, relative_attention_max_distance=40),
    # mT5 architecture and other activations transformers supports for T5.
    "mt5": dict(model_type="mt5", feed_forward_proj="gated-gelu", tie_word_embeddings=False, config_style="hf4"),
    "gated_silu": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False),
    "gelu_exact": dict(feed_forward_proj="gelu"),
}

# (d) a padded batch: different lengths, attention masks, several decoder steps.
LENGTHS = [37, 12, 5, 30]
MAX_LENGTH = 40
DECODER_STEPS = 6


def _compare(hf_checkpoint, name, settings, seed=0):
    settings = dict(settings)
    style = settings.pop("config_style", "hf5")
    directory, torch_model = hf_checkpoint(name, seed=seed, config_style=style, **settings)
    model = gj.load_pretrained(directory)
    ids, mask, dec = padded_batch(model.config.vocab_size, LENGTHS, MAX_LENGTH, seed=seed,
                                  decoder_steps=DECODER_STEPS)
    expected = torch_logits(torch_model, ids, mask, dec)
    ours = np.asarray(gj.forward(model.config, model.params, ids, mask, dec))
    return model, expected, ours, (ids, mask, dec), torch_model


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_logits_match_transformers(hf_checkpoint, name):
    model, expected, ours, _, _ = _compare(hf_checkpoint, name, CASES[name])
    assert ours.shape == expected.shape == (len(LENGTHS), DECODER_STEPS, model.config.vocab_size)
    diff = float(np.abs(ours - expected).max())
    print(f"{name}: float32 max |logit diff| = {diff:.3g} (max |logit| {np.abs(expected).max():.3g})")
    assert diff <= FLOAT32_TOLERANCE


def test_config_flags_read_as_transformers_reads_them(hf_checkpoint):
    v10, *_ = _compare(hf_checkpoint, "a", CASES["v1_0_relu_tied"])
    v11, *_ = _compare(hf_checkpoint, "b", CASES["v1_1_gated_gelu_untied"])
    assert (v10.config.tie_word_embeddings, v10.config.scale_decoder_outputs) == (True, True)
    assert (v11.config.tie_word_embeddings, v11.config.scale_decoder_outputs) == (False, False)
    assert "lm_head" not in v10.params and v11.params["lm_head"].shape == (32, 128)


def test_padding_does_not_change_unpadded_rows(hf_checkpoint):
    """A padded row's logits equal that sequence run alone without padding."""
    directory, _ = hf_checkpoint("pad", **CASES["v1_0_relu_tied"])
    model = gj.load_pretrained(directory)
    ids, mask, dec = padded_batch(model.config.vocab_size, LENGTHS, MAX_LENGTH, decoder_steps=DECODER_STEPS)
    batched = np.asarray(gj.forward(model.config, model.params, ids, mask, dec))
    row = 2
    alone = np.asarray(gj.forward(model.config, model.params, ids[row:row + 1, :LENGTHS[row]],
                                  mask[row:row + 1, :LENGTHS[row]], dec[row:row + 1]))
    np.testing.assert_allclose(batched[row], alone[0], atol=1e-5)


@pytest.mark.parametrize("name", ["v1_0_relu_tied", "v1_1_gated_gelu_untied"])
def test_bfloat16_is_finite_and_close(hf_checkpoint, name):
    model, expected, _, (ids, mask, dec), torch_model = _compare(hf_checkpoint, name, CASES[name])
    bf16 = gj.load_pretrained(model.path, dtype="bfloat16")
    assert bf16.params["shared"].dtype == jnp.bfloat16
    ours = np.asarray(gj.forward(bf16.config, bf16.params, ids, mask, dec).astype(jnp.float32))
    assert np.isfinite(ours).all()
    scale = float(np.abs(expected).max())
    diff_vs_fp32 = float(np.abs(ours - expected).max())
    torch_bf16 = torch_logits(torch_model, ids, mask, dec, dtype=__import__("torch").bfloat16)
    diff_torch_bf16 = float(np.abs(torch_bf16 - expected).max())
    print(f"{name}: bf16 max diff vs fp32 {diff_vs_fp32:.3g} (transformers bf16: {diff_torch_bf16:.3g}); "
          f"max |logit| {scale:.3g}")
    assert diff_vs_fp32 <= BFLOAT16_RELATIVE_TOLERANCE * scale
    # The float32 master weights with bfloat16 compute (dtype=...) obey the same bound.
    mixed = np.asarray(gj.forward(model.config, model.params, ids, mask, dec, dtype=jnp.bfloat16)
                       .astype(jnp.float32))
    assert np.isfinite(mixed).all() and float(np.abs(mixed - expected).max()) <= BFLOAT16_RELATIVE_TOLERANCE * scale


def test_forward_is_jittable_and_takes_numpy_or_jax(hf_checkpoint):
    model, expected, _, (ids, mask, dec), _ = _compare(hf_checkpoint, "jit", CASES["v1_0_relu_tied"])
    jitted = jax.jit(gj.forward, static_argnums=0)
    from_jax = np.asarray(jitted(model.config, model.params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec)))
    from_numpy = np.asarray(gj.forward(model.config, model.params, ids.astype(np.int32), mask, dec))
    np.testing.assert_allclose(from_jax, expected, atol=FLOAT32_TOLERANCE)
    np.testing.assert_array_equal(from_jax, from_numpy)


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_other_weight_formats_load_identically(hf_checkpoint, fmt):
    settings = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    reference_dir, torch_model = hf_checkpoint("single", **settings)
    other_dir, _ = hf_checkpoint(fmt, fmt=fmt, **settings)
    if fmt == "sharded":
        assert (other_dir / "model.safetensors.index.json").is_file()
    reference = gj.load_pretrained(reference_dir)
    other = gj.load_pretrained(other_dir)
    assert other.config == reference.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, other.params, reference.params)
