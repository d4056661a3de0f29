"""Composable sweeps: grids equal loops of single forwards, prefix sharing changes nothing, unit ablations
equal weight surgery, path patching along every path / none equals ordinary patching / the clean run."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import interventions as ivs
from genir_jax.interp import sweep as sw
from genir_jax.core.model import forward_with_cache
from genir_jax.interp.patching import FROM_SOURCE, Source, ranks_of_targets, run_sweep
from tests.hf_fixtures import padded_batch

CONFIG = gj.t5_v1_0(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=6,
                           num_heads=4, dropout_rate=0.0)
START = np.zeros((7, 1), np.int32)


@pytest.fixture(scope="module")
def params():
    return gj.init_params(CONFIG, 0)


@pytest.fixture(scope="module")
def queries(params):
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [7, 3, 11, 5, 9, 4, 8], seed=4)
    logits = np.asarray(gj.forward(CONFIG, params, ids, mask, START))[:, 0]
    return ids, mask, logits.argmax(-1).astype(np.int32)


def _logits(params, ids, mask, interventions=None):
    return np.asarray(gj.forward(CONFIG, params, ids, mask, START, interventions=interventions))[:, 0]


def _assert_matches_loop(params, queries, sweep, result, source_cache=None):
    """Every config of the sweep equals a plain forward with that config alone."""
    ids, mask, targets = queries
    for k in range(sweep.size):
        config = sweep.config(CONFIG, k)
        if source_cache is not None:
            config = {s: {l: tuple(ivs.Patch(p.mask, source_cache[(s, l)] if p.value is FROM_SOURCE else p.value)
                                   for p in ps) for l, ps in sites.items()} for s, sites in config.items()}
        logits = _logits(params, ids, mask, config)
        ranks, target_logits = ranks_of_targets(logits, targets)
        np.testing.assert_array_equal(result.ranks[k], np.asarray(ranks), err_msg=str(sweep.label(k)))
        np.testing.assert_allclose(result.target_logits[k], np.asarray(target_logits), atol=1e-5)


def test_stack_product_concat_labels_and_shapes():
    a = sw.stack([ivs.zero_ablation(CONFIG, ["decoder.1.hook_mlp_out"]), ivs.zero_ablation(CONFIG, ["decoder.2.hook_attn_out"])],
                 labels=[{"name": "mlp1"}, {"name": "attn2"}], axis="which")
    heads = sw.site_grid(CONFIG, "decoder.4.cross_attn.hook_z", unit="head")
    grid = sw.product(a, heads)
    assert grid.axes == ("which", "site", "head") and grid.shape == (2, 1, 4) and grid.size == 8
    assert [grid.label(k)["name"] for k in range(8)] == ["mlp1"] * 4 + ["attn2"] * 4
    assert [grid.label(k)["head"] for k in range(8)] == [0, 1, 2, 3] * 2
    joined = sw.concat(a, heads)
    assert joined.size == 6 and joined.label(0)["head"] is None and joined.label(5)["head"] == 3
    # a config of a product applies both patches, the first sweep's first
    config = grid.config(CONFIG, 5)
    assert set(config["decoder"]) == {"hook_attn_out", "cross_attn.hook_z"}
    mask = np.asarray(config["decoder"]["cross_attn.hook_z"][0].mask)
    assert mask.shape == (6, 1, 1, 4, 1) and mask[4, 0, 0, 1, 0] == 1 and mask.sum() == 1


def test_grid_and_stack_errors():
    with pytest.raises(ivs.InterventionError, match="out of range"):
        sw.site_grid(CONFIG, "decoder.*.mlp.hook_post", unit="neuron", units=[64])
    with pytest.raises(ivs.InterventionError, match="no neuron axis"):
        sw.site_grid(CONFIG, "decoder.*.hook_mlp_out", unit="neuron")
    with pytest.raises(ivs.InterventionError, match="needs the sequence `length`"):
        sw.site_grid(CONFIG, "encoder.hook_out", unit="position")
    with pytest.raises(gj.GenIRError, match="matches no site"):
        sw.site_grid(CONFIG, "decoder.*.mlp.hook_pots", unit="neuron")
    with pytest.raises(ivs.InterventionError, match="2 labels for 1"):
        sw.stack([{}], labels=[{}, {}])


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_component_grid_equals_loop_and_prefix_sharing_changes_nothing(params, queries):
    ids, mask, targets = queries
    means = ivs.mean_activations(CONFIG, params, ids, mask, ["decoder.*.hook_mlp_out", "decoder.*.hook_attn_out",
                                                            "decoder.*.hook_cross_attn_out"], progress=False)
    grid = sw.concat(sw.relabel(sw.component_grid(CONFIG), mode="zero"),
                     sw.relabel(sw.component_grid(CONFIG, value=means), mode="mean"))
    assert grid.size == 36
    shared = run_sweep(CONFIG, params, ids, mask, targets, grid, query_chunk=2, config_chunk=5, progress=False)
    _assert_matches_loop(params, queries, grid, shared)
    assert shared.stats["decoder_layers_skipped_fraction"] > 0.3
    unshared = run_sweep(CONFIG, params, ids, mask, targets, grid, query_chunk=2, config_chunk=5,
                         prefix_sharing=False, progress=False)
    np.testing.assert_array_equal(shared.ranks, unshared.ranks)
    np.testing.assert_allclose(shared.target_logits, unshared.target_logits, atol=1e-5)
    assert unshared.stats["decoder_layers_skipped_fraction"] == 0.0
    # aggregates are the per-query values' statistics
    np.testing.assert_allclose(shared.aggregates["rank>0"], (shared.ranks > 0).mean(axis=1))
    np.testing.assert_allclose(shared.aggregates["logit_effect"],
                               (shared.target_logits - shared.clean["logit"][None]).mean(axis=1), atol=1e-6)


def test_neuron_ablation_equals_zeroing_its_w_out_row(params, queries):
    ids, mask, targets = queries
    grid = sw.site_grid(CONFIG, ["decoder.1.mlp.hook_post", "decoder.4.mlp.hook_post"], unit="neuron", units=[0, 7, 63])
    result = run_sweep(CONFIG, params, ids, mask, targets, grid, metrics=("rank", "logit"), query_chunk=4,
                       progress=False)
    for k in range(grid.size):
        layer, neuron = grid.label(k)["layer"], grid.label(k)["neuron"]
        surgery = jax.tree_util.tree_map(np.array, params)
        surgery["decoder"]["layers"]["mlp"]["wo"][layer, neuron, :] = 0.0
        logits = _logits(surgery, ids, mask)
        np.testing.assert_allclose(result.target_logits[k], logits[np.arange(7), targets], atol=1e-5)
        np.testing.assert_array_equal(result.ranks[k], np.asarray(ranks_of_targets(logits, targets)[0]))


def test_head_ablation_equals_zeroing_its_output_projection_slice(params, queries):
    ids, mask, targets = queries
    grid = sw.concat(sw.site_grid(CONFIG, "decoder.*.cross_attn.hook_z", unit="head"),
                     sw.site_grid(CONFIG, "decoder.2.attn.hook_z", unit="head"))
    result = run_sweep(CONFIG, params, ids, mask, targets, grid, query_chunk=4, config_chunk=7, progress=False)
    for k in range(grid.size):
        label = grid.label(k)
        component = "cross_attn" if "cross_attn" in label["site"] else "self_attn"
        surgery = jax.tree_util.tree_map(np.array, params)
        surgery["decoder"]["layers"][component]["out"][label["layer"], label["head"]] = 0.0
        logits = _logits(surgery, ids, mask)
        np.testing.assert_allclose(result.target_logits[k], logits[np.arange(7), targets], atol=1e-5)


def test_encoder_position_grid_and_resample_equal_loop(params, queries):
    ids, mask, targets = queries
    order = np.roll(np.arange(7), 1)
    grid = sw.site_grid(CONFIG, "encoder.hook_out", unit="position", length=ids.shape[1], value=FROM_SOURCE)
    inner = sw.site_grid(CONFIG, "encoder.0.hook_mlp_out", value=0.0)
    both = sw.concat(grid, inner)
    result = run_sweep(CONFIG, params, ids, mask, targets, both, source=Source(CONFIG, params, ids[order], mask[order]),
                       query_chunk=4, progress=False)
    _, cache = forward_with_cache(CONFIG, params, ids[order], mask[order], START, cache_sites=["encoder.hook_out"])
    _assert_matches_loop(params, queries, both, result, source_cache={("encoder", "hook_out"): cache["encoder.hook_out"]})


def test_metrics_docid_rank_logprob_logit_diff_and_hits(params, queries):
    ids, mask, targets = queries
    candidates = np.arange(100, 160)
    targets = candidates[_logits(params, ids, mask)[:, candidates].argmax(-1)].astype(np.int32)
    foils = np.where(targets == 100, 101, 100).astype(np.int32)
    grid = sw.component_grid(CONFIG, layers=[3, 5])
    result = run_sweep(CONFIG, params, ids, mask, targets, grid, candidates=candidates, foil_ids=foils,
                       metrics=("rank", "docid_rank", "logit", "logprob", "logit_diff"), hits=(1, 3), progress=False)
    for k in range(grid.size):
        logits = _logits(params, ids, mask, grid.config(CONFIG, k)).astype(np.float64)
        rows = np.arange(7)
        docid_rank = [(np.argsort(-logits[i, candidates], kind="stable") == targets[i] - 100).argmax() for i in rows]
        np.testing.assert_array_equal(result.values["docid_rank"][k], docid_rank)
        logprob = logits[rows, targets] - np.log(np.exp(logits).sum(-1))
        np.testing.assert_allclose(result.values["logprob"][k], logprob, atol=1e-5)
        np.testing.assert_allclose(result.values["logit_diff"][k], logits[rows, targets] - logits[rows, foils], atol=1e-5)
        assert result.aggregates["hits@3"][k] == pytest.approx(np.mean(np.asarray(docid_rank) < 3))
    np.testing.assert_array_equal(result.clean["docid_rank"], 0)


def test_bad_metric_and_foil_input(params, queries):
    ids, mask, targets = queries
    grid = sw.component_grid(CONFIG, layers=[0])
    with pytest.raises(ivs.InterventionError, match="unknown metric"):
        run_sweep(CONFIG, params, ids, mask, targets, grid, metrics=("rank", "accuracy"), progress=False)
    with pytest.raises(ivs.InterventionError, match="needs a foil"):
        run_sweep(CONFIG, params, ids, mask, targets, grid, metrics=("logit_diff",), progress=False)
    with pytest.raises(ivs.InterventionError, match="foil equals the target for query index 2"):
        foils = (targets + 1) % CONFIG.vocab_size
        foils[2] = targets[2]
        run_sweep(CONFIG, params, ids, mask, targets, grid, metrics=("logit_diff",), foil_ids=foils, progress=False)
    with pytest.raises(ivs.InterventionError, match="needs the docid token ids"):
        run_sweep(CONFIG, params, ids, mask, targets, grid, metrics=("docid_rank",), progress=False)


# --------------------------------------------------------------------------------------------------
# Path patching
# --------------------------------------------------------------------------------------------------

def _senders():
    means_free = sw.stack([ivs.zero_ablation(CONFIG, ["decoder.1.hook_mlp_out", "decoder.2.hook_mlp_out"]),
                           ivs.zero_ablation(CONFIG, ["decoder.0.cross_attn.hook_z"], heads=[1, 2]),
                           ivs.neuron_ablation(CONFIG, {"decoder.3.mlp": [5, 9, 11]})],
                          labels=[{"sender": "mlp1-2"}, {"sender": "cross0 heads 1,2"}, {"sender": "mlp3 neurons"}])
    return means_free


def test_path_patching_along_every_path_equals_ordinary_patching(params, queries):
    ids, mask, targets = queries
    senders = _senders()
    every = sw.receivers(CONFIG, components={c: "all" for c in sw.COMPONENTS}, logits=True)
    paths = run_sweep(CONFIG, params, ids, mask, targets, sw.product(senders, every), progress=False)
    ordinary = run_sweep(CONFIG, params, ids, mask, targets, senders, progress=False)
    np.testing.assert_array_equal(paths.ranks, ordinary.ranks)
    np.testing.assert_allclose(paths.target_logits, ordinary.target_logits, atol=1e-5)
    assert (ordinary.target_logits != ordinary.clean["logit"][None]).any()


def test_path_patching_along_no_path_is_the_clean_run(params, queries):
    ids, mask, targets = queries
    none = run_sweep(CONFIG, params, ids, mask, targets, sw.product(_senders(), sw.receivers(CONFIG)), progress=False)
    np.testing.assert_allclose(none.target_logits, np.broadcast_to(none.clean["logit"], none.target_logits.shape),
                               atol=1e-5)


def test_path_patching_mlp_to_logits_directly(params, queries):
    """Sender: decoder MLP 2 zeroed; receiver: the logits only. The final residual is the clean one minus
    MLP 2's clean output; every other component reads the clean stream."""
    ids, mask, targets = queries
    sweep = sw.product(sw.stack([ivs.zero_ablation(CONFIG, ["decoder.2.hook_mlp_out"])]), sw.receivers(CONFIG, logits=True))
    result = run_sweep(CONFIG, params, ids, mask, targets, sweep, progress=False)
    _, cache = forward_with_cache(CONFIG, params, ids, mask, START,
                                  cache_sites=["decoder.5.hook_resid_post", "decoder.2.hook_mlp_out"])
    final = np.asarray(cache["decoder.5.hook_resid_post"] - cache["decoder.2.hook_mlp_out"], np.float32)
    scale = np.asarray(params["decoder"]["final_norm"]["scale"])
    hidden = final / np.sqrt(np.mean(final ** 2, axis=-1, keepdims=True) + CONFIG.layer_norm_epsilon) * scale
    logits = np.asarray(gj.unembed(CONFIG, params, hidden))[:, 0]
    np.testing.assert_allclose(result.target_logits[0], logits[np.arange(7), targets], atol=1e-5)


