"""Automatic decoder stages: segment the decoder's layers into k contiguous stages from per-layer curves.

The paper (Sec. 5) reads three decoder stages (I = 0-6, II = 7-17, III = 18-23 of a 24-layer decoder) off
per-layer curves by eye; `default_stages` falls back to equal thirds for other depths. Here the stages
come from the model itself: per-layer features (`stage_features`: residual contribution ratios, the
target's logit-lens rank, single-component zero-ablation effects), z-scored per column
(`standardize`) so curves of different scale weigh equally, are fitted by a piecewise-constant function
with k pieces over the layers; the k pieces that minimise the total within-stage sum of squared deviations
are the stages (`segment_layers`, exact dynamic programming, O(k L^2) after O(L F) prefix sums).

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
from genir_jax.core.sites import COMPONENTS, component_site
from genir_jax.interp.sweep import Sweep, stack

# Feature columns of `stage_features`, in order.
FEATURE_NAMES = tuple([f"ratio_{c}" for c in COMPONENTS] + ["lens_log1p_rank"]
                      + [f"zero_drop_{c}" for c in COMPONENTS])
# Relative size below which a column's spread counts as constant (floating-point noise, not signal).
_CONSTANT_RTOL = 1e-12
# Relative tolerance under which two DP candidates count as tied (costs equal up to rounding).
_TIE_RTOL = 1e-9


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
    rows = [(c, layer) for c in COMPONENTS for layer in range(L)]
    configs = [{}] + [zero_ablation(config, [component_site("decoder", c, layer)]) for c, layer in rows]
    labels = [{"component": None, "layer": -1}] + [{"component": c, "layer": layer} for c, layer in rows]
    return stack(configs, labels=labels), rows


def stage_features(config: T5Config, params, input_ids, attention_mask, target_ids, *,
                   batch_size: int | None = None, progress: bool = False) -> tuple[np.ndarray, list[str]]:
    """Per-layer curves [L, F] averaged over the queries [N, S] with target token ids [N], and their names
    (`FEATURE_NAMES`):

    - ``ratio_{attn,cross_attn,mlp}``: ||component output|| / ||resid_post - resid_pre|| (paper Fig. 3),
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
    ratios = np.stack([residual.contributions[:, :, func, parts.index(c)] for c in COMPONENTS], axis=-1)
    lens_site = [name for name, _ in LENS_SITES].index("resid_post")
    lens = np.log1p(residual.lens_ranks[:, :, lens_site].astype(np.float64))

    interventions, rows = zero_ablation_configs(config)
    sweep = run_sweep(config, params, input_ids, attention_mask, target_ids, interventions,
                      query_chunk=batch_size, progress=progress, desc="auto stages: zero ablations")
    logits = np.asarray(sweep.target_logits, dtype=np.float64)       # [1 + 3L, N]
    drops = (logits[:1] - logits[1:]).mean(axis=1)                    # [3L], ordered as rows
    L = config.num_decoder_layers
    zero = drops.reshape(len(COMPONENTS), L).T                        # [L, 3]

    features = np.concatenate([ratios.astype(np.float64).mean(axis=0), lens.mean(axis=0)[:, None], zero], axis=1)
    return features, list(FEATURE_NAMES)


@dataclasses.dataclass(frozen=True)
class AutoStages:
    """Automatically found stages, the raw per-layer features they were fitted to and the fit's cost (on
    the standardized features)."""

    stages: list[list[int]]
    features: np.ndarray          # [L, F], raw (not standardized)
    feature_names: list[str]
    cost: float

    def as_json(self) -> dict:
        """A JSON-able description: method, k, stages (lists and ``"0-6,..."`` text), features per name."""
        return {
            "method": "auto",
            "k": len(self.stages),
            "stages": [[int(layer) for layer in stage] for stage in self.stages],
            "stages_text": describe_stages(self.stages),
            "features": {name: [float(v) for v in self.features[:, f]]
                         for f, name in enumerate(self.feature_names)},
            "cost": float(self.cost),
        }


def auto_stages(config: T5Config, params, input_ids, attention_mask, target_ids, k: int = 3,
                **kw) -> AutoStages:
    """k decoder stages for the model on these (usually correctly answered) queries: `stage_features`
    (keyword arguments go to it), standardized, segmented by `segment_layers`."""
    L = config.num_decoder_layers
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= L:
        raise GenIRError(f"cannot split the decoder's {L} layers into {k!r} non-empty stages; "
                         f"need an integer 1 <= k <= {L}")
    features, names = stage_features(config, params, input_ids, attention_mask, target_ids, **kw)
    z = standardize(features)
    stages = segment_layers(z, k)
    return AutoStages(stages=stages, features=features, feature_names=names, cost=segment_cost(z, stages))
