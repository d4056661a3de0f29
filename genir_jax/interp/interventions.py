"""Building interventions: zero / mean ablation, activation patching, head and neuron knock-outs.

An `Interventions` value is a plain pytree ``{"encoder"|"decoder": {local site: Patch | (Patch, ...)}}``.
Each `Patch(mask, value)` turns a site's activation ``out`` into ``out + mask * (value - out)``
(`genir_jax.core.taps`). For per-layer sites both arrays carry a leading layer axis ``[L, B, *site]`` (each
axis may be 1 to broadcast); stack-level sites (``hook_embed``, ``*.hook_out``, final-norm sites) have
no layer axis. Masks select layers, and optionally positions, heads or neurons:

    iv = zero_ablation(cfg, ["decoder.3.hook_mlp_out", "decoder.4.hook_mlp_out"])
    iv = mean_ablation(cfg, means, sites=["decoder.*.hook_cross_attn_out"], positions=[0], length=1)
    iv = replacement(cfg, other_run_cache)                    # activation patching, per query
    iv = head_ablation(cfg, {"decoder.16.cross_attn": [1, 3]})   # zero the heads' hook_z
    iv = combine(iv_a, iv_b)                                   # both, applied in order

A patching *sweep* stacks K configurations along a new leading axis of every mask (values are shared
by all configs, or come per query from a source run): see `genir_jax.interp.patching`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from genir_jax.base.progress import compiling_bar

from genir_jax.base.batching import batches, num_batches
from genir_jax.base.program_cache import cached_jit
from genir_jax.core.config import T5Config
from genir_jax.core.sites import (
    ALL_LAYERS, STACK_SITES, Site, expand_site_patterns, is_decoder_only, num_layers, parse_site, site_name, site_shape,
)
from genir_jax.core.taps import Patch
from genir_jax.core.validation import InterventionError, validate  # noqa: F401 (re-export)

Interventions = dict  # {"encoder"|"decoder": {local site: Patch | tuple[Patch, ...]}}


class FromSource:
    """Marker value: take this site's activation, query by query, from a source run (another model on the
    same queries, the same model on resampled queries, another model's encoder); see `genir_jax.interp.patching`."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "FROM_SOURCE"


FROM_SOURCE = FromSource()
# Ablation modes, what replaces an ablated activation: zero, its mean over queries (these two need only the
# patched model), another query's activation (resample) or a source model's on the same query (source).
ABLATION_MODES = ("zero", "mean", "resample", "source")
jax.tree_util.register_pytree_node(FromSource, lambda x: ((), None), lambda aux, children: FROM_SOURCE)


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------

def site_unit_axis(site: Site, kind: str) -> int:
    """Index (in the per-example site shape) of the position / head / neuron axis."""
    local = site.local
    leaf = local.split(".")[-1]
    is_attention = local.startswith(("attn.", "cross_attn."))
    if kind == "positions":
        return 1 if leaf in ("hook_attn_scores", "hook_pattern") else 0
    if kind == "heads":
        if not is_attention:
            raise InterventionError(f"site '{site.name}' has no head axis; heads apply to attention sites "
                                    "(e.g. '<stack>.<l>.attn.hook_z')")
        return 0 if leaf in ("hook_attn_scores", "hook_pattern") else 1
    if kind == "neurons":
        if not local.startswith("mlp."):
            raise InterventionError(f"site '{site.name}' has no neuron axis; neurons apply to MLP sites "
                                    "(e.g. '<stack>.<l>.mlp.hook_post')")
        return 1
    raise ValueError(kind)


def _selection_mask(config: T5Config, site: Site, positions, heads, neurons, length) -> np.ndarray:
    """Per-example mask (rank of the site, 1 on unselected axes) selecting positions/heads/neurons."""
    rank = len(site_shape(config, site, 1, 1))
    mask = np.ones((1,) * rank, dtype=np.float32)
    for kind, chosen in (("positions", positions), ("heads", heads), ("neurons", neurons)):
        if chosen is None:
            continue
        axis = site_unit_axis(site, kind)
        if kind == "positions":
            if length is None:
                raise InterventionError(f"site '{site.name}': selecting positions needs the sequence `length`")
            size = length
        else:  # heads of this site (key/value heads under grouped-query attention) or neurons
            size = site_shape(config, site, 1, 1)[axis]
        chosen = np.asarray(list(chosen), dtype=np.int64)
        if chosen.size and (chosen.min() < 0 or chosen.max() >= size):
            raise InterventionError(f"site '{site.name}': {kind} {chosen.tolist()} out of range [0, {size})")
        selector = np.zeros(size, dtype=np.float32)
        selector[chosen] = 1.0
        shape = [1] * rank
        shape[axis] = size
        mask = mask * selector.reshape(shape)
    return mask


