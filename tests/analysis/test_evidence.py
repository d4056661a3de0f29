"""Bootstrap intervals against closed-form intervals on synthetic data, and verdicts by the stated rule."""

import math

import numpy as np
import pytest

from genir_jax.analysis.evidence import (BESIDE_MARK, DOES_NOT_HOLD, HOLDS, UNDETERMINED, Claim, Interval, bootstrap,
                                         ratio, share, verdict)
from genir_jax.base.errors import GenIRError


def test_mean_interval_matches_the_normal_interval():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=4000)
    interval = bootstrap(values, resamples=4000, seed=1)
    half = 1.959964 * values.std(ddof=1) / math.sqrt(len(values))
    assert interval.estimate == pytest.approx(values.mean())
    assert interval.low == pytest.approx(values.mean() - half, abs=0.1 * half)
    assert interval.high == pytest.approx(values.mean() + half, abs=0.1 * half)
    assert (interval.queries, interval.resamples, interval.seed, interval.level) == (4000, 4000, 1, 0.95)


def test_share_interval_matches_the_wilson_interval():
    flags = np.zeros(1000, bool)
    flags[:300] = True
    interval = share(flags, resamples=4000, seed=2)
    n, p, z = 1000, 0.3, 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert interval.estimate == pytest.approx(0.3)
    assert interval.low == pytest.approx(centre - half, abs=0.004)
    assert interval.high == pytest.approx(centre + half, abs=0.004)


def test_seeded_and_recorded():
    values = np.random.default_rng(3).random(50)
    assert bootstrap(values, seed=7) == bootstrap(values, seed=7)
    assert bootstrap(values, seed=7) != bootstrap(values, seed=8)
    record = bootstrap(values, np.median, seed=7, resamples=500).record()
    assert record["resamples"] == 500 and record["seed"] == 7 and record["queries"] == 50
    assert record["estimate"] == pytest.approx(np.median(values))
    import json

    interval = bootstrap(values, seed=7)
    assert interval.observations is not None  # kept in memory for pooling, not written
    assert Interval.from_record(json.loads(json.dumps(interval.record()))) == interval


def test_small_and_degenerate_samples():
    single = bootstrap([0.4])
    assert single.queries == 1 and math.isnan(single.low)
    assert "no interval" in single.format()
    constant = share([True] * 20)
    assert (constant.low, constant.high) == (1.0, 1.0)
    two_of_ten = share([True] * 2 + [False] * 8, seed=0)
    assert two_of_ten.low <= 0.1 and two_of_ten.high >= 0.4  # ten queries decide little
    with pytest.raises(GenIRError, match="no queries"):
        bootstrap([])
    with pytest.raises(GenIRError, match="finite"):
        bootstrap([1.0, float("nan")])


def test_verdict_rule():
    narrow = Interval(0.9, 0.85, 0.95, 200)
    assert verdict(narrow, Claim(paper=0.93)) == HOLDS
    assert verdict(narrow, Claim(paper=0.5)) == DOES_NOT_HOLD
    assert verdict(narrow, Claim(threshold=0.5, side="above")) == HOLDS
    assert verdict(narrow, Claim(threshold=0.9, side="above")) == DOES_NOT_HOLD   # straddles the threshold
    assert verdict(narrow, Claim(threshold=0.99, side="below")) == HOLDS
    wide = Interval(0.2, 0.025, 0.556, 10)
    assert verdict(wide, Claim(paper=0.3, max_width=0.3)) == UNDETERMINED
    assert verdict(Interval(0.5, math.nan, math.nan, 1), Claim(paper=0.5)) == UNDETERMINED
    # an interval beside its own estimate (a biased statistic under resampling) decides nothing, however narrow
    beside = Interval(0.49, 0.51, 0.63, 53)
    assert verdict(beside, Claim(threshold=0.5, side="above")) == UNDETERMINED
    assert verdict(beside, Claim(paper=0.55)) == UNDETERMINED
    assert verdict(Interval(0.3 + 1e-12, 0.1, 0.3, 40), Claim(paper=0.2)) == HOLDS  # float rounding is not "beside"
    assert narrow.scaled(100).format(unit="%") == "90.00 [85.00, 95.00]% (n=200)"
    # and no table shows such an interval unmarked
    assert beside.format() == "0.49 [0.51, 0.63]\u2020 (n=53)" and BESIDE_MARK == "\u2020"
    assert Interval(0.3 + 1e-12, 0.1, 0.3, 40).format() == "0.30 [0.10, 0.30] (n=40)"
    with pytest.raises(GenIRError):
        Claim()


