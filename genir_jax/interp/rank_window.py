"""Exact full-vocabulary ranks of many patched final states, computing few of their logits.

A sweep ranks each query's target among all V tokens for every config: a ``[rows, D] x [D, V]`` unembedding
that is most of a neuron sweep's work, although most configs move the final state only a little. Each
patched state ``h`` is the query's clean state ``h0`` plus ``delta``, so every token's patched logit lies
within ``|w_v| |delta| <= max_v |w_v| |delta|`` (the reach) of its clean logit. Per query, `clean_window`
keeps the `RANK_WINDOW` tokens around the target in the clean logits' descending order and the clean logits
just outside them. A row whose target logit stays further than its reach (plus a float margin) from both
edges has its rank decided outside the window: every token before the window still scores above the
target, every token after it below, so the rank is the count before the window plus an exact count among
the window's tokens (their logits computed, the same tie rule as `genir_jax.interp.metrics`). Rows the bound
cannot decide are ranked over the whole vocabulary (`streamed_target_metrics`): gathered into a small
block when they are few, all rows when they are many. The result is the streamed rank, exactly, up to
float near-ties as between any two ways of computing a logit (tests/interp/test_rank_window.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genir_jax.interp.metrics import TIE_TOLERANCE, ahead_of_target, streamed_target_metrics, tie_tolerance

RANK_WINDOW = 256  # tokens per query whose logits every config computes
FLOAT_MARGIN = 1e-5  # relative to the largest logit |w_v| (|h| + |h0|): float32 roundings of both ways (the
                     # error of a d-term dot product is about sqrt(d) * 6e-8 of it); float32 states only


def clean_window(hidden, table, targets, size: int = RANK_WINDOW) -> dict:
    """What `windowed_ranks` needs from each query's clean run (traceable).

    hidden [B, D]: the clean final states, scaled as the unembedding scales them; table [V, D]; targets [B].
    Returns the clean states, the `size` tokens around each target in descending clean-logit order
    (``tokens`` [B, W]), how many tokens precede them (``before``), the clean logits just above and just
    below them (``upper``, ``lower``; +-inf at the ends of the vocabulary), and the largest unembedding row
    norm max_v |w_v| (``row_norm``, the same for every query; kept per query like the rest)."""
    vocab = table.shape[0]
    size = min(size, vocab)
    logits = jnp.einsum("bd,vd->bv", hidden, table.astype(hidden.dtype)).astype(jnp.float32)
    order = jnp.argsort(-logits, axis=-1)
    ordered = jnp.take_along_axis(logits, order, axis=-1)
    position = jnp.argmax(order == targets[:, None], axis=-1)
    start = jnp.clip(position - size // 2, 0, vocab - size)
    tokens = jnp.take_along_axis(order, start[:, None] + jnp.arange(size)[None, :], axis=-1)

    def ordered_at(index):
        return jnp.take_along_axis(ordered, jnp.clip(index, 0, vocab - 1)[:, None], axis=-1)[:, 0]

    row_norm = jnp.sqrt(jnp.max(jnp.sum(jnp.square(table.astype(jnp.float32)), axis=-1)))
    return {"hidden": hidden.astype(jnp.float32), "tokens": tokens.astype(jnp.int32),
            "row_norm": jnp.full(targets.shape, row_norm),
            "before": start.astype(jnp.int32),
            "upper": jnp.where(start > 0, ordered_at(start - 1), jnp.inf),
            "lower": jnp.where(start + size < vocab, ordered_at(start + size), -jnp.inf)}


def windowed_ranks(hidden, table, targets, window: dict, *, capacity: int | None = None):
    """Full-vocabulary ranks [K, B] (int32) of the targets under K configs' final states hidden [K, B, D]
    (scaled as the unembedding scales them; float32: the margin is sized for float32 roundings), with
    `window` from `clean_window` for the B queries; which rows the bound decided ([K, B] bool); and how many
    rows were ranked over the whole vocabulary (0, `capacity` or K * B: the work done beyond the window).
    `capacity`: undecided rows ranked as a gathered block (default 1/16 of the rows, at least 64); beyond it
    every row is ranked over the whole vocabulary."""
    configs, rows, width = hidden.shape
    f32 = jnp.float32
    # the target's and the window's logits as `streamed_target_metrics` computes logits
    target_logit = jnp.einsum("kbd,bd->kb", hidden, table[targets].astype(hidden.dtype)).astype(f32)
    logits = jnp.einsum("kbd,bwd->kbw", hidden, table[window["tokens"]].astype(hidden.dtype)).astype(f32)
    h, clean = hidden.astype(f32), window["hidden"]
    reach_per_unit = window["row_norm"][None]  # max_v |w_v|
    reach = reach_per_unit * jnp.sqrt(jnp.sum(jnp.square(h - clean[None]), axis=-1))
    size = jnp.sqrt(jnp.sum(jnp.square(h), axis=-1)) + jnp.sqrt(jnp.sum(jnp.square(clean), axis=-1))[None]
    tolerance = tie_tolerance(target_logit, TIE_TOLERANCE)
    margin = reach + 2.0 * tolerance + FLOAT_MARGIN * reach_per_unit * (size + 1.0)
    # a NaN target logit (or margin) is never decided here: the streamed rank gives it the worst rank
    decided = (target_logit + margin < window["upper"][None]) & (target_logit - margin > window["lower"][None])

    tokens, wanted = window["tokens"][None], targets[None, :, None]
    ahead = ahead_of_target(logits, tokens, target_logit[..., None], wanted, tolerance[..., None])
    ranks = (window["before"][None] + jnp.sum(ahead, axis=-1, dtype=jnp.int32)).reshape(-1)

    flat_hidden = hidden.reshape(configs * rows, width)
    flat_targets = jnp.tile(targets, configs)
    undecided = ~decided.reshape(-1)
    capacity = capacity or max(64, configs * rows // 16)
    capacity = min(capacity, configs * rows)

    def exact(h_rows, t_rows):
        return streamed_target_metrics(h_rows, table, t_rows, ("rank",))["rank"]

    def none_undecided():
        return ranks

    def few_undecided():  # padding repeats row 0, whose exact rank is right whether or not it was decided
        picked = jnp.nonzero(undecided, size=capacity, fill_value=0)[0]
        return ranks.at[picked].set(exact(flat_hidden[picked], flat_targets[picked]))

    def many_undecided():
        return exact(flat_hidden, flat_targets)

    count = jnp.sum(undecided)
    branch = (count > 0).astype(jnp.int32) + (count > capacity).astype(jnp.int32)
    ranks = jax.lax.switch(branch, (none_undecided, few_undecided, many_undecided))
    full_rows = jnp.asarray([0, capacity, configs * rows], jnp.int32)[branch]
    return ranks.reshape(configs, rows), decided, full_rows
