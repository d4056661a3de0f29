"""Teacher-forced multi-token targets (`genir_jax.docids.sequence_targets`) and sequence stage patching."""

from __future__ import annotations

import numpy as np
import pytest

from genir_jax.core.config import t5_v1_0
from genir_jax.core.model import forward, init_params
from genir_jax.docids.sequence_targets import (greedy_consistent, kept_at_rank_0, pad_targets, reduce_step_ranks,
                                               sequence_log_prob, sequence_metric, step_ranks, teacher_forced_logits,
                                               worst_step_ranks)

CONFIG = t5_v1_0(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=3, num_heads=2)


def sequence_case():
    """(params, ids, mask, sequences): a random model with spread-out logits, 5 queries (one padded) and
    docid-like token sequences of 2-4 tokens ending with EOS (also used by tests/analysis/test_sequence_logit_lens.py)."""
    params = init_params(CONFIG, 3)
    params = {**params, "shared": np.asarray(params["shared"]) * 4.0}  # spread-out logits
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 64, size=(5, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    sequences = [[5, 9, 1], [7, 1], [12, 3, 4, 1], [5, 1], [20, 21, 1]]
    return params, ids, mask, sequences


@pytest.fixture(scope="module")
def setup():
    return sequence_case()


def _numpy_step_log_probs(params, ids, mask, seq):
    """log p of each token of `seq` by a plain forward per prefix length (no teacher-forcing helper)."""
    out, ranks = [], []
    for t in range(len(seq)):
        decoder_in = np.asarray([[0] + seq[:t]], np.int32)
        logits = np.asarray(forward(CONFIG, params, ids[None], mask[None], decoder_in), np.float64)[0, -1]
        log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        out.append(log_probs[seq[t]])
        ranks.append(int(np.sum(logits > logits[seq[t]]) + np.sum((logits == logits[seq[t]])[:seq[t]])))
    return np.asarray(out), np.asarray(ranks)


def test_sequence_metrics_equal_prefix_by_prefix_computation(setup):
    params, ids, mask, sequences = setup
    targets, tmask = pad_targets(sequences)
    logits = teacher_forced_logits(CONFIG, params, ids, mask, targets)
    logprob = np.asarray(sequence_log_prob(logits, targets, tmask))
    ranks = np.asarray(step_ranks(logits, targets, tmask))
    for i, seq in enumerate(sequences):
        expected_lp, expected_ranks = _numpy_step_log_probs(params, ids[i], mask[i], seq)
        np.testing.assert_allclose(logprob[i], expected_lp.sum(), atol=1e-4)
        assert ranks[i, :len(seq)].tolist() == expected_ranks.tolist()
        assert (ranks[i, len(seq):] == -1).all()
        assert int(reduce_step_ranks(ranks, tmask, "max")[i]) == expected_ranks.max()
        assert float(reduce_step_ranks(ranks, tmask, "mean")[i]) == pytest.approx(expected_ranks.mean())
    np.testing.assert_array_equal(np.asarray(sequence_metric(logits, targets, tmask, "step_rank", "first")),
                                  ranks[:, 0])


def test_greedy_consistent_matches_greedy_decoding(setup):
    params, ids, mask, _ = setup
    greedy = []
    for i in range(ids.shape[0]):  # greedy decoding, three steps then EOS appended as the docid's end
        seq = []
        for _ in range(3):
            decoder_in = np.asarray([[0] + seq], np.int32)
            seq.append(int(np.argmax(np.asarray(forward(CONFIG, params, ids[i:i + 1], mask[i:i + 1], decoder_in))[0, -1])))
        greedy.append(seq)
    # the greedy tokens are consistent; changing the last one makes it inconsistent
    assert greedy_consistent(CONFIG, params, ids, mask, greedy).all()
    changed = [seq[:-1] + [(seq[-1] + 1) % 64] for seq in greedy]
    assert not greedy_consistent(CONFIG, params, ids, mask, changed).any()


def test_worst_step_ranks_in_small_batches_equal_the_prefix_by_prefix_ranks(setup):
    """The rank behind the correct-pairs check: the worst step's rank (a one-token sequence: the first decoder
    step's, an atomic docid), batch by batch (here 2 rows, the last batch padded) as in one batch."""
    params, ids, mask, sequences = setup
    sequences = sequences[:4] + [[20]]
    expected = [_numpy_step_log_probs(params, ids[i], mask[i], seq)[1].max() for i, seq in enumerate(sequences)]
    assert worst_step_ranks(CONFIG, params, ids, mask, sequences, batch_size=2).tolist() == expected


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_sequence_stage_patching_zero_mlp_equals_zeroed_weights(setup):
    from genir_jax.analysis.sequence_stage_patching import run_sequence_stage_patching

    params, ids, mask, sequences = setup
    targets, tmask = pad_targets(sequences)
    stages = [[0], [1, 2]]
    result = run_sequence_stage_patching(CONFIG, params, ids, mask, targets, tmask, stages=stages,
                                         modes=("zero", "t5"), source_params=init_params(CONFIG, 9),
                                         metric="seq_logprob", batch_size=3, progress=False)
    keys = [row.key for row in result.rows]
    assert len(keys) == 2 * 3 * 2 + 1 and keys[-1] == "0-encoder.0.hook_resid_post-t5"
    wo = np.array(params["decoder"]["layers"]["mlp"]["wo"])
    wo[1:] = 0.0  # the mlp of layers 1 and 2 writes nothing: what zero-patching stage 1's mlp does
    zeroed = {**params, "decoder": {**params["decoder"], "layers": {**params["decoder"]["layers"],
                                                                    "mlp": {**params["decoder"]["layers"]["mlp"],
                                                                            "wo": wo}}}}
    expected = np.asarray(sequence_log_prob(teacher_forced_logits(CONFIG, zeroed, ids, mask, targets), targets, tmask))
    np.testing.assert_allclose(result.values[keys.index("1-mlp-zero")], expected, atol=1e-4)
    clean = np.asarray(sequence_log_prob(teacher_forced_logits(CONFIG, params, ids, mask, targets), targets, tmask))
    np.testing.assert_allclose(result.clean, clean, atol=1e-5)
    assert not np.allclose(result.values[keys.index("0-attn-t5")], clean, atol=1e-3)
    entries = result.fractions()
    assert entries[0]["mode"] == "zero" and "mean_effect" in entries[0]


def test_kept_at_rank_0_first_each_and_every_step():
    ranks = np.asarray([[0, 0, -1], [0, 3, 0], [2, 0, 0], [0, 0, 0]])
    kept = kept_at_rank_0(ranks)
    assert kept["first step"].tolist() == [True, True, False, True]
    assert kept["every step"].tolist() == [True, False, False, True]  # padding is no step
    assert [flags.tolist() for flags in kept["steps"]] == [[True, True, False, True], [True, False, True, True],
                                                           [True, True, True]]  # step 3: the three longer docids


def test_sequence_stage_patching_keeps_each_steps_rank(setup, tmp_path):
    """The per-step ranks behind the first-step / per-step / every-step shares: those of the zeroed-weights
    model, reduced to the per-query rank, and written to step_ranks.json."""
    import json

    from genir_jax.analysis.sequence_stage_patching import run_sequence_stage_patching
    from genir_jax.analysis.stage_patching import STEP_RANKS_JSON, write_stage_patching

    params, ids, mask, sequences = setup
    targets, tmask = pad_targets(sequences)
    result = run_sequence_stage_patching(CONFIG, params, ids, mask, targets, tmask, stages=[[0], [1, 2]],
                                         modes=("zero",), batch_size=3, progress=False)
    keys = [row.key for row in result.rows]
    wo = np.array(params["decoder"]["layers"]["mlp"]["wo"])
    wo[1:] = 0.0
    zeroed = {**params, "decoder": {**params["decoder"], "layers": {**params["decoder"]["layers"],
                                                                    "mlp": {**params["decoder"]["layers"]["mlp"],
                                                                            "wo": wo}}}}
    expected = np.asarray(step_ranks(teacher_forced_logits(CONFIG, zeroed, ids, mask, targets), targets, tmask))
    np.testing.assert_array_equal(result.step_ranks[keys.index("1-mlp-zero")], expected)
    np.testing.assert_array_equal(result.values, result.step_ranks.max(axis=-1))
    write_stage_patching(tmp_path / "out", result.as_rank_result())
    written = json.loads((tmp_path / "out" / STEP_RANKS_JSON).read_text())
    assert written["1-mlp-zero"] == [row[row >= 0].tolist() for row in expected]