def test_ratio_resamples_the_queries_in_pairs():
    rng = np.random.default_rng(5)
    before = rng.random(300)
    same = ratio(before, before)
    assert (same.estimate, same.low, same.high, same.queries) == (1.0, 1.0, 1.0, 300)  # pairs: every resample is 1
    after = 0.8 * before + 0.05 * rng.random(300)
    interval = ratio(after, before, seed=3)
    assert interval.estimate == pytest.approx(after.mean() / before.mean())
    assert interval.low < interval.estimate < interval.high and interval.width < 0.05
    assert ratio(after, before, seed=3) == interval and interval.seed == 3
    assert ratio([1.0, 0.0], [0.0, 0.0]) is None  # no ratio of a zero mean
    with pytest.raises(GenIRError, match="2 numerator values for 3"):
        ratio([1.0, 2.0], [1.0, 2.0, 3.0])


def test_interval_does_not_depend_on_the_order_of_the_queries():
    values = np.random.default_rng(4).random(40)
    assert bootstrap(values) == bootstrap(values[::-1]) == bootstrap(np.random.default_rng(5).permutation(values))


def test_pool_bootstraps_the_concatenated_observations_of_every_seed():
    """Pooling seeds: the statistic over every seed's per-query values concatenated, its interval the same
    percentile bootstrap (scipy, same resamples and seed) over the (seed, query) pairs; each seed's interval is
    left as it was."""
    from scipy.stats import bootstrap as scipy_bootstrap

    from genir_jax.analysis.evidence import pool

    rng = np.random.default_rng(11)
    per_seed = [rng.random(40) < 0.3, rng.random(60) < 0.6]
    intervals = [share(flags) for flags in per_seed]
    before = [interval.record() for interval in intervals]
    pooled = pool(intervals)
    observations = np.sort(np.concatenate(per_seed).astype(np.float64))
    expected = scipy_bootstrap((observations,), np.mean, n_resamples=10_000, confidence_level=0.95,
                               method="percentile", vectorized=True, rng=np.random.default_rng(0))
    assert pooled.estimate == pytest.approx((per_seed[0].sum() + per_seed[1].sum()) / 100)
    assert (pooled.low, pooled.high) == tuple(float(b) for b in expected.confidence_interval)
    assert pooled.queries == 100 and [interval.record() for interval in intervals] == before
    assert pooled.format(n="40+60").endswith("(n=40+60)")
    medians = pool([bootstrap(rng.random(30), np.median, seed=4), bootstrap(rng.random(30), np.median, seed=4)])
    assert medians.seed == 4 and medians.queries == 60
    paired = [ratio(rng.random(50) + 0.5, rng.random(50) + 1.0) for _ in range(2)]
    together = pool(paired)
    assert together.estimate == pytest.approx(
        np.concatenate([p.observations.arrays[0] for p in paired]).mean()
        / np.concatenate([p.observations.arrays[1] for p in paired]).mean())
    with pytest.raises(GenIRError, match="observations"):
        pool([intervals[0].scaled(100), intervals[1]])
    with pytest.raises(GenIRError, match="different helpers"):
        pool([intervals[0], paired[0]])
    assert "observations" not in intervals[0].record() and intervals[0] == Interval(*[
        intervals[0].record()[k] for k in ("estimate", "low", "high", "queries", "level", "resamples", "seed")])