def test_path_patching_into_later_mlp_inputs_differs_from_both_extremes(params, queries):
    ids, mask, targets = queries
    senders = sw.stack([ivs.zero_ablation(CONFIG, ["decoder.0.hook_cross_attn_out"])])
    to_mlps = sw.receivers(CONFIG, components={"mlp": range(1, 6)})
    result = run_sweep(CONFIG, params, ids, mask, targets, sw.product(senders, to_mlps), progress=False)
    ordinary = run_sweep(CONFIG, params, ids, mask, targets, senders, progress=False)
    assert not np.allclose(result.target_logits, ordinary.target_logits, atol=1e-4)
    assert not np.allclose(result.target_logits[0], result.clean["logit"], atol=1e-4)
    with pytest.raises(ivs.InterventionError, match="senders must be decoder components"):
        run_sweep(CONFIG, params, ids, mask, targets,
                  sw.product(sw.stack([ivs.zero_ablation(CONFIG, ["decoder.1.hook_resid_pre"])]), to_mlps),
                  progress=False)


def test_sweep_store_resumes_from_finished_chunks(params, queries):
    ids, mask, targets = queries

    class Store(dict):
        def __init__(self, fail_after=None):
            super().__init__()
            self.fail_after = fail_after

        def get(self, key):
            return copy.deepcopy(dict.get(self, key))

        def put(self, key, arrays):
            if self.fail_after is not None and len(self) >= self.fail_after:
                raise KeyboardInterrupt("killed")
            self[key] = arrays

    grid = sw.component_grid(CONFIG)
    store = Store(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(CONFIG, params, ids, mask, targets, grid, config_chunk=2, store=store, progress=False)
    store.fail_after = None
    finished = sum(len(block["index"]) for block in store.values())
    assert len(store) == 3 and 0 < finished < grid.size
    resumed = run_sweep(CONFIG, params, ids, mask, targets, grid, config_chunk=2, store=store, progress=False)
    assert resumed.stats["configs_computed"] == grid.size - finished
    whole = run_sweep(CONFIG, params, ids, mask, targets, grid, config_chunk=2, progress=False)
    np.testing.assert_array_equal(resumed.ranks, whole.ranks)
    np.testing.assert_array_equal(resumed.target_logits, whole.target_logits)


# --------------------------------------------------------------------------------------------------
# Multi-token (naive / semantic docid) targets
# --------------------------------------------------------------------------------------------------

SEQUENCES = [[5, 9, 1], [7, 1], [12, 3, 4, 1], [5, 1], [20, 21, 1], [33, 1], [8, 8, 1]]


def _sequence_loop(params, ids, mask, targets, tmask, interventions=None):
    """Worst step rank and sequence log-probability of one config, from one teacher-forced forward."""
    from genir_jax.docids.sequence_targets import sequence_metric, teacher_forced_logits

    logits = teacher_forced_logits(CONFIG, params, ids, mask, targets, interventions=interventions)
    return (np.asarray(sequence_metric(logits, targets, tmask, "step_rank", "max")),
            np.asarray(sequence_metric(logits, targets, tmask, "seq_logprob")))


def test_sequence_targets_grid_equals_teacher_forced_loop(params, queries):
    """Zero and mean grids (means at every teacher-forced position), a T5-style source and a resample source
    over docid sequences: every config equals one teacher-forced forward with it, prefix sharing included."""
    from genir_jax.docids.sequence_targets import pad_targets, teacher_forcing_inputs

    ids, mask, _ = queries
    targets, tmask = pad_targets(SEQUENCES)
    decoder_inputs = teacher_forcing_inputs(targets, CONFIG.decoder_start_token_id)
    sites = ["decoder.*.hook_mlp_out", "decoder.*.hook_cross_attn_out"]
    means = ivs.mean_activations(CONFIG, params, ids, mask, sites, decoder_input_ids=decoder_inputs, progress=False)
    grid = sw.concat(sw.relabel(sw.component_grid(CONFIG, components=("mlp", "cross_attn")), mode="zero"),
                     sw.relabel(sw.component_grid(CONFIG, components=("mlp", "cross_attn"), value=means), mode="mean"),
                     sw.relabel(sw.site_grid(CONFIG, ["decoder.1.hook_mlp_out", "decoder.4.hook_mlp_out"],
                                            value=FROM_SOURCE),
                                mode="source"))
    other = gj.init_params(CONFIG, 5)
    result = run_sweep(CONFIG, params, ids, mask, targets, grid, target_mask=tmask, source=Source(CONFIG, other),
                       metrics=("rank", "logprob"), query_chunk=3, config_chunk=4, progress=False)
    _, source_cache = forward_with_cache(CONFIG, other, ids, mask, decoder_inputs, cache_sites=["decoder.*.hook_mlp_out"])
    clean_rank, clean_logprob = _sequence_loop(params, ids, mask, targets, tmask)
    np.testing.assert_array_equal(result.clean["rank"], clean_rank)
    np.testing.assert_allclose(result.clean["logprob"], clean_logprob, atol=1e-4)
    for k in range(grid.size):
        config = grid.config(CONFIG, k)
        config = {s: {l: tuple(ivs.Patch(p.mask, np.stack([np.asarray(source_cache[f"decoder.{i}.{l}"])
                                                          for i in range(CONFIG.num_decoder_layers)])
                                         if p.value is FROM_SOURCE else p.value) for p in ps)
                      for l, ps in sites_.items()} for s, sites_ in config.items()}
        rank, logprob = _sequence_loop(params, ids, mask, targets, tmask, config)
        np.testing.assert_array_equal(result.values["rank"][k], rank, err_msg=str(grid.label(k)))
        np.testing.assert_allclose(result.values["logprob"][k], logprob, atol=1e-4, err_msg=str(grid.label(k)))
    assert result.stats["decoder_layers_skipped_fraction"] > 0.3
    unshared = run_sweep(CONFIG, params, ids, mask, targets, grid, target_mask=tmask, source=Source(CONFIG, other),
                         metrics=("rank", "logprob"), query_chunk=3, config_chunk=4, prefix_sharing=False,
                         progress=False)
    np.testing.assert_array_equal(result.values["rank"], unshared.values["rank"])
    np.testing.assert_allclose(result.values["logprob"], unshared.values["logprob"], atol=1e-4)
    # resample: another query's encoder input, this query's teacher-forced docid
    order = np.roll(np.arange(7), 1)
    resampled = run_sweep(CONFIG, params, ids, mask, targets, sw.site_grid(CONFIG, "encoder.hook_out", value=FROM_SOURCE),
                          target_mask=tmask, source=Source(CONFIG, params, ids[order], mask[order]),
                          metrics=("rank", "logprob"), progress=False)
    _, cache = forward_with_cache(CONFIG, params, ids[order], mask[order], decoder_inputs,
                                  cache_sites=["encoder.hook_out"])
    swapped = ivs.encoder_swap(CONFIG, cache["encoder.hook_out"], site="encoder.hook_out")
    rank, logprob = _sequence_loop(params, ids, mask, targets, tmask, swapped)
    np.testing.assert_array_equal(resampled.values["rank"][0], rank)
    np.testing.assert_allclose(resampled.values["logprob"][0], logprob, atol=1e-4)


def test_sequence_targets_bad_input(params, queries):
    from genir_jax.docids.sequence_targets import pad_targets

    ids, mask, _ = queries
    targets, tmask = pad_targets(SEQUENCES)
    grid = sw.component_grid(CONFIG, layers=[0])
    with pytest.raises(ivs.InterventionError, match="metric 'docid_rank' is not defined for multi-token targets"):
        run_sweep(CONFIG, params, ids, mask, targets, grid, target_mask=tmask, metrics=("rank", "docid_rank"),
                  candidates=np.arange(100, 160), progress=False)
    holes = tmask.copy()
    holes[2, 0] = 0
    with pytest.raises(ivs.InterventionError, match="non-empty prefix"):
        run_sweep(CONFIG, params, ids, mask, targets, grid, target_mask=holes, metrics=("rank",), progress=False)
    with pytest.raises(ivs.InterventionError, match=r"target_ids must have shape \(7,\)"):
        run_sweep(CONFIG, params, ids, mask, targets, grid, metrics=("rank",), progress=False)