def _group_sites(config: T5Config, sites: Iterable[str]) -> dict[tuple[str, str], list[int | None]]:
    grouped: dict[tuple[str, str], list[int | None]] = {}
    for name in expand_site_patterns(config, sites):
        site = parse_site(config, name)
        grouped.setdefault((site.stack, site.local), []).append(site.layer)
    return grouped


def site_masks(config: T5Config, sites: Iterable[str], *, positions=None, heads=None, neurons=None,
               length: int | None = None) -> dict[tuple[str, str], np.ndarray]:
    """Masks for full site names (patterns allowed), grouped per (stack, local site).

    Layer sites get ``[L, 1, *site]`` with ones at the named layers (and selected positions / heads /
    neurons), stack sites ``[1, *site]``; other axes are 1 and broadcast.
    """
    out = {}
    for (stack, local), layers in _group_sites(config, sites).items():
        site = Site(stack, local, layers[0])
        selection = _selection_mask(config, site, positions, heads, neurons, length)[None]  # batch axis
        if local in STACK_SITES:
            out[(stack, local)] = selection
            continue
        mask = np.zeros((num_layers(config, stack),) + selection.shape, dtype=np.float32)
        for layer in layers:
            mask[layer] = selection
        out[(stack, local)] = mask
    return out


def _interventions(masks: Mapping[tuple[str, str], Any], values: Mapping[tuple[str, str], Any]) -> Interventions:
    iv: Interventions = {}
    for key, mask in masks.items():
        stack, local = key
        # numpy masks are transferred as they are (jnp.asarray would lower and compile a copy per shape)
        mask = jax.device_put(mask) if isinstance(mask, np.ndarray) else jnp.asarray(mask)
        iv.setdefault(stack, {})[local] = Patch(mask, values[key])
    return iv


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------

def zero_ablation(config: T5Config, sites: Iterable[str], *, positions=None, heads=None, neurons=None,
                  length: int | None = None) -> Interventions:
    """Replace the selected activations by 0 (the reference's zero patching sets the whole tensor)."""
    masks = site_masks(config, sites, positions=positions, heads=heads, neurons=neurons, length=length)
    return _interventions(masks, {key: jnp.zeros((), jnp.float32) for key in masks})


def _source_sites(config: T5Config, per_site: Mapping[str, Any]) -> set[tuple[str, str]]:
    """The (stack, local) sites whose value is `FROM_SOURCE` (keys may be full names or patterns)."""
    marked = [name for name, value in per_site.items() if isinstance(value, FromSource)]
    return {(site.stack, site.local) for site in (parse_site(config, n) for n in expand_site_patterns(config, marked))}


def _stacked_values(config: T5Config, masks, per_site: Mapping[str, Any], with_batch: bool):
    """{(stack, local): value} with a layer axis for layer sites, from {full name: array}.

    A site whose value is `FROM_SOURCE` keeps that marker (no layer stacking: the sweep engine fills it
    from the source run, see `genir_jax.interp.patching`); it cannot be mixed with arrays for the same site."""
    values = {}
    sourced = _source_sites(config, per_site)
    for (stack, local) in masks:
        if (stack, local) in sourced:
            names = [Site(stack, local, None).name] if local in STACK_SITES else \
                [site_name(stack, local, layer) for layer in range(num_layers(config, stack))]
            mixed = [n for n in names if n in per_site and not isinstance(per_site[n], FromSource)]
            if mixed:
                raise InterventionError(f"site '{mixed[0]}': values of one site are either all FROM_SOURCE or "
                                        "all arrays")
            values[(stack, local)] = FROM_SOURCE
            continue
        if local in STACK_SITES:
            name = Site(stack, local, None).name
            values[(stack, local)] = _value_for(per_site, name, with_batch)
            continue
        layers = []
        template = None
        for layer in range(num_layers(config, stack)):
            name = site_name(stack, local, layer)
            if name in per_site:
                template = _value_for(per_site, name, with_batch)
            layers.append(name)
        if template is None:
            raise InterventionError(f"no values given for any layer of site '{site_name(stack, local, ALL_LAYERS)}'")
        stacked = [(_value_for(per_site, name, with_batch) if name in per_site else jnp.zeros_like(template))
                   for name in layers]
        values[(stack, local)] = jnp.stack(stacked)
    return values


