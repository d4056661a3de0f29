"""The sweep engine (`run_sweep`) on decoder-only models: neuron and head sweeps with zero and mean ablation
equal a loop of single patched `decoder_only.forward` calls read at each prompt's last real token."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from genir_jax.checkpoints.decoder_hf import load_decoder_only
from genir_jax.core import decoder_only as do
from genir_jax.core.decoder_config import DecoderConfig
from genir_jax.interp.attribution import attribute
from genir_jax.interp.interventions import InterventionError, mean_activations
from genir_jax.interp.patching import run_sweep, runner_up_foils
from genir_jax.interp.site_grammar import SiteSpecError, parse_receivers, parse_sweep
from genir_jax.interp.sweep import component_grid, first_decoder_layer, site_grid, stack
from genir_jax.scale.partitioning import Partitioner
from tests.decoder_fixtures import build_torch_causal_lm, padded_causal_batch, save_causal_lm

LENGTHS = [7, 4, 6, 5]
# (family, padding side, MLP width override): GPT-2 left-padded, Llama right-padded; few neurons.
CASES = {"gpt2": ("left", {"n_inner": 12}), "llama": ("right", {"intermediate_size": 12})}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for seed, (kind, (side, overrides)) in enumerate(CASES.items()):
        torch_model = build_torch_causal_lm(kind, seed=seed + 30, **overrides)
        model = load_decoder_only(save_causal_lm(torch_model, tmp_path_factory.mktemp(kind)))
        ids, mask = padded_causal_batch(model.config.vocab_size, LENGTHS, side, seed=seed + 3)
        targets = np.random.default_rng(seed).integers(0, model.config.vocab_size, len(LENGTHS)).astype(np.int32)
        out[kind] = (model, ids, mask, targets)
    return out


def _last_logits(cfg, params, ids, mask, interventions=None):
    """Logits [N, V] of single patched forwards at each prompt's last real token."""
    last = np.asarray(mask).shape[1] - 1 - np.argmax(np.asarray(mask)[:, ::-1], axis=1)
    return np.asarray(do.forward(cfg, params, ids, mask, interventions))[np.arange(len(ids)), last]


def _ranks(logits, targets, token_ids):
    """Rank of each target among `token_ids` (columns of `logits`), ties broken by token id, lower first."""
    target = np.take_along_axis(logits, np.searchsorted(token_ids, targets)[:, None], axis=1)
    return ((logits > target) | ((logits == target) & (token_ids[None] < targets[:, None]))).sum(axis=1)


def _loop(cfg, params, ids, mask, targets, sweep):
    """Per config and query: (rank over the vocabulary, logit) of the target from single patched forwards."""
    outs = [_last_logits(cfg, params, ids, mask, sweep.config(cfg, k)) for k in range(sweep.size)]
    vocabulary = np.arange(cfg.vocab_size)
    return (np.stack([_ranks(out, targets, vocabulary) for out in outs]),
            np.stack([out[np.arange(len(ids)), targets] for out in outs]))


def _means(cfg, params, ids, mask, pattern):
    return mean_activations(cfg, params, ids, mask, [pattern], progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CASES))
