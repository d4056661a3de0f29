"""What cross-attention writes (paper Sec. 5.4, Tables 5 and 6): the logit lens of its outputs.

Logit lens as the reference's `cross-attention-outputs.py` (`genir_jax.analysis.logit_lens`): a vector is
passed through the decoder's final RMS norm (with its learned scale), rescaled by ``d_model ** -0.5`` when
the model does so before its tied unembedding, and unembedded over the whole vocabulary (words and docids).

- Docid shares (Table 5): for every correct query and every decoder layer of the analysed stages (every
  stage but the first; the paper's stages II and III), the logit lens of the layer's whole cross-attention
  output (``decoder.{l}.hook_cross_attn_out``, all heads) and the fraction of docid tokens among its top
  10 / 100 / 1000 tokens. Docid tokens are the tokenizer's ``@DOC_ID_<id>@`` entries (the reference
  counts ids >= len(t5-large tokenizer), the same tokens for its checkpoints).
- Head tokens (Table 6): for given queries and heads (layer, head) the logit lens of the head's own
  output z_h @ W_O[h] (normalised by the final norm on its own), and its top word tokens (docid tokens
  excluded); with ``with_docids`` also its top tokens over the whole vocabulary (docids included).

Output files (CLI ``crattn-writes``), the reference's:
- ``per_q_averages_s{II,III,...}.json``: ``{"10": [fraction per (query, layer)], "100": [...],
  "1000": [...]}``, query-major, layers ascending, one file per analysed stage (roman numeral of its
  1-based index);
- ``cr_attn_ratios.json``: ``{"10-II": mean, "100-II": ..., "1000-II": ..., "10-III": ...}``;
- ``crattn_writes_summary.json`` (ours), schema::

    {"analysis": "crattn_writes", "queries": int, "stages": [[layer, ...], ...],
     "cutoffs": [10, 100, 1000],
     "docid_share": {"II": {"10": float, "100": float, "1000": float}, "III": {...}},   # fractions
     "per_layer": {"<layer>": {"10": float, "100": float, "1000": float}}}

CLI ``crattn-head-tokens`` writes ``crattn_head_tokens.json``: a list, per query and head, of
``{"query", "layer", "head", "token_ids", "tokens" (vocabulary pieces), "words" (decoded), "logits"}``
(the top WORD tokens); `head_top_tokens(..., with_docids=True)` (the reproduction's Table 6) adds the top
tokens of the whole vocabulary, docids included: ``"top_token_ids", "top_tokens", "top_words", "top_logits",
"top_is_docid"``.
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

from genir_jax.analysis.logit_lens import logit_lens
from genir_jax.analysis.reading import query_batches
from genir_jax.core.config import T5Config
from genir_jax.docids.tokens import docid_vocabulary
from genir_jax.base.errors import GenIRError
from genir_jax.core.sites import site_name

CUTOFFS = (10, 100, 1000)
SUMMARY_FILE = "crattn_writes_summary.json"
RATIOS_FILE = "cr_attn_ratios.json"
HEAD_TOKENS_FILE = "crattn_head_tokens.json"


def roman(number: int) -> str:
    """1 -> "I", 2 -> "II", ... (stage names as the reference's file names use them)."""
    out = ""
    for value, letters in ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"),
                           (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")):
        while number >= value:
            out += letters
            number -= value
    return out


def docid_mask(tokenizer, vocab_size: int) -> np.ndarray:
    """[V] bool: which vocabulary ids are docid tokens."""
    mask = np.zeros(vocab_size, dtype=bool)
    ids = [i for i in docid_vocabulary(tokenizer) if i < vocab_size]
    mask[ids] = True
    return mask


# --------------------------------------------------------------------------------------------------
# Table 5: docid shares among the top tokens of each layer's cross-attention output
# --------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("config", "layers", "cutoffs"))
def _docid_counts(config: T5Config, params, input_ids, attention_mask, is_docid, layers: tuple[int, ...],
                  cutoffs: tuple[int, ...]):
    """[B, n_layers, n_cutoffs] int32: docid tokens among the top-k of each layer's cross_attn output."""
    from genir_jax.core.model import forward_with_cache

    decoder_ids = jnp.full((input_ids.shape[0], 1), config.decoder_start_token_id, jnp.int32)
    sites = [site_name("decoder", "hook_cross_attn_out", l) for l in layers]
    _, cache = forward_with_cache(config, params, input_ids, attention_mask, decoder_ids, cache_sites=sites)
    outputs = jnp.stack([cache[name][:, 0] for name in sites], axis=1)   # [B, n, D]
    _, top = jax.lax.top_k(logit_lens(config, params, outputs), max(cutoffs))  # [B, n, kmax], descending
    hits = jnp.cumsum(is_docid[top].astype(jnp.int32), axis=-1)
    return jnp.stack([hits[..., k - 1] for k in cutoffs], axis=-1)


@dataclasses.dataclass
class DocidShareResult:
    """Docid counts per (query, analysed layer, cutoff), and the stages they belong to."""

    counts: np.ndarray          # [N, n_layers, n_cutoffs]
    layers: list[int]
    stages: list[list[int]]      # all stages; the analysed ones are stages[1:]
    cutoffs: tuple[int, ...]

    def _stage_layers(self):
        for index, stage in enumerate(self.stages[1:], start=2):
            yield roman(index), [self.layers.index(l) for l in stage]

    def per_q_averages(self) -> dict[str, dict[str, list[float]]]:
        """``{stage name: {"10": [fraction per (query, layer)], ...}}`` as the reference's per_q files."""
        fractions = self.counts / np.asarray(self.cutoffs, dtype=np.float64)
        return {name: {str(k): fractions[:, cols, c].reshape(-1).tolist() for c, k in enumerate(self.cutoffs)}
                for name, cols in self._stage_layers()}

    def averages(self) -> dict[str, float]:
        """The reference's cr_attn_ratios.json: ``{"10-II": mean fraction, ...}``."""
        return {f"{k}-{name}": sum(values) / len(values) for name, per_k in self.per_q_averages().items()
                for k, values in per_k.items()}  # summed in the reference's order

    def summary(self) -> dict:
        fractions = self.counts / np.asarray(self.cutoffs, dtype=np.float64)
        return {
            "analysis": "crattn_writes", "queries": int(self.counts.shape[0]), "stages": self.stages,
            "cutoffs": list(self.cutoffs),
            "docid_share": {name: {k: float(np.mean(v)) for k, v in per_k.items()}
                            for name, per_k in self.per_q_averages().items()},
            "per_layer": {str(layer): {str(k): float(fractions[:, j, c].mean()) for c, k in enumerate(self.cutoffs)}
                          for j, layer in enumerate(self.layers)},
        }


def docid_shares(config: T5Config, params, tokenizer, texts: Sequence[str], *, stages: Sequence[Sequence[int]],
                 cutoffs: Sequence[int] = CUTOFFS, batch_size: int = 16, reference_padding: bool = False,
                 reference_docids: bool = False, progress: bool = True) -> DocidShareResult:
    """Table 5 for the given (correct) queries: docid counts in the top-k of every analysed layer.
    `reference_docids`: every id from the first docid token on counts as a docid (the reference's test)."""
    stages = [list(s) for s in stages]
    if len(stages) < 2:
        raise GenIRError("--stages: need at least two stages (the analysed ones are all but the first)")
    cutoffs = tuple(sorted(set(int(k) for k in cutoffs)))
    if not cutoffs or cutoffs[0] < 1:
        raise GenIRError(f"cutoffs must be positive integers, got {list(cutoffs)}")
    if cutoffs[-1] > config.vocab_size:
        raise GenIRError(f"cutoff {cutoffs[-1]} exceeds the vocabulary size {config.vocab_size}")
    layers = sorted(set(l for s in stages[1:] for l in s))
    if reference_docids:
        from genir_jax.analysis.residual import docid_mask as reference_docid_mask

        is_docid = jnp.asarray(reference_docid_mask(tokenizer, config.vocab_size, reference=True))
    else:
        is_docid = jnp.asarray(docid_mask(tokenizer, config.vocab_size))
    counts = np.zeros((len(texts), len(layers), len(cutoffs)), np.int32)
    plan = query_batches(tokenizer, texts, batch_size, reference_padding=reference_padding)
    for batch in compiling_bar(plan, desc="crattn writes (query batches)", disable=not progress, unit="batch"):
        ids, mask = batch.arrays
        out = _docid_counts(config, params, jnp.asarray(ids), jnp.asarray(mask), is_docid, tuple(layers), cutoffs)
        counts[batch.rows] = np.asarray(out)[:batch.size]
    return DocidShareResult(counts, layers, stages, cutoffs)


def write_docid_shares(directory: str | os.PathLike, result: DocidShareResult, summary: bool = True) -> None:
    """The reference's per_q_averages_s*.json and cr_attn_ratios.json, plus our summary, into `directory`
    (use inside `genir_jax.base.io.atomic_directory`)."""
    directory = os.fspath(directory)
    for name, data in result.per_q_averages().items():
        with open(os.path.join(directory, f"per_q_averages_s{name}.json"), "w", encoding="utf-8") as handle:
            json.dump(data, handle)
    with open(os.path.join(directory, RATIOS_FILE), "w", encoding="utf-8") as handle:
        json.dump(result.averages(), handle)
    if summary:
        with open(os.path.join(directory, SUMMARY_FILE), "w", encoding="utf-8") as handle:
            json.dump(result.summary(), handle, indent=1)


# --------------------------------------------------------------------------------------------------
# Table 6: top word tokens of single heads
# --------------------------------------------------------------------------------------------------

def parse_heads(text: str, config: T5Config) -> list[tuple[int, int]]:
    """``"16.1,17.0"`` -> ``[(16, 1), (17, 0)]`` (layer.head), validated against the model."""
    heads = []
    for part in text.split(","):
        part = part.strip()
        try:
            layer, head = (int(x) for x in part.split("."))
        except ValueError:
            raise GenIRError(f"--heads: cannot parse {part!r}; expected LAYER.HEAD, e.g. '16.1'") from None
        if not 0 <= layer < config.num_decoder_layers:
            raise GenIRError(f"--heads: {part!r}: layer {layer} is outside the decoder's layers "
                             f"0-{config.num_decoder_layers - 1}")
        if not 0 <= head < config.num_heads:
            raise GenIRError(f"--heads: {part!r}: head {head} is outside 0-{config.num_heads - 1}")
        heads.append((layer, head))
    return list(dict.fromkeys(heads))


@functools.partial(jax.jit, static_argnames=("config", "heads", "top"))
def _head_top_tokens(config: T5Config, params, input_ids, attention_mask, is_docid, heads, top: int):
    """Top word tokens (ids [B, n_heads, top], logits) of each head's own cross-attention output, and its top
    tokens over the whole vocabulary, docids included (ids, logits)."""
    from genir_jax.core.model import forward_with_cache

    layers = sorted(set(l for l, _ in heads))
    decoder_ids = jnp.full((input_ids.shape[0], 1), config.decoder_start_token_id, jnp.int32)
    sites = [site_name("decoder", "cross_attn.hook_z", l) for l in layers]
    _, cache = forward_with_cache(config, params, input_ids, attention_mask, decoder_ids, cache_sites=sites)
    w_o = params["decoder"]["layers"]["cross_attn"]["out"]  # [L, H, K, D]
    outputs = jnp.stack([cache[site_name("decoder", "cross_attn.hook_z", l)][:, 0, h].astype(jnp.float32)
                         @ w_o[l, h].astype(jnp.float32) for l, h in heads], axis=1)       # [B, n, D]
    logits = logit_lens(config, params, outputs)
    all_values, all_ids = jax.lax.top_k(logits, top)
    values, ids = jax.lax.top_k(jnp.where(is_docid[None, None, :], -jnp.inf, logits), top)
    return ids, values, all_ids, all_values


def head_top_tokens(config: T5Config, params, tokenizer, texts: Sequence[str], heads: Sequence[tuple[int, int]], *,
                    top: int = 5, batch_size: int = 16, reference_padding: bool = False, with_docids: bool = False,
                    progress: bool = True) -> list[dict]:
    """Table 6: per query and head the `top` word tokens its output promotes (query-major, heads in order);
    `with_docids`: also its `top` tokens of the whole vocabulary, docids included (the ``top_*`` keys)."""
    if not heads:
        raise GenIRError("--heads: no heads given")
    is_docid = docid_mask(tokenizer, config.vocab_size)
    if top < 1 or top > int((~is_docid).sum()):
        raise GenIRError(f"--top must be between 1 and the number of word tokens, got {top}")
    heads = tuple((int(l), int(h)) for l, h in heads)
    ids_out = np.zeros((len(texts), len(heads), top), np.int64)
    logits_out = np.zeros((len(texts), len(heads), top), np.float32)
    all_ids_out, all_logits_out = np.zeros_like(ids_out), np.zeros_like(logits_out)
    plan = query_batches(tokenizer, texts, batch_size, reference_padding=reference_padding)
    for batch in compiling_bar(plan, desc="head tokens (query batches)", disable=not progress, unit="batch"):
        ids, mask = batch.arrays
        top_ids, top_logits, all_ids, all_logits = jax.device_get(
            _head_top_tokens(config, params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(is_docid), heads, top))
        ids_out[batch.rows], logits_out[batch.rows] = top_ids[:batch.size], top_logits[:batch.size]
        all_ids_out[batch.rows], all_logits_out[batch.rows] = all_ids[:batch.size], all_logits[:batch.size]
    entries = []
    for q, text in enumerate(texts):
        for j, (layer, head) in enumerate(heads):
            token_ids = ids_out[q, j].tolist()
            entries.append({"query": text, "layer": layer, "head": head, "token_ids": token_ids,
                            "tokens": tokenizer.convert_ids_to_tokens(token_ids),
                            "words": [tokenizer.decode([t]).strip() for t in token_ids],
                            "logits": logits_out[q, j].tolist()})
            if with_docids:
                all_ids = all_ids_out[q, j].tolist()
                entries[-1].update({"top_token_ids": all_ids, "top_tokens": tokenizer.convert_ids_to_tokens(all_ids),
                                    "top_words": [tokenizer.decode([t]).strip() for t in all_ids],
                                    "top_logits": all_logits_out[q, j].tolist(),
                                    "top_is_docid": [bool(is_docid[t]) for t in all_ids]})
    return entries


def write_head_tokens(directory: str | os.PathLike, entries: list[dict]) -> None:
    """``crattn_head_tokens.json`` into `directory` (use inside `genir_jax.base.io.atomic_directory`)."""
    with open(os.path.join(os.fspath(directory), HEAD_TOKENS_FILE), "w", encoding="utf-8") as handle:
        json.dump(entries, handle, indent=1, ensure_ascii=False)
