"""Source patching (`FROM_SOURCE` / `Source`) in the sweep engine on decoder-only models: every rank and logit
equals a loop of single `decoder_only.forward` calls whose patches carry the source's activations explicitly
(numpy arrays read from a separate source forward at the same positions), with and without prefix sharing
and the rank window."""

from __future__ import annotations

import numpy as np
import pytest

from genir_jax.checkpoints.decoder_hf import load_decoder_only
from genir_jax.core import decoder_only as do
from genir_jax.core.sites import BLOCK_STACK_SITES, site_name
from genir_jax.core.taps import Patch
from genir_jax.interp.interventions import FROM_SOURCE, FromSource, InterventionError
from genir_jax.interp.patching import Source, resample_source, run_sweep
from genir_jax.interp.sweep import component_grid, site_grid
from tests.decoder_fixtures import build_torch_causal_lm, padded_causal_batch, save_causal_lm

LENGTHS = [6, 3, 5, 4]
SOURCE_LENGTHS = [4, 6, 2, 5]  # other prompts, padded to the same length 6
CASES = {"gpt2": ("left", {"n_inner": 8}), "llama": ("right", {"intermediate_size": 8})}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for seed, (kind, (side, overrides)) in enumerate(CASES.items()):
        model = load_decoder_only(save_causal_lm(build_torch_causal_lm(kind, seed=seed + 50, **overrides),
                                                 tmp_path_factory.mktemp(kind)))
        other = load_decoder_only(save_causal_lm(build_torch_causal_lm(kind, seed=seed + 70, **overrides),
                                                 tmp_path_factory.mktemp(kind + "-other")))
        vocab = model.config.vocab_size
        ids, mask = padded_causal_batch(vocab, LENGTHS, side, seed=seed + 5)
        source_ids, source_mask = padded_causal_batch(vocab, SOURCE_LENGTHS, side, seed=seed + 9)
        targets = np.random.default_rng(seed).integers(0, vocab, len(LENGTHS)).astype(np.int32)
        out[kind] = (model, other, ids, mask, source_ids, source_mask, targets)
    return out


def _explicit(cfg, source_params, source_ids, source_mask, interventions):
    """`interventions` with every `FROM_SOURCE` value replaced by the source forward's activation (numpy;
    layer sites stacked [L, B, ...]), so a plain forward patches the source's values explicitly."""
    out = {}
    for stack, sites in interventions.items():
        for local, patches in sites.items():
            fixed = []
            for patch in patches:
                if isinstance(patch.value, FromSource):
                    layered = local not in BLOCK_STACK_SITES
                    names = [site_name(stack, local, l) for l in range(cfg.num_layers)] if layered else \
                        [site_name(stack, local)]
                    _, cache = do.forward_with_cache(cfg, source_params, source_ids, source_mask, cache_sites=names)
                    value = np.stack([np.asarray(cache[n]) for n in names]) if layered else np.asarray(cache[names[0]])
                    patch = Patch(patch.mask, value)
                fixed.append(patch)
            out.setdefault(stack, {})[local] = tuple(fixed)
    return out


def _loop(cfg, params, ids, mask, targets, sweep, source_params, source_ids, source_mask):
    """Per config and query: (rank over the vocabulary, logit) of the target from single explicitly patched
    forwards read at each prompt's last real token."""
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    ranks, logits = [], []
    for k in range(sweep.size):
        interventions = _explicit(cfg, source_params, source_ids, source_mask, sweep.config(cfg, k))
        out = np.asarray(do.forward(cfg, params, ids, mask, interventions))[np.arange(len(ids)), last]
        target = out[np.arange(len(ids)), targets][:, None]
        vocabulary = np.arange(cfg.vocab_size)[None]
        ranks.append(((out > target) | ((out == target) & (vocabulary < targets[:, None]))).sum(axis=1))
        logits.append(target[:, 0])
    return np.stack(ranks), np.stack(logits)


