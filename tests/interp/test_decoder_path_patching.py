"""Path patching (`receivers`) in the sweep engine on decoder-only models: a senders x receivers sweep equals a
hand-built loop of forwards (the senders' effect on their own outputs, fed only into a receiver's input, the
receiver's new output patched into a clean run), and its identities hold: every component and the logits as
receivers is ordinary patching, no receiver is the clean run."""

from __future__ import annotations

import numpy as np
import pytest

from genir_jax.checkpoints.decoder_hf import load_decoder_only
from genir_jax.core import decoder_only as do
from genir_jax.interp.interventions import InterventionError, replacement
from genir_jax.interp.patching import run_sweep
from genir_jax.interp.site_grammar import parse_receivers
from genir_jax.interp.sweep import component_grid, concat, product, receivers, site_grid
from tests.decoder_fixtures import build_torch_causal_lm, padded_causal_batch, save_causal_lm

LENGTHS = [6, 3, 5, 4]
CASES = {"gpt2": ("left", {"n_inner": 8}), "llama": ("right", {"intermediate_size": 8})}
OUTPUTS = ("hook_attn_out", "hook_mlp_out")  # component 0 (attn), 1 (mlp)
INPUTS = ("hook_resid_pre", "hook_resid_mid")  # the residual each reads


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for seed, (kind, (side, overrides)) in enumerate(CASES.items()):
        model = load_decoder_only(save_causal_lm(build_torch_causal_lm(kind, seed=seed + 80, **overrides),
                                                 tmp_path_factory.mktemp(kind)))
        ids, mask = padded_causal_batch(model.config.vocab_size, LENGTHS, side, seed=seed + 11)
        targets = np.random.default_rng(seed + 2).integers(0, model.config.vocab_size, len(LENGTHS)).astype(np.int32)
        out[kind] = (model, ids, mask, targets)
    return out


def _last(mask):
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)


def _logits(cfg, params, ids, mask, interventions=None):
    """Target-row logits [N, V] at each prompt's last real token of one forward."""
    return np.asarray(do.forward(cfg, params, ids, mask, interventions))[np.arange(len(ids)), _last(mask)]


def _cache(cfg, params, ids, mask, interventions=None):
    names = [f"blocks.{l}.{s}" for l in range(cfg.num_layers) for s in OUTPUTS + INPUTS + ("hook_resid_post",)]
    _, cache = do.forward_with_cache(cfg, params, ids, mask, interventions, cache_sites=names)
    return {name: np.asarray(value) for name, value in cache.items()}


def _hand_built(cfg, params, ids, mask, sender, sender_at, receiver):
    """Logits [N, V] of path patching by hand: `sender` (interventions) patches component `sender_at` =
    (layer, 0 attn | 1 mlp); its effect (patched minus clean output, from the clean input) reaches only
    `receiver`: (layer, component) of a component input, or "logits" (the final residual)."""
    clean = _cache(cfg, params, ids, mask)
    layer, component = sender_at
    output = f"blocks.{layer}.{OUTPUTS[component]}"
    effect = _cache(cfg, params, ids, mask, sender)[output] - clean[output]
    if receiver == "logits":
        last = f"blocks.{cfg.num_layers - 1}.hook_resid_post"
        return _logits(cfg, params, ids, mask, replacement(cfg, {last: clean[last] + effect}))
    if receiver <= sender_at:  # the receiver is not downstream of the sender: nothing reaches it
        return _logits(cfg, params, ids, mask)
    into = f"blocks.{receiver[0]}.{INPUTS[receiver[1]]}"
    out = f"blocks.{receiver[0]}.{OUTPUTS[receiver[1]]}"
    received = _cache(cfg, params, ids, mask, replacement(cfg, {into: clean[into] + effect}))[out]
    return _logits(cfg, params, ids, mask, replacement(cfg, {out: received}))


def _ranks(logits, targets):
    target = logits[np.arange(len(targets)), targets][:, None]
    vocabulary = np.arange(logits.shape[1])[None]
    return ((logits > target) | ((logits == target) & (vocabulary < targets[:, None]))).sum(axis=1)


