"""Attribution (AtP, AtP*) on decoder-only models (GPT-2; Llama with rotary embeddings and grouped-query
attention), checked against numbers computed other ways: exact patching with small patches (values from a
slightly perturbed model), AtP*'s QK fix against its definition (the exactly patched attention pattern, from a
patched forward, times the gradient at the pattern, from `jax.grad` through `decoder_only.forward`), and
GradDrop's identity for last-layer units."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from genir_jax.checkpoints.decoder_hf import load_decoder_only
from genir_jax.core import decoder_only as do
from genir_jax.interp import interventions as ivs
from genir_jax.interp.attribution import attribute, check_against_exact
from genir_jax.interp.interventions import FROM_SOURCE, InterventionError
from genir_jax.interp.patching import run_sweep
from genir_jax.interp.sweep import concat, site_grid
from tests.decoder_fixtures import build_torch_causal_lm, padded_causal_batch, save_causal_lm

# (padding side, overrides): GPT-2 left-padded; Llama right-padded with 2 key/value heads for its 4 query heads
CASES = {"gpt2": ("left", {"n_inner": 12}), "llama": ("right", {"intermediate_size": 12, "num_key_value_heads": 2})}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family: the model, one query (per-query patch values need a batch of one: the values of a perturbed
    model on that query), its prompt and its clean top token as target; and a 4-query batch."""
    out = {}
    for kind, (side, overrides) in CASES.items():
        model = load_decoder_only(save_causal_lm(build_torch_causal_lm(kind, seed=3, **overrides),
                                                 tmp_path_factory.mktemp(kind)))
        ids, mask = padded_causal_batch(model.config.vocab_size, [7, 4, 6, 5], side, seed=3)
        logits = _last_logits(model.config, model.params, ids, mask)
        out[kind] = (model, ids, mask, logits.argmax(-1).astype(np.int32))
    return out


def _last_logits(cfg, params, ids, mask, interventions=None):
    last = np.asarray(do.last_positions(mask))
    return np.asarray(do.forward(cfg, params, ids, mask, interventions))[np.arange(len(ids)), last]


def _perturbed(params, scale, seed=5):
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [np.asarray(x) + scale * rng.standard_normal(np.shape(x)).astype(
        np.float32) for x in leaves])


def _values(cfg, params, ids, mask, local, scale):
    """[L, B, *site]: the site's activations in every layer of a model perturbed by `scale`."""
    _, cache = do.forward_with_cache(cfg, _perturbed(params, scale), ids, mask, cache_sites=[f"blocks.*.{local}"])
    return np.stack([np.asarray(cache[f"blocks.{layer}.{local}"]) for layer in range(cfg.num_layers)])


@pytest.mark.parametrize("kind", list(CASES))
def test_attribution_approaches_exact_for_small_patches(models, kind):
    model, ids, mask, targets = models[kind]
    cfg, params = model.config, model.params
    ids, mask, targets = ids[:1], mask[:1], targets[:1]
    grid = concat(*(site_grid(cfg, f"blocks.*.{site}", unit=unit, value=_values(cfg, params, ids, mask, site, 3e-4))
                    for site, unit in (("attn.hook_z", "head"), ("mlp.hook_post", "neuron"), ("hook_attn_out", None),
                                       ("hook_mlp_out", None))))
    exact = run_sweep(cfg, params, ids, mask, targets, grid, metrics=("logit",), progress=False)
    exact = exact.aggregates["logit_effect"]
    scale = np.abs(exact).max()
    assert scale > 1e-4
    plain = attribute(cfg, params, ids, mask, targets, grid, method="atp", metric="logit", progress=False)
    np.testing.assert_allclose(plain.scores, exact, atol=0.05 * scale)
    assert np.corrcoef(plain.scores, exact)[0, 1] > 0.99
    star = attribute(cfg, params, ids, mask, targets, grid, method="atp*", metric="logit", progress=False)
    np.testing.assert_allclose(star.scores, plain.scores, atol=1e-6)  # no query / key site: no QK fix


