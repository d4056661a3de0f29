"""How well attribution estimates (AtP, AtP*) agree with exact patching, with intervals over queries.

For every unit family (decoder self- and cross-attention heads at ``hook_z``, the MLP neurons of every decoder
layer, decoder layer x component) and ablation mode (zero; mean: the unit's mean activation over the same
queries, one set of means shared by both methods through the sweep), the exact sweep
(`genir_jax.interp.patching.run_sweep`) and the attributions (`genir_jax.interp.attribution.attribute`) run on the
same queries and metric, the target docid's logit. Per (family, mode, method) it reports (printed with
timings by ``benchmarks/attribution_vs_exact.py``, shown by ``reproduce --attribution-agreement``):

- ``signed``: Spearman of the exact mean effect against the signed estimate (AtP; AtP*'s QK fix does not touch
  head outputs, neurons or component outputs, so its signed estimate is AtP's for these units),
- ``magnitude``: Spearman of |exact mean effect| against what the method ranks by (|AtP| for atp, the
  GradDrop magnitude for atp*),
- ``overlap``: the share of the exact top-k units (by |effect|) that the method's ranking also puts in its
  top-k (`top_k`: 10% of the units, at least 3 and at most 100),

each with a 95% percentile-bootstrap interval over queries (`genir_jax.analysis.evidence.bootstrap`: queries
resampled with replacement, both means and the statistic recomputed per resample; 10,000 resamples, seed 0),
and the verdict of `order_verdict` on the signed Spearman's interval.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Sequence

import numpy as np

from genir_jax.analysis.evidence import Claim, Interval, bootstrap, verdict
from genir_jax.base.errors import GenIRError
from genir_jax.core.sites import ALL_LAYERS, site_name
from genir_jax.interp.attribution import METHODS, MIN_SPEARMAN, spearman_rows, top_overlap_rows
from genir_jax.interp.interventions import ABLATION_MODES

FAMILIES = ("cross-attention heads", "self-attention heads", "neurons", "layer x component")
_FAMILY_SITES = {"cross-attention heads": (site_name("decoder", "cross_attn.hook_z", ALL_LAYERS), "head"),
                 "self-attention heads": (site_name("decoder", "attn.hook_z", ALL_LAYERS), "head"),
                 "neurons": (site_name("decoder", "mlp.hook_post", ALL_LAYERS), "neuron")}
MODES = ABLATION_MODES[:2]  # zero and mean: the modes both exact patching and attribution take
METRIC = "logit"
TOP_SHARE, TOP_MIN, TOP_MAX = 0.1, 3, 100
MAX_WIDTH = 0.5   # a Spearman interval wider than this decides nothing (`order_verdict`)
ORDER_CLAIM = Claim(threshold=MIN_SPEARMAN, side="above", max_width=MAX_WIDTH)
ORDER_RULE = (f"holds when the interval lies wholly above {MIN_SPEARMAN}, undetermined when it is wider than "
              f"{MAX_WIDTH}, lies beside its own estimate (a rank correlation of resampled means is biased low) or "
              "there is none, does not hold otherwise")
AGREEMENT_JSON = "agreement.json"
_CHUNK_ELEMENTS = 1 << 23  # resampled means computed this many [resample, unit] entries at a time


def top_k(items: int) -> int:
    """The k of the top-k overlap for a family of `items` units: 10% of them, at least 3, at most 100 (never
    more than there are)."""
    return min(items, max(TOP_MIN, min(TOP_MAX, math.ceil(items * TOP_SHARE))))


def family_grid(config, family: str, value=0.0):
    """The sweep of one unit family, every unit patched to `value` (0.0, or means ``{site: mean}``)."""
    from genir_jax.interp import sweep as sw

    if family == "layer x component":
        return sw.component_grid(config, value=value)
    if family not in _FAMILY_SITES:
        raise GenIRError(f"unknown unit family {family!r}; expected one of {', '.join(FAMILIES)}")
    pattern, unit = _FAMILY_SITES[family]
    return sw.site_grid(config, pattern, unit=unit, value=value)


def order_verdict(signed: Interval) -> str:
    """Does the method order the units as exact patching does? `genir_jax.analysis.evidence.verdict` of the signed
    Spearman's interval against `ORDER_CLAIM` (`ORDER_RULE`: above `MIN_SPEARMAN`, the threshold below which
    `genir-jax attribute --check-exact` warns, decided only by intervals at most `MAX_WIDTH` wide)."""
    return verdict(signed, ORDER_CLAIM)


@dataclasses.dataclass(frozen=True)
class AgreementRow:
    """One (family, mode, method): its unit count, k and the three statistics with their intervals."""

    family: str
    mode: str
    method: str
    items: int
    top_k: int
    signed: Interval
    magnitude: Interval
    overlap: Interval
    seconds: dict = dataclasses.field(default_factory=dict)  # exact sweep and attribution wall times

    @property
    def queries(self) -> int:
        return self.signed.queries

    @property
    def verdict(self) -> str:
        return order_verdict(self.signed)

    def record(self) -> dict:
        return {"family": self.family, "mode": self.mode, "method": self.method, "items": self.items,
                "queries": self.queries, "top_k": self.top_k, "signed": self.signed.record(),
                "magnitude": self.magnitude.record(), "overlap": self.overlap.record(), "verdict": self.verdict,
                "seconds": self.seconds}

    @classmethod
    def from_record(cls, record: dict) -> "AgreementRow":
        interval = Interval.from_record
        return cls(record["family"], record["mode"], record["method"], record["items"], record["top_k"],
                   interval(record["signed"]), interval(record["magnitude"]), interval(record["overlap"]),
                   record.get("seconds", {}))


def _resampled_means(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per resample (a row of query indices [R, N]) the mean of each unit's per-query `values` [K, N]: [R, K]."""
    count = values.shape[1]
    counts = np.bincount((np.arange(len(rows))[:, None] * count + rows).ravel(),
                         minlength=len(rows) * count).reshape(len(rows), count)
    return counts @ values.T / count


