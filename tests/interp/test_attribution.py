"""Attribution patching (AtP, AtP*) checked against numbers computed other ways: an exactly linear site,
finite differences, exact sweeps under small perturbations, and GradDrop's identity for last-layer units."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import interventions as ivs
from genir_jax.interp import sweep as sw
from genir_jax.interp.attribution import attribute, spearman, top_overlap
from genir_jax.core.model import forward_with_cache
from genir_jax.interp.patching import FROM_SOURCE, Source, run_sweep
from tests.hf_fixtures import padded_batch

CONFIG = gj.t5_v1_0(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=4,
                           num_heads=4, dropout_rate=0.0)
START = np.zeros((6, 1), np.int32)


@pytest.fixture(scope="module")
def setup():
    params = gj.init_params(CONFIG, 1)
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [7, 3, 11, 5, 9, 4], seed=2)
    logits = np.asarray(gj.forward(CONFIG, params, ids, mask, START))[:, 0]
    return params, ids, mask, logits.argmax(-1).astype(np.int32)


def _perturbed(params, scale, seed=5):
    leaves, tree = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_unflatten(tree, [np.asarray(x) + scale * rng.standard_normal(np.shape(x)).astype(np.float32)
                                               for x in leaves])


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_atp_is_exact_for_a_linear_site(setup):
    """The target logit is linear in the decoder output after its final norm: zeroing it removes the logit."""
    params, ids, mask, targets = setup
    grid = sw.site_grid(CONFIG, "decoder.hook_out")
    result = attribute(CONFIG, params, ids, mask, targets, grid, metric="logit", progress=False, per_query=True)
    np.testing.assert_allclose(result.per_query[0], -result.clean, rtol=1e-4, atol=1e-5)
    exact = run_sweep(CONFIG, params, ids, mask, targets, grid, metrics=("logit",), progress=False)
    np.testing.assert_allclose(result.scores, exact.aggregates["logit_effect"], rtol=1e-4, atol=1e-5)


def test_atp_of_a_neuron_equals_minus_activation_times_finite_difference_gradient(setup):
    params, ids, mask, targets = setup
    units = [3, 17, 40]
    grid = sw.site_grid(CONFIG, "decoder.1.mlp.hook_post", unit="neuron", units=units)
    result = attribute(CONFIG, params, ids, mask, targets, grid, metric="logprob", progress=False, per_query=True)
    _, cache = forward_with_cache(CONFIG, params, ids, mask, START, cache_sites=["decoder.1.mlp.hook_post"])
    activation = np.asarray(cache["decoder.1.mlp.hook_post"])[:, 0]  # [B, F]
    eps = 1e-2

    def logprob_with_offset(neuron, offset):
        value = np.array(activation)
        value[:, neuron] += offset
        iv = ivs.replacement(CONFIG, {"decoder.1.mlp.hook_post": value[:, None]})
        logits = np.asarray(gj.forward(CONFIG, params, ids, mask, START, interventions=iv), np.float64)[:, 0]
        return logits[np.arange(6), targets] - np.log(np.exp(logits).sum(-1))

    for k, neuron in enumerate(units):
        gradient = (logprob_with_offset(neuron, eps) - logprob_with_offset(neuron, -eps)) / (2 * eps)
        np.testing.assert_allclose(result.per_query[k], -activation[:, neuron] * gradient, rtol=2e-2, atol=2e-4)


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_attribution_approaches_exact_for_small_patches(setup, method):
    """Values from a slightly perturbed model: first-order estimates must match the exact sweep closely,
    including the QK-fixed encoder positions of atp*."""
    params, ids, mask, targets = setup
    source = Source(CONFIG, _perturbed(params, 3e-3))
    grid = sw.concat(
        sw.site_grid(CONFIG, "decoder.*.cross_attn.hook_z", unit="head", value=FROM_SOURCE),
        sw.component_grid(CONFIG, value=FROM_SOURCE),
        sw.site_grid(CONFIG, "encoder.hook_out", unit="position", length=ids.shape[1], value=FROM_SOURCE),
    )
    exact = run_sweep(CONFIG, params, ids, mask, targets, grid, source=source, metrics=("logit",),
                      per_query=False, progress=False).aggregates["logit_effect"]
    result = attribute(CONFIG, params, ids, mask, targets, grid, method=method, metric="logit", source=source,
                       progress=False)
    scale = np.abs(exact).max()
    assert scale > 1e-3
    np.testing.assert_allclose(result.scores, exact, atol=0.05 * scale)
    assert spearman(exact, result.scores) > 0.95


def test_atp_star_graddrop_is_the_plain_estimate_for_last_layer_units(setup):
    """A unit of the last decoder layer reaches the logits through no later layer: dropping any other layer
    leaves its estimate unchanged and dropping its own zeroes it, so the GradDrop mean is |AtP|."""
    params, ids, mask, targets = setup
    grid = sw.site_grid(CONFIG, "decoder.3.mlp.hook_post", unit="neuron", units=range(12))
    star = attribute(CONFIG, params, ids, mask, targets, grid, method="atp*", metric="logit", progress=False)
    plain = attribute(CONFIG, params, ids, mask, targets, grid, method="atp", metric="logit", progress=False,
                      per_query=True)
    np.testing.assert_allclose(star.scores, plain.scores, atol=1e-6)
    # GradDrop takes |.| per query pair (the paper's per-prompt-pair estimate), then the mean over queries
    np.testing.assert_allclose(star.magnitudes, np.abs(plain.per_query).mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(star.absolute, np.abs(plain.per_query).mean(axis=1), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(star.ranking, star.magnitudes)
    # no decoder layer's drop zeroes a stack site after the last layer: all L variants count, divided by L
    out = sw.site_grid(CONFIG, "decoder.hook_out")
    star = attribute(CONFIG, params, ids, mask, targets, out, method="atp*", metric="logit", progress=False,
                     per_query=True)
    np.testing.assert_allclose(star.magnitudes, np.abs(star.per_query).mean(axis=1), rtol=1e-4, atol=1e-6)


def test_atp_star_graddrop_equals_its_definition(setup):
    """GradDrop against its definition, computed with `jax.grad` through `gj.forward`: variant l is the AtP
    estimate with decoder layer l's attention, cross-attention and MLP outputs replaced by their own clean
    values (the forward pass unchanged, no gradient through them); the magnitude is
    mean over queries of sum_l |variant l| / (L - 1) for a decoder neuron (its own layer's variant is zero by
    construction), / L for an encoder neuron (no decoder layer is its own: all L variants count).
    `attribute` gets it from one shared forward pass."""
    params, ids, mask, targets = setup
    layers, units = CONFIG.num_decoder_layers, range(8)
    sites = ("decoder.0.mlp.hook_post", "decoder.1.mlp.hook_post", "encoder.1.mlp.hook_post")
    grid = sw.concat(*(sw.site_grid(CONFIG, site, unit="neuron", units=units) for site in sites))
    star = attribute(CONFIG, params, ids, mask, targets, grid, method="atp*", metric="logit", progress=False)
    outputs = ("hook_attn_out", "hook_cross_attn_out", "hook_mlp_out")
    _, cache = forward_with_cache(CONFIG, params, ids, mask, START, cache_sites=list(sites) + [
        f"decoder.*.{o}" for o in outputs])
    rows = np.arange(len(targets))

    def estimates(blocked):  # [3 sites x 8 units, queries]: gradient x (0 - activation) at each neuron
        def total_logit(delta, site):  # the neurons of one site shifted by delta (its values + delta)
            shifted = ivs.replacement(CONFIG, {site: cache[site] + delta})
            frozen = ivs.replacement(CONFIG, {f"decoder.{blocked}.{o}": cache[f"decoder.{blocked}.{o}"]
                                              for o in outputs}) if blocked is not None else {}
            logits = gj.forward(CONFIG, params, ids, mask, START, interventions=ivs.combine(shifted, frozen))
            return logits[rows, 0, targets].sum()

        per_site = []
        for site in sites:
            activation = np.asarray(cache[site])  # [B, positions, F]: a neuron is patched at every position
            gradient = np.asarray(jax.grad(total_logit)(np.zeros_like(activation), site))
            per_site.append((-activation * gradient).sum(axis=1)[:, :8].T)
        return np.concatenate(per_site)

    np.testing.assert_allclose(star.scores, estimates(None).mean(axis=1), rtol=1e-4, atol=1e-6)
    divisor = np.repeat([layers - 1, layers - 1, layers], 8)[:, None]
    magnitude = (sum(np.abs(estimates(l)) for l in range(layers)) / divisor).mean(axis=1)
    np.testing.assert_allclose(star.magnitudes, magnitude, rtol=1e-4, atol=1e-6)
    assert np.abs(magnitude - star.absolute).max() > 1e-3  # dropping layers changes the estimate here


def _qk_errors(params, ids, mask, targets, site, metric, scale, target_mask=None):
    """Max |estimate - exact| of atp and atp* over the heads of `site`, relative to the largest exact effect."""
    source = Source(CONFIG, _perturbed(params, scale))
    grid = sw.site_grid(CONFIG, site, unit="head", value=FROM_SOURCE)
    exact = run_sweep(CONFIG, params, ids, mask, targets, grid, source=source, metrics=(metric,), per_query=False,
                      target_mask=target_mask, progress=False).aggregates[f"{metric}_effect"]
    errors = []
    for method in ("atp", "atp*"):
        result = attribute(CONFIG, params, ids, mask, targets, grid, method=method, metric=metric, source=source,
                           target_mask=target_mask, progress=False)
        errors.append(np.abs(result.scores - exact).max() / np.abs(exact).max())
    return errors


def test_atp_star_qk_fix_matches_exact_patching_of_queries_and_keys(setup):
    """Queries and keys from a strongly perturbed model move the softmax far from its linear range: plain AtP
    is off by more than the largest effect, AtP*'s exact softmax (the rest linearised) is close to exact."""
    from genir_jax.docids.sequence_targets import pad_targets

    params, ids, mask, targets = setup
    plain, fixed = _qk_errors(params, ids, mask, targets, "decoder.*.cross_attn.hook_k", "logit", 1.0)
    assert plain > 1.0 and fixed < 0.3, (plain, fixed)
    sequences, tmask = pad_targets(SEQUENCES)  # decoder self-attention has several keys only for sequences
    plain, fixed = _qk_errors(params, ids, mask, sequences, "decoder.3.attn.hook_q", "logprob", 1.0, tmask)
    assert plain > 1.0 and fixed < 0.25, (plain, fixed)


