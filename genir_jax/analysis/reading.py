"""Who reads from whom (paper Sec. 5.3, Fig. 5): what earlier components MLP neurons and cross-attention
heads of the decoder read from.

Readers and their readings, per query (the decoder runs one step, position 0):
- MLP neuron i of layer l, if positively activated (``mlp.hook_post > 0``): t(c) = sim(W_in[:, i], c) for
  every earlier component output c (``wi``; ``wi_0``, the activation's input, for gated MLPs);
- cross-attention head h of layer l, with i_hat = argmax of its attention scores over encoder positions:
  t(c) = sim(k_i_hat, c @ W_Q[h]) with k the head's cached keys.
sim is the dot product or the cosine (eps 1e-8 per norm, as torch). The vectors c are RAW residual-stream
components (before any RMS norm), exactly those the reference scripts (`eval_neuron_reading.py`,
`eval_cr_attn_reading.py`) compare with, in their key order. For a neuron of layer l: for every layer p < l
``decoder.p.hook_{resid_pre, attn_out}``, per head ``decoder.p.attn.head{h}`` (z_h @ W_O[h]),
``decoder.p.hook_cross_attn_out``, ``decoder.p.cross_attn.head{h}``,
``decoder.p.hook_{resid_mid_cross, mlp_out, resid_post}``, then ``decoder.l.hook_{resid_pre, attn_out,
cross_attn_out, resid_mid_cross}``. For a head of layer l: the six residual sites of every p < l (no heads),
then ``decoder.l.hook_{resid_pre, attn_out}``. With dot products, the readings of the embedding
(``decoder.0.hook_resid_pre``) and of every attn / cross_attn / mlp output before the reader sum to
W_in[:, i] . r (r = ``hook_resid_mid_cross`` of layer l) for a neuron and to (r @ W_Q[h]) . k_i_hat
(r = ``hook_resid_mid`` of layer l) for a head.

Aggregation (the reference's `get_topk_neuron_readings.py`, and its notebook for heads): per reader and
query keep the positive readings of the embedding and of the attn / cross_attn / mlp outputs, take the top
k (or all), divide by their sum; average per reader over the queries (for neurons: the queries that
activate it); renormalise each reader's average and average over the readers of a layer. Result per
layer: ``[[component, proportion], ...]``. The stage buckets (the notebook's, Fig. 5) sum a layer's
proportions per component type and stage; the embedding is its own bucket.

Output files (CLI ``neuron-reading`` / ``crattn-reading``):
- ``all_queries_neuron_similarities_{sim}_{i}.json`` / ``all_queries_crattn_similarities_{sim}_{i}.json``:
  the reference's entries, a JSON list each, queries in correct_valid.json order. Neuron entries:
  ``{"actviation" (sic, rounded to 2 decimals), "sim_type", "value": {component: reading}, "layer", "q_id",
  "position" (neuron index)}``; head entries: ``{"sim_type", "value", "layer", "head", "q_id",
  "enc_position"}``. Every file holds up to 50 queries (``--queries-per-file``); ``i`` is the index of
  its first query (the reference names a chunk by the index at which it dumps it; readers glob the prefix).
- ``neuron_ratio_of_top_k_layers-{sim}-{k}.json`` / ``crattn_ratio_of_top_k_layers-{sim}-{k}.json``
  (k an integer or ``all``): ``{"layer": [[component, proportion], ...]}``, the reference's format.
- ``neuron_reading_summary.json`` / ``crattn_reading_summary.json``, schema::

    {"analysis": "neuron_reading" | "crattn_reading",
     "sim_type": "dot" | "cosine", "queries": int, "stages": [[layer, ...], ...],
     "reader_layers": [layer, ...],
     "results": {k: {"per_layer": {"<layer>": {"readers": int,           # neurons / heads averaged
                                               "embedding": float,       # decoder.0.hook_resid_pre
                                               "attn": [float per stage],
                                               "cross_attn": [float per stage],
                                               "mlp": [float per stage]}},
                     "mean": {"embedding": float, "attn": [...], "cross_attn": [...], "mlp": [...]}}}}

  ``k`` is ``"all"`` or the top-k as a string; ``mean`` is the unweighted mean over the layers in
  ``per_layer``. A layer's proportions sum to 1 unless some of its readers had no positive reading.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from genir_jax.analysis.inputs import encode_queries, tokenize_for_analysis
from genir_jax.base.batching import Batch, batches
from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError
from genir_jax.core.sites import site_name

SIM_TYPES = ("dot", "cosine")
READERS = ("mlp", "cross_attn")
# Residual-stream sites of a decoder layer, in the reference's order (its `components_per_layer`).
LAYER_COMPONENTS = ("hook_resid_pre", "hook_attn_out", "hook_cross_attn_out", "hook_resid_mid_cross",
                    "hook_mlp_out", "hook_resid_post")
# What a reader of layer l reads in layer l itself (everything before its own output).
CURRENT_LAYER = {"mlp": LAYER_COMPONENTS[:4], "cross_attn": LAYER_COMPONENTS[:2]}
COMPONENT_TYPES = ("attn", "cross_attn", "mlp")
EMBEDDING = "decoder.0.hook_resid_pre"
RAW_PREFIX = {"mlp": "all_queries_neuron_similarities", "cross_attn": "all_queries_crattn_similarities"}
RATIO_PREFIX = {"mlp": "neuron_ratio_of_top_k_layers", "cross_attn": "crattn_ratio_of_top_k_layers"}
SUMMARY_FILE = {"mlp": "neuron_reading_summary.json", "cross_attn": "crattn_reading_summary.json"}
ANALYSIS_NAME = {"mlp": "neuron_reading", "cross_attn": "crattn_reading"}
_EPS = 1e-8  # torch.cosine_similarity's


# --------------------------------------------------------------------------------------------------
# Component catalogue
# --------------------------------------------------------------------------------------------------

def _block_names(layer: int, num_heads: int, heads: bool) -> list[str]:
    """The vectors of one decoder layer in the reference's order (per-head attention outputs optional)."""
    names = []
    for site in LAYER_COMPONENTS:
        names.append(site_name("decoder", site, layer))
        if heads and site in ("hook_attn_out", "hook_cross_attn_out"):
            kind = site[5:-4]
            names += [site_name("decoder", f"{kind}.head{h}", layer) for h in range(num_heads)]
    return names


