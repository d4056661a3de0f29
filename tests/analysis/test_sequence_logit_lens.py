"""Logit lens and contributions per decoding step (`genir_jax.analysis.sequence_logit_lens`) against a plain
computation: one forward per gold prefix (no teacher forcing), the lens of that prefix's last position ranked
with numpy, and the single-step analysis (`genir_jax.analysis.residual`) at step 1."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genir_jax.analysis.logit_lens import logit_lens
from genir_jax.analysis.sequence_logit_lens import (LENS_SITES, RANKS_CSV, SUMMARY_JSON, run_sequence_logit_lens,
                                                    write_sequence_logit_lens)
from genir_jax.base.errors import GenIRError
from genir_jax.core.model import forward_with_cache
from genir_jax.docids.sequence_targets import pad_targets
from tests.docids.test_sequence_targets import CONFIG, sequence_case

SEQUENCES = [[5, 9, 1], [7, 1], [12, 3, 4, 1], [5, 1], [20, 21, 1]]


@pytest.fixture(scope="module")
def setup():
    params, ids, mask, sequences = sequence_case()
    assert sequences == SEQUENCES
    targets, tmask = pad_targets(sequences)
    result = run_sequence_logit_lens(CONFIG, params, ids, mask, targets, tmask, batch_size=2, progress=False)
    return params, ids, mask, targets, tmask, result


def _numpy_rank(logits: np.ndarray, target: int) -> int:
    order = np.argsort(-logits, kind="stable")
    return int(np.flatnonzero(order == target)[0])


def test_lens_ranks_equal_one_forward_per_prefix(setup):
    params, ids, mask, targets, _, result = setup
    sites = {name: f"decoder.*.{hook}" for name, hook in LENS_SITES}
    for n, seq in enumerate(SEQUENCES):
        for t, target in enumerate(seq):
            decoder_in = np.asarray([[0] + seq[:t]], np.int32)  # the gold prefix alone, no teacher forcing
            logits, cache = forward_with_cache(CONFIG, params, ids[n:n + 1], mask[n:n + 1], decoder_in,
                                               cache_sites=list(sites.values()))
            assert result.final_ranks[n, t] == _numpy_rank(np.asarray(logits)[0, -1], target)
            for layer in range(CONFIG.num_decoder_layers):
                for k, (name, hook) in enumerate(LENS_SITES):
                    resid = np.asarray(cache[f"decoder.{layer}.{hook}"])[0, -1]
                    lens = np.asarray(logit_lens(CONFIG, params, resid))
                    assert result.lens_ranks[n, t, layer, k] == _numpy_rank(lens, target), (n, t, layer, name)
        assert np.all(result.lens_ranks[n, len(seq):] == -1) and np.all(result.final_ranks[n, len(seq):] == -1)
        assert np.isnan(result.contributions[n, len(seq):]).all()
    # the last layer's resid_post lens is the model's own output
    real = result.final_ranks >= 0
    np.testing.assert_array_equal(result.lens_ranks[:, :, -1, 0][real], result.final_ranks[real])


def test_step_one_equals_the_single_step_analysis(setup):
    from genir_jax.analysis.residual import run_residual_rank

    params, ids, mask, targets, _, result = setup
    is_docid = np.zeros(CONFIG.vocab_size, bool)
    is_docid[40:] = True
    single = run_residual_rank(CONFIG, params, ids, mask, targets[:, 0], is_docid, batch_size=3, progress=False)
    np.testing.assert_array_equal(result.lens_ranks[:, 0, :, 0], single.lens_ranks[:, :, -1])  # resid_post
    np.testing.assert_array_equal(result.lens_ranks[:, 0, :, 1], single.lens_ranks[:, :, 2])   # cross_attn_out
    np.testing.assert_array_equal(result.lens_ranks[:, 0, :, 2], single.lens_ranks[:, :, 3])   # mlp_out
    np.testing.assert_allclose(result.contributions[:, 0], single.contributions, rtol=1e-5, atol=1e-6)


def test_summary_and_files_are_numpy_statistics_of_the_ranks(setup, tmp_path):
    *_, result = setup
    summary = result.summary()
    labels = [entry["label"] for entry in summary["steps"]]
    assert labels == ["step 1", "step 2", "step 3", "step 4", "last step (EOS)"]
    assert [entry["queries"] for entry in summary["steps"]] == [5, 5, 3, 1, 5]
    assert summary["docid_lengths"] == {"2": 2, "3": 2, "4": 1}
    step2 = summary["steps"][1]["relevant_rank"]["resid_post"]["mean"]
    np.testing.assert_allclose(step2, result.lens_ranks[:, 1, :, 0].mean(axis=0))
    last = np.asarray([result.lens_ranks[n, len(s) - 1, :, 2] for n, s in enumerate(SEQUENCES)])
    np.testing.assert_allclose(summary["steps"][-1]["relevant_rank"]["mlp_out"]["median"], np.median(last, axis=0))
    write_sequence_logit_lens(tmp_path, result, [f"q{i}" for i in range(5)])
    written = json.loads((tmp_path / SUMMARY_JSON).read_text())
    assert written["steps"][1]["relevant_rank"]["resid_post"]["mean"] == pytest.approx(step2)
    rows = (tmp_path / RANKS_CSV).read_text().splitlines()
    assert rows[0] == "query,step,layer,site,rank"
    assert len(rows) - 1 == sum(len(s) for s in SEQUENCES) * CONFIG.num_decoder_layers * len(LENS_SITES)
    assert rows[1] == f"q0,1,0,resid_post,{result.lens_ranks[0, 0, 0, 0]}"


def test_bad_target_masks_are_refused(setup):
    params, ids, mask, targets, tmask, _ = setup
    holes = tmask.copy()
    holes[0, 0] = 0  # not a prefix
    with pytest.raises(GenIRError, match="prefix"):
        run_sequence_logit_lens(CONFIG, params, ids, mask, targets, holes, progress=False)
    with pytest.raises(GenIRError, match="target token ids"):
        run_sequence_logit_lens(CONFIG, params, ids, mask, targets + 100, tmask, progress=False)
