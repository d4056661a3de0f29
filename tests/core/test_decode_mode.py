"""The decoder's cached decoding mode (`T5.init_decode_cache` / `T5.decode_step`) against the teacher-forced
forward: the same logits at every position, with and without patches that have a position axis."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.core.model import T5
from genir_jax.interp import interventions as ivs
from tests.hf_fixtures import padded_batch

CONFIG = gj.t5_v1_0(vocab_size=40, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                    num_heads=4, dropout_rate=0.0)
LENGTH = 5


def _stepwise_logits(params, ids, mask, decoder_ids, interventions):
    model, variables = T5(CONFIG), {"params": params}
    encoded, _ = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask),
                             {"encoder": interventions["encoder"]} if "encoder" in interventions else None,
                             method=T5.encode)
    decoder = {"decoder": interventions["decoder"]} if "decoder" in interventions else None
    cache = model.apply(variables, encoded, LENGTH, decoder, method=T5.init_decode_cache)
    out = []
    for position in range(LENGTH):
        logits, cache = model.apply(variables, jnp.asarray(decoder_ids[:, position]), jnp.asarray(position), cache,
                                    jnp.asarray(mask), decoder, method=T5.decode_step)
        out.append(np.asarray(logits))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("case", ["none", "positions", "scores", "cross keys", "encoder and per query"])
def test_decode_steps_equal_teacher_forced_logits(case):
    params = gj.init_params(CONFIG, 1)
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [6, 3, 8], seed=4)
    decoder_ids = np.random.default_rng(0).integers(2, CONFIG.vocab_size, size=(3, LENGTH))
    decoder_ids[:, 0] = 0
    rng = np.random.default_rng(1)
    interventions = {
        "none": {},
        "positions": ivs.combine(
            ivs.zero_ablation(CONFIG, ["decoder.0.attn.hook_v", "decoder.2.hook_mlp_out"], positions=[1, 3],
                              length=LENGTH),
            ivs.zero_ablation(CONFIG, ["decoder.1.mlp.hook_post"], positions=[2], neurons=[0, 7], length=LENGTH),
            ivs.zero_ablation(CONFIG, ["decoder.hook_embed"], positions=[4], length=LENGTH)),
        # (zeroing self-attention *scores* would unmask later keys, which a decoding step has not seen yet)
        "scores": ivs.zero_ablation(CONFIG, ["decoder.1.attn.hook_pattern", "decoder.2.cross_attn.hook_attn_scores"],
                                    positions=[2], heads=[1], length=LENGTH),
        "cross keys": ivs.combine(ivs.head_ablation(CONFIG, {"decoder.0.cross_attn": [0, 2]}),
                                  ivs.zero_ablation(CONFIG, ["decoder.1.cross_attn.hook_k"], heads=[3])),
        "encoder and per query": ivs.combine(
            ivs.zero_ablation(CONFIG, ["encoder.1.hook_mlp_out"]),
            ivs.replacement(CONFIG, {"decoder.1.hook_resid_mid": rng.normal(size=(3, LENGTH, 32)).astype(np.float32)},
                            positions=[0, 3], length=LENGTH)),
    }[case]
    expected = np.asarray(gj.forward(CONFIG, params, ids, mask, decoder_ids, interventions=interventions or None))
    np.testing.assert_allclose(_stepwise_logits(params, ids, mask, decoder_ids, interventions), expected,
                               rtol=0, atol=2e-5)
    if case != "none":  # the patches matter
        plain = np.asarray(gj.forward(CONFIG, params, ids, mask, decoder_ids))
        assert np.abs(plain - expected).max() > 1e-3
