"""Attribution against exact patching (`genir_jax.analysis.attribution_agreement`), checked against numbers
computed other ways: exact effects from single patched forwards, AtP from `jax.grad` at the site, the rank
statistics from scipy, and the bootstrap's seeding."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.stats import spearmanr

import genir_jax as gj
from genir_jax.analysis import attribution_agreement as agreement
from genir_jax.base.errors import GenIRError
from genir_jax.core.model import forward_with_cache
from genir_jax.interp import interventions as ivs
from tests.hf_fixtures import padded_batch

CONFIG = gj.t5_v1_0(vocab_size=160, d_model=32, d_kv=8, d_ff=24, num_layers=1, num_decoder_layers=3,
                    num_heads=4, dropout_rate=0.0)
QUERIES = 7
START = np.zeros((QUERIES, 1), np.int32)
ROWS = np.arange(QUERIES)


@pytest.fixture(scope="module")
def setup():
    params = gj.init_params(CONFIG, 3)
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [7, 3, 11, 5, 9, 4, 6], seed=4)
    logits = np.asarray(gj.forward(CONFIG, params, ids, mask, START))[:, 0]
    return params, ids, mask, logits.argmax(-1).astype(np.int32)


def _target_logits(params, ids, mask, targets, interventions=None):
    return np.asarray(gj.forward(CONFIG, params, ids, mask, START, interventions=interventions),
                      np.float64)[ROWS, 0, targets]


def _by_hand(params, ids, mask, targets, site, unit_axis, mode, exact=True):
    """Per unit of `site` (heads or neurons, every layer), per query: the exact effect of setting the unit to 0
    or to its mean over the queries (one patched forward each; None without `exact`), and AtP's
    (value - activation) . gradient with the gradient of the summed target logits at the site from `jax.grad`.
    Both [L x units, N]."""
    layers = [f"decoder.{layer}.{site}" for layer in range(CONFIG.num_decoder_layers)]
    _, cache = forward_with_cache(CONFIG, params, ids, mask, START, cache_sites=layers)
    clean = _target_logits(params, ids, mask, targets)
    exact, estimate = ([] if exact else None), []
    for name in layers:
        activation = np.asarray(cache[name], np.float64)
        value = np.zeros_like(activation) if mode == "zero" else np.broadcast_to(activation.mean(axis=0),
                                                                                activation.shape)

        def total(delta, name=name, activation=activation):
            shifted = ivs.replacement(CONFIG, {name: (activation + delta).astype(np.float32)})
            return gj.forward(CONFIG, params, ids, mask, START, interventions=shifted)[ROWS, 0, targets].sum()

        gradient = np.asarray(jax.grad(total)(np.zeros(activation.shape, np.float32)), np.float64)
        for unit in range(activation.shape[unit_axis]):
            selected = np.zeros(activation.shape, bool)
            np.moveaxis(selected, unit_axis, 0)[unit] = True
            if exact is not None:
                patched = ivs.replacement(CONFIG, {name: np.where(selected, value, activation).astype(np.float32)})
                exact.append(_target_logits(params, ids, mask, targets, patched) - clean)
            change = np.where(selected, value - activation, 0.0) * gradient
            estimate.append(change.reshape(QUERIES, -1).sum(axis=1))
    return None if exact is None else np.asarray(exact), np.asarray(estimate)


def _top_overlap_by_hand(reference, estimate, k):
    return len(set(np.argsort(-reference)[:k]) & set(np.argsort(-estimate)[:k])) / k


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_agreement_equals_single_patched_forwards_scipy_and_jax_grad(setup, mode):
    """Cross-attention heads (every decoder layer), AtP: the item and query counts, the signed and magnitude
    Spearman and the top-k overlap equal scipy's on exact effects from one patched forward per head and AtP's
    (value - activation) . gradient by `jax.grad`; the mean is each head's mean over the same queries."""
    params, ids, mask, targets = setup
    result = agreement.run_attribution_agreement(CONFIG, params, ids, mask, targets,
                                                 families=("cross-attention heads",), modes=(mode,),
                                                 methods=("atp",), progress=False, resamples=200)
    (row,) = result.rows
    exact, estimate = _by_hand(params, ids, mask, targets, "cross_attn.hook_z", -2, mode)
    assert (row.family, row.mode, row.method) == ("cross-attention heads", mode, "atp")
    assert row.items == CONFIG.num_decoder_layers * CONFIG.num_heads == len(exact)
    assert row.queries == result.queries == QUERIES and row.top_k == 3
    effect, score = exact.mean(axis=1), estimate.mean(axis=1)
    assert row.signed.estimate == pytest.approx(spearmanr(effect, score).statistic, abs=1e-9)
    assert row.magnitude.estimate == pytest.approx(spearmanr(np.abs(effect), np.abs(score)).statistic, abs=1e-9)
    assert row.overlap.estimate == pytest.approx(_top_overlap_by_hand(np.abs(effect), np.abs(score), 3))
    for interval in (row.signed, row.magnitude, row.overlap):
        assert interval.low <= interval.estimate <= interval.high and interval.queries == QUERIES
    assert row.verdict in ("holds", "does not hold", "undetermined")