def component_names(config: T5Config, layer: int, reader: str) -> list[str]:
    """The reference's keys, in its order, of every vector a reader of `layer` is compared with."""
    heads = reader == "mlp"
    names = [n for p in range(layer) for n in _block_names(p, config.num_heads, heads)]
    return names + [site_name("decoder", site, layer) for site in CURRENT_LAYER[reader]]


def _component_index(config: T5Config, layer: int, reader: str) -> tuple[int, ...]:
    """Positions of `component_names` in the flattened [layer, vector] catalogue of `_vector_blocks`."""
    heads = reader == "mlp"
    block = _block_names(0, config.num_heads, heads)
    size = len(block)
    local = [block.index(site_name("decoder", site, 0)) for site in CURRENT_LAYER[reader]]
    return tuple(range(layer * size)) + tuple(layer * size + i for i in local)


def is_aggregated(name: str) -> bool:
    """Whether a component takes part in the proportions: the embedding and every attn / cross_attn / mlp
    output (the reference removes the other residual sites and the single heads)."""
    return name == EMBEDDING or name.endswith(("hook_attn_out", "hook_cross_attn_out", "hook_mlp_out"))


def parse_layers(text: str, num_decoder_layers: int, option: str = "--layers") -> list[int]:
    """``"all"`` or comma-separated layers / ranges (``"18-23"``, ``"7,9-11"``) -> sorted unique layers."""
    if text.strip() == "all":
        return list(range(num_decoder_layers))
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            first, last = (int(x) for x in part.split("-")) if "-" in part else (int(part), int(part))
        except ValueError:
            raise GenIRError(f"{option}: cannot parse {part!r}; expected 'all' or e.g. '18-23' or '7,9-11'") from None
        if not 0 <= first <= last < num_decoder_layers:
            raise GenIRError(f"{option}: {part!r} is outside the decoder's layers 0-{num_decoder_layers - 1}")
        layers.update(range(first, last + 1))
    if not layers:
        raise GenIRError(f"{option}: no layers given")
    return sorted(layers)


