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

Non-finite logits never look good (`ahead_of_target`, the one rule every rank here and in
`genir_jax.interp.rank_window` uses): a NaN logit of another token counts as ahead of the target, and a NaN
target logit has every other token ahead (rank V - 1; for ``docid_rank`` every other candidate), so a model
that computes NaN ranks worst, not first. Infinities compare as numbers (+inf ties +inf: lower id first).

Two ways to compute them: `target_metrics` from materialised logits ``[B, V]``, and
`streamed_target_metrics` from the final hidden state and the unembedding table, in vocabulary blocks:
it never holds ``[B, V]`` logits, and ranking costs little more than the unembedding matmul itself (the
sweep engine uses it; at K configs x B queries x 32k tokens the materialised logits and their comparison
took half a neuron sweep's time). Each metric says what it is made of in `Metric.from_stats`. The target
logit is a dot product there, so it may differ from the matmul's value in the last bits; logits within
`TIE_TOLERANCE` of the target's count as ties (lower token id first, the reference's rule). Ranks agree with
`target_metrics` except at such float near-ties (tests/interp/test_metrics.py checks every disagreement is one).
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
    # streamed form: the statistics it needs (`STREAM_STATS`) and how it is made of them
    stats: tuple[str, ...] = ()
    from_stats: Callable | None = None  # ({statistic: [B]}) -> [B]


def _rank(logits, targets, target_logit, candidates, foils):
    return ranks_of_targets(logits, targets)[0]


def _docid_rank(logits, targets, target_logit, candidates, foils):
    import jax.numpy as jnp

    before = ahead_of_target(logits[:, candidates], candidates[None, :], target_logit[:, None], targets[:, None])
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
    Metric("rank", _rank, is_rank=True, stats=("rank",), from_stats=lambda s: s["rank"]),
    Metric("docid_rank", _docid_rank, is_rank=True, needs=("candidates",), stats=("docid_rank",),
           from_stats=lambda s: s["docid_rank"]),
    Metric("logit", _logit, differentiable=True, stats=("logit",), from_stats=lambda s: s["logit"]),
    Metric("logprob", _logprob, differentiable=True, stats=("logit", "logsumexp"),
           from_stats=lambda s: s["logit"] - s["logsumexp"]),
    Metric("logit_diff", _logit_diff, differentiable=True, needs=("foils",), stats=("logit", "foil_logit"),
           from_stats=lambda s: s["logit"] - s["foil_logit"]),
)}
METRICS = tuple(METRIC_TABLE)
RANK_METRICS = tuple(m for m in METRICS if METRIC_TABLE[m].is_rank)
DIFFERENTIABLE_METRICS = tuple(m for m in METRICS if METRIC_TABLE[m].differentiable)
THRESHOLDS = (0, 5, 10, 100)
# Multi-token (naive / semantic docid) targets, teacher-forced: the metrics a sweep computes at every step,
# and how it reduces them per query. ``rank``: the worst step's rank (0 iff greedy decoding reproduces the
# whole docid); ``logprob``: the sequence's log-probability (sum over its steps). The others have no
# agreed sequence form (docid ranks and foils are single-token notions) and are refused for sequences.
STEP_REDUCTIONS = {"rank": "max", "logprob": "sum"}


def reduce_steps(metric: str, values, mask):
    """Per-query value [B] of a metric's per-step values [B, T] over the real steps (`mask` [B, T] > 0)."""
    import jax.numpy as jnp

    real = jnp.asarray(mask) > 0
    if STEP_REDUCTIONS[metric] == "max":
        return jnp.max(jnp.where(real, values, 0), axis=-1)
    return jnp.sum(jnp.where(real, values, 0), axis=-1)


def tie_tolerance(target_logit, relative: float = 0.0):
    """Absolute tie tolerance ``relative * max(|target_logit|, 1)``; finite even for a non-finite target logit
    (an infinite tolerance would make every token a tie)."""
    import jax.numpy as jnp

    size = jnp.where(jnp.isfinite(target_logit), jnp.abs(target_logit), 1.0)
    return relative * jnp.maximum(size, 1.0)


def ahead_of_target(logits, tokens, target_logit, targets, tolerance=0.0):
    """Which tokens rank before the target (broadcasting; `tolerance` absolute, see `tie_tolerance`).

    Ahead: a logit above the target's by more than `tolerance`, or within it (or equal) with a lower token id
    (the reference's stable sort), or NaN; every token when the target's own logit is NaN. Never the target.
    """
    import jax.numpy as jnp

    gap = logits - target_logit
    tie = (logits == target_logit) | (jnp.abs(gap) <= tolerance)
    ahead = (gap > tolerance) | (tie & (tokens < targets)) | jnp.isnan(logits) | jnp.isnan(target_logit)
    return ahead & (tokens != targets)


def ranks_of_targets(logits, targets):
    """Rank (tokens scoring higher, plus equal-scoring tokens with a lower id) and logit of each target.

    logits [..., V], targets [...]. Equals the position in a stable descending sort; NaN logits rank as
    `ahead_of_target` says (a NaN target: V - 1).
    """
    import jax.numpy as jnp

    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    token = jnp.arange(logits.shape[-1]).reshape((1,) * (logits.ndim - 1) + (-1,))
    before = ahead_of_target(logits, token, target_logit, targets[..., None])
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


