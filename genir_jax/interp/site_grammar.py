"""A small language for patching sweeps: ``--sites`` specs parsed into a `genir_jax.interp.sweep.Sweep`.

One spec: ``STACK.LAYERS.SITE[UNIT]``

- STACK: ``encoder`` or ``decoder``;
- LAYERS: ``*`` (every layer), one layer ``7``, a range ``10-17`` or a list ``1,3,5-7``;
- SITE: a TransformerLens-style local site name (``hook_mlp_out``, ``mlp.hook_post``, ``cross_attn.hook_z``,
  ``attn.hook_z``, ``hook_resid_post``, ... see `genir_jax.core.sites`), or a component alias ``attn`` /
  ``cross_attn`` / ``mlp`` meaning that component's output (``hook_attn_out`` ...), or ``{attn,mlp}`` /
  ``*`` for several / every component of the stack: a layer x component grid;
- UNIT (optional): ``[head]``, ``[neuron]`` or ``[position]`` (one config per unit), optionally with the
  indices to sweep: ``[head=0,3]``, ``[neuron=0-99]``, ``[position=0-4]``.

Stack-level sites have no layers: ``encoder.hook_out``, ``decoder.hook_embed``, ``hook_embed``,
``encoder_final_ln.hook_normalized`` (also spelled ``encoder.final_ln.hook_normalized``), optionally with
``[position]``.

Specs joined by `` x `` form a product (every combination, patches applied left to right); a list of
specs (separate ``--sites`` arguments) is concatenated; a config listed twice (the same sites) is refused.
Errors are `SiteSpecError` (a `GenIRError`) naming the spec and what was expected.

    parse_sweep(cfg, "decoder.*.cross_attn.hook_z[head]", value=0.0)         # every layer x head
    parse_sweep(cfg, ["decoder.10-17.mlp", "decoder.*.attn"], value=FROM_SOURCE)
    parse_sweep(cfg, "decoder.3.mlp.hook_post[neuron=0-99] x encoder.hook_out", value=means)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError
from genir_jax.core.sites import (
    COMPONENT_SITES, COMPONENTS, Site, components as layer_components, is_decoder_only, layer_sites, num_layers,
    parse_site, site_name, stack_sites, stacks,
)

UNIT_ALIASES = {"head": "head", "heads": "head", "neuron": "neuron", "neurons": "neuron",
                "position": "position", "positions": "position", "pos": "position"}
PRODUCT = re.compile(r"\s+x\s+")
_UNIT = re.compile(r"^(?P<base>[^\[\]]+?)\s*(?:\[\s*(?P<unit>[A-Za-z_]+)\s*(?:=\s*(?P<index>[^\]]*))?\])?$")
_LAYERED = re.compile(r"^(?P<stack>encoder|decoder|blocks)\.(?P<layers>\*|[0-9][0-9,\s-]*)\.(?P<site>.+)$")
_STACK_ALIASES = {"encoder.final_ln.hook_normalized": "encoder_final_ln.hook_normalized",
                  "decoder.final_ln.hook_normalized": "decoder_final_ln.hook_normalized",
                  "encoder.hook_embed": "hook_embed"}
GRAMMAR = ("STACK.LAYERS.SITE[UNIT] with STACK encoder|decoder (blocks for decoder-only models), LAYERS '*', '7', '10-17' or '1,3,5-7', SITE a "
           "local site name (hook_mlp_out, mlp.hook_post, cross_attn.hook_z, ...), a component (attn, cross_attn, "
           "mlp), '{attn,mlp}' or '*', and optional [head], [neuron] or [position] (e.g. [head=0,3]); or a "
           "stack-level site (encoder.hook_out, decoder.hook_embed, ...)")


class SiteSpecError(GenIRError, ValueError):
    """A ``--sites`` spec that does not parse or does not fit the model."""


def parse_indices(text: str, *, what: str, spec: str, size: int | None = None) -> list[int]:
    """``'1,3,5-7'`` -> [1, 3, 5, 6, 7] (order kept, duplicates refused); checked against ``0..size-1``."""
    out: list[int] = []
    seen: set[int] = set()  # membership in the list would make a long range quadratic
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not match:
            raise SiteSpecError(f"site spec '{spec}': bad {what} list '{text}'; expected numbers and ranges like "
                                "'7', '10-17' or '1,3,5-7'")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low:
            raise SiteSpecError(f"site spec '{spec}': {what} range '{part}' is empty (the end is below the start)")
        for index in range(low, high + 1):
            if size is not None and index >= size:
                raise SiteSpecError(f"site spec '{spec}': {what} {index} out of range; expected 0-{size - 1}")
            if index in seen:
                raise SiteSpecError(f"site spec '{spec}': {what} {index} is listed twice")
            seen.add(index)
            out.append(index)
    return out


def _unit_length(config: T5Config, site: Site, length: int | None, spec: str, decoder_length: int = 1) -> int:
    """Size of a site's position axis: the encoder's length for encoder sites and cross-attention keys /
    values, the decoder's otherwise (1, the start position, for single-token docids; a docid's teacher-forced
    steps for multi-token ones); a decoder-only model's prompt length (`length`)."""
    uses_encoder = site.stack == "encoder" or site.local in ("cross_attn.hook_k", "cross_attn.hook_v") or \
        is_decoder_only(config)
    if not uses_encoder:
        return int(decoder_length)
    if length is None:
        raise SiteSpecError(f"site spec '{spec}': [position] on an encoder (or decoder-only) site needs the query "
                            "length (the command takes it from the tokenised queries)")
    return int(length)