@pytest.mark.parametrize("kind", list(CASES))
def test_atp_star_qk_fix_equals_its_definition(models, kind):
    """Queries, keys and scores from a strongly perturbed model (saturated softmax): AtP*'s estimate is the
    gradient at the attention pattern times the exact change of the pattern, both computed here from
    `decoder_only.forward` (rotary embeddings, grouped-query keys, the d_kv ** -0.5 scale, the causal mask)."""
    model, ids, mask, targets = models[kind]
    cfg, params = model.config, model.params
    ids, mask, targets = ids[:1], mask[:1], targets[:1]
    last = int(np.asarray(do.last_positions(mask))[0])
    for layer in range(cfg.num_layers):
        pattern_site = f"blocks.{layer}.attn.hook_pattern"
        _, cache = do.forward_with_cache(cfg, params, ids, mask, cache_sites=[pattern_site])
        clean_pattern = np.asarray(cache[pattern_site])

        def target_logit(delta):
            shifted = ivs.replacement(cfg, {pattern_site: clean_pattern + delta})
            return do.forward(cfg, params, ids, mask, shifted)[0, last, targets[0]]

        gradient = np.asarray(jax.grad(target_logit)(np.zeros_like(clean_pattern)), np.float64)
        for site in ("attn.hook_q", "attn.hook_k", "attn.hook_attn_scores"):
            grid = site_grid(cfg, f"blocks.{layer}.{site}", unit="position", length=ids.shape[1],
                             value=_values(cfg, params, ids, mask, site, 1.0))
            star = attribute(cfg, params, ids, mask, targets, grid, method="atp*", metric="logit", progress=False)
            plain = attribute(cfg, params, ids, mask, targets, grid, method="atp", metric="logit", progress=False)
            expected = []
            for k in range(grid.size):
                _, patched = do.forward_with_cache(cfg, params, ids, mask, grid.config(cfg, k),
                                                   cache_sites=[pattern_site])
                expected.append(np.sum(gradient * (np.asarray(patched[pattern_site], np.float64) - clean_pattern)))
            expected = np.asarray(expected)
            assert np.abs(expected).max() > 1e-2, (layer, site)
            np.testing.assert_allclose(star.scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max(),
                                       err_msg=f"{kind} layer {layer} {site}")
            assert np.abs(plain.scores - expected).max() > 0.1 * np.abs(expected).max()  # AtP's linear softmax is not


def test_atp_star_graddrop_is_the_plain_estimate_for_last_layer_units(models):
    """A unit of the last layer reaches the logits through no later layer: the GradDrop mean is |AtP| per query."""
    model, ids, mask, targets = models["llama"]
    cfg, params = model.config, model.params
    grid = concat(site_grid(cfg, f"blocks.{cfg.num_layers - 1}.mlp.hook_post", unit="neuron"),
                  site_grid(cfg, f"blocks.{cfg.num_layers - 1}.attn.hook_z", unit="head"))
    star = attribute(cfg, params, ids, mask, targets, grid, method="atp*", metric="logprob", progress=False)
    plain = attribute(cfg, params, ids, mask, targets, grid, method="atp", metric="logprob", progress=False,
                      per_query=True)
    np.testing.assert_allclose(star.scores, plain.scores, atol=1e-6)
    np.testing.assert_allclose(star.magnitudes, np.abs(plain.per_query).mean(axis=1), rtol=1e-4, atol=1e-6)
    # an earlier layer's units: dropping the last layer changes their estimate
    early = site_grid(cfg, "blocks.0.mlp.hook_post", unit="neuron")
    star = attribute(cfg, params, ids, mask, targets, early, method="atp*", metric="logprob", progress=False)
    assert np.abs(star.magnitudes - star.absolute).max() > 1e-4


def test_check_against_exact_and_refusals_on_a_decoder_only_model(models):
    model, ids, mask, targets = models["gpt2"]
    cfg, params = model.config, model.params
    grid = site_grid(cfg, "blocks.*.attn.hook_z", unit="head")
    result = attribute(cfg, params, ids, mask, targets, grid, method="atp", metric="logit", progress=False)
    agreement = check_against_exact(cfg, params, ids, mask, targets, result, top=3, progress=False)
    exact = run_sweep(cfg, params, ids, mask, targets, grid.take(agreement.configs), metrics=("logit",),
                      progress=False)
    np.testing.assert_allclose(agreement.exact, exact.aggregates["logit_effect"], atol=1e-5)
    with pytest.raises(InterventionError, match="atp\\*: AtP\\* has no QK fix for blocks.\\*.hook_resid_pre"):
        attribute(cfg, params, ids, mask, targets, site_grid(cfg, "blocks.*.hook_resid_pre"), method="atp*",
                  progress=False)
    with pytest.raises(InterventionError, match="attribution: FROM_SOURCE / Source patching is not supported"):
        attribute(cfg, params, ids, mask, targets, site_grid(cfg, "blocks.*.hook_mlp_out", value=FROM_SOURCE),
                  progress=False)
