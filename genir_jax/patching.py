"""Patching sweeps: K intervention configs x N queries in one `jax.vmap` inside one `jax.jit`.

For every config and query the sweep returns the 0-based rank of the query's target token in the full
vocabulary (the reference's ``argsort(argsort(-logits))`` position; ties are broken by token id, lower
first), the target logit and the top-k tokens of the single decoder step.

How the work is shared:
- the encoder output (and with it each layer's cross-attention keys and values) is computed once per
  query for all configs that do not touch the encoder: inside the vmap over configs these values do not
  depend on the config, so JAX keeps them unbatched; configs that do touch the encoder (decided on the
  host from their masks) run the whole model per config;
- values that come per query from another run (`FROM_SOURCE`: the pretrained T5 on the same query,
  the same model on a resampled query, another model's encoder) are computed once per query chunk by
  running the `Source` with a cache, inside the same jitted function;
- queries are processed in chunks (bounded memory) and sharded over a 1-axis device mesh; configs can
  be chunked too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from genir_jax.config import T5Config
from genir_jax.interventions import InterventionError, Interventions, validate
from genir_jax.model import T5, cache_specs
from genir_jax.sites import STACK_SITES, Site, num_layers
from genir_jax.taps import Patch


class FromSource:
    """Marker value: take this site's activation from the sweep's `Source` run on the same query chunk."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "FROM_SOURCE"


FROM_SOURCE = FromSource()
jax.tree_util.register_pytree_node(FromSource, lambda x: ((), None), lambda aux, children: FROM_SOURCE)


class Source(NamedTuple):
    """The run that supplies `FROM_SOURCE` values: a model (same architecture) and, optionally, its own
    inputs aligned with the swept queries (e.g. a resampled query per row, or another tokenisation)."""

    config: T5Config
    params: Any
    input_ids: Any = None
    attention_mask: Any = None


@dataclasses.dataclass
class SweepResult:
    """Results per config (axis 0) and query (axis 1)."""

    ranks: np.ndarray          # [K, N] int: 0-based rank of the target in the full vocabulary
    target_logits: np.ndarray  # [K, N] float32
    top_ids: np.ndarray        # [K, N, k] int: the k highest-scoring tokens (indices into `candidates` if given)
    top_logits: np.ndarray     # [K, N, k] float32