def test_mean_ablation_atp_of_neurons_is_mean_minus_activation_times_gradient(setup):
    """AtP of a mean patch: (mean - activation) . gradient, the gradient from `jax.grad`, the mean the neuron's
    over the queries (`mean_activations`, the value the exact sweep patches in too)."""
    from genir_jax.interp.attribution import attribute
    from genir_jax.interp.interventions import mean_activations
    from genir_jax.interp.site_grammar import swept_sites

    params, ids, mask, targets = setup
    zero = agreement.family_grid(CONFIG, "neurons")
    means = mean_activations(CONFIG, params, ids, mask, swept_sites(CONFIG, zero), progress=False)
    grid = agreement.family_grid(CONFIG, "neurons", means)
    assert grid.size == CONFIG.num_decoder_layers * CONFIG.d_ff
    result = attribute(CONFIG, params, ids, mask, targets, grid, metric="logit", progress=False, per_query=True)
    _, estimate = _by_hand(params, ids, mask, targets, "mlp.hook_post", -1, "mean", exact=False)
    np.testing.assert_allclose(result.per_query, estimate, rtol=1e-4, atol=1e-5)
    assert np.abs(estimate).max() > 1e-3


def test_bootstrap_intervals_contain_the_estimate_and_are_seeded():
    """Every interval holds its point estimate; the same data and seed give the same numbers, another seed other
    bounds; the point estimates are scipy's over all queries, whatever the seed."""
    rng = np.random.default_rng(0)
    exact = rng.normal(size=(30, 40))
    signed = exact + 2 * rng.normal(size=exact.shape)
    magnitude = np.abs(signed) + rng.random(exact.shape)
    first = agreement.agreement_intervals(exact, signed, magnitude, 5, resamples=500)
    again = agreement.agreement_intervals(exact, signed, magnitude, 5, resamples=500)
    other = agreement.agreement_intervals(exact, signed, magnitude, 5, resamples=500, seed=1)
    assert first == again
    assert [i.estimate for i in first] == [i.estimate for i in other]
    assert [(i.low, i.high) for i in first] != [(i.low, i.high) for i in other]
    for interval in first:
        assert interval.low <= interval.estimate <= interval.high and interval.low < interval.high
        assert (interval.queries, interval.resamples, interval.seed) == (40, 500, 0)
    effect = exact.mean(axis=1)
    assert first[0].estimate == pytest.approx(spearmanr(effect, signed.mean(axis=1)).statistic)
    assert first[1].estimate == pytest.approx(spearmanr(np.abs(effect), magnitude.mean(axis=1)).statistic)
    assert first[2].estimate == _top_overlap_by_hand(np.abs(effect), magnitude.mean(axis=1), 5)
    # without magnitudes the ranking is |mean signed estimate| (AtP's)
    plain = agreement.agreement_intervals(exact, signed, None, 5, resamples=500)
    assert plain[1].estimate == pytest.approx(spearmanr(np.abs(effect), np.abs(signed.mean(axis=1))).statistic)


def test_bootstrap_resamples_queries_and_recomputes_both_means():
    """Two queries whose effects order the units oppositely to their estimates' order or alike: a resample of
    only the first has Spearman +1, of only the second -1, so the interval spans both ends, while the estimate
    (both queries: means [2, 2.25, 1.5] against [0.5, 1.25, 3]) is -0.5."""
    exact = np.array([[1.0, 3.0], [2.0, 2.5], [3.0, 0.0]])
    signed = np.array([[1.0, 0.0], [2.0, 0.5], [3.0, 3.0]])
    interval = agreement.agreement_intervals(exact, signed, None, 1, resamples=400)[0]
    assert (interval.low, interval.high) == (-1.0, 1.0)
    assert interval.estimate == pytest.approx(-0.5)