def _softmax_row(scores):
    weights = np.exp(np.asarray(scores, np.float64) - np.max(scores))
    return weights / weights.sum()


@pytest.mark.parametrize("site", ["hook_attn_scores", "hook_q", "hook_k"])
def test_atp_star_qk_fix_value_and_sign_by_hand(site):
    """The QK fix of one query over three keys (one layer, head and query): the estimate is the gradient at
    the pattern times the exact change of the softmax, written out here by hand; it has the sign of that
    change (a second gradient of the opposite sign flips it), and a config the term does not act in is 0.
    Plain AtP, linear through the softmax, gives another number (0.169 for the exact 0.155 of the first case)."""
    from genir_jax.interp.attribution import _score_qk_scores

    q = np.ones((1, 1, 1, 1, 1))                                        # [L, B, T, H, K]
    k = np.asarray([1.0, 0.0, 0.0]).reshape(1, 1, 3, 1, 1)              # [L, B, S, H, K]
    scores = np.einsum("lbthk,lbshk->lbhts", q, k)                      # [1, 0, 0]
    if site == "hook_attn_scores":   # scores [1, 0, 0] -> [1 + ln 2, 0, 0]: the first key's weight rises
        value, patched, reader = scores + np.log([2.0, 1.0, 1.0]), [1 + np.log(2.0), 0, 0], 0
    elif site == "hook_q":           # q 1 -> -2: scores [-2, 0, 0], the first key's weight falls
        value, patched, reader = np.full_like(q, -2.0), [-2.0, 0, 0], 0
    else:                            # the second key 0 -> 3: scores [1, 3, 0], its weight rises
        value, patched, reader = np.asarray([1.0, 3.0, 0.0]).reshape(k.shape), [1.0, 3.0, 0], 1
    expected = _softmax_row(patched)[reader] - _softmax_row([1.0, 0, 0])[reader]
    term = sw.Term(stack="decoder", local=f"cross_attn.{site}", value=value,
                   table=np.ones((1,) + (1,) * value.ndim), row=np.asarray([0, -1]))
    g_pattern = np.zeros((2, 1, 1, 1, 1, 3))                            # [V, L, B, H, T, S]
    g_pattern[0, ..., reader], g_pattern[1, ..., reader] = 1.0, -2.0
    out = _score_qk_scores(term, {"q": q, "k": k, "scores": scores}, value, g_pattern)
    assert out.shape == (2, 2, 1)
    np.testing.assert_allclose(out[:, 0, 0], [expected, -2.0 * expected], rtol=1e-6)
    np.testing.assert_array_equal(out[:, 1, 0], [0.0, 0.0])
    assert np.sign(out[0, 0, 0]) == (1 if site != "hook_q" else -1)