def test_neuron_and_head_sweeps_equal_a_loop_of_patched_forwards(models, kind):
    model, ids, mask, targets = models[kind]
    cfg, params = model.config, model.params
    neuron = "blocks.*.mlp.hook_post"
    head = "blocks.*.attn.hook_z"
    sweeps = {
        "neuron zero": site_grid(cfg, neuron, unit="neuron"),
        "neuron mean": site_grid(cfg, neuron, unit="neuron", value=_means(cfg, params, ids, mask, neuron)),
        "head zero": site_grid(cfg, head, unit="head"),
        "head mean": site_grid(cfg, head, unit="head", value=_means(cfg, params, ids, mask, head)),
        "components": component_grid(cfg),
        "position zero": site_grid(cfg, "blocks.*.attn.hook_v", unit="position", length=ids.shape[1]),
        "final norm": site_grid(cfg, "ln_final.hook_normalized", unit="position", length=ids.shape[1]),
    }
    assert sweeps["neuron zero"].size == cfg.num_layers * cfg.d_ff == 24
    assert tuple(component_grid(cfg).labels["component"][:2]) == ("attn", "mlp")
    first, _ = first_decoder_layer(cfg, sweeps["head zero"])
    assert first.tolist() == [0] * cfg.num_heads + [1] * cfg.num_heads
    clean_ranks, clean_logits = _loop(cfg, params, ids, mask, targets, stack([{}]))
    for name, sweep in sweeps.items():
        result = run_sweep(cfg, params, ids, mask, targets, sweep, metrics=("rank", "logit"), progress=False)
        ranks, logits = _loop(cfg, params, ids, mask, targets, sweep)
        np.testing.assert_array_equal(result.ranks, ranks, err_msg=name)
        np.testing.assert_allclose(result.target_logits, logits, atol=1e-4, err_msg=name)
        assert np.abs(logits - clean_logits).max() > 1e-3, name  # the ablations change something
        assert result.stats["decoder_layers_skipped_fraction"] > 0, name  # prefix sharing at work
        # no prefix sharing and no rank window: the same numbers
        plain = run_sweep(cfg, params, ids, mask, targets, sweep, metrics=("rank", "logit"), progress=False,
                          prefix_sharing=False, rank_window=0)
        np.testing.assert_array_equal(plain.ranks, ranks, err_msg=name)
        np.testing.assert_allclose(plain.target_logits, logits, atol=1e-4, err_msg=name)
    np.testing.assert_array_equal(result.clean["rank"], clean_ranks[0])
    np.testing.assert_allclose(result.clean["logit"], clean_logits[0], atol=1e-4)


def test_docid_rank_logprob_logit_diff_and_top_k_on_a_decoder_only_model(models):
    model, ids, mask, targets = models["gpt2"]
    cfg, params = model.config, model.params
    candidates = np.unique(np.concatenate([targets, np.arange(3, 60, 5)])).astype(np.int32)
    clean = _last_logits(cfg, params, ids, mask)
    others = np.where(candidates[None] == targets[:, None], -np.inf, clean[:, candidates])
    foils = runner_up_foils(cfg, params, ids, mask, targets, candidates)
    np.testing.assert_array_equal(foils, candidates[np.argmax(others, axis=1)])
    grid = component_grid(cfg)
    result = run_sweep(cfg, params, ids, mask, targets, grid, metrics=("rank", "docid_rank", "logprob", "logit_diff"),
                       candidates=candidates, foil_ids=foils, top_k=3, progress=False)
    rows = np.arange(len(ids))
    for k in range(grid.size):
        out = _last_logits(cfg, params, ids, mask, grid.config(cfg, k))
        np.testing.assert_array_equal(result.values["rank"][k], _ranks(out, targets, np.arange(cfg.vocab_size)))
        np.testing.assert_array_equal(result.values["docid_rank"][k], _ranks(out[:, candidates], targets, candidates))
        logprob = out[rows, targets] - np.log(np.exp(out - out.max(1, keepdims=True)).sum(1)) - out.max(1)
        np.testing.assert_allclose(result.values["logprob"][k], logprob, atol=1e-4)
        np.testing.assert_allclose(result.values["logit_diff"][k], out[rows, targets] - out[rows, foils], atol=1e-4)
        np.testing.assert_array_equal(result.top_ids[k], np.argsort(-out[:, candidates], axis=1, kind="stable")[:, :3])


def test_devices_model_parallel_and_chunks_change_nothing_on_a_decoder_only_model(models):
    model, ids, mask, targets = models["llama"]
    cfg, params = model.config, model.params
    grid = site_grid(cfg, "blocks.*.attn.hook_z", unit="head")
    one = run_sweep(cfg, params, ids, mask, targets, grid, devices=jax.local_devices()[:1], progress=False)
    runs = {"4 devices, chunked": dict(devices=jax.local_devices()[:4], query_chunk=1, config_chunk=3),
            "data=2,model=2": dict(partitioner=Partitioner("data=2,model=2", devices=jax.local_devices()[:4]))}
    for name, options in runs.items():
        other = run_sweep(cfg, params, ids, mask, targets, grid, progress=False, **options)
        np.testing.assert_array_equal(one.ranks, other.ranks, err_msg=name)
        np.testing.assert_allclose(one.target_logits, other.target_logits, atol=1e-5, err_msg=name)


