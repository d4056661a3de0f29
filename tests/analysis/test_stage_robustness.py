"""Stage robustness: every row against a plain forward with the same ablation, and the stage table
against the stage-patching analysis."""

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import interventions as ivs
from genir_jax.analysis.stage_patching import run_stage_patching
from genir_jax.analysis.stage_robustness import render_markdown, run_stage_robustness
from genir_jax.base.errors import GenIRError
from genir_jax.interp.metrics import ranks_of_targets
from tests.hf_fixtures import padded_batch

CONFIG = gj.t5_v1_0(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=6,
                           num_heads=4, dropout_rate=0.0)
START = np.zeros((6, 1), np.int32)
SITES = {"attn": "hook_attn_out", "cross_attn": "hook_cross_attn_out", "mlp": "hook_mlp_out"}


@pytest.fixture(scope="module")
def setup():
    params = gj.init_params(CONFIG, 5)
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [7, 3, 11, 5, 9, 4], seed=2)
    logits = np.asarray(gj.forward(CONFIG, params, ids, mask, START))[:, 0]
    targets = logits.argmax(-1).astype(np.int32)
    partitions = {"thirds": [[0, 1], [2, 3], [4, 5]], "uneven": [[0], [1, 2, 3, 4], [5]]}
    result = run_stage_robustness(CONFIG, params, ids, mask, targets, partitions=partitions, query_chunk=4,
                                  progress=False)
    return params, ids, mask, targets, partitions, result


def _ranks(params, ids, mask, targets, interventions):
    logits = np.asarray(gj.forward(CONFIG, params, ids, mask, START, interventions=interventions))[:, 0]
    return np.asarray(ranks_of_targets(logits, targets)[0])


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_rows_equal_plain_forwards(setup):
    params, ids, mask, targets, _, result = setup
    means = ivs.mean_activations(CONFIG, params, ids, mask, [f"decoder.*.{s}" for s in SITES.values()],
                                 progress=False)
    for index, row in enumerate(result.rows):
        if row["kind"] == "stage":
            continue
        layers = range(6) if row["kind"] == "all_layers" else [row["layer"]]
        sites = [f"decoder.{layer}.{SITES[row['component']]}" for layer in layers]
        config = (ivs.zero_ablation(CONFIG, sites) if row["mode"] == "zero"
                  else ivs.mean_ablation(CONFIG, means, sites=sites))
        expected = _ranks(params, ids, mask, targets, config)
        np.testing.assert_array_equal(result.ranks[index], expected, err_msg=str(row))
        assert row["!=0"] == pytest.approx(float(np.mean(expected > 0)))
        assert row["mean_rank"] == pytest.approx(float(np.mean(expected)))
    assert len(result.select("all_layers")) == 6 and len(result.select("single_layer")) == 36


def test_stage_rows_equal_stage_patching(setup):
    params, ids, mask, targets, partitions, result = setup
    for name, stages in partitions.items():
        reference = run_stage_patching(CONFIG, params, ids, mask, targets, stages=stages, modes=("mean", "zero"),
                                       progress=False)
        for entry in reference.fractions():
            rows = result.select("stage", partition=name, component=entry["component"], stage=entry["stage"],
                                 mode=entry["mode"])
            assert len(rows) == 1
            for label in ("!=0", ">5", ">10", ">100"):
                assert rows[0][label] == pytest.approx(entry[label])
    assert result.partitions == partitions
    text = render_markdown(result, len(targets))
    assert "thirds: 0-1, 2-3, 4-5" in text and "uneven: 0-0, 1-4, 5-5" in text



def test_mean_mode_rows_put_each_layers_own_mean_where_the_row_says():
    """Quick, without a model: every mean-mode row of the sweep, applied to random activations, replaces
    exactly the (component, layer) outputs its labels name (every layer, one layer, or one stage of a
    partition) by that layer's own mean and leaves every other output as it was."""
    from genir_jax.analysis.stage_robustness import stage_robustness_sweep

    layers, width = CONFIG.num_decoder_layers, CONFIG.d_model
    rng = np.random.default_rng(0)
    means = {f"decoder.{layer}.{site}": rng.normal(size=(1, width)).astype(np.float32)
             for layer in range(layers) for site in SITES.values()}
    partitions = {"uneven": [[0], [1, 2, 3, 4], [5]], "halves": [[0, 1, 2], [3, 4, 5]]}
    sweep, _ = stage_robustness_sweep(CONFIG, partitions, ("mean",), means)
    clean = {site: rng.normal(size=(layers, 2, 1, width)).astype(np.float32) for site in SITES.values()}
    seen = set()
    for k in range(sweep.size):
        label = sweep.label(k)
        assert label["mode"] == "mean"
        chosen = {"all_layers": lambda: range(layers), "single_layer": lambda: [label["layer"]],
                  "stage": lambda: partitions[label["partition"]][label["stage"]]}[label["kind"]]()
        seen.add((label["kind"], label["component"], label["partition"], tuple(chosen)))
        patches = sweep.config(CONFIG, k)["decoder"]
        for component, site in SITES.items():
            patched = clean[site]
            for patch in patches.get(site, ()):
                patched = patched + np.asarray(patch.mask) * (np.asarray(patch.value) - patched)
            expected = clean[site].copy()
            if component == label["component"]:
                for layer in chosen:
                    expected[layer] = means[f"decoder.{layer}.{site}"]
            np.testing.assert_allclose(patched, expected, atol=1e-6, err_msg=f"{label} {site}")
    stage_rows = sum(len(stages) for stages in partitions.values())
    assert len(seen) == sweep.size == len(SITES) * (1 + layers + stage_rows)


@pytest.mark.parametrize("partition,message", [
    ([[0, 1], [1, 2]], "in two stages"),
    ([[0, True]], "not a decoder layer"),
    ([[0, 6]], "not a decoder layer"),
    ([[0], []], "at least one layer"),
])
def test_bad_partitions(setup, partition, message):
    params, ids, mask, targets, _, _ = setup
    with pytest.raises(GenIRError, match=message):
        run_stage_robustness(CONFIG, params, ids, mask, targets, partitions={"bad": partition}, modes=("zero",),
                             progress=False)