def test_atp_star_qk_fix_of_the_encoder_final_norm(setup):
    """encoder.hook_out = encoder_final_ln.hook_normalized x the norm's scale, so zeroing a position of either is
    the same patch: AtP* fixes the norm's site as it fixes encoder.hook_out (exact cross-attention patterns with
    the patched keys), and that differs from plain AtP (the fix ran)."""
    params, ids, mask, targets = setup
    results = {}
    for site in ("encoder_final_ln.hook_normalized", "encoder.hook_out"):
        grid = sw.site_grid(CONFIG, site, unit="position", length=ids.shape[1])
        for method in ("atp", "atp*"):
            results[site, method] = attribute(CONFIG, params, ids, mask, targets, grid, method=method,
                                              metric="logit", progress=False).scores
    norm, out = "encoder_final_ln.hook_normalized", "encoder.hook_out"
    np.testing.assert_allclose(results[norm, "atp*"], results[out, "atp*"], rtol=1e-4, atol=1e-6)
    assert np.abs(results[norm, "atp*"] - results[norm, "atp"]).max() > 1e-3


def test_atp_star_refuses_sites_without_a_qk_fix(setup):
    params, ids, mask, targets = setup
    for site, named in (("encoder.1.hook_resid_post", "encoder.*.hook_resid_post"), ("hook_embed", "hook_embed")):
        grid = sw.site_grid(CONFIG, site)
        with pytest.raises(ivs.InterventionError, match=re.escape(f"AtP* has no QK fix for {named} patches") +
                           ".*--method atp"):
            attribute(CONFIG, params, ids, mask, targets, grid, method="atp*", metric="logit", progress=False)


