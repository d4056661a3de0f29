"""Residual contributions (paper Sec. 5, Fig. 3) and rank development by logit lens (Sec. 5.2, Fig. 4).

For every correct query, at the decoder's single position and in every decoder layer l:

Contributions (reference: ``eval_residual_rank.py``, part 1). With r_delta = resid_post - resid_pre and the
parts attn, cross_attn, mlp (the layer's component outputs), resid_pre ("Residual In") and resid_post
("Residual Out"): ratio = ||part|| / ||r_delta||, norm = ||part||, cosine = cos(part, resid_post)
(the reference's cosine is taken with the layer's OUTPUT residual, resid_post, not with r_delta).

Logit lens (`genir_jax.analysis.logit_lens`, reference part 2): the rank of the relevant docid in the
lens of resid_mid, resid_mid_cross, cross_attn_out, mlp_out and resid_post; and, for resid_post, rank
statistics of all docid tokens (min, max, mean) and of all other tokens (min, max, mean, median).
Beyond the reference (the paper's Sec. 5.2 claims): the rank of the relevant docid in the lens of the
sum over all layers of the MLP outputs, and of the cross-attention outputs.

Everything runs batched and jitted per chunk of queries (one forward with a cache, then a `lax.map`
over layers for the lens), so memory is bounded by the chunk size.

Output files (`write_residual_rank`), in the reference's names and layouts (pandas ``to_csv``: an
unnamed index column first; every value a float):
- ``all_dec_resid_results.csv``: ``,query,func,layer,component,value``; rows ordered query, layer, func
  (``Ratio to Delta of Residual``, ``Absolute Value``, ``Cosine Similarity``), component (``Self-Attn.``,
  ``Cross-Attn.``, ``MLP``, ``Residual In``, ``Residual Out``).
- ``all_ranks_correct_doc.csv``: ``,query,layer,component,value``; per query and layer the relevant
  docid's rank for ``Residual Before Cr.Attn``, ``Residual After Cr.Attn``, ``Cross-Attn. Output``,
  ``MLP Output``, ``Residual After Layer``, then ``first_doc``, ``last_doc``, ``Mean Doc-IDs``,
  ``first_non_doc``, ``last_non_doc``, ``Mean Non-Doc-IDs``.
- ``ranks_component_sums.csv`` (ours): ``,query,component,value`` with components
  ``Sum of MLP Outputs`` and ``Sum of Cross-Attn. Outputs``, one row each per query.
- ``residual_rank_summary.json`` (ours, for the report's Fig. 3 / Fig. 4), schema below.
The reference's periodic dumps ``all_dec_resid_results_{i}.json`` / ``all_ranks_correct_doc_{i}.json``
(the rows of the first i queries, a crash safeguard of its slow loop) are not written: the same rows are
the first i queries of the CSV files.

Two modes (``reference=``):
- default: docid tokens are the tokenizer's ``@DOC_ID_...@`` tokens; ``Mean Non-Doc-IDs`` is the mean
  rank of the other tokens; ``Mean Doc-IDs`` the exact mean.
- reference: as ``eval_residual_rank.py``: every token id from the first docid token on counts as a docid
  (the reference slices at ``len(t5-large tokenizer)``), ``Mean Non-Doc-IDs`` is the MEDIAN (torch's
  lower median) of the non-docid ranks although labelled mean, and ``Mean Doc-IDs`` is divided in
  float32 as torch does. The reference runs each query unpadded and alone; batches with attention
  masks compute the same, so both modes use masked batches.

Summary JSON schema (``residual_rank_summary.json``; every per-layer list has one value per decoder
layer, each a statistic over the queries):
    {"schema": "genir-jax/residual-rank/1", "num_queries": N, "num_decoder_layers": L,
     "reference_mode": bool, "queries_not_at_rank_0": int (final model output; 0 for correct queries),
     "contributions": {FUNC: {PART: {"mean": [L], "std": [L]}}},
         FUNC in ratio, norm, cosine; PART in attn, cross_attn, mlp, resid_pre, resid_post
     "relevant_rank": {SITE: {"mean": [L], "median": [L], "std": [L]}},
         SITE in resid_mid, resid_mid_cross, cross_attn_out, mlp_out, resid_post (logit lens)
     "vocabulary_rank": {STAT: {"mean": [L], "median": [L], "std": [L]}},
         STAT in docid_min, docid_max, docid_mean, non_docid_min, non_docid_max, non_docid_mean,
         non_docid_median (logit lens of resid_post; per query, then over queries)
     "component_sums": {"mlp" | "cross_attn": {"mean": x, "median": x, "max": x,
         "fraction_not_rank_0": x, "fraction_above_5": x, "fraction_above_10": x, "fraction_above_100": x}},
     "per_query": {"relevant_rank": {SITE: [N][L]}, "vocabulary_rank": {docid_mean | non_docid_median: [N][L]}},
     "labels": {"contributions": {"funcs": {FUNC: label}, "parts": {PART: label}},
                "relevant_rank": {SITE: label}, "vocabulary_rank": {STAT: label}, "component_sums": {..}}}
         the CSV labels of our keys; in reference mode "Mean Non-Doc-IDs" labels non_docid_median.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from genir_jax.base.progress import compiling_bar

from genir_jax.analysis.logit_lens import logit_lens, rank_sum_bits, rank_sum_fits, vocabulary_rank_stats
from genir_jax.base.batching import batches, num_batches
from genir_jax.core.config import T5Config
from genir_jax.docids.tokens import is_docid_token
from genir_jax.base.errors import DataError, GenIRError
from genir_jax.base.io import atomic_directory
from genir_jax.core.model import T5, cache_specs
from genir_jax.interp.patching import ranks_of_targets
from genir_jax.core import decoder_only
from genir_jax.core.sites import ALL_LAYERS, expand_site_patterns, is_decoder_only, site_name

# Contributions: functions and parts, in the reference's order, with its labels.
FUNCS = (("ratio", "Ratio to Delta of Residual"), ("norm", "Absolute Value"), ("cosine", "Cosine Similarity"))
PARTS = (("attn", "Self-Attn.", "hook_attn_out"), ("cross_attn", "Cross-Attn.", "hook_cross_attn_out"),
         ("mlp", "MLP", "hook_mlp_out"), ("resid_pre", "Residual In", "hook_resid_pre"),
         ("resid_post", "Residual Out", "hook_resid_post"))
# Logit-lens sites whose relevant-docid rank is recorded, in the reference's order, with its labels.
LENS_SITES = (("resid_mid", "Residual Before Cr.Attn"), ("resid_mid_cross", "Residual After Cr.Attn"),
              ("cross_attn_out", "Cross-Attn. Output"), ("mlp_out", "MLP Output"),
              ("resid_post", "Residual After Layer"))
# Vocabulary statistics of the resid_post lens written to the ranks CSV (our key, reference label).
VOCAB_ROWS = (("docid_min", "first_doc"), ("docid_max", "last_doc"), ("docid_mean", "Mean Doc-IDs"),
              ("non_docid_min", "first_non_doc"), ("non_docid_max", "last_non_doc"),
              ("non_docid_mean", "Mean Non-Doc-IDs"))
SUMS = (("mlp", "Sum of MLP Outputs", "hook_mlp_out"), ("cross_attn", "Sum of Cross-Attn. Outputs",
                                                         "hook_cross_attn_out"))
CACHED = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_cross_attn_out", "hook_resid_mid_cross",
          "hook_mlp_out", "hook_resid_post")
# Parts, lens sites and sums of the cross-attention: none in a decoder-only model (left out of its outputs).
CROSS_ATTENTION_ONLY = frozenset({"cross_attn", "resid_mid_cross", "cross_attn_out"})
RESID_CSV = "all_dec_resid_results.csv"
RANKS_CSV = "all_ranks_correct_doc.csv"
SUMS_CSV = "ranks_component_sums.csv"
SUMMARY_JSON = "residual_rank_summary.json"
SCHEMA = "genir-jax/residual-rank/1"
_COSINE_EPS = 1e-8  # torch.cosine_similarity's default


def docid_mask(tokenizer, vocab_size: int, *, reference: bool = False) -> np.ndarray:
    """[V] bool: which token ids count as docids (see the module docstring for the two modes)."""
    ids = sorted(i for token, i in tokenizer.get_vocab().items() if is_docid_token(token) and i < vocab_size)
    if not ids:
        raise DataError("the checkpoint's tokenizer has no docid tokens (@DOC_ID_<id>@); is it a GenIR model?")
    mask = np.zeros(vocab_size, dtype=bool)
    if reference:
        mask[ids[0]:] = True
    else:
        mask[ids] = True
    if mask.all():
        raise DataError("every token of the vocabulary is a docid token; nothing to compare the docids with")
    return mask


@dataclasses.dataclass
class ResidualRankResult:
    """Per query (axis 0) and decoder layer (axis 1) results; see the module docstring."""

    query_ids: list[str]
    contributions: np.ndarray      # [N, L, 3 funcs, 5 parts] float32 (order of FUNCS, PARTS)
    lens_ranks: np.ndarray         # [N, L, 5] int (order of LENS_SITES)
    vocab_stats: dict              # name -> [N, L] int (docid_/non_docid_ min, max, median) + docid_sum (int64)
    docid_count: int
    vocab_size: int
    sum_ranks: np.ndarray          # [N, 2] int (order of SUMS)
    final_ranks: np.ndarray        # [N] int: the relevant docid's rank in the model's own logits
    reference: bool = False
    decoder_only: bool = False     # a decoder-only model: its cross-attention entries are NaN / -1 and not written

    def applies(self, name: str) -> bool:
        """Whether a part, lens site or sum (`PARTS`, `LENS_SITES`, `SUMS` key) exists in the model."""
        return not (self.decoder_only and name in CROSS_ATTENTION_ONLY)

    @property
    def non_docid_count(self) -> int:
        return self.vocab_size - self.docid_count

    def docid_mean(self, reference: bool | None = None) -> np.ndarray:
        """[N, L] mean rank of the docid tokens; in reference mode divided in float32 as torch does."""
        reference = self.reference if reference is None else reference
        total = self.vocab_stats["docid_sum"]
        if reference:
            return (total.astype(np.float32) / np.float32(self.docid_count)).astype(np.float64)
        return total / self.docid_count

    def non_docid_mean(self) -> np.ndarray:
        """[N, L] exact mean rank of the non-docid tokens (all ranks sum to V(V-1)/2)."""
        everything = self.vocab_size * (self.vocab_size - 1) // 2
        return (everything - self.vocab_stats["docid_sum"]) / self.non_docid_count

    def vocabulary_rows(self) -> dict[str, np.ndarray]:
        """[N, L] values of the ranks CSV's vocabulary rows (our keys of VOCAB_ROWS), mode-dependent."""
        stats = self.vocab_stats
        return {
            "docid_min": stats["docid_min"], "docid_max": stats["docid_max"], "docid_mean": self.docid_mean(),
            "non_docid_min": stats["non_docid_min"], "non_docid_max": stats["non_docid_max"],
            "non_docid_mean": stats["non_docid_median"] if self.reference else self.non_docid_mean(),
        }


