"""Who reads from whom, the computation: the jitted readings per batch of queries, the reference's
proportions aggregated over queries and readers, and whole runs (see `genir_jax.analysis.reading`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from genir_jax.base.progress import compiling_bar

from genir_jax.analysis.inputs import query_batches
from genir_jax.analysis.reading_sites import (ANALYSIS_NAME, COMPONENT_TYPES, EMBEDDING,
                                              LAYER_COMPONENTS, RATIO_PREFIX, READERS, SIM_TYPES, block_names,
                                              component_index, component_names, is_aggregated, topk_label)
from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError
from genir_jax.core.sites import site_name

_EPS = 1e-8  # torch.cosine_similarity's


# --------------------------------------------------------------------------------------------------
# The jitted computations
# --------------------------------------------------------------------------------------------------

def _needed_sites(upto: int, heads: bool) -> list[str]:
    names = [site_name("decoder", site, l) for l in range(upto) for site in LAYER_COMPONENTS]
    if heads:
        names += [site_name("decoder", f"{kind}.hook_z", l) for l in range(upto) for kind in ("attn", "cross_attn")]
    return names


def _vector_blocks(config: T5Config, params, cache, upto: int, heads: bool) -> jnp.ndarray:
    """[B, upto * P, D]: the vectors of layers 0..upto-1 in `block_names` order, flattened."""
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
        comps = vectors[:, np.asarray(component_index(config, layer, "mlp"))]               # [B, C, D]
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
        best = jnp.argmax(scores[:, :, 0], axis=-1)                                          # [B, H]
        keys = cache[site_name("decoder", "cross_attn.hook_k", layer)].astype(jnp.float32)  # [B, S, H, K]
        key = keys[jnp.arange(keys.shape[0])[:, None], best, jnp.arange(keys.shape[2])[None, :]]   # [B, H, K]
        comps = vectors[:, np.asarray(component_index(config, layer, "cross_attn"))]               # [B, C, D]
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
    for batch in compiling_bar(plan, desc=f"{ANALYSIS_NAME[reader]} (query batches)", disable=not progress,
                               unit="batch"):
        rows, (ids, mask) = batch.rows, batch.arrays
        readings = reading_batch(config, params, ids, mask, reader=reader, layers=layers, sim_type=sim_type,
                                 valid_rows=batch.size)
        for reading in readings:
            for agg in aggregators:
                agg.add(reading)
        if sink is not None:
            sink(rows, readings)
    return ReadingResult(reader, sim_type, len(texts), [list(s) for s in stages], layers, aggregators)