def agreement_intervals(exact: np.ndarray, signed: np.ndarray, magnitude: np.ndarray | None, k: int,
                        **options) -> tuple[Interval, Interval, Interval]:
    """The signed Spearman, the magnitude Spearman and the top-`k` overlap of per-query exact effects `exact`
    [K, N] and estimates `signed` [K, N] (`magnitude` [K, N]: per-query GradDrop magnitudes, or None to rank by
    |mean signed estimate|), each with its bootstrap interval over the N queries: every resample draws queries
    (`genir_jax.analysis.evidence.bootstrap` of the query indices, `options` its level, resamples and seed) and
    recomputes the means over them and the statistic."""
    exact, signed = np.asarray(exact, np.float64), np.asarray(signed, np.float64)
    if exact.ndim != 2 or exact.shape != signed.shape or (magnitude is not None and np.shape(magnitude) != exact.shape):
        raise GenIRError(f"agreement: exact effects {exact.shape} and estimates {signed.shape} must both be "
                         "[units, queries]")
    if exact.shape[0] < 2:
        raise GenIRError(f"agreement: {exact.shape[0]} unit(s); a rank correlation needs at least two")
    stacked = np.stack([exact, signed] + ([] if magnitude is None else [np.asarray(magnitude, np.float64)]))
    step = max(1, _CHUNK_ELEMENTS // exact.shape[0])
    computed: dict[bytes, np.ndarray] = {}  # the three statistics [R, 3] of each set of resamples, made once

    def statistic(column: int):
        def compute(indices, axis=-1):
            rows = np.atleast_2d(np.asarray(indices)).astype(np.int64)
            key = rows.tobytes()
            if key not in computed:  # the three bootstrap calls draw the same resamples (same seed and size)
                computed[key] = np.concatenate([_statistics(stacked, rows[at:at + step], k)
                                                for at in range(0, len(rows), step)])
            values = computed[key][:, column]
            return values if np.ndim(indices) > 1 else values[0]
        return compute

    return tuple(bootstrap(np.arange(exact.shape[1]), statistic(column), **options) for column in range(3))


def _statistics(stacked: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """Per resample (`rows` [R, N] query indices) the signed Spearman, the magnitude Spearman and the top-`k`
    overlap of the resampled means of `stacked` (exact, signed[, magnitude]) [2 or 3, K, N]: [R, 3]."""
    means = [_resampled_means(values, rows) for values in stacked]
    effect = np.abs(means[0])
    ranking = np.abs(means[1]) if len(means) == 2 else means[2]
    return np.stack([spearman_rows(means[0], means[1]), spearman_rows(effect, ranking),
                     top_overlap_rows(effect, ranking, k)], axis=-1)


@dataclasses.dataclass(frozen=True)
class AttributionAgreement:
    """Every (family, mode, method) row of one model and query set."""

    rows: tuple[AgreementRow, ...]
    queries: int
    metric: str = METRIC

    def record(self) -> dict:
        return {"metric": self.metric, "queries": self.queries, "rows": [row.record() for row in self.rows]}

    @classmethod
    def from_record(cls, record: dict) -> "AttributionAgreement":
        return cls(tuple(AgreementRow.from_record(r) for r in record["rows"]), record["queries"], record["metric"])


def run_attribution_agreement(config, params, input_ids, attention_mask, target_ids, *,
                              families: Sequence[str] = FAMILIES, modes: Sequence[str] = MODES,
                              methods: Sequence[str] = METHODS, query_chunk: int | None = None,
                              progress: bool = True, **options) -> AttributionAgreement:
    """Exact patching and each attribution method on the same queries (single-token docids `target_ids` [N])
    for every family and mode; see the module docstring. Mean ablation: each swept site's mean over these
    queries (`genir_jax.interp.interventions.mean_activations`), the same values in the exact sweep and in the
    estimate ((mean - activation) . gradient). `options`: the bootstrap's level, resamples and seed."""
    from genir_jax.interp.attribution import attribute
    from genir_jax.interp.interventions import mean_activations
    from genir_jax.interp.patching import run_sweep
    from genir_jax.interp.site_grammar import swept_sites

    unknown = [m for m in modes if m not in MODES] + [m for m in methods if m not in METHODS]
    if unknown:
        raise GenIRError(f"attribution agreement: unknown mode or method {unknown[0]!r}; modes are "
                         f"{', '.join(MODES)}, methods {', '.join(METHODS)}")
    target_ids = np.asarray(target_ids, np.int32)
    if target_ids.ndim != 1:
        raise GenIRError("attribution agreement: single-token docids only (target_ids [N]); the logit metric "
                         "has no sequence form")
    zero_grids = {family: family_grid(config, family) for family in families}
    rows = []
    for mode in modes:
        value = 0.0
        if mode == "mean":
            sites = list(dict.fromkeys(s for grid in zero_grids.values() for s in swept_sites(config, grid)))
            value = mean_activations(config, params, input_ids, attention_mask, sites, progress=progress)
        for family in families:
            grid = family_grid(config, family, value)
            started = time.perf_counter()
            exact = run_sweep(config, params, input_ids, attention_mask, target_ids, grid, metrics=(METRIC,),
                              top_k=0, hits=(), query_chunk=query_chunk, progress=progress,
                              desc=f"exact: {family}, {mode}")
            exact_seconds = time.perf_counter() - started
            effects = exact.values[METRIC] - exact.clean[METRIC][None]
            for method in methods:
                started = time.perf_counter()
                result = attribute(config, params, input_ids, attention_mask, target_ids, grid, method=method,
                                   metric=METRIC, query_chunk=query_chunk, progress=progress, per_query=True)
                seconds = {"exact": exact_seconds, method: time.perf_counter() - started}
                k = top_k(grid.size)
                rows.append(AgreementRow(family, mode, method, grid.size, k, *agreement_intervals(
                    effects, result.per_query, result.per_query_magnitudes, k, **options), seconds=seconds))
    return AttributionAgreement(tuple(rows), len(target_ids))


def write_attribution_agreement(directory, result: AttributionAgreement) -> pathlib.Path:
    """``agreement.json`` in `directory` (atomically)."""
    from genir_jax.base.io import write_json

    path = pathlib.Path(directory) / AGREEMENT_JSON
    write_json(path, result.record(), indent=2)
    return path


def read_attribution_agreement(directory) -> AttributionAgreement:
    """What `write_attribution_agreement` wrote."""
    import json

    return AttributionAgreement.from_record(json.loads((pathlib.Path(directory) / AGREEMENT_JSON).read_text()))
