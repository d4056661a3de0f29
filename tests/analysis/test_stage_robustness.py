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