@pytest.mark.parametrize("kind", list(CASES))
def test_source_patching_sweeps_equal_a_loop_of_explicitly_patched_forwards(models, kind):
    model, other, ids, mask, source_ids, source_mask, targets = models[kind]
    cfg, params = model.config, model.params
    length = ids.shape[1]
    sweeps = {
        "components": component_grid(cfg, value=FROM_SOURCE),
        "heads": site_grid(cfg, "blocks.*.attn.hook_z", unit="head", value=FROM_SOURCE),
        "neurons": site_grid(cfg, "blocks.1.mlp.hook_post", unit="neuron", value=FROM_SOURCE),
        "positions": site_grid(cfg, "blocks.*.hook_resid_pre", unit="position", length=length, value=FROM_SOURCE),
        "final norm": site_grid(cfg, "ln_final.hook_normalized", unit="position", length=length, value=FROM_SOURCE),
    }
    sources = {  # other prompts; another model on the same prompts
        "other prompts": (Source(cfg, params, source_ids, source_mask), params, source_ids, source_mask),
        "other model": (Source(other.config, other.params), other.params, ids, mask),
    }
    for source_name, (source, source_params, s_ids, s_mask) in sources.items():
        for name, sweep in sweeps.items():
            if source_name == "other model" and name not in ("components", "heads"):
                continue
            what = f"{source_name}, {name}"
            ranks, logits = _loop(cfg, params, ids, mask, targets, sweep, source_params, s_ids, s_mask)
            result = run_sweep(cfg, params, ids, mask, targets, sweep, source=source, progress=False)
            np.testing.assert_array_equal(result.ranks, ranks, err_msg=what)
            np.testing.assert_allclose(result.target_logits, logits, atol=1e-4, err_msg=what)
            assert np.abs(logits - result.clean["logit"][None]).max() > 1e-3, what  # the source changes something
            if name in ("heads", "positions"):
                assert result.stats["decoder_layers_skipped_fraction"] > 0, what  # prefix sharing at work
            plain = run_sweep(cfg, params, ids, mask, targets, sweep, source=source, progress=False,
                              prefix_sharing=False, rank_window=0)
            np.testing.assert_array_equal(plain.ranks, ranks, err_msg=what)
            np.testing.assert_allclose(plain.target_logits, logits, atol=1e-4, err_msg=what)


def test_resampling_and_the_whole_prompt_from_the_source(models):
    model, _, ids, mask, source_ids, source_mask, targets = models["gpt2"]
    cfg, params = model.config, model.params
    grid = component_grid(cfg, value=FROM_SOURCE)
    resample = resample_source(cfg, params, ids, mask, seed=1)
    ranks, logits = _loop(cfg, params, ids, mask, targets, grid, params, resample.input_ids, resample.attention_mask)
    result = run_sweep(cfg, params, ids, mask, targets, grid, source=resample, progress=False)
    np.testing.assert_array_equal(result.ranks, ranks)
    np.testing.assert_allclose(result.target_logits, logits, atol=1e-4)
    # the last layer's residual output taken from the source run: the patched model predicts, at the query's
    # last real token, what the source prompt's forward predicts at that same position
    whole = site_grid(cfg, f"blocks.{cfg.num_layers - 1}.hook_resid_post", value=FROM_SOURCE)
    patched = run_sweep(cfg, params, ids, mask, targets, whole, source=Source(cfg, params, source_ids, source_mask),
                        progress=False)
    source_logits = np.asarray(do.forward(cfg, params, source_ids, source_mask))
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    np.testing.assert_allclose(patched.target_logits[0], source_logits[np.arange(len(ids)), last, targets], atol=1e-4)


def test_mismatched_sources_are_refused(models):
    model, _, ids, mask, source_ids, source_mask, targets = models["llama"]
    cfg, params = model.config, model.params
    grid = site_grid(cfg, "blocks.*.hook_mlp_out", value=FROM_SOURCE)
    with pytest.raises(InterventionError, match="source prompts are padded to length 7, the queries to 6"):
        run_sweep(cfg, params, ids, mask, targets, grid, progress=False,
                  source=Source(cfg, params, np.pad(source_ids, ((0, 0), (0, 1))), np.pad(source_mask, ((0, 0), (0, 1)))))
    with pytest.raises(InterventionError, match="FROM_SOURCE values need a `source`"):
        run_sweep(cfg, params, ids, mask, targets, grid, progress=False)
    with pytest.raises(InterventionError, match="source inputs have 3 rows for 4 queries"):
        run_sweep(cfg, params, ids, mask, targets, grid, progress=False,
                  source=Source(cfg, params, source_ids[:3], source_mask[:3]))
    gpt2 = models["gpt2"][0]
    with pytest.raises(InterventionError, match="source model's"):
        run_sweep(cfg, params, ids, mask, targets, grid, progress=False, source=Source(gpt2.config, gpt2.params))