@pytest.mark.parametrize("kind", list(CASES))
def test_senders_x_receivers_equal_a_hand_built_loop(models, kind):
    model, ids, mask, targets = models[kind]
    cfg, params = model.config, model.params
    chosen = [(1, 0), (1, 1), (0, 1), "logits", (0, 0)]  # attn[1], mlp[1], mlp[0], the logits, attn[0]
    table = concat(*[receivers(cfg, logits=True) if r == "logits" else
                     receivers(cfg, components={("attn", "mlp")[r[1]]: [r[0]]}) for r in chosen])
    assert table.labels["receivers"].tolist() == ["attn[1]", "mlp[1]", "mlp[0]", "logits", "attn[0]"]
    senders = {"heads": (site_grid(cfg, "blocks.0.attn.hook_z", unit="head"), lambda k: (0, 0)),
               "components": (component_grid(cfg), lambda k: (k // 2, k % 2))}
    for name, (grid, where) in senders.items():
        sweep = product(grid, table)
        result = run_sweep(cfg, params, ids, mask, targets, sweep, progress=False)
        plain = run_sweep(cfg, params, ids, mask, targets, sweep, progress=False, prefix_sharing=False,
                          rank_window=0)
        changed = 0
        for s in range(grid.size):
            for r, receiver in enumerate(chosen):
                k = s * len(chosen) + r
                assert sweep.label_table()[k]["receivers"] == table.labels["receivers"][r]
                logits = _hand_built(cfg, params, ids, mask, grid.config(cfg, s), where(s), receiver)
                what = f"{name}: sender {s}, receiver {receiver}"
                for run in (result, plain):
                    np.testing.assert_allclose(run.target_logits[k], logits[np.arange(len(ids)), targets], atol=1e-4,
                                               err_msg=what)
                    np.testing.assert_array_equal(run.ranks[k], _ranks(logits, targets), err_msg=what)
                changed += np.abs(result.target_logits[k] - result.clean["logit"]).max() > 1e-3
        assert changed >= grid.size, name  # most paths change the target's logit


@pytest.mark.parametrize("kind", list(CASES))
def test_every_receiver_is_ordinary_patching_and_none_is_the_clean_run(models, kind):
    model, ids, mask, targets = models[kind]
    cfg, params = model.config, model.params
    grid = site_grid(cfg, "blocks.*.attn.hook_z", unit="head")
    ordinary = run_sweep(cfg, params, ids, mask, targets, grid, progress=False)
    every = run_sweep(cfg, params, ids, mask, targets, product(grid, parse_receivers(cfg, "all")), progress=False)
    spelled = receivers(cfg, components={"attn": "all", "mlp": "all"}, logits=True)
    assert np.array_equal(spelled.receivers.components, parse_receivers(cfg, "all").receivers.components)
    none = run_sweep(cfg, params, ids, mask, targets, product(grid, parse_receivers(cfg, "none")), progress=False)
    np.testing.assert_array_equal(every.ranks, ordinary.ranks)
    np.testing.assert_allclose(every.target_logits, ordinary.target_logits, atol=1e-5)
    assert np.abs(ordinary.target_logits - ordinary.clean["logit"][None]).max() > 1e-3  # the heads matter
    np.testing.assert_array_equal(none.ranks, np.broadcast_to(ordinary.clean["rank"], none.ranks.shape))
    np.testing.assert_allclose(none.target_logits, np.broadcast_to(ordinary.clean["logit"], none.ranks.shape),
                               atol=1e-5)


def test_path_patching_refusals_on_a_decoder_only_model(models):
    model, ids, mask, targets = models["llama"]
    cfg, params = model.config, model.params
    with pytest.raises(InterventionError, match="unknown component 'cross_attn'; expected one of attn, mlp"):
        receivers(cfg, components={"cross_attn": [0]})
    with pytest.raises(InterventionError, match="senders must be layer components .* 'blocks.*.hook_resid_pre'"):
        run_sweep(cfg, params, ids, mask, targets, product(site_grid(cfg, "blocks.*.hook_resid_pre"),
                                                           receivers(cfg, logits=True)), progress=False)
    assert parse_receivers(cfg, "mlp[1]+logits").labels["receivers"].tolist() == ["mlp[1]+logits"]