def ranks_of_targets(logits: jnp.ndarray, targets: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rank (tokens scoring higher, plus equal-scoring tokens with a lower id) and logit of each target.

    logits [..., V], targets [...]. Equals the position in a stable descending sort.
    """
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)
    token = jnp.arange(logits.shape[-1]).reshape((1,) * (logits.ndim - 1) + (-1,))
    before = (logits > target_logit) | ((logits == target_logit) & (token < targets[..., None]))
    return jnp.sum(before, axis=-1, dtype=jnp.int32), target_logit[..., 0]


def _source_sites(configs: Interventions) -> list[tuple[str, str]]:
    return sorted((stack, local) for stack, sites in configs.items() for local, patches in sites.items()
                  for patch in ((patches,) if isinstance(patches, Patch) else patches)
                  if isinstance(patch.value, FromSource))


def _source_names(config: T5Config, sites: list[tuple[str, str]]) -> list[str]:
    names = []
    for stack, local in sites:
        if local in STACK_SITES:
            names.append(Site(stack, local, None).name)
        else:
            names += [f"{stack}.{layer}.{local}" for layer in range(num_layers(config, stack))]
    return names


def _fill_from_source(values: Interventions, raw_source: dict) -> Interventions:
    """Replace FROM_SOURCE markers by the source run's activations (layer sites stacked over layers)."""
    return {stack: {local: tuple(raw_source[stack][local] if isinstance(v, FromSource) else v for v in vs)
                    for local, vs in sites.items()} for stack, sites in values.items()}


def _split_masks(configs: Interventions) -> tuple[Interventions, Interventions]:
    """(masks only, values only) pytrees with the same structure, so vmap batches just the masks."""
    masks, values = {}, {}
    for stack, sites in configs.items():
        for local, patches in sites.items():
            items = (patches,) if isinstance(patches, Patch) else tuple(patches)
            masks.setdefault(stack, {})[local] = tuple(p.mask for p in items)
            values.setdefault(stack, {})[local] = tuple(p.value for p in items)
    return masks, values


def _join(masks: Interventions, values: Interventions) -> Interventions:
    return {stack: {local: tuple(Patch(m, v) for m, v in zip(masks[stack][local], values[stack][local]))
                    for local in masks[stack]} for stack in masks}


@functools.partial(jax.jit, static_argnames=("config", "source_config", "source_spec", "touches_encoder", "top_k"))
def _sweep_chunk(params, source_params, input_ids, attention_mask, source_ids, source_mask, targets, masks, values,
                 candidates, *, config, source_config, source_spec, touches_encoder, top_k):
    model = T5(config)
    start = jnp.full((input_ids.shape[0], 1), config.decoder_start_token_id, dtype=jnp.int32)
    if source_spec is not None:
        source = T5(source_config, encoder_cache=source_spec[0], decoder_cache=source_spec[1])
        source_start = jnp.full((source_ids.shape[0], 1), source_config.decoder_start_token_id, dtype=jnp.int32)
        _, raw_source = source.apply({"params": source_params}, source_ids, source_mask, source_start)
        values = _fill_from_source(values, raw_source)
    variables = {"params": params}
    if not touches_encoder:
        encoded, _ = model.apply(variables, input_ids, attention_mask, method=T5.encode)

    def one_config(config_masks):
        interventions = _join(config_masks, values)
        if touches_encoder:
            enc, _ = model.apply(variables, input_ids, attention_mask, interventions, method=T5.encode)
        else:
            enc = encoded
        hidden, _ = model.apply(variables, enc, attention_mask, start, None, interventions, method=T5.decode)
        logits = model.apply(variables, hidden[:, 0], method=T5.unembed).astype(jnp.float32)
        ranks, target_logits = ranks_of_targets(logits, targets)
        top_logits, top_ids = jax.lax.top_k(logits if candidates is None else logits[:, candidates], top_k)
        return ranks, target_logits, top_ids.astype(jnp.int32), top_logits

    return jax.vmap(one_config)(masks)


def _num_configs(masks: Interventions) -> int:
    sizes = {int(np.shape(m)[0]) for sites in masks.values() for ms in sites.values() for m in ms}
    if len(sizes) != 1:
        raise InterventionError(f"sweep: every mask needs the same leading config axis K, got sizes {sorted(sizes)}")
    return sizes.pop()


def _touches_encoder(masks: Interventions, count: int) -> np.ndarray:
    """Per config: does any encoder mask select anything?"""
    touched = np.zeros(count, dtype=bool)
    for ms in masks.get("encoder", {}).values():
        for m in ms:
            touched |= np.asarray(m).reshape(count, -1).any(axis=1)
    return touched


def _take_configs(masks: Interventions, index: np.ndarray) -> Interventions:
    return {stack: {local: tuple(jnp.asarray(np.asarray(m)[index]) for m in ms) for local, ms in sites.items()}
            for stack, sites in masks.items()}


def default_query_chunk(num_configs: int, vocab_size: int, budget_bytes: int = 1 << 30) -> int:
    """Queries per device and step so the [K, chunk, V] float32 logits (and the temporaries of ranking)
    stay within `budget_bytes`; at most 256."""
    per_query = max(1, num_configs) * vocab_size * 4 * 3
    return int(max(1, min(256, budget_bytes // per_query)))


def run_sweep(
    config: T5Config,
    params,
    input_ids,
    attention_mask,
    target_ids,
    configs: Interventions,
    *,
    source: Source | None = None,
    top_k: int = 10,
    candidates=None,
    query_chunk: int | None = None,
    config_chunk: int | None = None,
    devices=None,
    progress: bool = True,
) -> SweepResult:
    """Run every config (masks with a leading K axis) on every query; see the module docstring.

    `candidates`: token ids (e.g. the docid tokens) among which the top-k are taken (``top_ids`` then index
    into `candidates`); default: the whole vocabulary. Ranks are always in the full vocabulary.
    `query_chunk`: queries per device per step (default: from a 1 GiB logits budget); `config_chunk`:
    configs per step (default: all). `devices`: the devices to shard queries over (default: all local).

    input_ids / attention_mask [N, S]; target_ids [N] token ids. Values of patches are shared by all
    configs (no K axis) or `FROM_SOURCE`. Results are identical whatever the number of devices.
    """
    input_ids = np.asarray(input_ids, dtype=np.int32)
    attention_mask = np.asarray(attention_mask, dtype=np.int32)
    target_ids = np.asarray(target_ids, dtype=np.int32)
    count, length = input_ids.shape
    if target_ids.shape != (count,):
        raise InterventionError(f"sweep: target_ids must have shape ({count},), got {target_ids.shape}")
    if count and (target_ids.min() < 0 or target_ids.max() >= config.vocab_size):
        bad = int(target_ids[(target_ids < 0) | (target_ids >= config.vocab_size)][0])
        raise InterventionError(f"sweep: target token id {bad} is outside the vocabulary [0, {config.vocab_size})")
    if candidates is not None:
        candidates = np.asarray(candidates, dtype=np.int32).reshape(-1)
        if candidates.size == 0 or candidates.min() < 0 or candidates.max() >= config.vocab_size:
            raise InterventionError(f"sweep: candidates must be token ids in [0, {config.vocab_size})")
        top_k = min(top_k, candidates.size)
    masks, values = _split_masks(configs)
    num_configs = _num_configs(masks)
    validate(config, _join(masks, values), 1, length, 1, leading=(num_configs,))
    source_pairs = _source_sites(configs)
    source_spec = None
    source_ids, source_mask = input_ids, attention_mask
    if source_pairs:
        if source is None:
            raise InterventionError("sweep: FROM_SOURCE values need a `source`")
        _check_source_fits(config, source.config, source_pairs)
        source_spec = cache_specs(source.config, _source_names(source.config, source_pairs))
        if source.input_ids is not None:
            source_ids = np.asarray(source.input_ids, dtype=np.int32)
            source_mask = np.asarray(source.attention_mask if source.attention_mask is not None
                                     else np.ones_like(source_ids), dtype=np.int32)
            if source_ids.shape[0] != count:
                raise InterventionError(f"sweep: source inputs have {source_ids.shape[0]} rows for {count} queries")
    source_config = source.config if source_pairs else config
    source_params = source.params if source_pairs else params

    devices = list(devices) if devices is not None else jax.local_devices()
    mesh = Mesh(np.asarray(devices), ("queries",))
    rows = NamedSharding(mesh, PartitionSpec("queries"))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    source_params = params if source_params is None or not source_pairs else jax.device_put(source_params, replicated)
    # Every device always sees `per_device` queries, so each device runs the same program on the same
    # shapes whatever the device count: results are bit-identical with 1 or many devices.
    per_device = query_chunk or default_query_chunk(config_chunk or num_configs, config.vocab_size)
    chunk = per_device * len(devices)

    touched = _touches_encoder(masks, num_configs)
    config_chunk = config_chunk or num_configs
    groups = []  # (config indices, touches encoder)
    for flag in (False, True):
        index = np.flatnonzero(touched == flag)
        groups += [(index[i:i + config_chunk], flag) for i in range(0, len(index), config_chunk)]
    values = jax.device_put(values, replicated)

    ranks = np.zeros((num_configs, count), np.int32)
    target_logits = np.zeros((num_configs, count), np.float32)
    top_ids = np.zeros((num_configs, count, top_k), np.int32)
    top_logits = np.zeros((num_configs, count, top_k), np.float32)
    steps = [(g, s) for g in groups for s in range(0, count, chunk)]
    for (index, flag), start in tqdm(steps, desc="patching sweep", disable=not progress, unit="chunk"):
        stop = min(start + chunk, count)
        padded = [np.pad(a[start:stop], [(0, chunk - (stop - start))] + [(0, 0)] * (a.ndim - 1))
                  for a in (input_ids, attention_mask, source_ids, source_mask, target_ids)]
        padded[1][stop - start:, 0] = 1  # padding rows attend to one token, keeping them finite
        padded[3][stop - start:, 0] = 1
        ids, mask, s_ids, s_mask, targets = (jax.device_put(a, rows) for a in padded)
        out = _sweep_chunk(
            params, source_params, ids, mask, s_ids, s_mask, targets,
            jax.device_put(_take_configs(masks, index), replicated), values,
            None if candidates is None else jax.device_put(candidates, replicated), config=config, source_config=source_config, source_spec=source_spec, touches_encoder=bool(flag),
            top_k=top_k,
        )
        r, t, i, l = (np.asarray(x)[:, : stop - start] for x in out)
        ranks[index, start:stop], target_logits[index, start:stop] = r, t
        top_ids[index, start:stop], top_logits[index, start:stop] = i, l
    return SweepResult(ranks=ranks, target_logits=target_logits, top_ids=top_ids, top_logits=top_logits)


def _check_source_fits(config: T5Config, source_config: T5Config, pairs) -> None:
    for field in ("d_model", "num_heads", "d_kv", "d_ff"):
        if getattr(config, field) != getattr(source_config, field):
            raise InterventionError(f"sweep: the source model's {field}={getattr(source_config, field)} differs from "
                                    f"the patched model's {getattr(config, field)}")
    for stack, _ in pairs:
        if num_layers(config, stack) != num_layers(source_config, stack):
            raise InterventionError(f"sweep: the source model's {stack} has {num_layers(source_config, stack)} "
                                    f"layers, the patched model's {num_layers(config, stack)}")
