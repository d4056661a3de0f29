"""Residual contributions and logit lens per decoding step, for multi-token (naive / semantic) docids.

The single-step analysis (`genir_jax.analysis.residual`, paper Fig. 3 / Fig. 4) reads the decoder at its one
position. With a docid of T tokens ``y_1 .. y_T`` (ending with EOS) the decoder runs T steps; teacher forcing
(`genir_jax.docids.sequence_targets`: decoder inputs ``[start, y_1, .., y_{T-1}]``) gives every step in one forward
pass. At step t and decoder layer l this module computes:

- the logit-lens rank (`genir_jax.analysis.logit_lens`: final norm + unembedding, 0-based, ties to the lower
  token id) of the step's target token ``y_t`` in ``resid_post``, ``cross_attn_out`` and ``mlp_out``
  (`LENS_SITES`);
- the contributions of Fig. 3 (`genir_jax.analysis.residual.contributions`: ratio to the layer's residual
  change, norm, cosine with resid_post) of attn, cross_attn, mlp, resid_pre and resid_post.

Padding steps (beyond a docid's EOS) are marked -1 in ranks and NaN in contributions. Chunks of queries run
through one jitted function; memory is bounded by the chunk (one layer's lens logits at a time).
Summaries (`summary`) average per step index (step 1, 2, ...) and at each docid's last step (EOS), over
the queries whose docid has that step.

Files (`write_sequence_logit_lens`): ``sequence_lens_summary.json`` (the summary) and
``sequence_lens_ranks.csv`` (``query,step,layer,site,rank``: every real step's lens rank, for re-analysis).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from genir_jax.base.progress import compiling_bar

from genir_jax.analysis.logit_lens import logit_lens
from genir_jax.analysis.residual import FUNCS, PARTS, contributions
from genir_jax.base.batching import batches, num_batches
from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError
from genir_jax.base.io import write_json, write_text
from genir_jax.interp.metrics import ranks_of_targets
from genir_jax.core.model import T5, cache_specs
from genir_jax.core.sites import ALL_LAYERS, expand_site_patterns, site_name

LENS_SITES = (("resid_post", "hook_resid_post"), ("cross_attn_out", "hook_cross_attn_out"),
              ("mlp_out", "hook_mlp_out"))
_CACHED = ("hook_resid_pre", "hook_attn_out", "hook_cross_attn_out", "hook_mlp_out", "hook_resid_post")


@dataclasses.dataclass
class SequenceLensResult:
    """Per query n, step t, layer l: `lens_ranks` [N, T, L, len(LENS_SITES)] (-1 on padding steps) and
    `contributions` [N, T, L, len(FUNCS), len(PARTS)] (NaN on padding); `lengths` [N] docid lengths (with
    EOS); `final_ranks` [N, T] the model's own rank of each target token (-1 on padding)."""

    lens_ranks: np.ndarray
    contributions: np.ndarray
    lengths: np.ndarray
    final_ranks: np.ndarray

    def step_rows(self) -> list[tuple[str, np.ndarray]]:
        """(label, [N] bool which queries, [N] step index) for step 1, 2, .. and the last step (EOS)."""
        count = self.lengths.shape[0]
        rows = [(f"step {t + 1}", self.lengths > t, np.full(count, t)) for t in range(int(self.lengths.max()))]
        rows.append(("last step (EOS)", np.ones(count, bool), self.lengths - 1))
        return rows

    def summary(self) -> dict:
        """JSON-ready means (and medians for ranks) per step row and layer; see the module docstring."""
        out = {"num_queries": int(self.lengths.shape[0]), "num_decoder_layers": int(self.lens_ranks.shape[2]),
               "docid_lengths": {str(k): int(v) for k, v in zip(*np.unique(self.lengths, return_counts=True))},
               "steps": []}
        for label, chosen, step in self.step_rows():
            index = np.flatnonzero(chosen)
            ranks = self.lens_ranks[index, step[index]]            # [n, L, sites]
            contrib = self.contributions[index, step[index]]      # [n, L, funcs, parts]
            entry = {"label": label, "queries": int(index.size),
                     "final_not_rank_0": int(np.sum(self.final_ranks[index, step[index]] != 0)),
                     "relevant_rank": {name: {"mean": ranks[:, :, k].mean(axis=0).tolist(),
                                              "median": np.median(ranks[:, :, k], axis=0).tolist()}
                                       for k, (name, _) in enumerate(LENS_SITES)},
                     "contributions": {func: {part: contrib[:, :, f, p].mean(axis=0).tolist()
                                              for p, (part, _, _) in enumerate(PARTS)}
                                       for f, (func, _) in enumerate(FUNCS)},
                     # [n][L] per query and layer, for intervals over queries
                     "per_query": {"relevant_rank": {name: ranks[:, :, k].tolist()
                                                     for k, (name, _) in enumerate(LENS_SITES)},
                                   "contributions": {func: {part: contrib[:, :, f, p].tolist()
                                                            for p, (part, _, _) in enumerate(PARTS)}
                                                     for f, (func, _) in enumerate(FUNCS)}}}
            out["steps"].append(entry)
        return out


