"""Windowed ranks (`genir_jax.interp.rank_window`) against ranks over fully materialised logits, on every branch
(all rows decided by the bound, a few undecided rows gathered, too many undecided: every row), and the sweep
engine with and without the window."""

import jax.numpy as jnp
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import sweep as sw
from genir_jax.interp.metrics import TIE_TOLERANCE, ranks_of_targets
from genir_jax.interp.patching import run_sweep
from genir_jax.interp.rank_window import clean_window, windowed_ranks
from tests.hf_fixtures import padded_batch


def _states(vocab=3000, width=24, queries=12, configs=40, seed=0):
    """Clean states, per-config patched states (some barely moved, some far), a table and targets at
    ranks 0, 1, 5, 40, 900 and the last place among the clean logits."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, width)).astype(np.float32)
    table[7] = table[11]  # two equal rows: exact ties, ranked by token id
    clean = rng.standard_normal((queries, width)).astype(np.float32) * 3
    order = np.argsort(-(clean @ table.T), axis=-1, kind="stable")
    places = np.resize([0, 1, 5, 40, 900, vocab - 1], queries)
    targets = order[np.arange(queries), places].astype(np.int32)
    scale = np.geomspace(1e-4, 3.0, configs).astype(np.float32)[:, None, None]
    hidden = clean[None] + scale * rng.standard_normal((configs, queries, width)).astype(np.float32)
    return hidden, table, targets, clean


def _assert_equal_but_near_ties(ranks, hidden, table, targets):
    """Ranks equal those of the materialised logits, except where another token is within a float rounding
    of the target (both orders are honest there)."""
    logits = np.einsum("kbd,vd->kbv", hidden, table)
    expected = np.asarray(ranks_of_targets(jnp.asarray(logits), jnp.asarray(np.broadcast_to(targets, ranks.shape)))[0])
    for k, b in zip(*np.nonzero(ranks != expected)):
        row, target = logits[k, b], targets[b]
        gap = np.abs(np.delete(row, target) - row[target])
        assert gap.min() <= 4 * TIE_TOLERANCE * max(1.0, abs(row[target])), (k, b, ranks[k, b], expected[k, b])
    return expected


@pytest.mark.parametrize("size,capacity,branch", [(64, 10_000, "few"), (64, 4, "many"), (3000, None, "none")])
def test_windowed_ranks_equal_materialised_ranks(size, capacity, branch):
    hidden, table, targets, clean = _states()
    window = clean_window(jnp.asarray(clean), jnp.asarray(table), jnp.asarray(targets), size)
    ranks, decided, full_rows = windowed_ranks(jnp.asarray(hidden), jnp.asarray(table), jnp.asarray(targets), window,
                                               capacity=capacity)
    ranks, decided = np.asarray(ranks), np.asarray(decided)
    expected = _assert_equal_but_near_ties(ranks, hidden, table, targets)
    assert np.mean(ranks == expected) > 0.99
    rows = hidden.shape[0] * hidden.shape[1]
    if branch == "none":  # the window is the whole vocabulary: the bound decides every row
        assert decided.all() and int(full_rows) == 0
    else:  # small shifts decided, large ones not; the undecided rows were ranked over the whole vocabulary
        assert 0.2 < decided.mean() < 0.95
        assert int(full_rows) == (min(capacity, rows) if branch == "few" else rows)
    # the bound never decides a row wrongly: a decided row's rank is the exact one (or a near tie)
    assert np.mean(ranks[decided] == expected[decided]) > 0.99


def test_window_sits_around_the_target_in_clean_order():
    hidden, table, targets, clean = _states()
    window = {k: np.asarray(v) for k, v in clean_window(jnp.asarray(clean), jnp.asarray(table),
                                                        jnp.asarray(targets), 64).items()}
    logits = clean @ table.T
    for b in range(len(targets)):
        inside = logits[b, window["tokens"][b]]
        assert targets[b] in window["tokens"][b]
        assert np.all(np.diff(inside) <= 0)  # descending
        assert window["upper"][b] >= inside[0] and window["lower"][b] <= inside[-1]
        assert window["before"][b] == np.sum(logits[b] > inside[0]) or window["before"][b] == 0


CONFIG = gj.t5_v1_0(vocab_size=3000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=4,
                           num_heads=4, dropout_rate=0.0)


@pytest.fixture(scope="module")
def model():
    params = gj.init_params(CONFIG, 1)
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [7, 3, 11, 5, 9, 4, 6, 8], seed=2)
    logits = np.asarray(gj.forward(CONFIG, params, ids, mask, np.zeros((8, 1), np.int32)))[:, 0]
    places = [0, 0, 3, 50, 1000, 2999, 0, 7]  # correct queries (rank 0) and others
    targets = np.argsort(-logits, axis=-1)[np.arange(8), places].astype(np.int32)
    return params, ids, mask, targets


def test_sweep_ranks_with_the_window_equal_ranks_without(model):
    params, ids, mask, targets = model
    grid = sw.concat(sw.site_grid(CONFIG, "decoder.*.mlp.hook_post", unit="neuron"),
                     sw.site_grid(CONFIG, "decoder.*.cross_attn.hook_z", unit="head"),
                     sw.component_grid(CONFIG))
    kwargs = dict(metrics=("rank", "logit"), top_k=0, progress=False)
    plain = run_sweep(CONFIG, params, ids, mask, targets, grid, rank_window=0, **kwargs)
    for size in (256, 16):
        windowed = run_sweep(CONFIG, params, ids, mask, targets, grid, rank_window=size, **kwargs)
        assert windowed.stats["rank_window"] == size and plain.stats["rank_window"] == 0
        assert 0.3 < windowed.stats["rank_rows_decided"] < 1.0  # whole components moved some rows too far
        np.testing.assert_array_equal(windowed.values["rank"], plain.values["rank"])
        np.testing.assert_array_equal(windowed.values["logit"], plain.values["logit"])
        for name in ("rank", "rank>0", "hits@1", "hits@10"):
            np.testing.assert_array_equal(windowed.aggregates[name], plain.aggregates[name])


def test_sweep_uses_the_window_only_where_it_is_exact(model):
    params, ids, mask, targets = model
    grid = sw.component_grid(CONFIG, layers=[3])
    kwargs = dict(progress=False)
    assert run_sweep(CONFIG, params, ids, mask, targets, grid, metrics=("rank",), top_k=0, **kwargs).stats["rank_window"]
    # the whole softmax (logprob), a top-k over the vocabulary, bfloat16: every row over the whole vocabulary
    for extra in (dict(metrics=("rank", "logprob"), top_k=0), dict(metrics=("rank",), top_k=5),
                  dict(metrics=("rank",), top_k=0, dtype="bfloat16")):
        assert run_sweep(CONFIG, params, ids, mask, targets, grid, **extra, **kwargs).stats["rank_window"] == 0


def test_nan_states_get_the_worst_rank():
    """A config whose final state is NaN (a diverged or broken model) is never decided by the bound, and its
    rank is the worst, V - 1, not 0; NaN clean states (every window edge NaN) give the same."""
    hidden, table, targets, clean = _states(vocab=1000, queries=6, configs=4)
    hidden[1, 2] = np.nan
    window = clean_window(jnp.asarray(clean), jnp.asarray(table), jnp.asarray(targets), 64)
    ranks, decided, _ = windowed_ranks(jnp.asarray(hidden), jnp.asarray(table), jnp.asarray(targets), window)
    assert not bool(np.asarray(decided)[1, 2]) and int(np.asarray(ranks)[1, 2]) == 1000 - 1
    nan_clean = np.full_like(clean, np.nan)
    window = clean_window(jnp.asarray(nan_clean), jnp.asarray(table), jnp.asarray(targets), 64)
    ranks, decided, _ = windowed_ranks(jnp.asarray(np.full_like(hidden, np.nan)), jnp.asarray(table),
                                       jnp.asarray(targets), window)
    assert not np.asarray(decided).any() and (np.asarray(ranks) == 1000 - 1).all()


def _separated_window_states(vocab=1000, width=4, big=1000.0):
    """A table whose clean logits (state e0) put tokens 100..107 in a window far from both edges (gaps of
    about 0.85), with unit rows except the last token's, norm `big`, whose logit sits at the bottom; the
    target is token 104."""
    cosines = np.concatenate([np.linspace(0.95, 0.9, 100), np.linspace(0.08, 0.01, 8),
                              np.linspace(-0.8, -0.9, vocab - 109)])
    table = np.zeros((vocab, width), np.float32)
    table[:vocab - 1, 0] = cosines
    table[:vocab - 1, 2] = np.sqrt(1.0 - cosines ** 2)
    table[vocab - 1] = [-0.95, big, 0.0, 0.0]
    clean = np.zeros((1, width), np.float32)
    clean[0, 0] = 1.0
    return table, clean, np.asarray([104], np.int32)


def test_the_reach_uses_the_largest_row_norm():
    """Moving the state by 0.01 along the one long row lifts that token (norm 1000, clean logit -0.95)
    from the bottom to the top (+10). Every other row has norm 1, so a reach from any smaller norm (the mean
    row norm is about 2) keeps the target's logit well inside the window's edges, would decide the row and
    miss the token that overtook it; the largest norm (reach 10) leaves it to the exact count: rank 105."""
    table, clean, targets = _separated_window_states()
    hidden = np.stack([clean, clean + np.asarray([[0.0, 0.01, 0.0, 0.0]], np.float32),
                       clean + np.asarray([[0.0, 0.0, 0.0, 0.01]], np.float32)])  # [3 configs, 1, 4]
    window = clean_window(jnp.asarray(clean), jnp.asarray(table), jnp.asarray(targets), 8)
    ranks, decided, _ = windowed_ranks(jnp.asarray(hidden), jnp.asarray(table), jnp.asarray(targets), window)
    assert np.asarray(ranks)[:, 0].tolist() == [104, 105, 104]
    assert float(window["row_norm"][0]) == pytest.approx(np.linalg.norm(table[-1]), rel=1e-6)
    assert int(window["before"][0]) == 100
    assert np.asarray(decided)[:, 0].tolist() == [True, False, False]  # a reach of 10 decides no moved state
    _assert_equal_but_near_ties(np.asarray(ranks), hidden, table, targets)


def test_an_exact_tie_inside_the_window_gets_the_tie_rule():
    """Token 103's row equals the target's (104): the lower id ranks first (`ahead_of_target`), so the
    windowed rank of 104 counts 103 and the rank of 103 does not count 104; rows the bound decides."""
    table, clean, _ = _separated_window_states(big=1.0)
    table[103] = table[104]
    hidden = clean[None] + np.asarray([[[0.0, 0.0, 0.0, 1e-3]], [[0.0, 0.0, 0.0, 0.0]]], np.float32)
    for target, expected in ((104, 104), (103, 103)):
        targets = np.asarray([target], np.int32)
        window = clean_window(jnp.asarray(clean), jnp.asarray(table), jnp.asarray(targets), 8)
        ranks, decided, full_rows = windowed_ranks(jnp.asarray(hidden), jnp.asarray(table), jnp.asarray(targets),
                                                   window)
        assert np.asarray(decided).all() and int(full_rows) == 0  # ranked inside the window
        assert np.asarray(ranks)[:, 0].tolist() == [expected, expected]
        materialised = ranks_of_targets(jnp.asarray(np.einsum("kbd,vd->kbv", hidden, table)),
                                        jnp.asarray(np.broadcast_to(targets, (2, 1))))[0]
        assert np.asarray(materialised)[:, 0].tolist() == [expected, expected]


def test_a_single_undecided_row_is_ranked_over_the_whole_vocabulary():
    """One row the bound cannot decide (the state moved along the long row: that token overtakes the target
    from outside the window) is ranked exactly, 105 not the window's 104, in a gathered block of one row."""
    table, clean, targets = _separated_window_states()
    hidden = np.stack([clean, clean + np.asarray([[0.0, 0.01, 0.0, 0.0]], np.float32)])  # [2 configs, 1, 4]
    window = clean_window(jnp.asarray(clean), jnp.asarray(table), jnp.asarray(targets), 8)
    ranks, decided, full_rows = windowed_ranks(jnp.asarray(hidden), jnp.asarray(table), jnp.asarray(targets),
                                               window, capacity=1)
    assert np.asarray(decided)[:, 0].tolist() == [True, False]
    assert np.asarray(ranks)[:, 0].tolist() == [104, 105] and int(full_rows) == 1


def test_the_default_capacity_of_a_large_sweep():
    """Beyond 1024 rows the default capacity is 1/16 of the rows (an integer: it sizes the gathered block)."""
    table, clean, targets = _separated_window_states()
    hidden = np.broadcast_to(clean, (1040, 1, 4)).copy()  # 1040 configs, all decided but one
    hidden[7] += np.asarray([0.0, 0.01, 0.0, 0.0], np.float32)
    window = clean_window(jnp.asarray(clean), jnp.asarray(table), jnp.asarray(targets), 8)
    ranks, decided, full_rows = windowed_ranks(jnp.asarray(hidden), jnp.asarray(table), jnp.asarray(targets),
                                               window)
    assert int(np.sum(~np.asarray(decided))) == 1 and int(full_rows) == 1040 // 16
    assert int(np.asarray(ranks)[7, 0]) == 105 and (np.delete(np.asarray(ranks)[:, 0], 7) == 104).all()