def mean_value(config: T5Config, means: Mapping[str, Any], stack: str, local: str):
    """The patch value of site (stack, local) from per-site means ``{full name: [*site]}``: stacked over
    layers (``[L, 1, *site]``; layers without a mean get zeros) for layer sites, ``[1, *site]`` otherwise."""
    return _stacked_values(config, {(stack, local): None}, means, with_batch=False)[(stack, local)]


def _value_for(per_site: Mapping[str, Any], name: str, with_batch: bool):
    if name not in per_site:
        raise InterventionError(f"no value given for site '{name}'")
    value = jnp.asarray(per_site[name])
    return value if with_batch else value[None]


def mean_ablation(config: T5Config, means: Mapping[str, Any], sites: Iterable[str] | None = None, *,
                  positions=None, heads=None, neurons=None, length: int | None = None) -> Interventions:
    """Replace the selected activations by their mean over a query set.

    `means` maps full site names to per-example means (as `mean_activations` returns them, e.g.
    ``[T, D]`` for a residual site); `sites` defaults to all of them.
    """
    sites = list(means) if sites is None else list(sites)
    masks = site_masks(config, sites, positions=positions, heads=heads, neurons=neurons, length=length)
    return _interventions(masks, _stacked_values(config, masks, means, with_batch=False))


def replacement(config: T5Config, activations: Mapping[str, Any], sites: Iterable[str] | None = None, *,
                positions=None, heads=None, neurons=None, length: int | None = None) -> Interventions:
    """Activation patching: replace the selected activations by those of another run, query by query.

    `activations` maps full site names to ``[B, ...]`` arrays aligned with the patched batch: the cache of
    the same model on other queries (resampling), of another model on the same queries (cross-model,
    e.g. the pretrained T5), or an encoder output of another model (encoder swap, see `encoder_swap`).
    A value may also be `FROM_SOURCE` (keys then may be patterns, e.g. ``{"decoder.*.hook_mlp_out":
    FROM_SOURCE}``): the activation comes query by query from a sweep's source run (`genir_jax.interp.patching`).
    """
    sites = list(activations) if sites is None else list(sites)
    masks = site_masks(config, sites, positions=positions, heads=heads, neurons=neurons, length=length)
    return _interventions(masks, _stacked_values(config, masks, activations, with_batch=True))


def encoder_swap(config: T5Config, other_encoder_output, site: str) -> Interventions:
    """Run the decoder on another model's encoder output (``[B, T, D]``, or `FROM_SOURCE` in a sweep).

    `site` is required: ``"encoder.hook_out"`` (after the final norm: exactly what cross-attention reads)
    or, as the reference swaps, ``f"encoder.{L-1}.hook_resid_post"`` (before the final norm, so the patched
    model's own final norm is applied; `genir_jax.analysis.encoder_swap.swap_site` names it).
    """
    if not isinstance(site, str):
        raise InterventionError(f"encoder_swap: the swapped site must be named (e.g. 'encoder.hook_out'), got {site!r}")
    return replacement(config, {site: other_encoder_output})


def _unit_ablation(config: T5Config, units: Mapping[str, Sequence[int]], leaf: str, axis: str,
                   means: Mapping[str, Any] | None) -> Interventions:
    """Zero (or mean-replace) selected heads / neurons: ``{"<prefix>": indices}`` patches ``<prefix>.<leaf>``."""
    parts = []
    for prefix, indices in units.items():
        site = f"{prefix}.{leaf}"
        if means is None:
            parts.append(zero_ablation(config, [site], **{axis: indices}))
        else:
            parts.append(mean_ablation(config, {site: means[site]}, **{axis: indices}))
    return combine(*parts)


def head_ablation(config: T5Config, heads: Mapping[str, Sequence[int]], *, means: Mapping[str, Any] | None = None
                  ) -> Interventions:
    """Knock out attention heads by zeroing (or mean-replacing) their ``hook_z``.

    `heads` maps ``"<stack>.<layer>.attn"`` or ``"<stack>.<layer>.cross_attn"`` to head indices.
    """
    return _unit_ablation(config, heads, "hook_z", "heads", means)


def neuron_ablation(config: T5Config, neurons: Mapping[str, Sequence[int]], *,
                    means: Mapping[str, Any] | None = None) -> Interventions:
    """Knock out MLP neurons by zeroing (or mean-replacing) their ``mlp.hook_post`` activation.

    `neurons` maps ``"<stack>.<layer>.mlp"`` to neuron indices.
    """
    return _unit_ablation(config, neurons, "hook_post", "neurons", means)


