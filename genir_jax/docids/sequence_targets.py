"""Multi-token docid targets for analyses: teacher-forced decoder inputs and per-step metrics.

With naive / semantic docids the target of a query is a token sequence ``y_1 .. y_T`` (ending with EOS).
Teacher forcing feeds the gold prefix: decoder inputs ``[start, y_1, .., y_{T-1}]``, so one forward pass
gives every step's logits ``[N, T, V]`` and step t's logits predict ``y_t`` given the gold prefix. Two
selectable metrics reduce them (`TEACHER_FORCED_METRICS`):

- ``seq_logprob``: the target's sequence log-probability ``sum_t log p(y_t | y_<t, query)`` (masked steps
  excluded) -- the score beam search ranks by (before its length normalisation);
- ``step_rank``: the 0-based rank of each ``y_t`` in the full vocabulary at its step (ties: lower token id
  first, as `genir_jax.interp.metrics.ranks_of_targets`), [N, T] with -1 on padding; reduced per query by
  `reduce_step_ranks` (``max``: the worst step, 0 iff greedy decoding reproduces the docid; ``mean``;
  ``first``: step 1 only, the atomic-like view).

Decoder-only models (a `DecoderConfig`): the gold prefix follows each query's prompt in one sequence
``prompt y_1 .. y_{T-1}``; the logits at the prompt's last token and at each docid token are the steps'.

Arrays in, arrays out; `teacher_forced_logits` is the only function that runs the model.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

TEACHER_FORCED_METRICS = ("seq_logprob", "step_rank")
RANK_REDUCTIONS = ("max", "mean", "first")


def pad_targets(sequences: Sequence[Sequence[int]], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token sequences with 0: (targets [N, T] int32, mask [N, T] int32)."""
    width = max((len(s) for s in sequences), default=1) if width is None else int(width)
    targets = np.zeros((len(sequences), width), dtype=np.int32)
    mask = np.zeros((len(sequences), width), dtype=np.int32)
    for i, seq in enumerate(sequences):
        if len(seq) > width:
            raise ValueError(f"target {i} has {len(seq)} tokens, more than the width {width}")
        targets[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
    return targets, mask


def teacher_forcing_inputs(targets, start_id: int) -> np.ndarray:
    """Decoder inputs [N, T]: the targets shifted right behind the decoder start token."""
    targets = np.asarray(targets, dtype=np.int32)
    start = np.full((targets.shape[0], 1), start_id, dtype=np.int32)
    return np.concatenate([start, targets[:, :-1]], axis=1)


def teacher_forced_logits(config, params, input_ids, attention_mask, targets, interventions=None):
    """Float32 logits [N, T, V] of every target step given the gold prefix (one forward pass). A decoder-only
    `config`: `input_ids` / `attention_mask` are prompts (left- or right-padded; `interventions` then address
    positions of the prompt + docid rows, see `decoder_only_teacher_forcing`)."""
    import jax.numpy as jnp

    from genir_jax.core.model import forward
    from genir_jax.core.sites import is_decoder_only

    if is_decoder_only(config):
        from genir_jax.core import decoder_only

        ids, mask, steps = decoder_only_teacher_forcing(input_ids, attention_mask, targets)
        logits = decoder_only.forward(config, params, ids, mask, interventions=interventions)
        return jnp.take_along_axis(logits, jnp.asarray(steps)[:, :, None], axis=1).astype(jnp.float32)

    decoder_inputs = teacher_forcing_inputs(targets, config.decoder_start_token_id)
    logits = forward(config, params, input_ids, attention_mask, decoder_inputs, interventions=interventions)
    return logits.astype(jnp.float32)


def decoder_only_teacher_forcing(input_ids, attention_mask, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``prompt y_1 .. y_{T-1}`` for a decoder-only model: each prompt's real tokens (`attention_mask`
    [N, S], either padding side) followed by its targets [N, T] but the last, right-padded to S + T - 1
    columns; returns (input_ids, attention_mask, steps [N, T]: the column whose logits predict y_t)."""
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
    targets = np.asarray(targets, dtype=np.int32)
    count, width = targets.shape
    ids = np.zeros((count, input_ids.shape[1] + width - 1), dtype=np.int32)
    mask = np.zeros_like(ids)
    steps = np.zeros((count, width), dtype=np.int32)
    for row in range(count):
        prompt = input_ids[row][attention_mask[row] == 1]
        if not prompt.size:
            raise ValueError(f"prompt {row} is empty (attention mask all 0)")
        tokens = np.concatenate([prompt, targets[row, :-1]])
        ids[row, :len(tokens)], mask[row, :len(tokens)] = tokens, 1
        steps[row] = len(prompt) - 1 + np.arange(width)
    return ids, mask, steps


def step_log_probs(logits, targets, mask):
    """log p(y_t | y_<t) [N, T] (0 on padding)."""
    import jax
    import jax.numpy as jnp

    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
    return jnp.where(jnp.asarray(mask) > 0, picked, 0.0)


def sequence_log_prob(logits, targets, mask):
    """The target sequence's log-probability [N] (sum of the masked step log-probabilities)."""
    return step_log_probs(logits, targets, mask).sum(axis=-1)


def step_ranks(logits, targets, mask):
    """0-based rank of each target token at its step [N, T] (-1 on padding): one compiled program (kept by the
    program cache, `genir_jax.base.program_cache`) rather than a dozen eager operations, each lowered per run."""
    return _step_ranks_program()(logits=logits, targets=targets, mask=mask)


@functools.lru_cache(maxsize=1)
def _step_ranks_program():
    from genir_jax.base.program_cache import cached_jit

    @cached_jit
    def step_ranks_program(logits, targets, mask):
        import jax.numpy as jnp

        from genir_jax.interp.metrics import ranks_of_targets

        ranks, _ = ranks_of_targets(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
        return jnp.where(jnp.asarray(mask) > 0, ranks, -1)

    return step_ranks_program


def reduce_step_ranks(ranks, mask, how: str = "max"):
    """Per-query rank [N] from step ranks [N, T]: ``max``, ``mean`` (over real steps) or ``first``."""
    import jax.numpy as jnp

    ranks, mask = jnp.asarray(ranks), jnp.asarray(mask) > 0
    if how == "max":
        return jnp.max(jnp.where(mask, ranks, 0), axis=-1)
    if how == "mean":
        return jnp.sum(jnp.where(mask, ranks, 0), axis=-1) / jnp.maximum(mask.sum(axis=-1), 1)
    if how == "first":
        return ranks[:, 0]
    raise ValueError(f"unknown rank reduction {how!r}; choose one of {', '.join(RANK_REDUCTIONS)}")


STEP_SHARES = ("first step", "every step")  # besides the per-step shares (`kept_at_rank_0`)


def kept_at_rank_0(ranks) -> dict:
    """Which queries keep their docid token at rank 0, from step ranks [N, T] (-1 on padding; or per query a
    list of its steps' ranks, as the result files keep them): ``first step`` [N] (the first token: the
    atomic-like view), ``every step`` [N] (greedy decoding gives the whole docid) and ``steps``: for each step
    t, the flags of the queries whose docid has a step t."""
    if not isinstance(ranks, np.ndarray):
        rows = [list(row) for row in ranks]
        ranks = np.full((len(rows), max(map(len, rows), default=1)), -1, np.int64)
        for index, row in enumerate(rows):
            ranks[index, :len(row)] = row
    real = ranks >= 0
    return {"first step": ranks[:, 0] == 0, "every step": np.all((ranks == 0) | ~real, axis=1),
            "steps": [ranks[real[:, t], t] == 0 for t in range(ranks.shape[1]) if real[:, t].any()]}


def sequence_metric(logits, targets, mask, metric: str, reduction: str = "max"):
    """The selected metric per query [N]: ``seq_logprob`` or ``step_rank`` reduced by `reduction`."""
    if metric == "seq_logprob":
        return sequence_log_prob(logits, targets, mask)
    if metric == "step_rank":
        return reduce_step_ranks(step_ranks(logits, targets, mask), mask, reduction)
    raise ValueError(f"unknown sequence metric {metric!r}; choose one of {', '.join(TEACHER_FORCED_METRICS)}")


def teacher_forced_step_ranks(config, params, input_ids, attention_mask, targets, mask, *, interventions=None,
                              batch_size: int = 64) -> np.ndarray:
    """`step_ranks` [N, T] of the docids `targets` / `mask` [N, T] given the gold prefix, in batches of
    `batch_size` queries, with `interventions` (e.g. a circuit) at every decoder position."""
    from genir_jax.base.batching import batches

    targets, mask = np.asarray(targets, np.int32), np.asarray(mask, np.int32)
    out = np.full(targets.shape, -1, dtype=np.int64)
    rows = max(1, min(batch_size, targets.shape[0]))
    for batch in batches((np.asarray(input_ids), np.asarray(attention_mask), targets, mask), rows):
        ids, att, tgt, msk = batch.arrays
        logits = teacher_forced_logits(config, params, ids, att, tgt, interventions=interventions)
        out[batch.rows] = np.asarray(step_ranks(logits, tgt, msk))[:batch.size]
    return out


def worst_step_ranks(config, params, input_ids, attention_mask, sequences, batch_size: int = 64) -> np.ndarray:
    """int [N]: each query's worst (largest) full-vocabulary rank of a token of its docid sequence (ending with
    EOS) given the gold prefix (`teacher_forced_step_ranks`); 0 iff greedy decoding produces exactly that docid.
    A one-token sequence is an atomic docid: its rank at the first decoder step."""
    targets, mask = pad_targets(sequences)
    if targets.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    ranks = teacher_forced_step_ranks(config, params, input_ids, attention_mask, targets, mask, batch_size=batch_size)
    return np.asarray(reduce_step_ranks(ranks, mask, "max")).astype(np.int64)


def greedy_consistent(config, params, input_ids, attention_mask, sequences, batch_size: int = 64) -> np.ndarray:
    """bool [N]: whether every token of each query's docid sequence (ending with EOS) is the top token of the
    whole vocabulary at its step given the gold prefix, i.e. greedy decoding produces exactly that docid
    (rank 0 at every step, `worst_step_ranks`: the multi-token counterpart of an atomic docid being the top
    token)."""
    return worst_step_ranks(config, params, input_ids, attention_mask, sequences, batch_size) == 0
