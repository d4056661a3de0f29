"""Patching sweeps: vmapped sweep == loop over configs == transformers with forward hooks; devices agree."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import interventions as ivs
from genir_jax.analysis.stage_patching import default_stages, parse_stages, run_stage_patching, stage_configs
from genir_jax.base.errors import GenIRError
from genir_jax.interp.patching import FROM_SOURCE, Source, ranks_of_targets, run_sweep
from genir_jax.interp.sweep import Sweep
from genir_jax.core.taps import Patch
from tests.hf_fixtures import padded_batch

CONFIG = gj.t5_v1_0(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=6,
                           num_heads=4, dropout_rate=0.0)
STAGES = [[0, 1], [2, 3, 4], [5]]


@pytest.fixture(scope="module")
def model():
    return gj.init_params(CONFIG, 0)


@pytest.fixture(scope="module")
def queries(model):
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [7, 3, 11, 5, 9, 4, 8], seed=4)
    logits = np.asarray(gj.forward(CONFIG, model, ids, mask, np.zeros((len(ids), 1), np.int32)))[:, 0]
    return ids, mask, logits.argmax(-1).astype(np.int32)  # targets at rank 0 when unpatched


def _loop(params, ids, mask, targets, sweep, k, source_cache=None):
    """Reference computation: config k alone, through the plain forward with interventions."""
    per_config = {}
    for stack, sites in sweep.config(CONFIG, k).items():
        for local, patches in sites.items():
            per_config.setdefault(stack, {})[local] = tuple(
                Patch(p.mask, source_cache[(stack, local)] if p.value is FROM_SOURCE else p.value)
                for p in patches)
    logits = gj.forward(CONFIG, params, ids, mask, np.zeros((len(ids), 1), np.int32), interventions=per_config)
    ranks, target_logits = ranks_of_targets(logits[:, 0], targets)
    return np.asarray(ranks), np.asarray(target_logits)


def test_ranks_of_targets_is_stable_descending_sort_position():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 5, size=(6, 40)).astype(np.float32)  # many ties
    targets = rng.integers(0, 40, size=6)
    ranks, values = ranks_of_targets(logits, targets)
    for row in range(6):
        order = np.argsort(-logits[row], kind="stable")
        assert int(ranks[row]) == int(np.flatnonzero(order == targets[row])[0])
        assert float(values[row]) == logits[row, targets[row]]


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_vmapped_sweep_equals_loop_over_configs(model, queries):
    ids, mask, targets = queries
    means = ivs.mean_activations(CONFIG, model, ids, mask, ["decoder.*.hook_mlp_out", "decoder.*.hook_attn_out",
                                                           "decoder.*.hook_cross_attn_out"], progress=False)
    interventions, rows = stage_configs(CONFIG, STAGES, ("mean", "zero"), means)
    assert isinstance(interventions, Sweep) and interventions.label_table() == [
        {"component": r.component, "stage": r.stage, "mode": r.mode} for r in rows]
    assert [r.key for r in rows] == [f"{s}-{c}-{m}" for m in ("mean", "zero") for c in ("mlp", "cross_attn", "attn")
                                     for s in range(3)]
    result = run_sweep(CONFIG, model, ids, mask, targets, interventions, query_chunk=4, progress=False)
    assert result.ranks.shape == (len(rows), len(ids)) == (18, 7)
    for k in range(len(rows)):
        ranks, target_logits = _loop(model, ids, mask, targets, interventions, k)
        np.testing.assert_array_equal(result.ranks[k], ranks, err_msg=rows[k].key)
        np.testing.assert_allclose(result.target_logits[k], target_logits, atol=1e-5)
    assert (result.ranks > 0).any()  # some patch moved a target
    full = np.asarray(gj.forward(CONFIG, model, ids, mask, np.zeros((7, 1), np.int32)))[:, 0]
    assert result.top_ids.shape == (18, 7, 10)
    # an untouched config's top-k are the clean top-k
    empty = {"decoder": {"hook_mlp_out": Patch(np.zeros((2, 6, 1, 1, 1), np.float32), 0.0)}}
    clean = run_sweep(CONFIG, model, ids, mask, targets, empty, top_k=5, progress=False)
    np.testing.assert_array_equal(clean.top_ids[0], np.argsort(-full, axis=-1, kind="stable")[:, :5])
    np.testing.assert_array_equal(clean.ranks, 0)


def test_stage_configs_masks_and_values_are_the_hand_stacked_ones(model, queries):
    """Builder-made configs stack to the masks and mean values the sweep used to be built from by hand."""
    ids, mask, _ = queries
    names = ["decoder.*.hook_mlp_out", "decoder.*.hook_attn_out", "decoder.*.hook_cross_attn_out"]
    means = ivs.mean_activations(CONFIG, model, ids, mask, names, progress=False)
    sweep, rows = stage_configs(CONFIG, STAGES, ("mean", "zero", "t5"), means)
    for local, component in (("hook_mlp_out", "mlp"), ("hook_attn_out", "attn"),
                             ("hook_cross_attn_out", "cross_attn")):
        hand = np.stack([np.asarray(means[f"decoder.{l}.{local}"]) for l in range(6)])[:, None]  # [L, 1, T, D]
        terms = [t for t in sweep.terms if t.stack == "decoder" and t.local == local]
        kinds = {}
        for term in terms:
            kind = "t5" if term.value is FROM_SOURCE else ("zero" if np.asarray(term.value).ndim == 0 else "mean")
            kinds[kind] = term
        assert sorted(kinds) == ["mean", "t5", "zero"] and len(terms) == 3
        np.testing.assert_array_equal(np.asarray(kinds["mean"].value), hand)
        assert np.asarray(kinds["zero"].value) == 0.0
        for k, row in enumerate(rows):
            dense = {m: (t.mask(CONFIG, k) if t.row[k] >= 0 else None) for m, t in kinds.items()}
            for m, got in dense.items():
                if row.component == component and row.mode == m:
                    expected = np.zeros((6, 1, 1, 1), np.float32)
                    expected[STAGES[row.stage]] = 1.0
                    np.testing.assert_array_equal(got, expected, err_msg=row.key)
                else:
                    assert got is None or not got.any(), row.key
    encoder = [t for t in sweep.terms if t.stack == "encoder"]
    assert len(encoder) == 1 and encoder[0].local == "hook_resid_post" and encoder[0].value is FROM_SOURCE
    expected = np.zeros((2, 1, 1, 1), np.float32)
    expected[-1] = 1.0
    np.testing.assert_array_equal(encoder[0].mask(CONFIG, len(rows) - 1), expected)
    assert [k for k in range(len(rows)) if encoder[0].row[k] >= 0] == [len(rows) - 1]


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_source_values_equal_replacement_from_a_separate_run(model, queries):
    """T5 mode: values FROM_SOURCE (another model on the same query) == patching in its cache."""
    ids, mask, targets = queries
    other = gj.init_params(CONFIG, 9)
    interventions, rows = stage_configs(CONFIG, STAGES, ("t5",))
    result = run_sweep(CONFIG, model, ids, mask, targets, interventions, source=Source(CONFIG, other),
                       query_chunk=3, progress=False)
    names = ["decoder.*.hook_mlp_out", "decoder.*.hook_attn_out", "decoder.*.hook_cross_attn_out",
             "encoder.1.hook_resid_post"]
    _, cache = gj.forward_with_cache(CONFIG, other, ids, mask, np.zeros((7, 1), np.int32), cache_sites=names)
    stacked = {("decoder", local): np.stack([np.asarray(cache[f"decoder.{l}.{local}"]) for l in range(6)])
               for local in ("hook_mlp_out", "hook_attn_out", "hook_cross_attn_out")}
    stacked[("encoder", "hook_resid_post")] = np.stack([np.asarray(cache["encoder.1.hook_resid_post"])] * 2)
    assert [r.key for r in rows][-1] == "0-encoder.1.hook_resid_post-t5"
    for k in range(len(rows)):
        ranks, _ = _loop(model, ids, mask, targets, interventions, k, stacked)
        np.testing.assert_array_equal(result.ranks[k], ranks, err_msg=rows[k].key)


def test_resampling_source_uses_its_own_inputs(model, queries):
    ids, mask, targets = queries
    order = np.roll(np.arange(len(ids)), 1)
    configs = {"decoder": {"hook_cross_attn_out": Patch(np.ones((1, 6, 1, 1, 1), np.float32), FROM_SOURCE)}}
    result = run_sweep(CONFIG, model, ids, mask, targets, configs,
                       source=Source(CONFIG, model, ids[order], mask[order]), progress=False)
    _, cache = gj.forward_with_cache(CONFIG, model, ids[order], mask[order], np.zeros((7, 1), np.int32),
                                     cache_sites=["decoder.*.hook_cross_attn_out"])
    iv = ivs.replacement(CONFIG, cache)
    logits = gj.forward(CONFIG, model, ids, mask, np.zeros((7, 1), np.int32), interventions=iv)
    np.testing.assert_array_equal(result.ranks[0], np.asarray(ranks_of_targets(logits[:, 0], targets)[0]))


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_one_and_four_devices_give_identical_results(model, queries):
    assert len(jax.local_devices()) >= 4, "conftest simulates 4 CPU devices"
    ids, mask, targets = queries
    means = ivs.mean_activations(CONFIG, model, ids, mask, ["decoder.*.hook_mlp_out", "decoder.*.hook_attn_out",
                                                           "decoder.*.hook_cross_attn_out"], progress=False)
    interventions, _ = stage_configs(CONFIG, STAGES, ("mean", "zero", "t5"), means)
    source = Source(CONFIG, gj.init_params(CONFIG, 2))
    one = run_sweep(CONFIG, model, ids, mask, targets, interventions, source=source, query_chunk=4,
                    devices=jax.local_devices()[:1], progress=False)
    four = run_sweep(CONFIG, model, ids, mask, targets, interventions, source=source, query_chunk=4,
                     devices=jax.local_devices()[:4], progress=False)
    np.testing.assert_array_equal(one.ranks, four.ranks)
    np.testing.assert_array_equal(one.target_logits, four.target_logits)
    np.testing.assert_array_equal(one.top_ids, four.top_ids)


def test_chunking_configs_and_queries_changes_nothing(model, queries):
    ids, mask, targets = queries
    interventions, _ = stage_configs(CONFIG, STAGES, ("zero",))
    whole = run_sweep(CONFIG, model, ids, mask, targets, interventions, query_chunk=7, progress=False)
    chunked = run_sweep(CONFIG, model, ids, mask, targets, interventions, query_chunk=2, config_chunk=4,
                        progress=False)
    np.testing.assert_array_equal(whole.ranks, chunked.ranks)
    # Chunks of other sizes run differently shaped matmuls (the clean prefix included): float32 reassociation
    # moves logits by ~1e-6; the sweep's exactness criterion is 1e-5.
    np.testing.assert_allclose(whole.target_logits, chunked.target_logits, atol=1e-5)


def test_sweep_rejects_bad_input(model, queries):
    ids, mask, targets = queries
    interventions, _ = stage_configs(CONFIG, STAGES, ("zero",))
    with pytest.raises(ivs.InterventionError, match=r"target token id 999 is outside the vocabulary \[0, 160\)"):
        run_sweep(CONFIG, model, ids, mask, np.full(len(ids), 999), interventions, progress=False)
    bad = {"decoder": {"hook_mlp_out": Patch(np.ones((2, 6, 1, 1, 1)), 0.0),
                       "hook_attn_out": Patch(np.ones((3, 6, 1, 1, 1)), 0.0)}}
    with pytest.raises(ivs.InterventionError, match="same leading config axis K"):
        run_sweep(CONFIG, model, ids, mask, targets, bad, progress=False)
    per_query = {"decoder": {"hook_mlp_out": Patch(np.ones((2, 6, 1, 1, 1)), np.zeros((6, 7, 1, 32)))}}
    with pytest.raises(ivs.InterventionError, match=r"value has shape \(6, 7, 1, 32\)"):
        run_sweep(CONFIG, model, ids, mask, targets, per_query, progress=False)
    with pytest.raises(ivs.InterventionError, match="FROM_SOURCE values need a `source`"):
        run_sweep(CONFIG, model, ids, mask, targets, stage_configs(CONFIG, STAGES, ("t5",))[0], progress=False)


def test_stage_helpers():
    assert default_stages(24) == [list(range(0, 7)), list(range(7, 18)), list(range(18, 24))]
    assert default_stages(8) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert default_stages(6) == [[0, 1], [2, 3], [4, 5]]
    assert parse_stages("0-1, 2-4,5", 6) == STAGES
    with pytest.raises(GenIRError, match="outside the decoder's layers 0-5"):
        parse_stages("0-6", 6)
    with pytest.raises(GenIRError, match="cannot parse 'a-b'"):
        parse_stages("a-b", 6)


def test_ranks_equal_transformers_with_forward_hooks(hf_checkpoint):
    """Zero / mean stage patching done with PyTorch forward hooks on transformers' T5 gives our ranks."""
    import torch

    directory, torch_model = hf_checkpoint("hooks", vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                           num_decoder_layers=6, num_heads=4)
    ours = gj.load_pretrained(directory)
    ids, mask, _ = padded_batch(160, [7, 3, 11, 5, 9], seed=8)
    dec = np.zeros((5, 1), np.int64)
    clean = np.asarray(gj.forward(ours.config, ours.params, ids, mask, dec))[:, 0]
    targets = clean.argmax(-1)
    result = run_stage_patching(ours.config, ours.params, ids, mask, targets, stages=STAGES,
                                modes=("mean", "zero"), progress=False)

    blocks = torch_model.decoder.block
    modules = {"attn": lambda l: blocks[l].layer[0].SelfAttention,
               "cross_attn": lambda l: blocks[l].layer[1].EncDecAttention,
               "mlp": lambda l: blocks[l].layer[2].DenseReluDense}
    as_torch = {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(mask),
                "decoder_input_ids": torch.as_tensor(dec)}

    def output_of(module_output):
        return module_output[0] if isinstance(module_output, tuple) else module_output

    def replace(module_output, value):
        if isinstance(module_output, tuple):
            return (value,) + tuple(module_output[1:])
        return value

    # means over the queries, captured with hooks on a clean run
    captured = {}
    handles = [modules[c](l).register_forward_hook(
        lambda mod, inp, out, key=(c, l): captured.__setitem__(key, output_of(out).detach().clone()))
        for c in modules for l in range(6)]
    with torch.no_grad():
        torch_model(**as_torch)
    for h in handles:
        h.remove()
    means = {key: value.mean(0, keepdim=True) for key, value in captured.items()}

    for row, our_ranks in zip(result.rows, result.ranks):
        handles = []
        for layer in STAGES[row.stage]:
            value = (lambda out: torch.zeros_like(output_of(out))) if row.mode == "zero" else \
                (lambda out, key=(row.component, layer): means[key].expand_as(output_of(out)))
            handles.append(modules[row.component](layer).register_forward_hook(
                lambda mod, inp, out, value=value: replace(out, value(out))))
        with torch.no_grad():
            logits = torch_model(**as_torch).logits[:, 0]
        for h in handles:
            h.remove()
        torch_ranks = torch.argsort(torch.argsort(logits, descending=True))
        expected = torch_ranks[torch.arange(5), torch.as_tensor(targets)].numpy()
        np.testing.assert_array_equal(our_ranks, expected, err_msg=row.key)
    assert (result.ranks > 0).any()