def combine(*interventions: Interventions) -> Interventions:
    """All patches of several interventions; patches of the same site apply in the given order."""
    out: Interventions = {}
    for iv in interventions:
        for stack, sites in (iv or {}).items():
            for local, patches in sites.items():
                patches = (patches,) if isinstance(patches, Patch) else tuple(patches)
                existing = out.setdefault(stack, {}).get(local, ())
                existing = (existing,) if isinstance(existing, Patch) else tuple(existing)
                out[stack][local] = existing + patches
    return out


# --------------------------------------------------------------------------------------------------
# Streaming means
# --------------------------------------------------------------------------------------------------

def mean_activations(config: T5Config, params, input_ids, attention_mask, sites: Iterable[str], *,
                     decoder_input_ids=None, batch_size: int = 64, progress: bool = True) -> dict[str, jnp.ndarray]:
    """Mean of each site's activation over the given queries, per position: ``{name: [*site]}``.

    Streams over batches (only running sums are kept). Like the reference's mean cache, the mean is
    taken per position over all queries, so with padded inputs padding positions are averaged too.
    Decoder-only models (``blocks.*`` sites) run the prompts alone (no `decoder_input_ids`).
    """
    names = expand_site_patterns(config, sites)
    input_ids = np.asarray(input_ids)
    attention_mask = np.asarray(attention_mask)
    count = input_ids.shape[0]
    if count == 0:
        raise InterventionError("mean_activations: no queries given")
    if is_decoder_only(config):
        if decoder_input_ids is not None:
            raise InterventionError("mean_activations: decoder-only models take no decoder_input_ids (the prompt "
                                    "is the whole input)")
        decoder_input_ids = np.zeros((count, 1), dtype=np.int32)  # unused
    elif decoder_input_ids is None:
        decoder_input_ids = np.full((count, 1), config.decoder_start_token_id, dtype=np.int32)
    decoder_input_ids = np.asarray(decoder_input_ids)
    if batch_size < 1:
        raise InterventionError(f"mean_activations: batch_size must be >= 1, got {batch_size}")
    batch_size = min(batch_size, count)

    totals = None
    chunks = num_batches(count, batch_size)
    for batch in compiling_bar(batches((input_ids, attention_mask, decoder_input_ids), batch_size),
                               desc="mean activations", total=chunks, disable=not progress or chunks < 2, leave=False):
        weights = np.zeros(batch_size, np.float32)
        weights[:batch.size] = 1.0  # padding rows (copies of the batch's first query) count for nothing
        sums = _batch_sums(config, tuple(names), params, *batch.arrays, weights)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    return {name: totals[name] / count for name in names}


@cached_jit(static_argnames=("config", "names"))
def _batch_sums(config: T5Config, names: tuple[str, ...], params, input_ids, attention_mask, decoder_input_ids,
                weights):
    """Weighted sums over the batch of each site's activation (compiled once per config and site list).

    Runs the encoder and decoder only (no unembedding: the logits are not needed) and sums each stack's
    stacked cache [layers, B, ...] once before splitting it by site, which halves the compile time of a
    24-layer model against per-site sums of a full forward. Decoder-only models: one forward recording the
    sites (its logits are unused, so XLA drops the unembedding)."""
    from genir_jax.core.model import T5, cache_specs, named_cache

    if is_decoder_only(config):
        from genir_jax.core.decoder_only import forward_with_cache

        _, cache = forward_with_cache(config, params, input_ids, attention_mask, cache_sites=names)
        return {name: jnp.einsum("b...,b->...", cache[name].astype(jnp.float32), weights) for name in names}

    specs = cache_specs(config, names)
    model = T5(config, encoder_cache=specs[0], decoder_cache=specs[1])
    variables = {"params": params}
    encoded, encoder_cache = model.apply(variables, input_ids, attention_mask, method=T5.encode)
    _, decoder_cache = model.apply(variables, encoded, attention_mask, decoder_input_ids, method=T5.decode)
    sums = {}
    for stack, raw, spec in (("encoder", encoder_cache, specs[0]), ("decoder", decoder_cache, specs[1])):
        sums[stack] = {}
        for local, _ in spec:
            batch_axis = 0 if local in STACK_SITES else 1  # layer sites are stacked [layers, B, ...]
            array = jnp.moveaxis(raw[local].astype(jnp.float32), batch_axis, -1)
            sums[stack][local] = jnp.einsum("...b,b->...", array, weights)
    return named_cache(config, names, sums, specs)