def _norm(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1))


def contributions(resid_pre, attn_out, cross_attn_out, mlp_out, resid_post) -> jnp.ndarray:
    """[..., 3, 5]: ratio to ||resid_post - resid_pre||, norm and cosine with resid_post of each part
    (attn, cross_attn, mlp, resid_pre, resid_post) of residual-sized vectors [..., D]."""
    parts = jnp.stack([attn_out, cross_attn_out, mlp_out, resid_pre, resid_post], axis=-2)  # [..., 5, D]
    norms = _norm(parts)
    delta = _norm(resid_post - resid_pre)[..., None]
    post = resid_post[..., None, :]
    unit = parts / jnp.maximum(norms, _COSINE_EPS)[..., None]
    post_unit = post / jnp.maximum(_norm(post), _COSINE_EPS)[..., None]
    cosine = jnp.sum(unit * post_unit, axis=-1)
    return jnp.stack([norms / delta, norms, cosine], axis=-2)


@functools.partial(jax.jit, static_argnames=("config",))
def _chunk(params, input_ids, attention_mask, targets, is_docid, *, config: T5Config):
    """One chunk of queries: the cached forward, contributions, lens ranks and vocabulary statistics."""
    if is_decoder_only(config):
        x = _decoder_only_sites(config, params, input_ids, attention_mask)
        logits = logit_lens(config, params, x["hook_resid_post"][-1])[:, None]
    else:
        names = expand_site_patterns(config, [site_name("decoder", site, ALL_LAYERS) for site in CACHED])
        model = T5(config, decoder_cache=cache_specs(config, names)[1])
        start = jnp.full((input_ids.shape[0], 1), config.decoder_start_token_id, dtype=jnp.int32)
        logits, raw = model.apply({"params": params}, input_ids, attention_mask, start)
        x = {site: raw["decoder"][site][:, :, 0].astype(jnp.float32) for site in CACHED}  # [L, B, D]
    contrib = contributions(x["hook_resid_pre"], x["hook_attn_out"], x["hook_cross_attn_out"], x["hook_mlp_out"],
                            x["hook_resid_post"])                                     # [L, B, 3, 5]
    lens_inputs = jnp.stack([x[f"hook_{site}"] for site, _ in LENS_SITES], axis=1)    # [L, 5, B, D]

    def one_layer(resid):
        lens = logit_lens(config, params, resid)                                      # [5, B, V]
        ranks, _ = ranks_of_targets(lens, jnp.broadcast_to(targets, lens.shape[:2]))
        return ranks, vocabulary_rank_stats(lens[-1], is_docid)

    lens_ranks, stats = jax.lax.map(one_layer, lens_inputs)                         # [L, 5, B], [L, B]
    sums = jnp.stack([jnp.sum(x[site], axis=0) for _, _, site in SUMS])              # [2, B, D]
    sum_lens = logit_lens(config, params, sums)
    sum_ranks, _ = ranks_of_targets(sum_lens, jnp.broadcast_to(targets, sum_lens.shape[:2]))
    final_ranks, _ = ranks_of_targets(logits[:, 0].astype(jnp.float32), targets)
    return contrib, lens_ranks, stats, sum_ranks, final_ranks