def parse_topk(values: Sequence[str]) -> list[int | None]:
    """``["all", "5"]`` -> ``[None, 5]`` (None: all positive readings), validated."""
    out: list[int | None] = []
    for value in values:
        if value == "all":
            out.append(None)
            continue
        try:
            k = int(value)
        except ValueError:
            raise GenIRError(f"--topk: {value!r} is neither 'all' nor a positive integer") from None
        if k < 1:
            raise GenIRError(f"--topk: {value!r} must be at least 1")
        out.append(k)
    if not out:
        raise GenIRError("--topk: no value given")
    return list(dict.fromkeys(out))


def topk_label(k: int | None) -> str:
    return "all" if k is None else str(k)


# --------------------------------------------------------------------------------------------------
# Batches of queries
# --------------------------------------------------------------------------------------------------

def query_batches(tokenizer, texts: Sequence[str], batch_size: int, *, reference_padding: bool = False,
                  block: int | None = None) -> list[Batch]:
    """Batches (`genir_jax.base.batching.Batch`, arrays ``(input_ids [batch_size, T], attention_mask)``) covering
    every query once.

    Default: all queries padded to the longest with a mask, consecutive rows per batch
    (`genir_jax.base.batching.batches`). Reference mode (the reading and cross-attention-output scripts run each
    query alone, unpadded, without a mask): a batch holds queries of one token length, no padding, an
    all-ones mask; queries are grouped within consecutive blocks of `block` rows (all rows when None), so
    results complete block by block, and batches are ordered by their first row. Short batches are filled
    up to `batch_size` with copies of their first row (callers keep ``batch.rows`` only), so each input
    shape compiles once.
    """
    if batch_size < 1:
        raise GenIRError("--batch-size must be >= 1")
    if not reference_padding:
        ids, mask = tokenize_for_analysis(tokenizer, list(texts))
        return list(batches((ids, mask), batch_size))
    if not texts:
        raise GenIRError("no queries to tokenize")
    count = len(texts)
    encoded = [np.asarray(ids, dtype=np.int32) for ids in encode_queries(tokenizer, list(texts))]
    block = block or count
    out: list[Batch] = []
    for block_start in range(0, count, block):
        by_length: dict[int, list[int]] = {}
        for row in range(block_start, min(block_start + block, count)):
            by_length.setdefault(len(encoded[row]), []).append(row)
        block_batches = []
        for group in by_length.values():
            group_rows = np.asarray(group)
            ids = np.stack([encoded[r] for r in group])
            for batch in batches((ids,), batch_size):
                padded = batch.arrays[0]
                block_batches.append(Batch(group_rows[batch.rows], (padded, np.ones_like(padded))))
        out.extend(sorted(block_batches, key=lambda b: int(b.rows[0])))
    return out


# --------------------------------------------------------------------------------------------------
# The jitted computations
# --------------------------------------------------------------------------------------------------

def _needed_sites(upto: int, heads: bool) -> list[str]:
    names = [site_name("decoder", site, l) for l in range(upto) for site in LAYER_COMPONENTS]
    if heads:
        names += [site_name("decoder", f"{kind}.hook_z", l) for l in range(upto) for kind in ("attn", "cross_attn")]
    return names