def test_top_k_and_family_sizes():
    assert [agreement.top_k(n) for n in (2, 9, 12, 30, 768, 98_304)] == [2, 3, 3, 3, 77, 100]
    sizes = {family: agreement.family_grid(CONFIG, family).size for family in agreement.FAMILIES}
    layers = CONFIG.num_decoder_layers
    assert sizes == {"cross-attention heads": layers * CONFIG.num_heads, "self-attention heads": layers * CONFIG.num_heads,
                     "neurons": layers * CONFIG.d_ff, "layer x component": layers * 3}


def test_agreement_errors(setup):
    params, ids, mask, targets = setup
    with pytest.raises(GenIRError, match="unknown mode or method 'resample'"):
        agreement.run_attribution_agreement(CONFIG, params, ids, mask, targets, modes=("resample",))
    with pytest.raises(GenIRError, match="single-token docids only"):
        agreement.run_attribution_agreement(CONFIG, params, ids, mask, np.stack([targets, targets], 1))
    with pytest.raises(GenIRError, match="unknown unit family 'layers'"):
        agreement.family_grid(CONFIG, "layers")
    with pytest.raises(GenIRError, match="1 unit"):
        agreement.agreement_intervals(np.ones((1, 3)), np.ones((1, 3)), None, 1)
    with pytest.raises(GenIRError, match="must both be"):
        agreement.agreement_intervals(np.ones((2, 3)), np.ones((2, 4)), None, 1)


@pytest.mark.slow  # about a minute on 2 cores (every family, mode and method compiled): the full suite runs it
def test_every_family_mode_and_method_and_the_record_round_trip(setup, tmp_path):
    params, ids, mask, targets = setup
    result = agreement.run_attribution_agreement(CONFIG, params, ids, mask, targets, progress=False, resamples=100)
    layers, heads = CONFIG.num_decoder_layers, CONFIG.num_heads
    items = {"cross-attention heads": layers * heads, "self-attention heads": layers * heads,
             "neurons": layers * CONFIG.d_ff, "layer x component": layers * 3}
    assert [(r.family, r.mode, r.method) for r in result.rows] == [
        (f, m, method) for m in ("zero", "mean") for f in agreement.FAMILIES for method in ("atp", "atp*")]
    for row in result.rows:
        assert row.items == items[row.family] and row.queries == QUERIES
        assert row.top_k == agreement.top_k(row.items)
    for plain, star in zip(result.rows[::2], result.rows[1::2]):
        assert plain.signed == star.signed  # the QK fix leaves head outputs, neurons and components alone
    agreement.write_attribution_agreement(tmp_path, result)
    assert agreement.read_attribution_agreement(tmp_path) == result


def test_a_spearman_interval_beside_its_estimate_decides_nothing():
    """Resampling queries adds noise to every unit's mean effect, which lowers the Spearman of nearly every
    resample: near 1 the whole percentile interval can lie below the estimate (here 0.991 [0.899, 0.988]). Such
    an interval decides nothing; by its bounds alone the order would "hold" (above 0.5, 0.09 wide)."""
    from genir_jax.analysis.evidence import UNDETERMINED

    rng = np.random.default_rng(1)
    units, queries = 30, 25
    exact = rng.normal(0, 0.3, units)[:, None] + rng.standard_cauchy((units, queries)) * 0.5
    signed = exact + rng.normal(0, 1, (units, queries))
    magnitude = np.abs(signed) + rng.exponential(1, (units, queries))
    spearman, _, _ = agreement.agreement_intervals(exact, signed, magnitude, 5, resamples=2000)
    assert spearman.high < spearman.estimate and not spearman.covers_estimate
    assert spearman.low > agreement.MIN_SPEARMAN and spearman.width < agreement.MAX_WIDTH
    assert agreement.order_verdict(spearman) == UNDETERMINED
    assert spearman.format().startswith(f"{spearman.estimate:.2f} [{spearman.low:.2f}, {spearman.high:.2f}]\u2020")