def _check_unit(config: T5Config, site: Site, unit: str, spec: str) -> None:
    local = site.local
    if unit == "neuron" and not local.startswith("mlp."):
        raise SiteSpecError(f"site spec '{spec}': [neuron] applies to MLP sites (mlp.hook_pre, mlp.hook_post"
                            f"{', mlp.hook_pre_linear' if config.is_gated_act else ''}), not '{local}'")
    if unit == "head" and not local.startswith(("attn.", "cross_attn.")):
        raise SiteSpecError(f"site spec '{spec}': [head] applies to attention sites (attn.hook_z, "
                            f"cross_attn.hook_z, ...), not '{local}'")


def _unit_size(config: T5Config, site: Site, unit: str, length: int | None, spec: str, decoder_length: int = 1) -> int:
    if unit == "head":
        return config.num_heads
    if unit == "neuron":
        return config.d_ff
    return _unit_length(config, site, length, spec, decoder_length)


def _grid(config, names, sites, unit, index_text, value, length, spec, decoder_length=1):
    from genir_jax.interp.interventions import InterventionError
    from genir_jax.interp.sweep import site_grid

    units = None
    size = None
    if unit is not None:
        for site in sites:
            _check_unit(config, site, unit, spec)
        size = _unit_size(config, sites[0], unit, length, spec, decoder_length)
        if index_text is not None:
            units = parse_indices(index_text, what=unit, spec=spec, size=size)
    _check_count(len(names) * (1 if unit is None else len(units) if units is not None else size), spec)
    try:
        return site_grid(config, names, unit=unit, units=units, value=value, length=size if unit == "position" else None)
    except (InterventionError, GenIRError) as exc:
        raise SiteSpecError(f"site spec '{spec}': {exc}") from None


def _component_grid(config, stack, layers, components, value, spec):
    from genir_jax.interp.sweep import component_grid

    return component_grid(config, components=components, layers=layers, value=value, stack=stack)


