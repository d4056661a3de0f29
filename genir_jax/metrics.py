"""What a sweep or an attribution measures about each query's target token: one table of metrics.

A metric is a function of the single decoder step's logits ``[B, V]`` (float32) and the target ids ``[B]``
(and, where it says so, the docid token ids or a foil token per query). Adding a metric is one entry in
`METRIC_TABLE`; the sweep engine, the attribution code, the command-line options and the aggregates
(`block_aggregates`) all read it from here. This module imports JAX only when a metric is computed, so
command-line parsing stays light.

- ``rank``: 0-based rank of the target in the full vocabulary, as the reference computes it
  (``argsort(argsort(-logits))``; ties broken by token id, lower first);
- ``docid_rank``: rank among the docid tokens (`candidates`), same tie rule;
- ``logit``: the target's logit; ``logprob``: its log-probability;
- ``logit_diff``: the target's logit minus the foil's (e.g. the runner-up docid).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    compute: Callable  # (logits, targets, target_logit, candidates, foils) -> [B]
    is_rank: bool = False            # integer ranks: thresholds and Hits@k apply
    differentiable: bool = False     # attribution patching can estimate it
    needs: tuple[str, ...] = ()      # "candidates" and/or "foils"


def _rank(logits, targets, target_logit, candidates, foils):
    return ranks_of_targets(logits, targets)[0]


def _docid_rank(logits, targets, target_logit, candidates, foils):
    import jax.numpy as jnp

    scores = logits[:, candidates]
    before = (scores > target_logit[:, None]) | ((scores == target_logit[:, None]) &
                                                (candidates[None, :] < targets[:, None]))
    return jnp.sum(before, axis=-1, dtype=jnp.int32)


def _logit(logits, targets, target_logit, candidates, foils):
    return target_logit


def _logprob(logits, targets, target_logit, candidates, foils):
    import jax

    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def _logit_diff(logits, targets, target_logit, candidates, foils):
    import jax.numpy as jnp

    return target_logit - jnp.take_along_axis(logits, foils[:, None], axis=-1)[:, 0]


METRIC_TABLE = {m.name: m for m in (
    Metric("rank", _rank, is_rank=True),
    Metric("docid_rank", _docid_rank, is_rank=True, needs=("candidates",)),
    Metric("logit", _logit, differentiable=True),
    Metric("logprob", _logprob, differentiable=True),
    Metric("logit_diff", _logit_diff, differentiable=True, needs=("foils",)),
)}
METRICS = tuple(METRIC_TABLE)
RANK_METRICS = tuple(m for m in METRICS if METRIC_TABLE[m].is_rank)
DIFFERENTIABLE_METRICS = tuple(m for m in METRICS if METRIC_TABLE[m].differentiable)
THRESHOLDS = (0, 5, 10, 100)


def ranks_of_targets(logits, targets):
    """Rank (tokens scoring higher, plus equal-scoring tokens with a lower id) and logit of each target.

    logits [..., V], targets [...]. Equals the position in a stable descending sort.
    """
    import jax.numpy as jnp

    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    token = jnp.arange(logits.shape[-1]).reshape((1,) * (logits.ndim - 1) + (-1,))
    before = (logits > target_logit) | ((logits == target_logit) & (token < targets[..., None]))
    return jnp.sum(before, axis=-1, dtype=jnp.int32), target_logit[..., 0]


def target_metrics(logits, targets, metrics: Sequence[str], *, candidates=None, foils=None, top_k: int = 0) -> dict:
    """The named metrics of each row of `logits` [B, V] (float32) for its target (traceable).

    ``top`` (when `top_k`) holds (ids, logits) of the k best tokens, among `candidates` if given (ids then
    index into `candidates`).
    """
    import jax
    import jax.numpy as jnp

    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    out = {name: METRIC_TABLE[name].compute(logits, targets, target_logit, candidates, foils) for name in metrics}
    if top_k:
        top_logits, top_ids = jax.lax.top_k(logits if candidates is None else logits[:, candidates], top_k)
        out["top"] = (top_ids.astype(jnp.int32), top_logits)
    return out


def block_aggregates(values: dict[str, np.ndarray], clean: dict[str, np.ndarray], metrics: Sequence[str],
                     hits: Sequence[int]) -> dict[str, np.ndarray]:
    """Sums over queries ([Kc] each) of a block's per-query values [Kc, n] against the clean values [n]:
    ``{m}`` and ``{m}_effect`` (value - clean) for every metric, ``{m}>t`` for rank metrics and thresholds
    `THRESHOLDS`, and ``hits@k`` (docid rank if computed, else the full rank, below k)."""
    out = {}
    for m in metrics:
        v = values[m].astype(np.float64)
        out[m] = v.sum(axis=1)
        out[f"{m}_effect"] = (v - clean[m][None].astype(np.float64)).sum(axis=1)
        if METRIC_TABLE[m].is_rank:
            for t in THRESHOLDS:
                out[f"{m}>{t}"] = (values[m] > t).sum(axis=1).astype(np.float64)
    rank_metric = "docid_rank" if "docid_rank" in metrics else ("rank" if "rank" in metrics else None)
    if rank_metric is not None:
        for k in hits:
            out[f"hits@{k}"] = (values[rank_metric] < k).sum(axis=1).astype(np.float64)
    return out
