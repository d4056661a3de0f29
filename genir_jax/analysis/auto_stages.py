"""Automatic decoder stages: segment the decoder's layers into k contiguous stages from per-layer curves.

The paper (Sec. 5) reads three decoder stages (I = 0-6, II = 7-17, III = 18-23 of a 24-layer decoder) off
per-layer curves by eye; `default_stages` falls back to equal thirds for other depths. Here the stages
come from the model itself: per-layer features (`stage_features`: residual contribution ratios, the
target's logit-lens rank, single-component zero-ablation effects), z-scored per column
(`standardize`) so curves of different scale weigh equally, are fitted by a piecewise-constant function
with k pieces over the layers; the k pieces that minimise the total within-stage sum of squared deviations
are the stages (`segment_layers`, exact dynamic programming, O(k L^2) after O(L F) prefix sums).

`fit_stages` works on per-query features [N, L, F]: it chooses k in 2..5 by a penalised cost of the
piecewise-constant fit (BIC with a doubled penalty, `choose_k`) and refits the boundaries on bootstrap
resamples of the queries (`bootstrap_stability`).
`genir_jax.analysis.stages.resolve_stages` calls it on one half of the correct queries only, so that the
tables report stage effects on queries the fit never saw.

`genir_jax.analysis.stage_patching.describe_stages` writes stages in the syntax `stage_patching.parse_stages` reads
(``"0-6,7-17,18-23"``).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from genir_jax.analysis.residual import FUNCS, LENS_SITES, PARTS, run_residual_rank
from genir_jax.analysis.stage_patching import describe_stages  # noqa: F401 (the one description of stages)
from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError
from genir_jax.interp.patching import run_sweep
from genir_jax.interp.interventions import zero_ablation
from genir_jax.core.sites import COMPONENTS, component_site, components, stacks
from genir_jax.interp.sweep import Sweep, stack

# Feature columns of `stage_features`, in order.
FEATURE_NAMES = tuple([f"ratio_{c}" for c in COMPONENTS] + ["lens_log1p_rank"]
                      + [f"zero_drop_{c}" for c in COMPONENTS])
# Relative size below which a column's spread counts as constant (floating-point noise, not signal).
_CONSTANT_RTOL = 1e-12
# Relative tolerance under which two DP candidates count as tied (costs equal up to rounding).
_TIE_RTOL = 1e-9
# The numbers of stages `choose_k` compares, and how.
K_RANGE = (2, 3, 4, 5)
CRITERION = ("penalised cost of the piecewise-constant fit to the standardized curves (BIC, penalty doubled): "
             "n ln(RSS_k / n) + 2 (k F + k - 1) ln n, n = layers x non-constant features F; least wins")
# Bootstrap resamples of the fit queries for the stability of the boundaries.
BOOTSTRAP_RESAMPLES = 100
# RSS below this share of the values counts as a perfect fit (keeps ln finite).
_RSS_FLOOR = 1e-12


def _check_features(features) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise GenIRError(f"stage features must be 2-D [layers, features], got shape {features.shape}")
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise GenIRError(f"stage features need at least one layer and one feature, got shape {features.shape}")
    if not np.all(np.isfinite(features)):
        rows = sorted({int(r) for r in np.argwhere(~np.isfinite(features))[:, 0]})
        raise GenIRError(f"stage features must be finite; layer(s) {rows} hold NaN or infinity")
    return features


def standardize(features) -> np.ndarray:
    """Z-score each column of [L, F] features (population std), so every curve weighs equally in the fit;
    constant columns (spread within rounding noise of their magnitude) become 0."""
    features = _check_features(features)
    mean = features.mean(axis=0)
    centered = features - mean[None, :]
    std = centered.std(axis=0)
    spread = np.ptp(features, axis=0)
    scale = np.maximum(np.abs(features).max(axis=0), 1.0)
    constant = spread <= _CONSTANT_RTOL * scale
    safe = np.where(constant, 1.0, std)
    return np.where(constant[None, :], 0.0, centered / safe[None, :])


def segment_cost(features, stages: Sequence[Sequence[int]]) -> float:
    """Total within-stage sum of squared deviations from each stage's mean feature vector (computed
    directly, without prefix sums)."""
    features = _check_features(features)
    total = 0.0
    for stage in stages:
        block = features[list(stage)]
        total += float(np.sum(np.square(block - block.mean(axis=0)[None, :])))
    return total


def segment_layers(features, k: int) -> list[list[int]]:
    """The partition of layers 0..L-1 of `features` [L, F] into k contiguous non-empty stages with the least
    total within-stage sum of squared deviations from the stage mean (exact optimal piecewise-constant fit).

    Dynamic programming over suffixes: ``best[m][i]`` is the least cost of layers i..L-1 in m stages; segment
    costs come from prefix sums of x and x^2 (columns centred first, for accuracy): O(L F) sums, O(L^2 F)
    segment costs, O(k L^2) recursion.

    Ties (costs equal up to a relative 1e-9, i.e. equal but for rounding) go to the partition whose stage
    ends, read from the first stage on, are lexicographically smallest: earlier stages end as early as
    possible. Callers usually pass `standardize(features)`.
    """
    features = _check_features(features)
    L = features.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise GenIRError(f"the number of stages must be an integer, got {k!r}")
    k = int(k)
    if not 1 <= k <= L:
        raise GenIRError(f"cannot split {L} layer(s) into {k} non-empty stages; need 1 <= k <= {L}")
    x = features - features.mean(axis=0)[None, :]
    zero = np.zeros((1, x.shape[1]))
    s1 = np.concatenate([zero, np.cumsum(x, axis=0)])            # [L+1, F]
    s2 = np.concatenate([zero, np.cumsum(np.square(x), axis=0)])

    # cost[i, j]: layers i..j-1 (j > i) as one stage.
    cost = np.full((L + 1, L + 1), np.inf)
    for i in range(L):
        j = np.arange(i + 1, L + 1)
        n = (j - i).astype(np.float64)
        s = s1[j] - s1[i][None, :]
        q = s2[j] - s2[i][None, :]
        cost[i, j] = np.maximum(np.sum(q - np.square(s) / n[:, None], axis=1), 0.0)
    tol = _TIE_RTOL * max(1.0, float(s2[L].sum()))

    best = np.full((k + 1, L + 1), np.inf)
    choice = np.zeros((k + 1, L + 1), dtype=np.int64)
    best[0, L] = 0.0
    for m in range(1, k + 1):
        # i..L-1 in m stages needs at least m layers; the first stage is i..j-1, leaving >= m-1 layers.
        for i in range(L - m, -1, -1):
            value, end = np.inf, -1
            for j in range(i + 1, L - m + 2):
                candidate = cost[i, j] + best[m - 1, j]
                if candidate < value - tol:  # ascending j: a later end must win by more than rounding
                    value, end = candidate, j
            best[m, i], choice[m, i] = value, end
    stages, start = [], 0
    for m in range(k, 0, -1):
        end = int(choice[m, start])
        stages.append(list(range(start, end)))
        start = end
    return stages


def zero_ablation_configs(config: T5Config) -> tuple[Sweep, list[tuple[str, int]]]:
    """A sweep zeroing one component's output in one decoder layer per config (`zero_ablation`), after a
    first config that patches nothing (the clean run). Returns the sweep (labelled component / layer; the
    clean config has component None, layer -1) and the (component, layer) of each config after the first."""
    L = config.num_decoder_layers
    rows = [(c, layer) for c in components(config) for layer in range(L)]
    configs = [{}] + [zero_ablation(config, [component_site(stacks(config)[-1], c, layer)]) for c, layer in rows]
    labels = [{"component": None, "layer": -1}] + [{"component": c, "layer": layer} for c, layer in rows]
    return stack(configs, labels=labels), rows


def stage_features(config: T5Config, params, input_ids, attention_mask, target_ids, *,
                   batch_size: int | None = None, progress: bool = False,
                   per_query: bool = False) -> tuple[np.ndarray, list[str]]:
    """Per-layer curves [L, F] averaged over the queries [N, S] with target token ids [N] (with `per_query`,
    each query's own curves [N, L, F], which `fit_stages` resamples), and their names (`FEATURE_NAMES`):

    - ``ratio_{attn,cross_attn,mlp}``: ||component output|| / ||resid_post - resid_pre|| (paper Fig. 3; a
      decoder-only model has no cross_attn columns, here and below),
    - ``lens_log1p_rank``: log(1 + rank of the target) in the logit lens of resid_post (Fig. 4),
    - ``zero_drop_{attn,cross_attn,mlp}``: clean target logit minus the target logit with that component's
      output zeroed in that layer alone (one `run_sweep` over 3 L + 1 configs).

    The first two come from `genir_jax.analysis.residual.run_residual_rank`. `batch_size`: queries per step
    (residual pass) and per device per step (sweep).
    """
    target_ids = np.asarray(target_ids, dtype=np.int32)
    # run_residual_rank also computes docid rank statistics, unused here: any mask with both kinds will do.
    is_docid = np.zeros(config.vocab_size, dtype=bool)
    is_docid[-1] = True
    residual = run_residual_rank(config, params, input_ids, attention_mask, target_ids, is_docid,
                                 batch_size=batch_size, progress=progress, desc="auto stages: layer curves")
    func = [name for name, _ in FUNCS].index("ratio")
    parts = [name for name, _, _ in PARTS]
    present = components(config)  # a decoder-only model's layers have no cross-attention: no such columns
    ratios = np.stack([residual.contributions[:, :, func, parts.index(c)] for c in present], axis=-1)
    lens_site = [name for name, _ in LENS_SITES].index("resid_post")
    lens = np.log1p(residual.lens_ranks[:, :, lens_site].astype(np.float64))

    interventions, rows = zero_ablation_configs(config)
    sweep = run_sweep(config, params, input_ids, attention_mask, target_ids, interventions,
                      query_chunk=batch_size, progress=progress, desc="auto stages: zero ablations")
    logits = np.asarray(sweep.target_logits, dtype=np.float64)       # [1 + 3L, N]
    drops = logits[:1] - logits[1:]                                   # [3L, N], ordered as rows
    L = config.num_decoder_layers
    zero = drops.reshape(len(present), L, -1).transpose(2, 1, 0)      # [N, L, components]

    features = np.concatenate([ratios.astype(np.float64), lens[:, :, None], zero], axis=2)  # [N, L, F]
    names = [f"ratio_{c}" for c in present] + ["lens_log1p_rank"] + [f"zero_drop_{c}" for c in present]
    return (features if per_query else features.mean(axis=0)), names


def stage_counts(num_layers: int, ks: Sequence[int] = K_RANGE) -> list[int]:
    """The numbers of stages `choose_k` compares for a decoder of `num_layers` layers: `ks` (2..5 by default)
    cut to 1..L (a 1-layer decoder has one stage)."""
    counts = [int(k) for k in ks if 1 <= int(k) <= num_layers]
    return counts or [min(num_layers, max(1, min(int(k) for k in ks)))]


def choose_k(z, ks: Sequence[int] = K_RANGE) -> tuple[int, dict]:
    """The number of stages for standardized per-layer features `z` [L, F], by a penalised segmentation cost:
    with n = L x F' values (F' the non-constant columns) and RSS_k the least within-stage sum of squares in k
    stages (`segment_layers`),

        C(k) = n ln(RSS_k / n) + 2 (k F' + k - 1) ln n     (k F' stage means, k - 1 boundaries),

    i.e. the Bayesian information criterion with its penalty doubled, because the boundaries are the best of
    many positions searched (plain BIC lets a split of pure noise through, as tests/analysis show). The least
    C(k) over `stage_counts(L, ks)` wins, ties to fewer stages: each extra stage must cut RSS by a factor
    exp(2 (F' + 1) ln(n) / n). Returns (k, record: criterion, chosen, values and stages per k)."""
    z = _check_features(z)
    L = z.shape[0]
    columns = int(np.sum(np.any(z != 0.0, axis=0)))
    n = L * columns
    values, fits = {}, {}
    for k in stage_counts(L, ks):
        stages = segment_layers(z, k)
        rss = segment_cost(z, stages)
        fits[k] = stages
        penalty = 2 * (k * columns + k - 1) * float(np.log(n)) if n else 0.0
        values[k] = 0.0 if n == 0 else n * float(np.log(max(rss, _RSS_FLOOR * n) / n)) + penalty
    chosen = min(values, key=lambda k: (values[k], k))
    record = {"criterion": CRITERION, "chosen": chosen,
              "values": {str(k): value for k, value in values.items()},
              "stages": {str(k): describe_stages(stages) for k, stages in fits.items()}}
    return chosen, record


def bootstrap_stability(per_query, stages: Sequence[Sequence[int]], *, resamples: int = BOOTSTRAP_RESAMPLES,
                        seed: int = 0, ks: Sequence[int] = K_RANGE) -> dict:
    """How stable `stages` are: the queries of `per_query` [N, L, F] resampled with replacement `resamples`
    times (seeded), each resample's mean curves standardized and segmented again into as many stages; for each
    boundary (the first layer of stage II, III, ...) the share of resamples that put it on the same layer and
    the distribution of where they put it; the share that reproduce every boundary; and the distribution of
    the k `choose_k` picks on the resamples."""
    per_query = np.asarray(per_query, dtype=np.float64)
    if per_query.ndim != 3 or per_query.shape[0] == 0:
        raise GenIRError(f"per-query stage features must be [queries, layers, features] with at least one query, "
                         f"got shape {per_query.shape}")
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 0:
        raise GenIRError(f"bootstrap resamples must be an integer >= 0, got {resamples!r}")
    starts = [int(stage[0]) for stage in stages[1:]]
    rng = np.random.default_rng(seed)
    found, picked = [], []
    for _ in range(int(resamples)):
        rows = rng.integers(0, per_query.shape[0], size=per_query.shape[0])
        z = standardize(per_query[rows].mean(axis=0))
        found.append([stage[0] for stage in segment_layers(z, len(stages))[1:]])
        picked.append(choose_k(z, ks)[0])
    found = np.asarray(found, dtype=np.int64).reshape(int(resamples), len(starts))
    share = (lambda hits: float(np.mean(hits)) if resamples else None)
    boundaries = []
    for i, start in enumerate(starts):
        layers, counts = np.unique(found[:, i], return_counts=True)
        boundaries.append({"first_layer_of_stage": i + 2, "layer": start, "agreement": share(found[:, i] == start),
                           "distribution": {str(int(l)): int(c) for l, c in zip(layers, counts)}})
    ks_found, k_counts = np.unique(np.asarray(picked, dtype=np.int64), return_counts=True)
    return {"resamples": int(resamples), "seed": int(seed), "resampled": "the fit queries, with replacement",
            "boundaries": boundaries, "all_boundaries_agree": share(np.all(found == np.asarray(starts), axis=1)),
            "k_distribution": {str(int(k)): int(c) for k, c in zip(ks_found, k_counts)}}


def fit_stages(per_query, feature_names: Sequence[str] = FEATURE_NAMES, *, k: int | None = None,
               ks: Sequence[int] = K_RANGE, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> "AutoStages":
    """Stages from per-query per-layer features [N, L, F]: the mean curves, standardized, segmented into `k`
    stages (None: `choose_k` over `ks`), and their `bootstrap_stability` over `resamples` resamples."""
    per_query = np.asarray(per_query, dtype=np.float64)
    if per_query.ndim != 3 or per_query.shape[0] == 0:
        raise GenIRError(f"per-query stage features must be [queries, layers, features] with at least one query, "
                         f"got shape {per_query.shape}")
    features = per_query.mean(axis=0)
    z = standardize(features)
    L = z.shape[0]
    chosen, selection = choose_k(z, ks)
    if k is None:
        k = chosen
    elif isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= L:
        raise GenIRError(f"cannot split the decoder's {L} layers into {k!r} non-empty stages; "
                         f"need an integer 1 <= k <= {L}")
    else:
        selection = {**selection, "fixed_k": int(k)}  # "chosen" stays what the criterion would pick
    stages = segment_layers(z, int(k))
    stability = bootstrap_stability(per_query, stages, resamples=resamples, seed=seed, ks=ks)
    return AutoStages(stages=stages, features=features, feature_names=list(feature_names),
                      cost=segment_cost(z, stages), k_selection=selection, stability=stability,
                      queries=int(per_query.shape[0]))


@dataclasses.dataclass(frozen=True)
class AutoStages:
    """Automatically found stages, the raw per-layer features they were fitted to, the fit's cost (on
    the standardized features), how k was chosen (`choose_k`), their bootstrap stability and the number of
    queries fitted."""

    stages: list[list[int]]
    features: np.ndarray          # [L, F], raw (not standardized)
    feature_names: list[str]
    cost: float
    k_selection: dict | None = None
    stability: dict | None = None
    queries: int | None = None

    def as_json(self) -> dict:
        """A JSON-able description: method, k, stages (lists and ``"0-6,..."`` text), features per name, cost,
        and the k selection and stability where computed."""
        out = {
            "method": "auto",
            "k": len(self.stages),
            "stages": [[int(layer) for layer in stage] for stage in self.stages],
            "stages_text": describe_stages(self.stages),
            "features": {name: [float(v) for v in self.features[:, f]]
                         for f, name in enumerate(self.feature_names)},
            "cost": float(self.cost),
        }
        for key in ("k_selection", "stability"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def auto_stages(config: T5Config, params, input_ids, attention_mask, target_ids, k: int | None = 3, *,
                resamples: int = 0, seed: int = 0, **kw) -> AutoStages:
    """Decoder stages for the model on these (usually correctly answered) queries: `stage_features` per query
    (keyword arguments go to it), then `fit_stages` (k stages; None: chosen by `choose_k`; `resamples`
    bootstrap resamples for the stability record)."""
    L = config.num_decoder_layers
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= L):
        raise GenIRError(f"cannot split the decoder's {L} layers into {k!r} non-empty stages; "
                         f"need an integer 1 <= k <= {L}")
    per_query, names = stage_features(config, params, input_ids, attention_mask, target_ids, per_query=True, **kw)
    return fit_stages(per_query, names, k=k, resamples=resamples, seed=seed)