def parse_atom(config: T5Config, spec: str, *, value, length: int | None = None, decoder_length: int = 1):
    """One spec without `` x `` -> Sweep (see the module docstring)."""
    text = spec.strip()
    match = _UNIT.match(text)
    if not match:
        raise SiteSpecError(f"site spec '{spec}': cannot parse; expected {GRAMMAR}")
    base, unit_text, index_text = match.group("base").strip(), match.group("unit"), match.group("index")
    unit = None
    if unit_text is not None:
        unit = UNIT_ALIASES.get(unit_text.lower())
        if unit is None:
            raise SiteSpecError(f"site spec '{spec}': unknown unit '[{unit_text}]'; expected [head], [neuron] or "
                                "[position] (optionally with indices, e.g. [head=0,3])")
    if index_text is not None and not index_text.strip():
        raise SiteSpecError(f"site spec '{spec}': empty index list in '[{unit_text}=]'")
    base = _STACK_ALIASES.get(base, base)

    # Stack-level sites (no layers).
    stack_site = _stack_site(config, base)
    if stack_site is not None:
        if unit in ("head", "neuron"):
            raise SiteSpecError(f"site spec '{spec}': [{unit}] does not apply to the stack-level site '{base}' "
                                "(only [position] does)")
        return _grid(config, [base], [stack_site], unit, index_text, value, length, spec, decoder_length)

    match = _LAYERED.match(base)
    if not match:
        raise SiteSpecError(f"site spec '{spec}': cannot parse '{base}'; expected {GRAMMAR}")
    stack, layer_text, site_text = match.group("stack"), match.group("layers"), match.group("site").strip()
    if stack not in stacks(config):
        raise SiteSpecError(f"site spec '{spec}': the model has no {stack!r} stack; its layers are "
                            f"{' and '.join(repr(k) + '.LAYERS' for k in stacks(config))}")
    count = num_layers(config, stack)
    if layer_text == "*":
        layers = list(range(count))
    else:
        layers = parse_indices(layer_text, what=f"{stack} layer", spec=spec, size=count)
    if not layers:
        raise SiteSpecError(f"site spec '{spec}': the {stack} has no layers")

    # Component grids.
    available = layer_components(config) if stack == stacks(config)[-1] else ("attn", "mlp")
    if site_text == "*" or site_text.startswith("{"):
        if site_text == "*":
            components = list(available)
        else:
            if not site_text.endswith("}"):
                raise SiteSpecError(f"site spec '{spec}': unclosed '{{' in '{site_text}'; expected e.g. {{attn,mlp}}")
            components = [c.strip() for c in site_text[1:-1].split(",") if c.strip()]
            bad = [c for c in components if c not in available]
            if bad or not components:
                raise SiteSpecError(f"site spec '{spec}': unknown component(s) {bad or components} in '{site_text}'; "
                                    f"the {stack} has {', '.join(available)}")
            if len(set(components)) != len(components):
                raise SiteSpecError(f"site spec '{spec}': a component is listed twice in '{site_text}'")
        if unit is not None:
            raise SiteSpecError(f"site spec '{spec}': [{unit}] does not apply to a component grid; name one site "
                                "(e.g. decoder.*.cross_attn.hook_z[head])")
        return _component_grid(config, stack, layers, components, value, spec)

    local = COMPONENT_SITES.get(site_text, site_text)
    if local not in layer_sites(config, stack):
        try:
            parse_site(config, Site(stack, local, layers[0]).name)
        except GenIRError as exc:
            raise SiteSpecError(f"site spec '{spec}': {exc}") from None
        raise SiteSpecError(f"site spec '{spec}': unknown site '{local}'")  # pragma: no cover
    names = [site_name(stack, local, l) for l in layers]
    sites = [Site(stack, local, l) for l in layers]
    grid = _grid(config, names, sites, unit, index_text, value, length, spec, decoder_length)
    # site_grid orders configs in model order: follow the order the layers were given, axis "layer".
    per_site = grid.shape[1] if unit is not None else 1
    order = {name: i for i, name in enumerate(grid.labels["site"][::per_site])}
    index = [order[n] * per_site + u for n in names for u in range(per_site)]
    result = grid.take(index)
    axes = ("layer", unit) if unit is not None else ("layer",)
    shape = (len(layers), per_site) if unit is not None else (len(layers),)
    return dataclasses.replace(result, axes=axes, shape=shape)


def _check_count(count: int, spec: str) -> None:
    """Refuse specs of more configurations than a sweep holds, before their tables are built."""
    from genir_jax.interp.sweep import check_config_count

    check_config_count(count, f"--sites '{spec}'", SiteSpecError)


def _stack_site(config: T5Config, name: str) -> Site | None:
    for stack in stacks(config):
        for local in stack_sites(stack):
            site = Site(stack, local, None)
            if site.name == name:
                return site
    return None


def parse_spec(config: T5Config, spec: str, *, value, length: int | None = None, decoder_length: int = 1):
    """One spec, possibly a product ``A x B x ...`` -> Sweep."""
    from genir_jax.interp.sweep import product

    if not isinstance(spec, str) or not spec.strip():
        raise SiteSpecError(f"site spec {spec!r}: empty; expected {GRAMMAR}")
    parts = PRODUCT.split(spec.strip())
    sweeps = [parse_atom(config, part, value=value, length=length, decoder_length=decoder_length) for part in parts]
    if len(sweeps) == 1:
        return sweeps[0]
    _check_count(int(np.prod([s.size for s in sweeps], dtype=object)), spec)
    try:
        return product(*sweeps)
    except GenIRError as exc:
        raise SiteSpecError(f"site spec '{spec}': {exc}") from None


def parse_sweep(config: T5Config, spec_or_specs: str | Sequence[str], *, value=0.0, length: int | None = None,
                decoder_length: int = 1):
    """Specs -> one `Sweep`: each spec parsed (products inside it), several specs concatenated.

    `value`: the mode's replacement value, 0.0 (zero ablation), `FROM_SOURCE` (resample / another model)
    or means ``{full site name: mean}`` (`genir_jax.interp.interventions.mean_activations` of `swept_sites`).
    `length`: the (padded) query length, for ``[position]`` on encoder sites; `decoder_length`: the decoder's
    (1 for single-token docids, the longest teacher-forced docid otherwise), for ``[position]`` on decoder sites.
    """
    from genir_jax.interp.sweep import concat

    specs = [spec_or_specs] if isinstance(spec_or_specs, str) else list(spec_or_specs)
    if not specs:
        raise SiteSpecError(f"no site spec given; expected {GRAMMAR}")
    sweeps = [parse_spec(config, spec, value=value, length=length, decoder_length=decoder_length) for spec in specs]
    _check_count(sum(s.size for s in sweeps), " ".join(specs))
    sweep = sweeps[0] if len(sweeps) == 1 else concat(*sweeps)
    _refuse_duplicate_configs(sweep, specs)
    return sweep