def test_unsupported_decoder_only_sweeps_are_refused(models):
    model, ids, mask, targets = models["llama"]
    cfg, params = model.config, model.params

    def sweep(grid, **kwargs):
        return run_sweep(cfg, params, ids, mask, targets, grid, progress=False, **kwargs)

    # FROM_SOURCE / Source patching and path patching (receivers) run, with their refusals:
    # tests/interp/test_decoder_source_patching.py, tests/interp/test_decoder_path_patching.py
    with pytest.raises(InterventionError, match="'hook_embed' patches are not supported"):
        sweep(site_grid(cfg, "hook_embed"))
    with pytest.raises(InterventionError, match="atomic .* docids only"):
        run_sweep(cfg, params, ids, mask, np.stack([targets, targets], 1), site_grid(cfg, "blocks.0.hook_mlp_out"),
                  target_mask=np.ones((len(targets), 2), np.int32), metrics=("rank",), progress=False)
    # attribution runs on decoder-only models (tests/interp/test_decoder_attribution.py) with the same limits
    with pytest.raises(InterventionError, match="attribution: 'hook_embed' patches are not supported"):
        attribute(cfg, params, ids, mask, targets, site_grid(cfg, "hook_embed"), progress=False)
    with pytest.raises(InterventionError, match="unknown stack 'decoder'"):
        component_grid(cfg, stack="decoder")


def test_mean_activations_of_a_decoder_only_model(models):
    model, ids, mask, _ = models["gpt2"]
    cfg, params = model.config, model.params
    sites = ["blocks.*.attn.hook_z", "blocks.1.mlp.hook_post", "ln_final.hook_normalized"]
    _, cache = do.forward_with_cache(cfg, params, ids, mask, cache_sites=sites)
    means = mean_activations(cfg, params, ids, mask, sites, batch_size=3, progress=False)  # a padded last batch
    assert sorted(means) == sorted(cache)
    for name, value in cache.items():
        np.testing.assert_allclose(np.asarray(means[name]), np.asarray(value).mean(axis=0), atol=1e-5, err_msg=name)
    with pytest.raises(InterventionError, match="decoder-only models take no decoder_input_ids"):
        mean_activations(cfg, params, ids, mask, sites, decoder_input_ids=ids, progress=False)


def test_site_specs_of_a_decoder_only_model():
    cfg = DecoderConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=12)
    neurons = parse_sweep(cfg, "blocks.*.mlp.hook_post[neuron]")
    grid = site_grid(cfg, "blocks.*.mlp.hook_post", unit="neuron")
    assert neurons.size == grid.size == 24 and neurons.axes == ("layer", "neuron")
    assert neurons.labels["site"].tolist() == grid.labels["site"].tolist()
    assert neurons.labels["neuron"].tolist() == grid.labels["neuron"].tolist()
    heads = parse_sweep(cfg, "blocks.1.attn.hook_z[head=0,3]")
    assert heads.labels["site"].tolist() == ["blocks.1.attn.hook_z"] * 2 and heads.labels["head"].tolist() == [0, 3]
    components = parse_sweep(cfg, "blocks.*.*")
    assert components.labels["site"].tolist() == [f"blocks.{l}.hook_{c}_out" for l in (0, 1) for c in ("attn", "mlp")]
    assert parse_sweep(cfg, "blocks.*.hook_resid_pre[position]", length=5).shape == (2, 5)  # the prompt's length
    assert parse_sweep(cfg, ["ln_final.hook_normalized", "hook_embed"]).labels["site"].tolist() == \
        ["ln_final.hook_normalized", "hook_embed"]
    with pytest.raises(SiteSpecError, match="no 'decoder' stack; its layers are 'blocks'.LAYERS"):
        parse_sweep(cfg, "decoder.*.mlp")
    with pytest.raises(SiteSpecError, match="unknown component"):
        parse_sweep(cfg, "blocks.*.{attn,cross_attn}")
    assert parse_receivers(cfg, "mlp[1]+logits").receivers.components[0].tolist() == [[0, 0], [0, 1]]


def test_last_positions_of_left_and_right_padding():
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert np.asarray(do.last_positions(mask)).tolist() == [3, 2, 3, 0]
