"""Per-head logit lens of the decoder's cross-attention: which heads write the relevant docid.

For every correct query (first decoding step) and every cross-attention head (layer l, head h), the head's own
write to the residual stream, ``z[l, h] @ W_O[l, h]`` (the head's share of ``decoder.{l}.hook_cross_attn_out``),
is read through the logit lens (`genir_jax.analysis.logit_lens.logit_lens`: the decoder's final RMS norm with
its learned scale, then the unembedding over the whole vocabulary). Recorded per (query, layer, head):

- ``target_rank``: the 0-based rank of the query's relevant docid token among all tokens (ties: lower token id
  first, as everywhere in genir-jax);
- ``docid_top``: how many docid tokens are among the head's top `top` tokens.

This is Table 5's docid share (`genir_jax.analysis.cross_attention_writes`) resolved per head, and the paper's
question "which cross-attention heads move the docid into the residual" asked of the relevant docid itself.
Heads are read one layer at a time (`lax.map`), so memory is [batch, heads, vocabulary] per step.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from genir_jax.base.progress import compiling_bar

from genir_jax.analysis.logit_lens import logit_lens
from genir_jax.base.batching import batches
from genir_jax.base.errors import GenIRError, SettingError
from genir_jax.base.io import atomic_path, write_json
from genir_jax.core.config import T5Config
from genir_jax.core.model import forward_with_cache
from genir_jax.core.sites import site_name

TOP = 10
RESULT_FILE = "head_logit_lens.json"
RANKS_FILE = "head_logit_lens_ranks.npy"


def _ranks(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """0-based rank of `targets` [B] in each row of `logits` [B, H, V] (stable: ties go to the lower id)."""
    target = jnp.take_along_axis(logits, targets[:, None, None], axis=-1)          # [B, H, 1]
    ids = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, None, :]
    before = (logits > target) | ((logits == target) & (ids < targets[:, None, None]))
    return jnp.sum(before, axis=-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "top"))
def _chunk(params, input_ids, attention_mask, targets, is_docid, *, config: T5Config, top: int):
    """([B, L, H] target ranks, [B, L, H] docid counts in the top `top`) for one batch of queries."""
    start = jnp.full((input_ids.shape[0], 1), config.decoder_start_token_id, jnp.int32)
    sites = [site_name("decoder", "cross_attn.hook_z", layer) for layer in range(config.num_decoder_layers)]
    _, cache = forward_with_cache(config, params, input_ids, attention_mask, start, cache_sites=sites)
    z = jnp.stack([cache[site][:, 0] for site in sites])                              # [L, B, H, K]
    out = params["decoder"]["layers"]["cross_attn"]["out"]                            # [L, H, K, D]

    def one_layer(args):
        z_layer, out_layer = args
        writes = jnp.einsum("bhk,hkd->bhd", z_layer, out_layer.astype(z_layer.dtype))  # [B, H, D]
        logits = logit_lens(config, params, writes)                                     # [B, H, V]
        _, top_ids = jax.lax.top_k(logits, top)
        return _ranks(logits, targets), jnp.sum(is_docid[top_ids], axis=-1, dtype=jnp.int32)

    ranks, docid_top = jax.lax.map(one_layer, (z, out))                                  # [L, B, H] each
    return jnp.transpose(ranks, (1, 0, 2)), jnp.transpose(docid_top, (1, 0, 2))


@dataclasses.dataclass
class HeadLogitLensResult:
    """Per (query, layer, head): the relevant docid's logit-lens rank and the docid count in the top `top`."""

    target_rank: np.ndarray   # [N, L, H] int
    docid_top: np.ndarray     # [N, L, H] int
    top: int

    def summary(self) -> dict:
        """Per head: the median target rank, the share of queries with the target in the top `top`, and the
        mean share of docid tokens among the top `top`; heads ordered by layer, then head."""
        queries, layers, heads = self.target_rank.shape
        rows = []
        for layer in range(layers):
            for head in range(heads):
                ranks = self.target_rank[:, layer, head]
                rows.append({"layer": layer, "head": head, "median_target_rank": float(np.median(ranks)),
                             "target_in_top": float(np.mean(ranks < self.top)),
                             "docid_share_in_top": float(np.mean(self.docid_top[:, layer, head]) / self.top)})
        return {"analysis": "head_logit_lens", "queries": queries, "top": self.top, "heads": rows}


def run_head_logit_lens(config: T5Config, params, input_ids, attention_mask, target_ids, is_docid, *,
                        top: int = TOP, batch_size: int = 16, progress: bool = False) -> HeadLogitLensResult:
    """The per-head logit lens of every decoder cross-attention head for queries whose relevant docid token is
    `target_ids` [N]; `is_docid` [V] marks the docid tokens (e.g. `genir_jax.analysis.residual.docid_mask`)."""
    input_ids, attention_mask = np.asarray(input_ids), np.asarray(attention_mask)
    target_ids, is_docid = np.asarray(target_ids, np.int32), np.asarray(is_docid, bool)
    if len(input_ids) == 0:
        raise GenIRError("head logit lens: no queries")
    if is_docid.shape != (config.vocab_size,):
        raise GenIRError(f"head logit lens: the docid mask has {is_docid.shape} entries for a vocabulary of "
                         f"{config.vocab_size}")
    if not 1 <= top <= config.vocab_size:
        raise SettingError(f"head logit lens: {{0}} must be in 1..{config.vocab_size}, got {top}", "top")
    ranks, counts = [], []
    chunks = batches((input_ids, attention_mask, target_ids), batch_size)
    for batch in compiling_bar(list(chunks), desc="head logit lens", unit="batch", disable=not progress):
        rank, count = _chunk(params, *batch.arrays, jnp.asarray(is_docid), config=config, top=top)
        ranks.append(np.asarray(rank)[:batch.size])
        counts.append(np.asarray(count)[:batch.size])
    return HeadLogitLensResult(np.concatenate(ranks), np.concatenate(counts), top)


def write_head_logit_lens(directory: str | os.PathLike, result: HeadLogitLensResult) -> None:
    """``head_logit_lens.json`` (the summary) and ``head_logit_lens_ranks.npy`` ([N, L, H] ranks)."""
    os.makedirs(directory, exist_ok=True)
    write_json(os.path.join(directory, RESULT_FILE), result.summary(), indent=2)
    with atomic_path(os.path.join(directory, RANKS_FILE)) as staging:
        with open(staging, "wb") as handle:
            np.save(handle, result.target_rank)