def test_attribution_errors(setup):
    params, ids, mask, targets = setup
    grid = sw.component_grid(CONFIG, layers=[0])
    with pytest.raises(ivs.InterventionError, match="not differentiable"):
        attribute(CONFIG, params, ids, mask, targets, grid, metric="rank", progress=False)
    with pytest.raises(ivs.InterventionError, match="not one of"):
        attribute(CONFIG, params, ids, mask, targets, grid, method="ig", progress=False)
    with pytest.raises(ivs.InterventionError, match="need a `source`"):
        attribute(CONFIG, params, ids, mask, targets, sw.component_grid(CONFIG, value=FROM_SOURCE), progress=False)
    with pytest.raises(ivs.InterventionError, match="foil"):
        attribute(CONFIG, params, ids, mask, targets, grid, metric="logit_diff", foil_ids=targets, progress=False)


def test_rank_statistics_helpers():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)
    assert top_overlap(np.array([5, 4, 3, 2, 1]), np.array([5, 1, 4, 2, 3]), 2) == 0.5


def test_agreement_with_exact_patching_by_hand():
    """Estimates [1, -2, 3, -4] against exact effects [2, -1, -3, -5]: the third has the wrong sign (3 of 4
    agree), ranks (2, 1, 3, 0) against (3, 2, 1, 0), d^2 = 1 + 1 + 4 + 0 = 6, rho = 1 - 6 * 6 / (4 * 15) = 0.4."""
    from genir_jax.interp.attribution import Agreement, sign_agreement

    agreement = Agreement("atp*", "logit", np.arange(4), np.array([1.0, -2, 3, -4]), np.array([2.0, -1, -3, -5]))
    assert agreement.sign_agreement == 0.75 and agreement.spearman == pytest.approx(0.4)
    assert agreement.describe() == "Spearman 0.40, same sign 75% (n=4)"
    assert agreement.warning.startswith("atp* disagrees with exact patching on its top 4 units: Spearman 0.40")
    record = agreement.as_dict()
    assert record["spearman"] == pytest.approx(0.4) and record["sign_agreement"] == 0.75
    assert [u["exact"] for u in record["units"]] == [2, -1, -3, -5]
    # the case: six of twelve heads estimated positive where every exact effect is negative
    half = Agreement("atp*", "logit", np.arange(12), np.r_[np.linspace(1, 2, 6), -np.linspace(1, 2, 6)],
                     -np.linspace(0.5, 3, 12))
    assert half.sign_agreement == 0.5 and half.warning is not None
    agreeing = Agreement("atp", "logit", np.arange(3), np.array([1.0, 2, -3]), np.array([1.5, 2.5, -1]))
    assert agreeing.warning is None and agreeing.spearman == pytest.approx(1.0)
    assert Agreement("atp", "logit", np.arange(1), np.array([1.0]), np.array([-1.0])).spearman is None
    assert sign_agreement([0.0, 1.0], [0.0, -1.0]) == 0.5
    with pytest.raises(ValueError, match="equally long"):
        sign_agreement([1.0], [1.0, 2.0])