def _vector_blocks(config: T5Config, params, cache, upto: int, heads: bool) -> jnp.ndarray:
    """[B, upto * P, D]: the vectors of layers 0..upto-1 in `_block_names` order, flattened."""
    def stacked(site):  # [B, upto, D] at decoder position 0
        return jnp.stack([cache[site_name("decoder", site, l)][:, 0] for l in range(upto)], axis=1).astype(jnp.float32)

    layers = params["decoder"]["layers"]
    parts = []
    for site in LAYER_COMPONENTS:
        parts.append(stacked(site)[:, :, None, :])
        if heads and site in ("hook_attn_out", "hook_cross_attn_out"):
            kind = site[5:-4]
            z = jnp.stack([cache[site_name("decoder", f"{kind}.hook_z", l)][:, 0] for l in range(upto)],
                          axis=1)  # [B,upto,H,K]
            w_o = layers["self_attn" if kind == "attn" else "cross_attn"]["out"][:upto]                # [upto,H,K,D]
            parts.append(jnp.einsum("blhk,lhkd->blhd", z.astype(jnp.float32), w_o.astype(jnp.float32)))
    blocks = jnp.concatenate(parts, axis=2)
    return blocks.reshape(blocks.shape[0], -1, blocks.shape[-1])


def _safe_norm(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.maximum(jnp.linalg.norm(x, axis=-1), _EPS)


def mlp_read_weights(config: T5Config, params) -> jnp.ndarray:
    """[L, D, F]: the vectors a neuron's activation reads from the residual (``wi``, gated: ``wi_0``)."""
    mlp = params["decoder"]["layers"]["mlp"]
    return mlp["wi_0"] if config.is_gated_act else mlp["wi"]


@functools.partial(jax.jit, static_argnames=("config", "upto", "layers"))
def _neuron_prepare(config: T5Config, params, input_ids, attention_mask, upto: int, layers: tuple[int, ...]):
    """The component catalogue [B, C, D] and the reader layers' neuron activations [B, n, F]."""
    from genir_jax.core.model import forward_with_cache

    sites = _needed_sites(upto, heads=True) + [site_name("decoder", "mlp.hook_post", l) for l in layers]
    decoder_ids = jnp.full((input_ids.shape[0], 1), config.decoder_start_token_id, jnp.int32)
    _, cache = forward_with_cache(config, params, input_ids, attention_mask, decoder_ids, cache_sites=sites)
    vectors = _vector_blocks(config, params, cache, upto, heads=True)
    acts = jnp.stack([cache[site_name("decoder", "mlp.hook_post", l)][:, 0] for l in layers],
                     axis=1).astype(jnp.float32)
    return vectors, acts


@functools.partial(jax.jit, static_argnames=("config", "layers", "capacity", "sim_type"))
def _neuron_values(config: T5Config, params, vectors, acts, layers: tuple[int, ...], capacity: int, sim_type: str):
    """Per reader layer: (neuron indices [B, cap], #active [B], activations [B, cap], readings [B, cap, C]).

    Only the active neurons (at most `capacity` per query, ascending) are gathered, so what leaves the
    device is what gets written.
    """
    weights = mlp_read_weights(config, params)
    out = []
    for j, layer in enumerate(layers):
        active = acts[:, j] > 0
        index = jax.vmap(lambda a: jnp.nonzero(a, size=capacity, fill_value=0)[0])(active)   # [B, cap]
        read = jnp.take(weights[layer].astype(jnp.float32).T, index, axis=0)                # [B, cap, D]
        comps = vectors[:, np.asarray(_component_index(config, layer, "mlp"))]               # [B, C, D]
        values = jnp.einsum("bnd,bcd->bnc", read, comps)
        if sim_type == "cosine":
            values = values / _safe_norm(read)[:, :, None] / _safe_norm(comps)[:, None, :]
        out.append((index, active.sum(-1), jnp.take_along_axis(acts[:, j], index, axis=1), values))
    return out


@functools.partial(jax.jit, static_argnames=("config", "layers", "sim_type"))
def _crattn_values(config: T5Config, params, input_ids, attention_mask, layers: tuple[int, ...], sim_type: str):
    """Per reader layer: (i_hat [B, H], readings [B, H, C])."""
    from genir_jax.core.model import forward_with_cache

    upto = max(layers) + 1
    sites = _needed_sites(upto, heads=False)
    sites += [site_name("decoder", f"cross_attn.{s}", l) for l in layers for s in ("hook_attn_scores", "hook_k")]
    decoder_ids = jnp.full((input_ids.shape[0], 1), config.decoder_start_token_id, jnp.int32)
    _, cache = forward_with_cache(config, params, input_ids, attention_mask, decoder_ids, cache_sites=sites)
    vectors = _vector_blocks(config, params, cache, upto, heads=False)
    w_q = params["decoder"]["layers"]["cross_attn"]["query"]  # [L, D, H, K]
    out = []
    for layer in layers:
        scores = cache[site_name("decoder", "cross_attn.hook_attn_scores", layer)]
        best = jnp.argmax(scores[:, :, 0], axis=-1)                                     # [B, H]
        keys = cache[site_name("decoder", "cross_attn.hook_k", layer)].astype(jnp.float32)  # [B, S, H, K]
        key = keys[jnp.arange(keys.shape[0])[:, None], best, jnp.arange(keys.shape[2])[None, :]]   # [B, H, K]
        comps = vectors[:, np.asarray(_component_index(config, layer, "cross_attn"))]               # [B, C, D]
        queries = jnp.einsum("bcd,dhk->bhck", comps, w_q[layer].astype(jnp.float32))               # [B, H, C, K]
        values = jnp.einsum("bhck,bhk->bhc", queries, key)
        if sim_type == "cosine":
            values = values / _safe_norm(queries) / _safe_norm(key)[:, :, None]
        out.append((best, values))
    return out


# --------------------------------------------------------------------------------------------------
# Results per batch
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LayerReadings:
    """The readings of one reader layer for a batch of queries (numpy).

    `readers` [b, n]: neuron or head index of each entry; `valid` [b, n]: which entries exist (active
    neurons; every head); `values` [b, n, C]: the readings of `names`; `extra` [b, n]: the neuron's
    activation or the head's argmax encoder position.
    """

    layer: int
    names: list[str]
    num_readers: int
    readers: np.ndarray
    valid: np.ndarray
    values: np.ndarray
    extra: np.ndarray


def _capacity(count: int, limit: int) -> int:
    """Static gather size: the next power of two (at least 8), so few shapes compile."""
    return min(limit, max(8, 1 << int(np.ceil(np.log2(max(count, 1))))))


def reading_batch(config: T5Config, params, input_ids, attention_mask, *, reader: str, layers: Sequence[int],
                  sim_type: str = "dot", valid_rows: int | None = None) -> list[LayerReadings]:
    """The readings of every reader in `layers` for one batch of queries (the first `valid_rows` kept)."""
    if reader not in READERS:
        raise GenIRError(f"unknown reader {reader!r}; expected one of {', '.join(READERS)}")
    if sim_type not in SIM_TYPES:
        raise GenIRError(f"unknown similarity {sim_type!r}; expected one of {', '.join(SIM_TYPES)}")
    layers = tuple(sorted(set(int(l) for l in layers)))
    rows = input_ids.shape[0] if valid_rows is None else valid_rows
    ids, mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
    out = []
    if reader == "mlp":
        vectors, acts = _neuron_prepare(config, params, ids, mask, max(layers) + 1, layers)
        counts = np.asarray((acts[:rows] > 0).sum(-1))
        capacity = _capacity(int(counts.max()) if counts.size else 1, config.d_ff)
        results = jax.device_get(_neuron_values(config, params, vectors, acts, layers, capacity, sim_type))
        for layer, (index, count, act, values) in zip(layers, results):
            valid = np.arange(capacity)[None, :] < count[:rows, None]
            out.append(LayerReadings(layer, component_names(config, layer, "mlp"), config.d_ff, index[:rows],
                                     valid, values[:rows], act[:rows]))
    else:
        results = jax.device_get(_crattn_values(config, params, ids, mask, layers, sim_type))
        heads = np.broadcast_to(np.arange(config.num_heads), (rows, config.num_heads))
        for layer, (best, values) in zip(layers, results):
            out.append(LayerReadings(layer, component_names(config, layer, "cross_attn"), config.num_heads,
                                     heads, np.ones_like(heads, dtype=bool), values[:rows], best[:rows]))
    return out


# --------------------------------------------------------------------------------------------------
# Aggregation (the reference's proportions)
# --------------------------------------------------------------------------------------------------

def reading_ratios(values: np.ndarray, topk: int | None) -> np.ndarray:
    """Per entry [N, K]: the positive readings among the top k (all when None, ties in component order),
    divided by their sum; 0 elsewhere (a row of zeros when nothing is positive)."""
    values = np.asarray(values, dtype=np.float64)
    positive = values > 0
    selected = positive
    if topk is not None and values.shape[1] > topk:
        order = np.argsort(-np.where(positive, values, -np.inf), axis=1, kind="stable")[:, :topk]
        selected = np.zeros_like(positive)
        np.put_along_axis(selected, order, True, axis=1)
        selected &= positive
    kept = np.where(selected, values, 0.0)
    total = kept.sum(axis=1, keepdims=True)
    return np.divide(kept, total, out=np.zeros_like(kept), where=total > 0)


class RatioAggregator:
    """Accumulates the readings' top-k proportions per (layer, reader) over query batches."""

    def __init__(self, topk: int | None):
        self.topk = topk
        self._sums: dict[int, np.ndarray] = {}
        self._counts: dict[int, np.ndarray] = {}
        self._names: dict[int, list[str]] = {}

    def add(self, reading: LayerReadings) -> None:
        keep = [i for i, name in enumerate(reading.names) if is_aggregated(name)]
        layer = reading.layer
        if layer not in self._sums:
            self._names[layer] = [reading.names[i] for i in keep]
            self._sums[layer] = np.zeros((reading.num_readers, len(keep)))
            self._counts[layer] = np.zeros(reading.num_readers, np.int64)
        readers = reading.readers[reading.valid]
        ratios = reading_ratios(reading.values[reading.valid][:, keep], self.topk)
        np.add.at(self._sums[layer], readers, ratios)
        self._counts[layer] += np.bincount(readers, minlength=reading.num_readers)

    def result(self) -> dict[int, dict[str, float]]:
        """``{layer: {component: proportion}}`` for every layer with at least one reader (model order)."""
        out = {}
        for layer in sorted(self._sums):
            seen = self._counts[layer] > 0
            if not seen.any():
                continue
            means = self._sums[layer][seen] / self._counts[layer][seen][:, None]
            totals = means.sum(axis=1, keepdims=True)
            normalised = np.divide(means, totals, out=np.zeros_like(means), where=totals > 0)
            layer_mean = normalised.sum(axis=0) / seen.sum()
            out[layer] = {name: float(v) for name, v in zip(self._names[layer], layer_mean) if v > 0}
        return out

    def readers(self) -> dict[int, int]:
        """Number of readers averaged per layer (neurons active for some query; heads)."""
        return {layer: int((c > 0).sum()) for layer, c in self._counts.items()}


def stage_buckets(proportions: dict[str, float], stages: Sequence[Sequence[int]]) -> dict:
    """The notebook's buckets: ``{"embedding": p, "attn": [p per stage], "cross_attn": [...], "mlp": [...]}``."""
    layer_stage = {layer: s for s, layers in enumerate(stages) for layer in layers}
    out = {"embedding": 0.0, **{kind: [0.0] * len(stages) for kind in COMPONENT_TYPES}}
    for name, value in proportions.items():
        if name == EMBEDDING:
            out["embedding"] += value
            continue
        _, layer, site = name.split(".")
        if int(layer) not in layer_stage:
            raise GenIRError(f"--stages: layer {layer} (read from by the readers) is in no stage")
        out[site[5:-4]][layer_stage[int(layer)]] += value
    return out


# --------------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ReadingResult:
    reader: str
    sim_type: str
    queries: int
    stages: list[list[int]]
    layers: list[int]
    aggregators: list[RatioAggregator]

    def ratio_files(self) -> dict[str, dict[str, list]]:
        """The reference-format proportion files: name -> ``{"layer": [[component, proportion], ...]}``."""
        return {
            f"{RATIO_PREFIX[self.reader]}-{self.sim_type}-{topk_label(agg.topk)}.json":
                {str(layer): [[name, value] for name, value in props.items()] for layer, props in agg.result().items()}
            for agg in self.aggregators
        }

    def summary(self) -> dict:
        results = {}
        for agg in self.aggregators:
            counts = agg.readers()
            per_layer = {}
            for layer, props in agg.result().items():
                per_layer[str(layer)] = {"readers": counts[layer], **stage_buckets(props, self.stages)}
            mean = {"embedding": 0.0, **{kind: [0.0] * len(self.stages) for kind in COMPONENT_TYPES}}
            if per_layer:
                mean["embedding"] = float(np.mean([v["embedding"] for v in per_layer.values()]))
                for kind in COMPONENT_TYPES:
                    mean[kind] = np.mean([v[kind] for v in per_layer.values()], axis=0).tolist()
            results[topk_label(agg.topk)] = {"per_layer": per_layer, "mean": mean}
        return {"analysis": ANALYSIS_NAME[self.reader], "sim_type": self.sim_type, "queries": self.queries,
                "stages": self.stages, "reader_layers": self.layers, "results": results}


Sink = Callable[[np.ndarray, list[LayerReadings]], None]


def run_reading(config: T5Config, params, tokenizer, texts: Sequence[str], *, reader: str, layers: Sequence[int],
                stages: Sequence[Sequence[int]], sim_type: str = "dot", topks: Sequence[int | None] = (None,),
                batch_size: int = 16, reference_padding: bool = False, block: int | None = None,
                sink: Sink | None = None, progress: bool = True) -> ReadingResult:
    """Readings of every query (batched, jitted), aggregated per top-k; `sink(rows, readings)` sees each
    batch (e.g. to write the reference's per-entry files). `block`: see `query_batches`."""
    layers = sorted(set(int(l) for l in layers))
    if not layers:
        raise GenIRError("no reader layers given")
    missing = sorted(set(range(max(layers) + 1)) - {l for s in stages for l in s})
    if missing:
        raise GenIRError(f"--stages: layers {missing} are read from but belong to no stage")
    aggregators = [RatioAggregator(k) for k in topks]
    plan = query_batches(tokenizer, texts, batch_size, reference_padding=reference_padding, block=block)
    for batch in tqdm(plan, desc=f"{ANALYSIS_NAME[reader]} (query batches)", disable=not progress, unit="batch"):
        rows, (ids, mask) = batch.rows, batch.arrays
        readings = reading_batch(config, params, ids, mask, reader=reader, layers=layers, sim_type=sim_type,
                                 valid_rows=batch.size)
        for reading in readings:
            for agg in aggregators:
                agg.add(reading)
        if sink is not None:
            sink(rows, readings)
    return ReadingResult(reader, sim_type, len(texts), [list(s) for s in stages], layers, aggregators)


# --------------------------------------------------------------------------------------------------
# Reference-format per-entry files
# --------------------------------------------------------------------------------------------------

def _round2(values: np.ndarray) -> np.ndarray:
    """torch.round(x, decimals=2) in float32: rint(x * 100) / 100."""
    values = np.asarray(values, np.float32)
    return np.rint(values * np.float32(100)) / np.float32(100)


def format_entries(reader: str, sim_type: str, query_id, readings: Sequence[LayerReadings], row: int) -> list[str]:
    """The reference's JSON entries of one query (batch row `row`), in its order."""
    out = []
    for reading in readings:
        valid = reading.valid[row]
        readers = reading.readers[row][valid].tolist()
        values = reading.values[row][valid].tolist()
        if reader == "mlp":
            acts = _round2(reading.extra[row][valid]).tolist()
            for neuron, act, vals in zip(readers, acts, values):
                out.append(json.dumps({"actviation": act, "sim_type": sim_type, "value": dict(zip(reading.names, vals)),
                                       "layer": reading.layer, "q_id": query_id, "position": neuron}))
        else:
            positions = reading.extra[row][valid].tolist()
            for head, position, vals in zip(readers, positions, values):
                out.append(json.dumps({"sim_type": sim_type, "value": dict(zip(reading.names, vals)),
                                       "layer": reading.layer, "head": head, "q_id": query_id,
                                       "enc_position": position}))
    return out


class RawEntryWriter:
    """Writes the per-entry files into `directory` (a staging directory), `per_file` queries each, in
    query order, as the queries' batches complete (batches may complete out of order within a file)."""

    def __init__(self, directory: str | os.PathLike, reader: str, sim_type: str, query_ids: Sequence,
                 per_file: int = 50, *, reference_numbering: bool = False):
        """Default numbering: a file is named by its first query's index (``_0`` holds queries 0..49, ``_50``
        the next 50). `reference_numbering`: as eval_neuron_reading.py / eval_cr_attn_reading.py number them:
        ``_0`` is an empty list, each full block is named by the index of the query after it (queries 0..49 in
        ``_50``), the last block by its last query's index (``_{N-1}``); where that name is taken (a last block
        of one query) the reference overwrites the earlier block, and so do we (`overwritten` lists it)."""
        if per_file < 1:
            raise GenIRError("--queries-per-file must be >= 1")
        self.directory, self.reader, self.sim_type = os.fspath(directory), reader, sim_type
        self.query_ids, self.per_file = list(query_ids), per_file
        self.reference_numbering = reference_numbering
        self._pending: dict[int, list[str]] = {}
        self._next_file = 0
        self.files: list[str] = []
        self.overwritten: list[str] = []
        if reference_numbering:
            self._write(f"{RAW_PREFIX[reader]}_{sim_type}_0.json", [])

    def __call__(self, rows: np.ndarray, readings: list[LayerReadings]) -> None:
        for b, row in enumerate(rows.tolist()):
            self._pending[row] = format_entries(self.reader, self.sim_type, self.query_ids[row], readings, b)
        self._flush()

    def _flush(self) -> None:
        count = len(self.query_ids)
        while self._next_file < count:
            rows = range(self._next_file, min(self._next_file + self.per_file, count))
            if any(r not in self._pending for r in rows):
                return
            number = self._next_file
            if self.reference_numbering:
                number = count - 1 if rows.stop == count else rows.stop
            name = f"{RAW_PREFIX[self.reader]}_{self.sim_type}_{number}.json"
            if name in self.files and self.reference_numbering and number != 0:
                self.overwritten.append(name)
            self._write(name, [entry for r in rows for entry in self._pending.pop(r)])
            self._next_file = rows.stop

    def _write(self, name: str, entries: list[str]) -> None:
        with open(os.path.join(self.directory, name), "w", encoding="utf-8") as handle:
            handle.write("[" + ", ".join(entries) + "]")
        if name not in self.files:
            self.files.append(name)

    def close(self) -> None:
        self._flush()
        if self._next_file < len(self.query_ids):  # pragma: no cover - a batch went missing (a bug)
            raise RuntimeError(f"raw entries missing for query {self._next_file}")


def stale_raw_files(directory: str | os.PathLike, reader: str, sim_type: str, keep: Sequence[str]) -> list[str]:
    """Per-entry files of the same reader and similarity left in `directory` by an earlier run (the
    reference's readers glob the prefix, so old chunks would be mixed in)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    prefix = f"{RAW_PREFIX[reader]}_{sim_type}_"
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
            if n.startswith(prefix) and n.endswith(".json") and n not in keep]


def write_reading_outputs(directory: str | os.PathLike, result: ReadingResult, summary: bool = True) -> None:
    """The proportion files and (unless not `summary`) the summary into `directory` (use inside
    `genir_jax.base.io.atomic_directory`)."""
    directory = os.fspath(directory)
    for name, data in result.ratio_files().items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
            json.dump(data, handle)
    if summary:
        with open(os.path.join(directory, SUMMARY_FILE[result.reader]), "w", encoding="utf-8") as handle:
            json.dump(result.summary(), handle, indent=1)


def iter_raw_entries(directory: str | os.PathLike, reader: str, sim_type: str) -> Iterator[dict]:
    """Entries of the per-entry files in `directory`, files in index order (for checks and reports)."""
    directory = os.fspath(directory)
    prefix = f"{RAW_PREFIX[reader]}_{sim_type}_"
    files = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".json")]
    for name in sorted(files, key=lambda n: int(n[len(prefix):-5])):
        with open(os.path.join(directory, name), encoding="utf-8") as handle:
            yield from json.load(handle)
