"""The decoder-only model's entry points agree with each other: running from a layer on (prefix sharing),
the unembedding, parameter shapes and logical axes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genir_jax.core import decoder_only as do
from genir_jax.core.decoder_config import DecoderConfig, gpt2_config
from genir_jax.interp import interventions as iv

CONFIGS = {
    "gpt2": gpt2_config(vocab_size=50, d_model=16, num_layers=3, num_heads=2, d_ff=32, max_position_embeddings=32),
    "llama_gqa": DecoderConfig(vocab_size=50, d_model=16, num_layers=3, num_heads=4, num_kv_heads=2, d_ff=24,
                               qkv_bias=True, tie_word_embeddings=True),
}
IDS = np.random.default_rng(0).integers(0, 50, (2, 6))
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


@pytest.mark.slow  # compiles the model, its suffix and the suffix under vmap: about 25 s on a busy CPU
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_from_layer_equals_the_full_forward(name):
    cfg = CONFIGS[name]
    params = do.init_params(cfg, 1)
    ablation = iv.combine(iv.neuron_ablation(cfg, {"blocks.2.mlp": [3]}), iv.head_ablation(cfg, {"blocks.1.attn": [1]}),
                          iv.zero_ablation(cfg, ["ln_final.hook_normalized"], positions=[5], length=6))
    residuals = [f"blocks.{layer}.hook_resid_pre" for layer in range(cfg.num_layers)]
    clean, states = do.forward_with_cache(cfg, params, IDS, MASK, cache_sites=residuals)
    patched = np.asarray(do.forward(cfg, params, IDS, MASK, ablation))
    assert float(np.abs(patched - np.asarray(clean)).max()) > 1e-3
    for start in (0, 1):  # the ablation touches layers 1 and 2 only: starting at 0 or 1 gives the same
        hidden = do.forward_from_layer(cfg, params, states[residuals[start]], start, MASK, ablation)
        np.testing.assert_allclose(np.asarray(do.unembed(cfg, params, hidden)), patched, atol=1e-5)

    stacked = jnp.stack([states[r] for r in residuals])  # a traced start under vmap, as a sweep runs it
    starts = jnp.arange(cfg.num_layers)
    hidden = jax.vmap(lambda x, s: do.forward_from_layer(cfg, params, x, s, MASK))(stacked, starts)
    for start in range(cfg.num_layers):
        np.testing.assert_allclose(np.asarray(do.unembed(cfg, params, hidden[start])), np.asarray(clean), atol=1e-5)


def test_unembedding_rows_shapes_and_axes():
    for cfg in CONFIGS.values():
        params = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), do.param_shapes(cfg))
        assert ("lm_head" in params) != cfg.tie_word_embeddings and ("pos_embed" in params) == cfg.is_gpt2
        table, scale = do.unembedding_rows(cfg, params)
        assert table.shape == (cfg.vocab_size, cfg.d_model) and scale == 1.0
        hidden = jnp.ones((2, cfg.d_model))
        np.testing.assert_allclose(np.asarray(do.unembed(cfg, params, hidden)), np.full((2, cfg.vocab_size), cfg.d_model))
        axes = do.logical_axes(cfg)
        assert tuple(axes["layers"]["attn"]["key"]) == ("layers", "embed", "heads", "kv")
        assert tuple(axes["embed"]) == ("vocab", "embed")


def test_decode_step_refuses_tokens_beyond_the_cache():
    cfg = CONFIGS["llama_gqa"]
    params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), do.param_shapes(cfg))
    cache = do.init_kv_cache(cfg, 2, 6)
    with pytest.raises(ValueError, match="2 token\\(s\\) at slot 5 do not fit a cache of 6 slots"):
        do.decode_step(cfg, params, IDS[:, :2], cache, 5, MASK)
    with pytest.raises(ValueError, match=r"key_mask has shape \(2, 5\), expected \(batch, cache slots\) = \(2, 6\)"):
        do.decode_step(cfg, params, IDS[:, :1], cache, 0, MASK[:, :5])
