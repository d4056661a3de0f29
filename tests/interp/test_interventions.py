"""Interventions and caches checked against numbers computed another way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import interventions as ivs
from genir_jax.core.sites import SiteError, all_site_names, parse_site
from tests.hf_fixtures import padded_batch

CONFIG = gj.t5_v1_0(vocab_size=96, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=4,
                           num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=20,
                           dropout_rate=0.0)
GATED = gj.t5_v1_1(vocab_size=96, d_model=24, d_kv=6, d_ff=48, num_layers=3, num_decoder_layers=2,
                          num_heads=4, dropout_rate=0.0)


@pytest.fixture(scope="module")
def params():
    return gj.init_params(CONFIG, 3)


@pytest.fixture(scope="module")
def batch():
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [9, 5, 7], seed=1)
    return ids, mask, np.zeros((3, 1), np.int32)


def _logits(params, batch, interventions=None, config=CONFIG):
    return np.asarray(gj.forward(config, params, *batch, interventions=interventions))


def _with(params, path, layer, value=0.0):
    """A copy of params with params[path...][layer] set to value."""
    params = jax.tree_util.tree_map(lambda x: x, params)
    node = params
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = node[path[-1]].at[layer].set(value)
    return params


def test_all_zero_mask_equals_clean_forward(params, batch):
    names = [n for n in all_site_names(CONFIG) if parse_site(CONFIG, n).layer in (None, 1)]
    masks = ivs.site_masks(CONFIG, names)
    iv = {}
    for (stack, local), mask in masks.items():
        iv.setdefault(stack, {})[local] = gj.Patch(np.zeros_like(mask), 123.0)  # value ignored under mask 0
    np.testing.assert_array_equal(_logits(params, batch, iv), _logits(params, batch))


@pytest.mark.parametrize("site, path", [
    ("decoder.2.hook_attn_out", ("decoder", "layers", "self_attn", "out")),
    ("decoder.1.hook_cross_attn_out", ("decoder", "layers", "cross_attn", "out")),
    ("decoder.3.hook_mlp_out", ("decoder", "layers", "mlp", "wo")),
    ("encoder.0.hook_attn_out", ("encoder", "layers", "self_attn", "out")),
    ("encoder.1.hook_mlp_out", ("encoder", "layers", "mlp", "wo")),
])
def test_zero_ablation_equals_zeroed_output_projection(params, batch, site, path):
    layer = parse_site(CONFIG, site).layer
    ablated = _logits(params, batch, ivs.zero_ablation(CONFIG, [site]))
    surgery = _logits(_with(params, path, layer), batch)
    np.testing.assert_allclose(ablated, surgery, atol=1e-5)
    assert np.abs(ablated - _logits(params, batch)).max() > 1e-3  # the ablation did something


def test_head_and_neuron_knockouts_equal_weight_surgery(params, batch):
    heads = {"decoder.1.cross_attn": [0, 2], "encoder.1.attn": [3]}
    knocked = _logits(params, batch, ivs.head_ablation(CONFIG, heads))
    surgery = _with(params, ("decoder", "layers", "cross_attn", "out"), (1, jnp.array([0, 2])))
    surgery = _with(surgery, ("encoder", "layers", "self_attn", "out"), (1, 3))
    np.testing.assert_allclose(knocked, _logits(surgery, batch), atol=1e-5)

    neurons = {"decoder.3.mlp": [1, 5, 40]}
    knocked = _logits(params, batch, ivs.neuron_ablation(CONFIG, neurons))
    surgery = _with(params, ("decoder", "layers", "mlp", "wo"), (3, jnp.array([1, 5, 40])))
    np.testing.assert_allclose(knocked, _logits(surgery, batch), atol=1e-5)


def test_mean_over_one_query_equals_its_clean_run(params, batch):
    ids, mask, dec = (a[1:2] for a in batch)
    sites = ["decoder.*.hook_mlp_out", "decoder.*.hook_cross_attn_out", "encoder.*.hook_attn_out",
             "decoder.0.mlp.hook_post"]
    means = ivs.mean_activations(CONFIG, params, ids, mask, sites, progress=False)
    iv = ivs.mean_ablation(CONFIG, means)
    np.testing.assert_allclose(_logits(params, (ids, mask, dec), iv), _logits(params, (ids, mask, dec)), atol=1e-5)


def test_streaming_mean_equals_mean_of_the_cache(params, batch):
    ids, mask, dec = batch
    sites = ["decoder.*.hook_mlp_out", "encoder.1.hook_resid_post", "decoder.2.cross_attn.hook_pattern"]
    streamed = ivs.mean_activations(CONFIG, params, ids, mask, sites, batch_size=2, progress=False)
    _, cache = gj.forward_with_cache(CONFIG, params, ids, mask, dec, cache_sites=list(streamed))
    for name, mean in streamed.items():
        np.testing.assert_allclose(mean, np.asarray(cache[name]).mean(0), atol=1e-6, err_msg=name)


def test_replacement_from_another_run_patches_it_in(params, batch):
    """Patching every decoder layer's components with another query's makes the decoder output that
    query's (the decoder input is the same start token): logits equal the other query's clean logits."""
    ids, mask, dec = batch
    other = (ids[[2, 0, 1]], mask[[2, 0, 1]], dec)
    sites = [f"decoder.{l}.{c}" for l in range(4) for c in ("hook_attn_out", "hook_cross_attn_out", "hook_mlp_out")]
    _, cache = gj.forward_with_cache(CONFIG, params, *other, cache_sites=sites)
    patched = _logits(params, batch, ivs.replacement(CONFIG, cache))
    np.testing.assert_allclose(patched, _logits(params, other), atol=1e-5)


def test_encoder_swap_with_own_encoder_changes_nothing_and_with_other_matches(params, batch):
    ids, mask, dec = batch
    _, cache = gj.forward_with_cache(CONFIG, params, ids, mask, dec, cache_sites=["encoder.hook_out",
                                                                                  "encoder.1.hook_resid_post"])
    same = _logits(params, batch, ivs.encoder_swap(CONFIG, cache["encoder.hook_out"], site="encoder.hook_out"))
    np.testing.assert_allclose(same, _logits(params, batch), atol=1e-6)
    # another model's encoder (before its final norm, as the reference swaps): decoder reads our final norm
    other = gj.init_params(CONFIG, 11)
    _, other_cache = gj.forward_with_cache(CONFIG, other, ids, mask, dec, cache_sites=["encoder.1.hook_resid_post"])
    swapped = _logits(params, batch, ivs.encoder_swap(CONFIG, other_cache["encoder.1.hook_resid_post"],
                                                      site="encoder.1.hook_resid_post"))
    # expected: the other model's encoder layers (with its embeddings), then OUR final norm and decoder
    other_with_our_norm = dict(other, encoder={**other["encoder"], "final_norm": params["encoder"]["final_norm"]})
    enc, _ = gj.encode(CONFIG, other_with_our_norm, ids, mask)
    hidden, _ = gj.decode(CONFIG, params, enc, mask, dec)
    np.testing.assert_allclose(swapped, np.asarray(gj.unembed(CONFIG, params, hidden)), atol=1e-5)


def test_from_source_values_pass_through_builders_unstacked():
    """FROM_SOURCE is a value like any other for replacement / encoder_swap: masks as usual, no layer stacking."""
    iv = ivs.replacement(CONFIG, {"decoder.*.hook_mlp_out": ivs.FROM_SOURCE}, sites=["decoder.1.hook_mlp_out",
                                                                                     "decoder.3.hook_mlp_out"])
    patch = iv["decoder"]["hook_mlp_out"]
    assert patch.value is ivs.FROM_SOURCE
    np.testing.assert_array_equal(np.asarray(patch.mask)[:, 0, 0, 0], [0, 1, 0, 1])
    same = ivs.replacement(CONFIG, {"decoder.1.hook_mlp_out": ivs.FROM_SOURCE,
                                    "decoder.3.hook_mlp_out": ivs.FROM_SOURCE})
    assert same["decoder"]["hook_mlp_out"].value is ivs.FROM_SOURCE
    np.testing.assert_array_equal(np.asarray(same["decoder"]["hook_mlp_out"].mask), np.asarray(patch.mask))
    swap = ivs.encoder_swap(CONFIG, ivs.FROM_SOURCE, site="encoder.1.hook_resid_post")
    assert swap["encoder"]["hook_resid_post"].value is ivs.FROM_SOURCE
    np.testing.assert_array_equal(np.asarray(swap["encoder"]["hook_resid_post"].mask)[:, 0, 0, 0], [0, 1])
    stacked = ivs.encoder_swap(CONFIG, ivs.FROM_SOURCE, site="encoder.hook_out")["encoder"]["hook_out"]
    assert stacked.value is ivs.FROM_SOURCE and np.asarray(stacked.mask).shape == (1, 1, 1)
    with pytest.raises(ivs.InterventionError, match="either all FROM_SOURCE or all arrays"):
        ivs.replacement(CONFIG, {"decoder.0.hook_mlp_out": ivs.FROM_SOURCE,
                                 "decoder.1.hook_mlp_out": np.zeros((3, 1, 24))})
    with pytest.raises(TypeError):
        ivs.encoder_swap(CONFIG, ivs.FROM_SOURCE)  # the swapped site is required
    with pytest.raises(ivs.InterventionError, match="the swapped site must be named"):
        ivs.encoder_swap(CONFIG, ivs.FROM_SOURCE, site=None)


def test_cache_records_only_what_was_asked(params, batch):
    from genir_jax.core.model import T5, cache_specs

    ids, mask, dec = batch
    names = ["decoder.3.hook_mlp_out", "encoder.0.attn.hook_pattern"]
    specs = cache_specs(CONFIG, names)
    out = jax.eval_shape(
        lambda p: T5(CONFIG, encoder_cache=specs[0], decoder_cache=specs[1]).apply({"params": p}, ids, mask, dec),
        params)[1]
    assert out["decoder"]["hook_mlp_out"].shape == (1, 3, 1, 24)  # one layer kept, not four
    assert out["encoder"]["attn.hook_pattern"].shape == (1, 3, 4, 9, 9)
    _, cache = gj.forward_with_cache(CONFIG, params, ids, mask, dec, cache_sites=names)
    _, full = gj.forward_with_cache(CONFIG, params, ids, mask, dec, cache_sites=["decoder.*.hook_mlp_out",
                                                                                "encoder.*.attn.hook_pattern"])
    for name in names:
        np.testing.assert_array_equal(cache[name], full[name])


def test_component_outputs_sum_to_residual_delta(params, batch):
    ids, mask, dec = batch
    layer = 2
    names = [f"decoder.{layer}.{s}" for s in ("hook_resid_pre", "hook_attn_out", "hook_cross_attn_out",
                                              "hook_mlp_out", "hook_resid_post")]
    _, c = gj.forward_with_cache(CONFIG, params, ids, mask, dec, cache_sites=names)
    delta = c[names[4]] - c[names[0]]
    np.testing.assert_allclose(c[names[1]] + c[names[2]] + c[names[3]], delta, atol=1e-5)


def test_gated_model_sites_and_stack_sites(batch):
    params = gj.init_params(GATED, 5)
    ids, mask, dec = batch
    names = ["decoder.1.mlp.hook_pre_linear", "hook_embed", "decoder.hook_embed", "encoder_final_ln.hook_normalized",
             "encoder.hook_out", "decoder.hook_out", "encoder.2.hook_resid_post"]
    logits, c = gj.forward_with_cache(GATED, params, ids, mask, dec, cache_sites=names)
    np.testing.assert_allclose(c["hook_embed"], np.asarray(params["shared"])[ids], atol=0)
    scale = np.asarray(params["encoder"]["final_norm"]["scale"])
    np.testing.assert_allclose(c["encoder.hook_out"], np.asarray(c["encoder_final_ln.hook_normalized"]) * scale,
                               atol=1e-6)
    r = np.asarray(c["encoder.2.hook_resid_post"])
    np.testing.assert_allclose(c["encoder_final_ln.hook_normalized"],
                               r / np.sqrt((r ** 2).mean(-1, keepdims=True) + 1e-6), atol=1e-5)
    np.testing.assert_allclose(np.asarray(gj.unembed(GATED, params, c["decoder.hook_out"])), logits, atol=1e-5)


def test_unknown_site_suggests_the_closest():
    with pytest.raises(SiteError, match=r"unknown site 'decoder.3.hook_mlp_output'; did you mean 'decoder.3.hook_mlp_out'"):
        parse_site(CONFIG, "decoder.3.hook_mlp_output")
    with pytest.raises(SiteError, match=r"layer 7 does not exist; the decoder has 4 layers"):
        parse_site(CONFIG, "decoder.7.hook_mlp_out")
    with pytest.raises(SiteError, match=r"unknown site 'decoder.0.mlp.hook_pre_linear'"):
        parse_site(CONFIG, "decoder.0.mlp.hook_pre_linear")  # not gated
    with pytest.raises(SiteError, match="matches no site"):
        ivs.zero_ablation(CONFIG, ["decoder.*.hook_nothing"])


def test_wrong_shapes_are_named(params, batch):
    bad = {"decoder": {"hook_mlp_out": gj.Patch(np.ones((3, 1, 1, 1)), 0.0)}}  # 3 layers for a 4-layer decoder
    with pytest.raises(ivs.InterventionError, match=r"site 'decoder.\*.hook_mlp_out': mask has shape \(3, 1, 1, 1\)"):
        gj.forward(CONFIG, params, *batch, interventions=bad)
    bad = {"decoder": {"attn.hook_z": gj.Patch(np.ones((4, 1, 1, 5, 1)), 0.0)}}  # 5 heads, model has 4
    with pytest.raises(ivs.InterventionError, match=r"does not broadcast to \(4, 3, 1, 4, 6\)"):
        gj.forward(CONFIG, params, *batch, interventions=bad)
    with pytest.raises(ivs.InterventionError, match="has no neuron axis"):
        ivs.zero_ablation(CONFIG, ["decoder.1.hook_mlp_out"], neurons=[1])
    with pytest.raises(ivs.InterventionError, match=r"heads \[4\] out of range \[0, 4\)"):
        ivs.zero_ablation(CONFIG, ["decoder.1.attn.hook_z"], heads=[4])
    with pytest.raises(SiteError, match="unknown site 'decoder.0.hook_mlp'"):
        gj.forward(CONFIG, params, *batch, interventions={"decoder": {"hook_mlp": gj.Patch(np.ones((4, 1, 1, 1)), 0.)}})


def test_positions_select_one_position(params):
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [6, 6], seed=2)
    dec = np.array([[0, 5, 7], [0, 9, 3]])
    iv = ivs.zero_ablation(CONFIG, ["decoder.*.hook_mlp_out"], positions=[2], length=3)
    patched = np.asarray(gj.forward(CONFIG, params, ids, mask, dec, interventions=iv))
    clean = np.asarray(gj.forward(CONFIG, params, ids, mask, dec))
    np.testing.assert_allclose(patched[:, :2], clean[:, :2], atol=1e-6)  # causal: earlier positions untouched
    assert np.abs(patched[:, 2] - clean[:, 2]).max() > 1e-3
