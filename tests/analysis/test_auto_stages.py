"""Automatic decoder stages: the DP equals brute force, planted stages are found, features equal direct
computations (hand-made zero ablation, cached forward, the model's own output at the last layer)."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import interventions as ivs
from genir_jax.analysis.auto_stages import (FEATURE_NAMES, AutoStages, auto_stages, describe_stages, segment_cost,
                                            segment_layers, stage_features, standardize)
from genir_jax.analysis.stage_patching import parse_stages
from genir_jax.base.errors import GenIRError
from tests.hf_fixtures import padded_batch

CONFIG = gj.t5_v1_0(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=6,
                           num_heads=4, dropout_rate=0.0)


def _partitions(L: int, k: int):
    """Every split of 0..L-1 into k contiguous non-empty stages, boundary tuples in lexicographic order."""
    for ends in itertools.combinations(range(1, L), k - 1):
        bounds = (0,) + ends + (L,)
        yield [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _exact_cost(rows, stages) -> Fraction:
    """Within-stage sum of squares in exact rational arithmetic (rows: lists of ints)."""
    total = Fraction(0)
    for stage in stages:
        for f in range(len(rows[0])):
            values = [Fraction(rows[layer][f]) for layer in stage]
            mean = sum(values) / len(values)
            total += sum((v - mean) ** 2 for v in values)
    return total


@pytest.mark.parametrize("L,k", [(L, k) for L in (1, 2, 4, 6, 9) for k in (1, 2, 3, 4) if k <= L])
def test_dp_equals_brute_force(L, k):
    rng = np.random.default_rng(100 * L + k)
    for trial in range(3):
        features = rng.normal(size=(L, 1 + trial)) * rng.uniform(0.1, 10, size=1 + trial)[None, :]
        stages = segment_layers(features, k)
        costs = [segment_cost(features, p) for p in _partitions(L, k)]
        best = list(_partitions(L, k))[int(np.argmin(costs))]
        assert stages == best
        assert segment_cost(features, stages) == pytest.approx(min(costs), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("L,k", [(5, 2), (6, 3), (8, 3), (9, 4)])
def test_ties_go_to_lexicographically_smallest_stage_ends(L, k):
    """Small integer features have many exact ties; rational arithmetic decides the true optimum."""
    rng = np.random.default_rng(L * 10 + k)
    for _ in range(5):
        rows = rng.integers(0, 3, size=(L, 2)).tolist()
        exact = [(_exact_cost(rows, p), p) for p in _partitions(L, k)]
        lowest = min(cost for cost, _ in exact)
        expected = next(p for cost, p in exact if cost == lowest)  # partitions come in lexicographic order
        assert segment_layers(np.array(rows, dtype=np.float64), k) == expected


def test_planted_stages_recovered_from_noisy_curves():
    rng = np.random.default_rng(0)
    planted = [list(range(0, 7)), list(range(7, 18)), list(range(18, 24))]  # the paper's stages
    levels = rng.normal(scale=3.0, size=(3, 5))
    signal = np.concatenate([np.repeat(levels[s][None, :], len(stage), axis=0) for s, stage in enumerate(planted)])
    scales = np.array([1.0, 100.0, 0.01, 5.0, 1e4])  # different units: standardize must even them out
    features = (signal + rng.normal(scale=0.3, size=signal.shape)) * scales[None, :]
    stages = segment_layers(standardize(features), 3)
    assert stages == planted
    assert describe_stages(stages) == "0-6,7-17,18-23"
    assert parse_stages(describe_stages(stages), 24) == planted


def test_edge_cases_k1_and_kL():
    features = np.random.default_rng(1).normal(size=(5, 3))
    assert segment_layers(features, 1) == [[0, 1, 2, 3, 4]]
    assert segment_layers(features, 5) == [[0], [1], [2], [3], [4]]
    assert segment_layers(np.zeros((1, 1)), 1) == [[0]]
    assert segment_cost(features, [[l] for l in range(5)]) == 0.0
    assert describe_stages([[0], [1, 2], [3, 4]]) == "0,1-2,3-4"
    # all-constant features: everything ties, the earliest stage ends win
    assert segment_layers(np.ones((5, 2)), 3) == [[0], [1], [2, 3, 4]]


def test_standardize():
    features = np.array([[1.0, 7.0, 0.0], [2.0, 7.0, 10.0], [3.0, 7.0, 20.0], [6.0, 7.0, 30.0]])
    z = standardize(features)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z[:, [0, 2]].std(axis=0), 1.0)
    np.testing.assert_array_equal(z[:, 1], 0.0)  # constant column
    np.testing.assert_allclose(z[:, 2], (features[:, 2] - 15.0) / np.std(features[:, 2]))


@pytest.mark.parametrize("features,k,message", [
    (np.zeros((4, 2)), 0, "1 <= k <= 4"),
    (np.zeros((4, 2)), 5, "1 <= k <= 4"),
    (np.zeros((4, 2)), 2.0, "integer"),
    (np.zeros(4), 2, "2-D"),
    (np.zeros((2, 3, 1)), 1, "2-D"),
    (np.zeros((0, 3)), 1, "at least one layer"),
    (np.array([[0.0], [np.nan], [1.0]]), 2, r"finite; layer\(s\) \[1\]"),
    (np.array([[0.0], [1.0], [np.inf]]), 2, "finite"),
])
def test_invalid_input(features, k, message):
    with pytest.raises(GenIRError, match=message):
        segment_layers(features, k)


def test_invalid_standardize_and_describe():
    with pytest.raises(GenIRError, match="finite"):
        standardize(np.array([[np.nan, 1.0]]))
    with pytest.raises(GenIRError, match="consecutive"):
        describe_stages([[0, 2]])
    with pytest.raises(GenIRError, match="empty"):
        describe_stages([[0], []])



def test_stage_feature_columns_from_planted_residual_and_sweep_results(monkeypatch):
    """Quick: `stage_features` on planted results of its two passes (every value distinct by query, layer,
    site and component), so a wrong lens site, a log instead of log1p, a mean over the wrong axis (or before
    the log), a wrong ratio or a wrong component's drop changes a column. The passes themselves are checked
    against a model in the slow tests below."""
    from types import SimpleNamespace

    from genir_jax.analysis import auto_stages as module
    from genir_jax.analysis.residual import FUNCS, LENS_SITES, PARTS

    queries, L = 3, CONFIG.num_decoder_layers
    n, layer = np.arange(queries)[:, None, None], np.arange(L)[None, :, None]
    lens_ranks = (np.arange(len(LENS_SITES))[None, None, :] + 1) * 100 + layer * 10 + n * n  # [N, L, 5]
    contributions = (np.arange(len(FUNCS))[None, None, :, None] * 1000 + np.arange(len(PARTS)) * 100
                     + layer[..., None] * 10 + n[..., None]).astype(np.float32)               # [N, L, 3, 5]
    residual = SimpleNamespace(contributions=contributions, lens_ranks=lens_ranks)
    target_logits = np.arange(1 + 3 * L)[:, None] * 0.5 + np.arange(queries)[None, :] * np.arange(1 + 3 * L)[:, None]
    monkeypatch.setattr(module, "run_residual_rank", lambda *args, **kw: residual)
    monkeypatch.setattr(module, "run_sweep", lambda *args, **kw: SimpleNamespace(target_logits=target_logits))
    values, names = stage_features(CONFIG, None, np.zeros((queries, 4), np.int32), np.ones((queries, 4), np.int32),
                                   np.zeros(queries, np.int32))
    post = [name for name, _ in LENS_SITES].index("resid_post")
    expected_lens = [np.mean(np.log1p([(post + 1) * 100 + l * 10 + q * q for q in range(queries)])) for l in range(L)]
    np.testing.assert_allclose(values[:, names.index("lens_log1p_rank")], expected_lens, rtol=1e-12)
    for c, component in enumerate(("attn", "cross_attn", "mlp")):  # ratio = FUNCS[0]; PARTS in this order
        np.testing.assert_allclose(values[:, names.index(f"ratio_{component}")], c * 100 + np.arange(L) * 10 + 1.0)
        rows = 1 + c * L + np.arange(L)  # the sweep's configs: clean, then component-major, layer-minor
        drops = (target_logits[0][None, :] - target_logits[rows]).mean(axis=1)
        np.testing.assert_allclose(values[:, names.index(f"zero_drop_{component}")], drops)


# --------------------------------------------------------------------------------------------------
# Features from a model
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return gj.init_params(CONFIG, 0)


@pytest.fixture(scope="module")
def queries(model):
    ids, mask, _ = padded_batch(CONFIG.vocab_size, [7, 3, 11, 5, 9], seed=4)
    logits = np.asarray(gj.forward(CONFIG, model, ids, mask, np.zeros((len(ids), 1), np.int32)))[:, 0]
    targets = logits.argmax(-1).astype(np.int32)  # rank 0 at the model's output
    targets[1] = np.argsort(-logits[1])[3]         # one query whose target is not on top
    return ids, mask, targets


@pytest.fixture(scope="module")
def features(model, queries):
    ids, mask, targets = queries
    return stage_features(CONFIG, model, ids, mask, targets, batch_size=2)


def _target_logits(params, ids, mask, targets, interventions=None):
    logits = np.asarray(gj.forward(CONFIG, params, ids, mask, np.zeros((len(ids), 1), np.int32),
                                   interventions=interventions), dtype=np.float64)[:, 0]
    return logits[np.arange(len(ids)), targets]


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_stage_features_shapes_and_values(model, queries, features):
    values, names = features
    ids, mask, targets = queries
    L = CONFIG.num_decoder_layers
    assert names == list(FEATURE_NAMES) and len(names) == 7
    assert values.shape == (L, 7) and values.dtype == np.float64
    assert np.all(np.isfinite(values))
    # ratios: ||c_out|| / ||resid_post - resid_pre|| from a cached forward, averaged over queries
    _, cache = gj.forward_with_cache(CONFIG, model, ids, mask, np.zeros((len(ids), 1), np.int32),
                                     cache_sites=["decoder.*.hook_resid_pre", "decoder.*.hook_resid_post",
                                                  "decoder.*.hook_attn_out", "decoder.*.hook_cross_attn_out",
                                                  "decoder.*.hook_mlp_out"])
    for layer in range(L):
        get = {site: np.asarray(cache[f"decoder.{layer}.hook_{site}"], np.float64)[:, 0]
               for site in ("resid_pre", "resid_post", "attn_out", "cross_attn_out", "mlp_out")}
        delta = np.linalg.norm(get["resid_post"] - get["resid_pre"], axis=-1)
        for column, site in enumerate(("attn_out", "cross_attn_out", "mlp_out")):
            expected = np.mean(np.linalg.norm(get[site], axis=-1) / delta)
            assert values[layer, column] == pytest.approx(expected, rel=1e-4)
    # the last layer's logit lens is the model's output: ranks 0 except query 1 (rank 3)
    assert values[-1, names.index("lens_log1p_rank")] == pytest.approx(np.log1p(3) / len(ids), rel=1e-6)
    assert np.all(values[:, names.index("lens_log1p_rank")] >= 0)


@pytest.mark.parametrize("component,site,layer", [("mlp", "hook_mlp_out", 2), ("cross_attn", "hook_cross_attn_out", 5),
                                                  ("attn", "hook_attn_out", 0)])
def test_zero_ablation_effect_equals_direct_forward(model, queries, features, component, site, layer):
    values, names = features
    ids, mask, targets = queries
    clean = _target_logits(model, ids, mask, targets)
    ablated = _target_logits(model, ids, mask, targets, ivs.zero_ablation(CONFIG, [f"decoder.{layer}.{site}"]))
    expected = float(np.mean(clean - ablated))
    assert values[layer, names.index(f"zero_drop_{component}")] == pytest.approx(expected, abs=1e-4, rel=1e-4)


def test_auto_stages_deterministic_and_json(model, queries, features):
    ids, mask, targets = queries
    first = auto_stages(CONFIG, model, ids, mask, targets, k=3, batch_size=3)
    second = auto_stages(CONFIG, model, ids, mask, targets, k=3)
    assert isinstance(first, AutoStages)
    assert first.stages == second.stages
    assert [l for stage in first.stages for l in stage] == list(range(CONFIG.num_decoder_layers))
    assert len(first.stages) == 3 and all(first.stages)
    np.testing.assert_allclose(first.features, features[0], rtol=1e-5, atol=1e-6)
    assert first.stages == segment_layers(standardize(first.features), 3)
    assert first.cost == pytest.approx(segment_cost(standardize(first.features), first.stages))
    payload = json.loads(json.dumps(first.as_json()))
    assert payload["method"] == "auto" and payload["k"] == 3 and payload["stages"] == first.stages
    assert parse_stages(payload["stages_text"], CONFIG.num_decoder_layers) == first.stages
    assert set(payload["features"]) == set(FEATURE_NAMES)
    assert all(len(v) == CONFIG.num_decoder_layers for v in payload["features"].values())
    with pytest.raises(GenIRError, match="1 <= k <= 6"):
        auto_stages(CONFIG, model, ids, mask, targets, k=7)


def test_resolve_stages_methods_and_defaults(model, queries):
    """--stages: auto (the fit on the fit half of the given queries, k chosen), thirds, paper, explicit; default
    paper at 24 decoder layers, auto otherwise. The record is what stages.json holds."""
    from argparse import Namespace

    from genir_jax.analysis.stage_patching import default_stages
    from genir_jax.analysis.stages import split_queries
    from genir_jax.cli.commands.common import resolve_stages

    ids, mask, targets = queries
    fit_rows, _ = split_queries(len(ids))
    expected = auto_stages(CONFIG, model, ids[fit_rows], mask[fit_rows], targets[fit_rows], k=None, batch_size=3)
    for spec in ("auto", None):
        stages, record = resolve_stages(Namespace(stages=spec, batch_size=3, no_progress=True), CONFIG, model,
                                        ids, mask, targets)
        assert stages == expected.stages and record["method"] == "auto" and record["stages"] == stages
        assert [layer for stage in stages for layer in stage] == list(range(CONFIG.num_decoder_layers))
        assert len(stages) == record["k"] == record["k_selection"]["chosen"] and 2 <= len(stages) <= 5
        assert all(stage == list(range(stage[0], stage[-1] + 1)) for stage in stages)
        assert record["split"]["fit_rows"] == fit_rows
        assert set(record["features"]) == set(FEATURE_NAMES) and record["num_decoder_layers"] == 6
        assert json.loads(json.dumps(record)) == record
    stages, record = resolve_stages(Namespace(stages="thirds"), CONFIG, None, None, None, None)
    assert stages == default_stages(6) == [[0, 1], [2, 3], [4, 5]]  # the old default for non-24-layer decoders
    assert record == {"method": "thirds", "stages": stages, "stages_text": "0-1,2-3,4-5", "num_decoder_layers": 6}
    stages, record = resolve_stages(Namespace(stages="0,1-4,5"), CONFIG, None, None, None, None)
    assert stages == [[0], [1, 2, 3, 4], [5]] and record["method"] == "explicit" and record["spec"] == "0,1-4,5"
    with pytest.raises(GenIRError, match="need a 24-layer decoder"):
        resolve_stages(Namespace(stages="paper"), CONFIG, None, None, None, None)
    deep = gj.t5_v1_0(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=24,
                             num_heads=4)
    paper = [list(range(0, 7)), list(range(7, 18)), list(range(18, 24))]
    for spec in (None, "paper"):
        stages, record = resolve_stages(Namespace(stages=spec), deep, None, None, None, None)
        assert stages == paper and record["method"] == "paper" and record["stages_text"] == "0-6,7-17,18-23"
    assert resolve_stages(Namespace(stages="thirds"), deep, None, None, None, None)[0] == \
        [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


def test_stage_features_names_its_progress_bar_after_itself(monkeypatch):
    """The residual pass inside patch-stages, crattn-writes, ... shows "auto stages: ...", not the bar of the
    residual-rank command."""
    import genir_jax.analysis.auto_stages as auto

    names = []

    class Stop(Exception):
        pass

    def residual_pass(*args, desc, **options):
        names.append(desc)
        raise Stop

    monkeypatch.setattr(auto, "run_residual_rank", residual_pass)
    with pytest.raises(Stop):
        stage_features(CONFIG, None, np.zeros((1, 2), np.int32), np.ones((1, 2), np.int32), np.zeros(1, np.int32))
    assert names == ["auto stages: layer curves"]