def _refuse_duplicate_configs(sweep, specs: Sequence[str]) -> None:
    """Two configs patching the same sites (``decoder.*.mlp`` and ``decoder.0.mlp``, a spec given twice) are
    refused, naming the first repeated one: they would be computed twice and counted twice."""
    columns = {name: values.tolist() for name, values in sweep.labels.items()}
    seen: set = set()
    for index in range(sweep.size):
        row = tuple((name, repr(values[index])) for name, values in columns.items() if values[index] is not None)
        if row in seen:
            described = ", ".join(f"{name}={values[index]}" for name, values in columns.items()
                                  if values[index] is not None and not name.startswith("stack"))
            raise SiteSpecError(f"site specs {list(specs)}: config {described} is listed twice")
        seen.add(row)


def swept_sites(config: T5Config, sweep) -> list[str]:
    """Full names of every site (and layer) some config of `sweep` patches, in model order: what a mean
    ablation needs means of."""
    from genir_jax.core.sites import all_site_names

    names: set[str] = set()
    for term in sweep.terms:
        active = term.row >= 0
        if not active.any():
            continue
        if not term.is_layer_site:
            names.add(Site(term.stack, term.local, None).name)
            continue
        if term.layer is not None:
            layers = np.unique(term.layer[active])
        else:
            tables = term.table[np.unique(term.row[active])]
            count = num_layers(config, term.stack)
            per_layer = np.asarray(tables).reshape(tables.shape[0], tables.shape[1], -1).any(axis=(0, 2))
            layers = np.arange(count) if per_layer.shape[0] == 1 else np.flatnonzero(per_layer)
        names.update(site_name(term.stack, term.local, int(l)) for l in layers)
    return [n for n in all_site_names(config) if n in names]


RECEIVERS_GRAMMAR = ("comma-free '+'-joined parts: COMPONENT[LAYERS] with COMPONENT attn|cross_attn|mlp and "
                     "LAYERS as in site specs ('*', '7', '10-17', '1,3,5-7'), or 'logits'; e.g. "
                     "'mlp[12-23]+logits', 'cross_attn[*]', 'all' (every component input and the logits: ordinary "
                     "patching), 'none' (no receiver: the clean run)")


def parse_receivers(config: T5Config, spec: str):
    """A path-patching receivers sweep (`genir_jax.interp.sweep.receivers`) from ``'mlp[12-23]+logits'``.

    Combine it with the senders by `genir_jax.interp.sweep.product`: the senders' effect then reaches only the
    inputs of the named components in the named decoder layers (and the logits if named).
    """
    from genir_jax.interp import sweep as sw

    text = spec.strip()
    layers = num_layers(config, stacks(config)[-1])
    if text == "all":
        return sw.receivers(config, components={c: "all" for c in layer_components(config)}, logits=True, label="all")
    if text == "none":
        return sw.receivers(config, label="none")
    components: dict[str, list[int]] = {}
    logits = False
    for part in (p.strip() for p in text.split("+")):
        if part == "logits":
            if logits:
                raise SiteSpecError(f"--receivers '{spec}': 'logits' is listed twice")
            logits = True
            continue
        match = re.fullmatch(r"(attn|cross_attn|mlp)\s*\[\s*([^\]]*)\]", part)
        if not match:
            raise SiteSpecError(f"--receivers '{spec}': cannot parse '{part}'; expected {RECEIVERS_GRAMMAR}")
        chosen = match.group(2).strip()
        try:
            indices = list(range(layers)) if chosen == "*" else parse_indices(chosen, what="layer", spec=spec,
                                                                             size=layers)
        except SiteSpecError as exc:
            raise SiteSpecError(str(exc).replace(f"site spec '{spec}'", f"--receivers '{spec}'", 1)) from None
        listed = components.setdefault(match.group(1), [])
        twice = [layer for layer in indices if layer in listed]
        if twice:
            raise SiteSpecError(f"--receivers '{spec}': {match.group(1)} layer {twice[0]} is listed twice")
        listed += indices
    return sw.receivers(config, components=components, logits=logits, label=text)
