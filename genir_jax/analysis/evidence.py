"""Evidence, not anecdote: 95% bootstrap intervals over queries, and verdicts computed from them.

Every statistic the report gives about the paper (a share of queries, a mean or median rank) is a statistic
of per-query values; its uncertainty comes from which queries happened to be correct. `bootstrap` resamples
the queries with replacement (scipy's `scipy.stats.bootstrap`, percentile method, a seeded generator) and
returns an `Interval` that records the query count, the confidence level, the number of resamples and the seed,
so a number in the report can always be traced to how its interval was made.

`pool` recomputes a statistic over the observations of several runs' intervals (e.g. one per training seed)
concatenated, resampling (run, query) pairs with the same helper, so pooled cells are made as every other cell is.

`verdict` turns an interval into "holds", "does not hold" or "undetermined" by one stated rule (`VERDICT_RULE`),
never by hand.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from genir_jax.base.errors import GenIRError

LEVEL = 0.95
RESAMPLES = 10_000
SEED = 0
HOLDS, DOES_NOT_HOLD, UNDETERMINED = "holds", "does not hold", "undetermined"
VERDICT_RULE = ("undetermined when the 95% interval is wider than the claim's stated width, or lies wholly beside "
                "its own estimate (the statistic is biased under resampling, so its interval cannot be trusted); "
                "otherwise holds when "
                "the interval contains the paper's value or lies wholly on the claim's side of its threshold, "
                "and does not hold when it does neither")


@dataclasses.dataclass(frozen=True)
class Observations:
    """What an interval was computed from: its helper (`bootstrap` or `ratio`), the per-query arrays it got and
    its options; `pool` recomputes the statistic from the observations of several intervals."""

    helper: str
    arrays: tuple
    statistic: Callable | None
    level: float
    resamples: int
    seed: int


BESIDE_MARK = "\u2020"  # a dagger after an interval's bracket: the interval lies wholly beside its own estimate
BESIDE_NOTE = (f"{BESIDE_MARK} after an interval: it does not contain its own estimate (the statistic is biased "
               "under resampling, which a percentile bootstrap does not correct); such an interval decides no claim.")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A statistic over `queries` per-query values and its bootstrap interval [low, high]."""

    estimate: float
    low: float
    high: float
    queries: int
    level: float = LEVEL
    resamples: int = RESAMPLES
    seed: int = SEED
    observations: Observations | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def width(self) -> float:
        return self.high - self.low

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def covers_estimate(self) -> bool:
        """Whether the interval holds its own estimate (up to float rounding of the two computations)."""
        slack = 1e-9 * max(1.0, abs(self.estimate))
        return self.low - slack <= self.estimate <= self.high + slack

    def scaled(self, factor: float) -> "Interval":
        """The same interval in other units (e.g. ``100`` for a share as a percentage); its observations are
        left behind (they are in the original units, which `pool` needs)."""
        return dataclasses.replace(self, estimate=self.estimate * factor, low=self.low * factor,
                                   high=self.high * factor, observations=None)

    def format(self, digits: int = 2, unit: str = "", n: str | None = None) -> str:
        """``"12.34 [10.01, 14.90]% (n=200)"``: the estimate, its interval and the query count (or `n`, e.g.
        ``"2x100"`` for a statistic pooled over seeds). An interval that does not hold its own estimate is marked
        `BESIDE_MARK` after the bracket (`BESIDE_NOTE` says what that means), so no table shows one unmarked."""
        n = self.queries if n is None else n
        if math.isnan(self.low):
            return f"{self.estimate:.{digits}f}{unit} (n={n}, no interval)"
        mark = "" if self.covers_estimate else BESIDE_MARK
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]{mark}{unit} (n={n})"

    def record(self) -> dict:
        """A JSON-ready record of the interval and how it was made (not its observations)."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                  if field.name != "observations"}
        return fields | {"method": "percentile bootstrap over queries"}

    @classmethod
    def from_record(cls, record: dict) -> "Interval":
        """The interval `record` wrote (without its observations)."""
        return cls(**{field.name: record[field.name] for field in dataclasses.fields(cls)
                      if field.name != "observations"})


def bootstrap(values: Sequence[float], statistic: Callable = np.mean, *, level: float = LEVEL,
              resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """`statistic` of the per-query `values` and its percentile-bootstrap interval (queries resampled with
    replacement, `resamples` times, from a generator seeded with `seed`). `statistic` takes an array and an
    ``axis`` keyword (numpy's mean, median, ...). The values are sorted first, so the interval does not depend on
    the queries' order. With fewer than two queries there is no interval (NaN bounds)."""
    from scipy.stats import bootstrap as scipy_bootstrap

    values = np.sort(np.asarray(values, dtype=np.float64).reshape(-1))  # the same interval in any query order
    _check(values, level, resamples)
    observed = Observations("bootstrap", (values,), statistic, level, resamples, seed)
    estimate = float(statistic(values, axis=-1))
    if len(values) < 2:
        return Interval(estimate, math.nan, math.nan, 1, level, resamples, seed, observed)
    if np.all(values == values[0]):  # every resample is the same: the interval is the point
        return Interval(estimate, estimate, estimate, len(values), level, resamples, seed, observed)
    result = scipy_bootstrap((values,), statistic, n_resamples=resamples, confidence_level=level,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return Interval(estimate, float(low), float(high), len(values), level, resamples, seed, observed)


def ratio(numerator: Sequence[float], denominator: Sequence[float], *, level: float = LEVEL,
          resamples: int = RESAMPLES, seed: int = SEED) -> Interval | None:
    """mean(`numerator`) / mean(`denominator`), two per-query values of the same queries (e.g. a metric with and
    without a patch), and its percentile-bootstrap interval with the queries resampled in pairs; None when the
    denominator's mean is 0 (no ratio). Resamples whose denominator's mean is 0 are left out of the interval."""
    numerator = np.asarray(numerator, dtype=np.float64).reshape(-1)
    denominator = np.asarray(denominator, dtype=np.float64).reshape(-1)
    if numerator.shape != denominator.shape:
        raise GenIRError(f"ratio: {numerator.size} numerator values for {denominator.size} denominator values")
    _check(numerator, level, resamples)
    _check(denominator, level, resamples)
    if denominator.mean() == 0:
        return None
    estimate = float(numerator.mean() / denominator.mean())
    observed = Observations("ratio", (numerator, denominator), None, level, resamples, seed)
    if len(numerator) < 2:
        return Interval(estimate, math.nan, math.nan, 1, level, resamples, seed, observed)
    rows = np.random.default_rng(seed).integers(0, len(numerator), size=(resamples, len(numerator)))
    over = denominator[rows].mean(axis=1)
    kept = over != 0
    values = numerator[rows].mean(axis=1)[kept] / over[kept]
    low, high = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return Interval(estimate, float(low), float(high), len(numerator), level, resamples, seed, observed)


def pool(intervals: Sequence[Interval]) -> Interval | None:
    """One statistic of several runs (e.g. one model per training seed), each given by its interval, recomputed
    over their per-query observations concatenated: the helper that made them (`bootstrap`, `share` or
    `ratio`), with the same options, resamples (run, query) pairs. None where `ratio` has no ratio. Refuses
    intervals without observations (scaled, or made by hand) or made by different helpers or options."""
    made = [interval.observations for interval in intervals]
    if not made or any(observed is None for observed in made):
        raise GenIRError("pool: every interval needs its observations (pool the unscaled intervals the helpers "
                         "return)")
    first = made[0]

    def how(observed: Observations) -> tuple:
        return (observed.helper, observed.statistic, observed.level, observed.resamples, observed.seed,
                len(observed.arrays))

    if any(how(observed) != how(first) for observed in made):
        raise GenIRError("pool: the intervals were made by different helpers or options")
    arrays = [np.concatenate([observed.arrays[k] for observed in made]) for k in range(len(first.arrays))]
    options = {"level": first.level, "resamples": first.resamples, "seed": first.seed}
    if first.helper == "ratio":
        return ratio(*arrays, **options)
    return bootstrap(arrays[0], first.statistic, **options)


def _check(values: np.ndarray, level: float, resamples: int) -> None:
    """Refuse what no interval can be made of: a bad level or resample count, no values, non-finite values."""
    if not 0 < level < 1:
        raise GenIRError(f"confidence level must be in (0, 1), got {level}")
    if resamples < 1:
        raise GenIRError(f"bootstrap resamples must be at least 1, got {resamples}")
    if len(values) == 0:
        raise GenIRError("a statistic over no queries")
    if not np.all(np.isfinite(values)):
        raise GenIRError("bootstrap: the per-query values are not all finite")


def share(flags: Sequence[bool], **options) -> Interval:
    """The share of queries for which `flags` is true (a fraction in [0, 1]) and its bootstrap interval."""
    return bootstrap(np.asarray(flags, dtype=bool).astype(np.float64), np.mean, **options)


@dataclasses.dataclass(frozen=True)
class Claim:
    """What the paper says of a statistic: its value, and/or a threshold and the side it lies on, and the widest
    interval that can decide it."""

    paper: float | None = None
    threshold: float | None = None
    side: str = "above"          # the claim: the statistic lies above (or below) `threshold`
    max_width: float = math.inf

    def __post_init__(self):
        if self.paper is None and self.threshold is None:
            raise GenIRError("a claim needs the paper's value or a threshold")
        if self.side not in ("above", "below"):
            raise GenIRError(f"a claim's side is 'above' or 'below', got {self.side!r}")


def verdict(interval: Interval, claim: Claim) -> str:
    """"holds", "does not hold" or "undetermined" for `interval` by `VERDICT_RULE`. An interval beside its own
    estimate happens to biased statistics (a rank correlation of resampled means: resampling adds noise to the
    means, which lowers the correlation of every resample), and decides nothing."""
    if math.isnan(interval.low) or interval.width > claim.max_width or not interval.covers_estimate:
        return UNDETERMINED
    if claim.paper is not None and interval.contains(claim.paper):
        return HOLDS
    if claim.threshold is not None:
        on_side = interval.low > claim.threshold if claim.side == "above" else interval.high < claim.threshold
        if on_side:
            return HOLDS
    return DOES_NOT_HOLD


def run_intervals(run_path, qrels) -> dict[str, Interval]:
    """Each retrieval metric of a TREC run file (`genir_jax.docids.retrieval.METRICS`) over the queries of
    `qrels` (a path or qrels), as `evaluate_run` averages it, with its bootstrap interval over those queries."""
    from genir_jax.data.corpus import read_qrels
    from genir_jax.docids.retrieval import METRICS, per_query_metrics, read_trec_run

    if not isinstance(qrels, dict):
        qrels = read_qrels(qrels)
    values = per_query_metrics(read_trec_run(run_path), qrels)
    return {metric: bootstrap([v[metric] for v in values.values()]) for metric in METRICS}