def test_check_against_exact_reruns_the_top_units(setup):
    from genir_jax.interp.attribution import check_against_exact

    params, ids, mask, targets = setup
    grid = sw.site_grid(CONFIG, "decoder.*.cross_attn.hook_z", unit="head", value=0.0)
    result = attribute(CONFIG, params, ids, mask, targets, grid, method="atp*", metric="logit", progress=False)
    agreement = check_against_exact(CONFIG, params, ids, mask, targets, result, top=5, progress=False)
    order = np.argsort(-result.magnitudes, kind="stable")[:5]
    np.testing.assert_array_equal(agreement.configs, order)
    np.testing.assert_allclose(agreement.estimate, result.scores[order])
    whole = run_sweep(CONFIG, params, ids, mask, targets, grid, metrics=["logit"], top_k=0, progress=False)
    np.testing.assert_allclose(agreement.exact, whole.aggregates["logit_effect"][order], rtol=1e-5, atol=1e-6)
    assert agreement.spearman == pytest.approx(spearman(result.scores[order], agreement.exact))


SEQUENCES = [[5, 9, 1], [7, 1], [12, 3, 4, 1], [5, 1], [20, 21, 1], [33, 1]]


@pytest.mark.parametrize("method", ["atp", "atp*"])
def test_sequence_attribution_approaches_exact_for_small_patches(setup, method):
    """Docid sequences (teacher-forced, every decoder position patched): the sequence log-probability's
    first-order estimates match the exact sequence sweep for values from a slightly perturbed model, and the
    QK fix of encoder.hook_out (single-step only) is refused."""
    from genir_jax.docids.sequence_targets import pad_targets

    params, ids, mask, _ = setup
    targets, tmask = pad_targets(SEQUENCES)
    source = Source(CONFIG, _perturbed(params, 3e-3))
    grid = sw.concat(sw.site_grid(CONFIG, "decoder.*.cross_attn.hook_z", unit="head", value=FROM_SOURCE),
                     sw.component_grid(CONFIG, value=FROM_SOURCE),
                     sw.site_grid(CONFIG, "decoder.2.hook_resid_post", unit="position", length=targets.shape[1],
                                  value=FROM_SOURCE))
    exact = run_sweep(CONFIG, params, ids, mask, targets, grid, target_mask=tmask, source=source,
                      metrics=("logprob",), per_query=False, progress=False).aggregates["logprob_effect"]
    result = attribute(CONFIG, params, ids, mask, targets, grid, method=method, metric="logprob", source=source,
                       target_mask=tmask, progress=False, per_query=True)
    scale = np.abs(exact).max()
    assert scale > 1e-3
    np.testing.assert_allclose(result.scores, exact, atol=0.05 * scale)
    assert spearman(exact, result.scores) > 0.95
    from genir_jax.docids.sequence_targets import sequence_log_prob, teacher_forced_logits

    clean = sequence_log_prob(teacher_forced_logits(CONFIG, params, ids, mask, targets), targets, tmask)
    np.testing.assert_allclose(result.clean, np.asarray(clean), atol=1e-4)
    encoder = sw.site_grid(CONFIG, "encoder.hook_out", unit="position", length=ids.shape[1], value=FROM_SOURCE)
    if method == "atp*":
        with pytest.raises(ivs.InterventionError, match="QK fix .* single-token docids only"):
            attribute(CONFIG, params, ids, mask, targets, encoder, method=method, metric="logprob", source=source,
                      target_mask=tmask, progress=False)
    with pytest.raises(ivs.InterventionError, match="attribution: metric 'logit' is not defined for multi-token"):
        attribute(CONFIG, params, ids, mask, targets, grid, method=method, metric="logit", source=source,
                  target_mask=tmask, progress=False)


def test_rank_statistics_row_by_row_equal_scipy_and_a_loop():
    """`spearman_rows` / `top_overlap_rows` (the bootstrap's per-resample statistics) row by row against
    scipy's Spearman (ties included) and a set intersection of each row's top-k."""
    from scipy.stats import spearmanr

    from genir_jax.interp.attribution import spearman_rows, top_overlap_rows

    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 6, (20, 15)).astype(float), rng.normal(size=(20, 15))
    np.testing.assert_allclose(spearman_rows(a, b), [spearmanr(x, y).statistic for x, y in zip(a, b)], atol=1e-12)
    assert spearman_rows(np.ones(4), np.arange(4.0)) == 0.0  # a constant row: no order, 0
    expected = [len(set(np.argsort(-x, kind="stable")[:4]) & set(np.argsort(-y, kind="stable")[:4])) / 4
                for x, y in zip(a, b)]
    np.testing.assert_allclose(top_overlap_rows(a, b, 4), expected)
    assert top_overlap_rows(a[0], b[0], 99) == 1.0  # k beyond the units: all of them
