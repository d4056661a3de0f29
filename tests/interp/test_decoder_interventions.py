"""Interventions on decoder-only models go through the same builders and `SiteTap` as T5, and equal the
same edit made with a torch forward hook on the transformers model."""

from __future__ import annotations

import numpy as np
import pytest

from genir_jax.checkpoints.decoder_hf import load_decoder_only
from genir_jax.core import decoder_only as do
from genir_jax.core.taps import Patch
from genir_jax.core.validation import InterventionError
from genir_jax.interp.interventions import head_ablation, mean_ablation, neuron_ablation, replacement, zero_ablation
from tests.decoder_fixtures import build_torch_causal_lm, padded_causal_batch, save_causal_lm, torch_causal_logits

LENGTHS = [7, 4, 6]
# Where each family's attention output projection and MLP output projection read hook_z / mlp.hook_post.
OUT_PROJ = {"gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
            "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
            "qwen2": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for seed, kind in enumerate(OUT_PROJ):
        torch_model = build_torch_causal_lm(kind, seed=seed + 10)
        out[kind] = (load_decoder_only(save_causal_lm(torch_model, tmp_path_factory.mktemp(kind))), torch_model)
    return out


def _hooked_logits(torch_model, module_name, columns, ids, mask):
    """transformers' logits with the input columns `columns` of module `module_name` zeroed by a pre-hook."""
    module = torch_model.get_submodule(module_name)

    def zero(_, inputs):
        edited = inputs[0].clone()
        edited[..., columns] = 0.0
        return (edited,) + tuple(inputs[1:])

    handle = module.register_forward_pre_hook(zero)
    try:
        return torch_causal_logits(torch_model, ids, mask, np.asarray(do.positions_from_mask(mask)))
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", list(OUT_PROJ))
def test_head_and_neuron_ablation_equal_torch_hooks(checkpoints, kind):
    model, torch_model = checkpoints[kind]
    cfg = model.config
    ids, mask = padded_causal_batch(cfg.vocab_size, LENGTHS, "left", seed=6)
    real = mask.astype(bool)
    clean = np.asarray(do.forward(cfg, model.params, ids, mask))

    head, k = 2, cfg.d_kv  # hook_z of head 2 in layer 1: the output projection's input columns of that head
    ours = np.asarray(do.forward(cfg, model.params, ids, mask, head_ablation(cfg, {"blocks.1.attn": [head]})))
    expected = _hooked_logits(torch_model, OUT_PROJ[kind][0].format(1), slice(head * k, (head + 1) * k), ids, mask)
    assert float(np.abs(ours - clean)[real].max()) > 1e-3  # the ablation changes something
    assert float(np.abs(ours - expected)[real].max()) <= 1e-4

    neurons = [5, 17]  # mlp.hook_post of layer 0: the MLP output projection's input columns
    ours = np.asarray(do.forward(cfg, model.params, ids, mask, neuron_ablation(cfg, {"blocks.0.mlp": neurons})))
    expected = _hooked_logits(torch_model, OUT_PROJ[kind][1].format(0), neurons, ids, mask)
    assert float(np.abs(ours - clean)[real].max()) > 1e-3
    assert float(np.abs(ours - expected)[real].max()) <= 1e-4


def test_patching_a_run_with_its_own_activations_changes_nothing(checkpoints):
    model, _ = checkpoints["llama"]
    cfg = model.config
    ids, mask = padded_causal_batch(cfg.vocab_size, LENGTHS, "right", seed=7)
    sites = ["hook_embed", "blocks.0.attn.hook_k", "blocks.1.attn.hook_pattern", "blocks.1.mlp.hook_pre_linear",
             "blocks.0.hook_resid_mid", "ln_final.hook_normalized"]
    clean, cache = do.forward_with_cache(cfg, model.params, ids, mask, cache_sites=sites)
    assert cache["blocks.0.attn.hook_k"].shape == (3, ids.shape[1], cfg.num_kv_heads, cfg.d_kv)
    assert cache["blocks.1.attn.hook_pattern"].shape == (3, cfg.num_heads, ids.shape[1], ids.shape[1])
    patched = do.forward(cfg, model.params, ids, mask, replacement(cfg, cache))
    np.testing.assert_allclose(np.asarray(patched), np.asarray(clean), atol=1e-5)
    # a zero ablation of the residual stream before the final norm is a constant output
    flat = np.asarray(do.forward(cfg, model.params, ids, mask, zero_ablation(cfg, ["blocks.1.hook_resid_post"])))
    np.testing.assert_allclose(flat, np.broadcast_to(flat[:1, :1], flat.shape), atol=1e-5)


def test_gqa_key_heads_and_mean_ablation(checkpoints):
    model, _ = checkpoints["qwen2"]  # one key/value head
    cfg = model.config
    ids, mask = padded_causal_batch(cfg.vocab_size, LENGTHS, "left", seed=8)
    iv = head_ablation(cfg, {"blocks.0.attn": [0]})
    assert iv["blocks"]["attn.hook_z"][0].mask.shape[-2] == cfg.num_heads
    with pytest.raises(InterventionError, match=r"heads \[1\] out of range \[0, 1\)"):
        zero_ablation(cfg, ["blocks.0.attn.hook_v"], heads=[1])
    means = {"blocks.0.hook_mlp_out": np.zeros((ids.shape[1], cfg.d_model), np.float32)}
    np.testing.assert_allclose(
        np.asarray(do.forward(cfg, model.params, ids, mask, mean_ablation(cfg, means))),
        np.asarray(do.forward(cfg, model.params, ids, mask, zero_ablation(cfg, ["blocks.0.hook_mlp_out"]))), atol=1e-6)


def test_interventions_apply_alike_in_cached_decoding(checkpoints):
    """A patch over the whole sequence applies to each cached chunk at its own positions."""
    model, _ = checkpoints["gpt2"]
    cfg = model.config
    ids, mask = padded_causal_batch(cfg.vocab_size, LENGTHS, "left", seed=9)
    rng = np.random.default_rng(0)
    value = rng.normal(size=(1, len(LENGTHS), ids.shape[1], cfg.d_model)).astype(np.float32)
    # layer 0 untouched, layer 1 half-way to `value` at every position
    iv = {"blocks": {"hook_resid_mid": Patch(np.array([0.0, 0.5], np.float32).reshape(2, 1, 1, 1),
                                             np.repeat(value, 2, axis=0))}}
    full = np.asarray(do.forward(cfg, model.params, ids, mask, iv))
    cache = do.init_kv_cache(cfg, len(LENGTHS), ids.shape[1])
    split = 3
    first, cache = do.decode_step(cfg, model.params, ids[:, :split], cache, 0, mask, iv)
    pieces = [np.asarray(first)]
    for t in range(split, ids.shape[1]):
        logits, cache = do.decode_step(cfg, model.params, ids[:, t:t + 1], cache, t, mask, iv)
        pieces.append(np.asarray(logits))
    real = mask.astype(bool)
    assert float(np.abs(np.concatenate(pieces, axis=1) - full)[real].max()) <= 1e-5


def test_t5_site_names_are_refused_with_a_suggestion(checkpoints):
    model, _ = checkpoints["llama"]
    with pytest.raises(Exception, match="unknown site 'decoder.1.hook_mlp_out'.*blocks.1.hook_mlp_out"):
        zero_ablation(model.config, ["decoder.1.hook_mlp_out"])
    with pytest.raises(InterventionError, match="unknown stack 'decoder'"):
        do.forward(model.config, model.params, np.ones((1, 2), int), None,
                   {"decoder": {"hook_mlp_out": Patch(1.0, 0.0)}})