@functools.partial(jax.jit, static_argnames=("config",))
def _chunk(params, input_ids, attention_mask, targets, *, config: T5Config):
    names = expand_site_patterns(config, [site_name("decoder", site, ALL_LAYERS) for site in _CACHED])
    model = T5(config, decoder_cache=cache_specs(config, names)[1])
    decoder_inputs = jnp.concatenate(
        [jnp.full((targets.shape[0], 1), config.decoder_start_token_id, jnp.int32), targets[:, :-1]], axis=1)
    logits, raw = model.apply({"params": params}, input_ids, attention_mask, decoder_inputs)
    x = {site: raw["decoder"][site].astype(jnp.float32) for site in _CACHED}          # [L, B, T, D]
    contrib = contributions(x["hook_resid_pre"], x["hook_attn_out"], x["hook_cross_attn_out"], x["hook_mlp_out"],
                            x["hook_resid_post"])                                     # [L, B, T, 3, 5]
    lens_inputs = jnp.stack([x[site] for _, site in LENS_SITES], axis=1)              # [L, 3, B, T, D]

    def one_layer(resid):
        ranks, _ = ranks_of_targets(logit_lens(config, params, resid), jnp.broadcast_to(targets, resid.shape[:-1]))
        return ranks

    lens_ranks = jax.lax.map(one_layer, lens_inputs)                                   # [L, 3, B, T]
    final_ranks, _ = ranks_of_targets(logits.astype(jnp.float32), targets)             # [B, T]
    return contrib, lens_ranks, final_ranks


def run_sequence_logit_lens(config: T5Config, params, input_ids, attention_mask, targets, target_mask, *,
                            batch_size: int = 8, progress: bool = True) -> SequenceLensResult:
    """Logit lens and contributions at every decoding step of the teacher-forced docids: queries [N, S],
    targets [N, T] (docid tokens ending with EOS, right-padded), target_mask [N, T] (1 on real tokens, a
    prefix of each row)."""
    input_ids, attention_mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)
    targets, target_mask = np.asarray(targets, np.int32), np.asarray(target_mask, np.int32)
    count = input_ids.shape[0]
    if count == 0:
        raise GenIRError("no queries to analyse")
    if targets.shape[0] != count or targets.shape != target_mask.shape:
        raise GenIRError(f"{count} queries need targets and a target mask [{count}, T] of one shape")
    lengths = target_mask.sum(axis=1)
    if lengths.min() < 1 or np.any(target_mask != (np.arange(targets.shape[1])[None] < lengths[:, None])):
        raise GenIRError("every target mask must be a non-empty prefix (the docid's tokens, then padding)")
    if targets.min() < 0 or targets.max() >= config.vocab_size:
        raise GenIRError(f"target token ids must lie in [0, {config.vocab_size})")
    steps, layers = targets.shape[1], config.num_decoder_layers
    lens = np.zeros((count, steps, layers, len(LENS_SITES)), np.int64)
    contrib = np.zeros((count, steps, layers, len(FUNCS), len(PARTS)), np.float32)
    final = np.zeros((count, steps), np.int64)
    chunk = max(1, min(batch_size, count))
    params = jax.device_put(params)
    for batch in compiling_bar(batches((input_ids, attention_mask, targets), chunk), desc="logit lens per step",
                               unit="chunk", total=num_batches(count, chunk), disable=not progress):
        ids, mask, tgt = batch.arrays
        c, r, f = jax.device_get(_chunk(params, ids, mask, tgt, config=config))
        rows, n = batch.rows, batch.size
        contrib[rows] = np.transpose(c, (1, 2, 0, 3, 4))[:n]
        lens[rows] = np.transpose(r, (2, 3, 0, 1))[:n]
        final[rows] = f[:n]
    padding = target_mask == 0
    lens[padding] = -1
    contrib[padding] = np.nan
    final[padding] = -1
    return SequenceLensResult(lens_ranks=lens, contributions=contrib, lengths=lengths, final_ranks=final)


SUMMARY_JSON = "sequence_lens_summary.json"
RANKS_CSV = "sequence_lens_ranks.csv"


def write_sequence_logit_lens(out_dir: str | os.PathLike, result: SequenceLensResult,
                              query_ids: Sequence[str]) -> None:
    """`SUMMARY_JSON` and `RANKS_CSV` into `out_dir` (steps numbered from 1)."""
    out_dir = os.fspath(out_dir)
    lines = ["query,step,layer,site,rank"]
    for n, query in enumerate(query_ids):
        for t in range(int(result.lengths[n])):
            for layer in range(result.lens_ranks.shape[2]):
                lines += [f"{query},{t + 1},{layer},{name},{int(result.lens_ranks[n, t, layer, k])}"
                          for k, (name, _) in enumerate(LENS_SITES)]
    os.makedirs(out_dir, exist_ok=True)
    write_text(os.path.join(out_dir, RANKS_CSV), "\n".join(lines) + "\n")
    write_json(os.path.join(out_dir, SUMMARY_JSON), {"query_ids": [str(q) for q in query_ids], **result.summary()},
               indent=1)