VOCAB_BLOCK = 2048  # tokens per unembedding block: [rows, 2048] float32 logits stay small, the matmul stays big
STREAM_STATS = ("logit", "rank", "docid_rank", "logsumexp", "foil_logit")
TIE_TOLERANCE = 1e-6  # relative: a few float32 roundings of a logit


def streamed_target_metrics(hidden, table, targets, metrics: Sequence[str], *, candidates=None, foils=None,
                            top_k: int = 0, block: int = VOCAB_BLOCK) -> dict:
    """`target_metrics` of the logits ``hidden @ table.T`` without materialising them (traceable).

    hidden [B, D] (the final decoder state, already scaled as the unembedding scales it), table [V, D] (the
    unembedding's rows: the tied embedding, or the transposed `lm_head`). One `lax.scan` over vocabulary
    blocks of `block` tokens accumulates what the metrics need: the count of tokens ranked before the
    target (reference tie rule), an online log-sum-exp, and the running top-k. The target's and the foil's
    logits are dot products; docid ranks and docid top-k use the candidates' rows only. Logits are float32
    whatever the table's dtype.
    """
    import jax
    import jax.numpy as jnp

    wanted = {stat for name in metrics for stat in METRIC_TABLE[name].stats}
    vocab, width = table.shape
    f32 = jnp.float32

    def logits_of(rows):
        return jnp.einsum("bd,vd->bv", hidden, rows.astype(hidden.dtype)).astype(f32)

    stats = {"logit": jnp.einsum("bd,bd->b", hidden, table[targets].astype(hidden.dtype)).astype(f32)}
    target_logit = stats["logit"][:, None]

    # The dot product and the block matmul may round the same logit differently, so logits within
    # `TIE_TOLERANCE` (relative) of the target's count as ties, which go to the lower token id as in the
    # reference's stable sort; an exact tie (two equal unembedding rows) is thus ranked as the reference ranks it.
    tolerance = tie_tolerance(target_logit, TIE_TOLERANCE)

    def before_target(logits, token):
        return ahead_of_target(logits, token, target_logit, targets[:, None], tolerance)

    streamed_top = top_k and candidates is None
    if {"rank", "logsumexp"} & wanted or streamed_top:
        blocks = -(-vocab // block)
        padded = jnp.pad(table, ((0, blocks * block - vocab), (0, 0))).reshape(blocks, block, width)
        rows = hidden.shape[0]

        def step(carry, xs):
            rows_block, offset = xs
            logits = logits_of(rows_block)
            token = offset + jnp.arange(block, dtype=jnp.int32)[None, :]
            valid = token < vocab
            out = dict(carry)
            if "rank" in wanted:
                # float32 sums of 0/1 are exact below 2**24 tokens and vectorise better than int32 sums
                out["rank"] = carry["rank"] + jnp.sum((before_target(logits, token) & valid).astype(f32), axis=-1)
            if "logsumexp" in wanted:
                masked = jnp.where(valid, logits, -jnp.inf)
                peak = jnp.maximum(carry["peak"], jnp.max(masked, axis=-1))
                out["peak"] = peak
                out["sumexp"] = carry["sumexp"] * jnp.exp(carry["peak"] - peak) + jnp.sum(
                    jnp.exp(masked - peak[:, None]), axis=-1)
            if streamed_top:
                values = jnp.concatenate([carry["top_logits"], jnp.where(valid, logits, -jnp.inf)], axis=-1)
                ids = jnp.concatenate([carry["top_ids"], jnp.broadcast_to(token, logits.shape)], axis=-1)
                best, where = jax.lax.top_k(values, top_k)
                out["top_logits"], out["top_ids"] = best, jnp.take_along_axis(ids, where, axis=-1)
            return out, None

        init = {}
        if "rank" in wanted:
            init["rank"] = jnp.zeros((rows,), f32)
        if "logsumexp" in wanted:
            init["peak"] = jnp.full((rows,), -jnp.inf, f32)
            init["sumexp"] = jnp.zeros((rows,), f32)
        if streamed_top:
            init["top_logits"] = jnp.full((rows, top_k), -jnp.inf, f32)
            init["top_ids"] = jnp.zeros((rows, top_k), jnp.int32)
        offsets = jnp.arange(blocks, dtype=jnp.int32) * block
        final, _ = jax.lax.scan(step, init, (padded, offsets))
        if "rank" in wanted:
            stats["rank"] = final["rank"].astype(jnp.int32)
        if "logsumexp" in wanted:
            stats["logsumexp"] = final["peak"] + jnp.log(final["sumexp"])
    if "docid_rank" in wanted or (top_k and candidates is not None):
        candidate_logits = logits_of(table[candidates])
        if "docid_rank" in wanted:
            stats["docid_rank"] = jnp.sum(before_target(candidate_logits, candidates[None, :]), axis=-1,
                                          dtype=jnp.int32)
    if "foil_logit" in wanted:
        stats["foil_logit"] = jnp.einsum("bd,bd->b", hidden, table[foils].astype(hidden.dtype)).astype(f32)
    out = {name: METRIC_TABLE[name].from_stats(stats) for name in metrics}
    if top_k:
        if candidates is None:
            out["top"] = (final["top_ids"], final["top_logits"])
        else:
            top_logits, top_ids = jax.lax.top_k(candidate_logits, top_k)
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
