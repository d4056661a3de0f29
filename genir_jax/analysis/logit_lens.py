"""The decoder's logit lens, and rank statistics of a logit vector over the whole vocabulary.

Logit lens (paper Sec. 5.2, as the reference's ``logit_lens_decoder``): any residual-sized vector r is
read as if it were the decoder's last residual, ``logits(r) = unembed(final_rmsnorm(r))`` where
`unembed` is T5's (``* d_model ** -0.5`` then the tied embedding for v1.0 models; the separate `lm_head`
for v1.1). The final norm, with its learned scale, is applied to whatever vector is given: a residual, a
single component's output or a sum of outputs (the reference does the same for component outputs).

Ranks are 0-based positions in a stable descending sort of the logits (ties: lower token id first),
i.e. the reference's ``argsort(argsort(-logits))`` without its tie ambiguity.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from genir_jax.core import decoder_only
from genir_jax.core.config import T5Config
from genir_jax.core.sites import is_decoder_only
from genir_jax.core.model import T5
from genir_jax.core.modules import RMSNorm


def logit_lens(config: T5Config, params, resid: jnp.ndarray) -> jnp.ndarray:
    """Logits [..., V] (float32) of residual-sized vectors [..., D] through the decoder's final norm and the
    unembedding (a decoder-only model: its final norm, LayerNorm or RMSNorm, and its unembedding). Jittable;
    for r = the last layer's resid_post it equals the model's logits."""
    if is_decoder_only(config):
        rows = resid.reshape((-1, 1, resid.shape[-1]))
        normed = decoder_only.forward_from_layer(config, params, rows, config.num_layers)  # the final norm only
        return decoder_only.unembed(config, params, normed).reshape(resid.shape[:-1] + (-1,)).astype(jnp.float32)
    norm = RMSNorm(epsilon=config.layer_norm_epsilon)
    normed = norm.apply({"params": params["decoder"]["final_norm"]}, resid)
    return T5(config).apply({"params": params}, normed, method=T5.unembed).astype(jnp.float32)


def rank_sum_bits(vocab_size: int) -> int:
    """Bits of the low part when ranks are summed as (high, low) int32 halves: about half of log2(V)."""
    return max(1, math.ceil(math.log2(max(vocab_size, 2)) / 2))


def rank_sum_fits(vocab_size: int, count: int) -> bool:
    """Whether summing `count` ranks of a V-token vocabulary in (high, low) int32 halves cannot overflow."""
    bits = rank_sum_bits(vocab_size)
    return count * max((1 << bits) - 1, (vocab_size - 1) >> bits) < 2 ** 31


def vocabulary_rank_stats(logits: jnp.ndarray, is_docid: jnp.ndarray) -> dict[str, jnp.ndarray]:
    """Rank statistics of the docid and the non-docid tokens in each logit vector of `logits` [B, V].

    `is_docid` [V] bool marks the docid tokens (at least one of each kind must exist). One stable sort per
    row. Returns int32 arrays [B]: ``docid_min``, ``docid_max``, ``non_docid_min``, ``non_docid_max``,
    ``non_docid_median`` (the lower middle value, as torch.median), and the sum of the docid ranks as
    ``docid_sum_high`` / ``docid_sum_low`` (sum = high * 2**bits + low with ``bits = rank_sum_bits(V)``;
    int32 halves because JAX computes without int64 by default; combine them on the host).
    """
    vocab = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1, stable=True)
    doc_sorted = jnp.take(is_docid, order)               # [B, V]: is the token at rank p a docid?
    non_sorted = ~doc_sorted
    position = jnp.arange(vocab, dtype=jnp.int32)[None, :]

    def first(mask):
        return jnp.argmax(mask, axis=-1).astype(jnp.int32)

    def last(mask):
        return (vocab - 1 - jnp.argmax(mask[:, ::-1], axis=-1)).astype(jnp.int32)

    non_count = jnp.sum(~is_docid, dtype=jnp.int32)
    middle = (non_count - 1) // 2 + 1                     # the lower median is the middle-th non-docid
    cumulative = jnp.cumsum(non_sorted, axis=-1, dtype=jnp.int32)
    bits = rank_sum_bits(vocab)
    zero = jnp.zeros((), jnp.int32)
    return {
        "docid_min": first(doc_sorted),
        "docid_max": last(doc_sorted),
        "non_docid_min": first(non_sorted),
        "non_docid_max": last(non_sorted),
        "non_docid_median": first(cumulative >= middle),
        "docid_sum_high": jnp.sum(jnp.where(doc_sorted, position >> bits, zero), axis=-1, dtype=jnp.int32),
        "docid_sum_low": jnp.sum(jnp.where(doc_sorted, position & ((1 << bits) - 1), zero), axis=-1,
                                 dtype=jnp.int32),
    }