def _decoder_only_sites(config, params, input_ids, attention_mask) -> dict:
    """The `CACHED` sites [L, B, D] of a decoder-only model at each prompt's last real token (where the docid is
    predicted); its layers have no cross-attention: a zero output and resid_mid_cross = resid_mid (the entries
    `run_residual_rank` then marks as not applicable)."""
    record = frozenset(CACHED) - {"hook_cross_attn_out", "hook_resid_mid_cross"}
    _, raw, _ = decoder_only.DecoderOnly(config, record=record).apply(
        {"params": params}, input_ids, decoder_only.positions_from_mask(attention_mask), attention_mask)
    last = decoder_only.last_positions(attention_mask)
    x = {site: jnp.take_along_axis(raw[site], last[None, :, None, None], axis=2)[:, :, 0].astype(jnp.float32)
         for site in record}
    x["hook_cross_attn_out"] = jnp.zeros_like(x["hook_attn_out"])
    x["hook_resid_mid_cross"] = x["hook_resid_mid"]
    return x


def default_batch_size(vocab_size: int, budget_bytes: int = 1 << 30) -> int:
    """Queries per step so one layer's lens logits [5, B, V] and the sort temporaries fit the budget."""
    return int(max(1, min(256, budget_bytes // (vocab_size * 4 * 12))))


def run_residual_rank(config: T5Config, params, input_ids, attention_mask, target_ids, is_docid, *,
                      query_ids: Sequence[str] | None = None, reference: bool = False,
                      batch_size: int | None = None, progress: bool = True,
                      desc: str = "residual / logit lens") -> ResidualRankResult:
    """Contributions and logit-lens ranks for queries [N, S] with relevant docid token ids [N].

    `is_docid` [V] bool (`docid_mask`). Chunks of `batch_size` queries (`genir_jax.base.batching.batches`: the last
    one padded with copies of its first row) run through one compiled function; results are gathered on the
    host. `desc`: the progress bar's name (a caller's sub-step names itself).
    """
    input_ids = np.asarray(input_ids, dtype=np.int32)
    attention_mask = np.asarray(attention_mask, dtype=np.int32)
    target_ids = np.asarray(target_ids, dtype=np.int32)
    is_docid = np.asarray(is_docid, dtype=bool)
    count = input_ids.shape[0]
    if count == 0:
        raise GenIRError("no queries to analyse")
    if target_ids.shape != (count,) or attention_mask.shape != input_ids.shape:
        raise GenIRError(f"{count} queries need target_ids [{count}] and a mask like input_ids {input_ids.shape}")
    if is_docid.shape != (config.vocab_size,) or not is_docid.any() or is_docid.all():
        raise GenIRError(f"is_docid must be [{config.vocab_size}] bool with docid and non-docid tokens")
    if target_ids.min() < 0 or target_ids.max() >= config.vocab_size:
        raise GenIRError(f"target token ids must lie in [0, {config.vocab_size})")
    docid_count = int(is_docid.sum())
    if not rank_sum_fits(config.vocab_size, docid_count):
        raise GenIRError(f"{docid_count} docids in a {config.vocab_size}-token vocabulary: rank sums would overflow")
    chunk = min(batch_size or default_batch_size(config.vocab_size), count)
    L = config.num_decoder_layers
    contrib = np.zeros((count, L, len(FUNCS), len(PARTS)), np.float32)
    lens_ranks = np.zeros((count, L, len(LENS_SITES)), np.int64)
    stat_names = ("docid_min", "docid_max", "non_docid_min", "non_docid_max", "non_docid_median")
    stats = {name: np.zeros((count, L), np.int64) for name in stat_names + ("docid_sum",)}
    sum_ranks = np.zeros((count, len(SUMS)), np.int64)
    final_ranks = np.zeros(count, np.int64)
    bits = rank_sum_bits(config.vocab_size)
    device_mask = jnp.asarray(is_docid)
    params = jax.device_put(params)  # once, not per chunk
    for batch in compiling_bar(batches((input_ids, attention_mask, target_ids), chunk), desc=desc, unit="chunk",
                               total=num_batches(count, chunk), disable=not progress):
        ids, mask, targets = batch.arrays
        out = _chunk(params, ids, mask, targets, device_mask, config=config)
        c, r, s, sr, fr = jax.device_get(out)
        rows, n = batch.rows, batch.size
        contrib[rows] = np.moveaxis(c, 0, 1)[:n]
        lens_ranks[rows] = np.transpose(r, (2, 0, 1))[:n]
        for name in stat_names:
            stats[name][rows] = s[name].T[:n]
        high, low = (s[k].T[:n].astype(np.int64) for k in ("docid_sum_high", "docid_sum_low"))
        stats["docid_sum"][rows] = (high << bits) + low
        sum_ranks[rows] = sr.T[:n]
        final_ranks[rows] = fr[:n]
    ids_out = [str(q) for q in query_ids] if query_ids is not None else [str(i) for i in range(count)]
    result = ResidualRankResult(query_ids=ids_out, contributions=contrib, lens_ranks=lens_ranks, vocab_stats=stats,
                                docid_count=docid_count, vocab_size=config.vocab_size, sum_ranks=sum_ranks,
                                final_ranks=final_ranks, reference=reference, decoder_only=is_decoder_only(config))
    if result.decoder_only:  # no cross-attention: its entries are not measurements
        contrib[..., [p for p, (name, _, _) in enumerate(PARTS) if not result.applies(name)]] = np.nan
        lens_ranks[..., [s for s, (name, _) in enumerate(LENS_SITES) if not result.applies(name)]] = -1
        sum_ranks[:, [k for k, (name, _, _) in enumerate(SUMS) if not result.applies(name)]] = -1
    return result


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------

def _cell(value) -> str:
    """A value as pandas writes a float64 column (the reference's value columns are float)."""
    return repr(float(value))


def _csv_text(header: Sequence[str], rows) -> str:
    lines = [",".join(header)]
    for index, row in enumerate(rows):
        lines.append(",".join([str(index)] + [_quote(str(cell)) for cell in row]))
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """CSV quoting as pandas / the csv module do it (only when needed)."""
    if any(ch in text for ch in ',"\n\r'):
        return '"' + text.replace('"', '""') + '"'
    return text


def resid_rows(result: ResidualRankResult):
    """Rows (query, func, layer, component, value) of ``all_dec_resid_results.csv``, in the reference's order."""
    for q, query_id in enumerate(result.query_ids):
        for layer in range(result.contributions.shape[1]):
            for f, (_, func_label) in enumerate(FUNCS):
                for p, (part, part_label, _) in enumerate(PARTS):
                    if result.applies(part):
                        yield query_id, func_label, layer, part_label, _cell(result.contributions[q, layer, f, p])


def rank_rows(result: ResidualRankResult):
    """Rows (query, layer, component, value) of ``all_ranks_correct_doc.csv``, in the reference's order."""
    vocab = result.vocabulary_rows()
    for q, query_id in enumerate(result.query_ids):
        for layer in range(result.lens_ranks.shape[1]):
            for s, (site, label) in enumerate(LENS_SITES):
                if result.applies(site):
                    yield query_id, layer, label, _cell(result.lens_ranks[q, layer, s])
            for key, label in VOCAB_ROWS:
                yield query_id, layer, label, _cell(vocab[key][q, layer])


def _series(values: np.ndarray, median: bool = False) -> dict:
    """Statistics over queries (axis 0) of [N, L] values, as lists per layer."""
    values = np.asarray(values, dtype=np.float64)
    out = {"mean": values.mean(axis=0).tolist(), "std": values.std(axis=0).tolist()}
    if median:
        out["median"] = np.median(values, axis=0).tolist()
    return out


def summary(result: ResidualRankResult) -> dict:
    """The machine-readable summary (schema in the module docstring)."""
    contributions_ = {func: {part: _series(result.contributions[:, :, f, p]) for p, (part, _, _) in enumerate(PARTS)
                             if result.applies(part)}
                      for f, (func, _) in enumerate(FUNCS)}
    relevant = {site: _series(result.lens_ranks[:, :, s], median=True) for s, (site, _) in enumerate(LENS_SITES)
                if result.applies(site)}
    stats = result.vocab_stats
    vocabulary = {
        "docid_min": stats["docid_min"], "docid_max": stats["docid_max"],
        "docid_mean": result.docid_mean(reference=False),
        "non_docid_min": stats["non_docid_min"], "non_docid_max": stats["non_docid_max"],
        "non_docid_mean": result.non_docid_mean(), "non_docid_median": stats["non_docid_median"],
    }
    sums = {}
    for k, (name, _, _) in enumerate(SUMS):
        if not result.applies(name):
            continue
        ranks = result.sum_ranks[:, k]
        sums[name] = {"mean": float(ranks.mean()), "median": float(np.median(ranks)), "max": int(ranks.max()),
                      **{f"fraction_{label}": float(np.mean(ranks > t))
                         for label, t in (("not_rank_0", 0), ("above_5", 5), ("above_10", 10), ("above_100", 100))}}
    vocabulary_labels = dict(VOCAB_ROWS)
    if result.reference:  # the CSV's "Mean Non-Doc-IDs" holds the median in reference mode
        vocabulary_labels["non_docid_median"] = vocabulary_labels.pop("non_docid_mean")
    labels = {"contributions": {"funcs": dict(FUNCS), "parts": {k: v for k, v, _ in PARTS if result.applies(k)}},
              "relevant_rank": {k: v for k, v in LENS_SITES if result.applies(k)},
              "vocabulary_rank": vocabulary_labels,
              "component_sums": {k: v for k, v, _ in SUMS if result.applies(k)}}
    return {
        "schema": SCHEMA,
        "num_queries": len(result.query_ids),
        "num_decoder_layers": int(result.lens_ranks.shape[1]),
        "reference_mode": bool(result.reference),
        "queries_not_at_rank_0": int(np.sum(result.final_ranks != 0)),
        "contributions": contributions_,
        "relevant_rank": relevant,
        "vocabulary_rank": {key: _series(value, median=True) for key, value in vocabulary.items()},
        "component_sums": sums,
        "labels": labels,
        # [N][L] per query and layer, for intervals over queries (the report's Fig. 4 table)
        "per_query": {"relevant_rank": {site: result.lens_ranks[:, :, s].tolist()
                                        for s, (site, _) in enumerate(LENS_SITES) if result.applies(site)},
                      "vocabulary_rank": {key: np.asarray(vocabulary[key]).tolist()
                                          for key in ("docid_mean", "non_docid_median")}},
    }


def write_residual_rank(out_dir: str | os.PathLike, result: ResidualRankResult, *, reference_only: bool = False
                        ) -> None:
    """The reference's two CSV files, our component-sum ranks and the summary JSON (`reference_only`: the
    reference's two files alone), written atomically."""
    files = {
        RESID_CSV: _csv_text(["", "query", "func", "layer", "component", "value"], resid_rows(result)),
        RANKS_CSV: _csv_text(["", "query", "layer", "component", "value"], rank_rows(result)),
        SUMS_CSV: _csv_text(["", "query", "component", "value"],
                            ((query_id, label, _cell(result.sum_ranks[q, k]))
                             for q, query_id in enumerate(result.query_ids) for k, (name, label, _) in enumerate(SUMS)
                             if result.applies(name))),
        SUMMARY_JSON: json.dumps(summary(result), indent=1) + "\n",
    }
    if reference_only:
        files = {name: files[name] for name in (RESID_CSV, RANKS_CSV)}
    with atomic_directory(out_dir) as staging:
        for name, text in files.items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as handle:
                handle.write(text)
