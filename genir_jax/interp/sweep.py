"""Sweeps: K intervention configurations along named config axes, stored compactly.

A *configuration* is an `Interventions` pytree made by one builder call (`genir_jax.interp.interventions`:
`zero_ablation`, `mean_ablation`, `replacement`, `head_ablation`, `neuron_ablation`, `encoder_swap`, ...).
A `Sweep` holds K of them with a label table (one named column per property: ``layer``, ``head``, ``mode``
...) and grid axes (``axes=("layer", "head")``, ``shape=(24, 16)``), never a positional convention.
Make one with:

    stack([cfg_a, cfg_b], labels=[{"mode": "zero"}, {"mode": "mean"}])    # explicit configurations
    site_grid(config, "decoder.*.cross_attn.hook_z", unit="head")         # every layer x head, lazily
    component_grid(config, value=ZERO)                                    # every layer x component
    product(a, b)   # every pair (patches of a, then of b)      concat(a, b)   # a's configs, then b's

Storage: a sweep is a tuple of `Term`s, one per (site, patch slot, value). A term keeps a small table of
dense mask rows and, per config, which row it uses, optionally multiplied by a one-hot over layers and a
one-hot over units (heads, neurons, positions). So 98,304 single-neuron configs cost a few int arrays of
length K, and the dense masks are built inside the compiled sweep, chunk by chunk.

Path patching: a sweep may carry `Receivers`: then every patch of a config is a *sender*, and only the
chosen receivers (the inputs of some components in some layers, and/or the logits) read its effect;
everything else reads the residual stream without it. See `genir_jax.interp.patching`.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from genir_jax.base.options import MAX_CONFIGS
from genir_jax.core.config import T5Config
from genir_jax.interp.interventions import (
    FromSource, InterventionError, Interventions, site_unit_axis, mean_value,
)
from genir_jax.core.sites import (
    BLOCKS, COMPONENT_SITES, COMPONENTS, STACK_SITES, STACKS, Site, component_site, components as layer_components,
    expand_site_patterns, is_decoder_only, num_layers, parse_site, site_shape, stacks,
)
from genir_jax.core.taps import Patch

UNIT_KINDS = ("head", "neuron", "position")
ZERO = 0.0


def check_config_count(count: int, what: str, error: type[Exception] = InterventionError) -> None:
    """Refuse (`error`, naming `what`) a sweep of more than `MAX_CONFIGS` configurations, before anything per
    configuration is allocated."""
    if count > MAX_CONFIGS:
        raise error(f"{what}: {count:,} configurations; a sweep holds at most {MAX_CONFIGS:,} (its per-config "
                    "tables are built before any chunking): split it into several sweeps")


@dataclasses.dataclass(frozen=True)
class Term:
    """One patch slot of one site, shared by all configs of a sweep.

    For config k the mask is ``table[row[k]] * onehot(layer[k]) (layer axis) * onehot(unit[k]) (unit
    axis)``; ``row[k] == -1`` means the term does not act in config k. Masks have the per-layer layout of
    `genir_jax.interp.interventions` (``[L, 1, *site]`` for layer sites, ``[1, *site]`` for stack sites; axes
    may be 1). `value` is 0.0, an array shared by all configs, or `FROM_SOURCE`. Terms of one site apply
    in increasing `order`.
    """

    stack: str
    local: str
    value: Any
    table: np.ndarray
    row: np.ndarray
    layer: np.ndarray | None = None
    unit: np.ndarray | None = None
    unit_axis: int | None = None
    unit_size: int = 0
    order: int = 0

    @property
    def is_layer_site(self) -> bool:
        return self.local not in STACK_SITES

    def take(self, index: np.ndarray) -> "Term":
        return dataclasses.replace(
            self, row=self.row[index], layer=None if self.layer is None else self.layer[index],
            unit=None if self.unit is None else self.unit[index])

    def mask(self, config: T5Config, k: int) -> np.ndarray | None:
        """The dense mask of config k (None when the term does not act in it)."""
        if self.row[k] < 0:
            return None
        mask = np.asarray(self.table[self.row[k]], np.float32)
        if self.layer is not None:
            count = num_layers(config, self.stack)
            mask = mask * (np.arange(count) == self.layer[k]).astype(np.float32).reshape((count,) + (1,) * (mask.ndim - 1))
        if self.unit is not None:
            axis = self.unit_axis + (2 if self.is_layer_site else 1)
            shape = [1] * mask.ndim
            shape[axis] = self.unit_size
            mask = mask * (np.arange(self.unit_size) == self.unit[k]).astype(np.float32).reshape(shape)
        return mask


@dataclasses.dataclass(frozen=True)
class Receivers:
    """Path patching: which component inputs (per config, layer and component in `COMPONENTS` order) and
    whether the logits read the senders' effect. components [K, L, 3] float, logits [K] float."""

    components: np.ndarray
    logits: np.ndarray

    def take(self, index: np.ndarray) -> "Receivers":
        return Receivers(self.components[index], self.logits[index])


@dataclasses.dataclass(frozen=True)
class Sweep:
    """K configurations: patch terms, a label table and named grid axes (see the module docstring)."""

    terms: tuple[Term, ...]
    labels: Mapping[str, np.ndarray]
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    receivers: Receivers | None = None

    def __post_init__(self):
        size = int(np.prod(self.shape)) if self.shape else 1
        for name, column in self.labels.items():
            if len(column) != size:
                raise InterventionError(f"sweep label '{name}' has {len(column)} entries for {size} configs")
        for term in self.terms:
            if len(term.row) != size:
                raise InterventionError(f"sweep term {term.stack}.{term.local} covers {len(term.row)} of {size} configs")

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def __len__(self) -> int:
        return self.size

    def label(self, k: int) -> dict:
        """The labels of config k as plain Python values."""
        return {name: _plain(column[k]) for name, column in self.labels.items()}

    def label_table(self) -> list[dict]:
        return [self.label(k) for k in range(self.size)]

    def take(self, index) -> "Sweep":
        """The configs at `index` (a flat sweep along one ``config`` axis)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        return Sweep(tuple(t.take(index) for t in self.terms), {n: c[index] for n, c in self.labels.items()},
                     ("config",), (len(index),), None if self.receivers is None else self.receivers.take(index))

    def config(self, config: T5Config, k: int) -> Interventions:
        """Config k as an ordinary `Interventions` pytree (dense masks), e.g. for `genir_jax.forward`.
        Path-patching receivers are not part of it (plain forwards have no receivers)."""
        out: Interventions = {}
        for term in sorted(self.terms, key=lambda t: t.order):
            mask = term.mask(config, k)
            if mask is None:
                continue
            sites = out.setdefault(term.stack, {})
            sites[term.local] = tuple(sites.get(term.local, ())) + (Patch(mask, term.value),)
        return out


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def _column(values: Sequence) -> np.ndarray:
    values = list(values)
    if values and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    if values and all(isinstance(v, (float, np.floating)) for v in values):
        return np.asarray(values, dtype=np.float64)
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _value_key(value) -> tuple:
    """Equal values share a term: scalars by value, arrays by content, FROM_SOURCE by identity."""
    if isinstance(value, FromSource):
        return ("source",)
    array = np.asarray(value)
    return ("array", array.shape, array.dtype.str, hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest())


# --------------------------------------------------------------------------------------------------
# Explicit configurations
# --------------------------------------------------------------------------------------------------

def stack(configs: Sequence[Interventions], *, labels: Sequence[Mapping[str, Any]] | None = None,
          axis: str = "config") -> Sweep:
    """K builder-made configurations along one named axis; `labels` gives each config's properties.

    Patches of the same site, slot (position in that site's patch tuple) and value share one term, so a
    stack of many configs that differ only in their masks stays one term per site.
    """
    configs = list(configs)
    if not configs:
        raise InterventionError("stack: no configurations given")
    if labels is not None and len(labels) != len(configs):
        raise InterventionError(f"stack: {len(labels)} labels for {len(configs)} configurations")
    count = len(configs)
    groups: dict[tuple, dict] = {}
    for k, iv in enumerate(configs):
        for stack_name, sites in (iv or {}).items():
            if stack_name not in STACKS + (BLOCKS,):
                raise InterventionError(f"configuration {k}: unknown stack '{stack_name}'")
            for local, patches in sites.items():
                patches = (patches,) if isinstance(patches, Patch) else tuple(patches)
                for slot, patch in enumerate(patches):
                    if not isinstance(patch, Patch):
                        raise InterventionError(f"configuration {k}: {stack_name}.{local}: expected Patch, got "
                                                f"{type(patch).__name__}")
                    key = (stack_name, local, slot, _value_key(patch.value))
                    group = groups.setdefault(key, {"value": patch.value, "rows": {}})
                    group["rows"][k] = np.asarray(patch.mask, np.float32)
    terms = []
    for (stack_name, local, slot, _), group in groups.items():
        shapes = [m.shape for m in group["rows"].values()]
        if len({len(s) for s in shapes}) != 1:
            raise InterventionError(f"stack: masks of {stack_name}.{local} have different ranks: {sorted(set(shapes))}")
        shape = np.broadcast_shapes(*shapes)
        table = np.stack([np.broadcast_to(m, shape) for m in group["rows"].values()])
        row = np.full(count, -1, np.int64)
        row[list(group["rows"])] = np.arange(len(group["rows"]))
        terms.append(Term(stack_name, local, group["value"], table, row, order=slot))
    columns = _label_columns(labels or [{} for _ in configs])
    return Sweep(tuple(terms), columns, (axis,), (count,))


def _label_columns(labels: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    names: list[str] = []
    for entry in labels:
        names += [n for n in entry if n not in names]
    return {name: _column([entry.get(name) for entry in labels]) for name in names}


def from_stacked(interventions: Interventions) -> Sweep:
    """A sweep from one `Interventions` whose masks carry a leading config axis K (the old convention)."""
    terms, sizes = [], set()
    for stack_name, sites in interventions.items():
        for local, patches in sites.items():
            patches = (patches,) if isinstance(patches, Patch) else tuple(patches)
            for slot, patch in enumerate(patches):
                table = np.asarray(patch.mask, np.float32)
                if table.ndim == 0:
                    raise InterventionError(f"sweep: {stack_name}.{local}: masks need a leading config axis K")
                sizes.add(table.shape[0])
                terms.append(Term(stack_name, local, patch.value, table, np.arange(table.shape[0]), order=slot))
    if len(sizes) != 1:
        raise InterventionError(f"sweep: every mask needs the same leading config axis K, got sizes {sorted(sizes)}")
    count = sizes.pop()
    return Sweep(tuple(terms), {}, ("config",), (count,))


def as_sweep(sweep_or_interventions) -> Sweep:
    return sweep_or_interventions if isinstance(sweep_or_interventions, Sweep) else from_stacked(sweep_or_interventions)


# --------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------

def _site_value(config: T5Config, stack_name: str, local: str, value) -> Any:
    """A term value from a mode value: 0.0, FROM_SOURCE, an array, or {full name: mean} (as
    `mean_activations` returns), stacked over layers."""
    if isinstance(value, Mapping):
        return mean_value(config, value, stack_name, local)
    return value


def site_grid(config: T5Config, sites: str | Iterable[str], *, unit: str | None = None, units=None,
              value=ZERO, length: int | None = None) -> Sweep:
    """One config per matched site (x unit): e.g. every layer's ``mlp.hook_post`` x every neuron.

    `sites`: full names or patterns (``"decoder.*.mlp.hook_post"``); `unit`: None (the whole site), "head",
    "neuron" or "position" (`length` needed: the stack's sequence length); `units`: which units (default
    all). `value`: 0.0 (zero ablation), `FROM_SOURCE` (resample / another model), or means
    ``{full name: mean}``. Labels: ``site``, ``stack``, ``component``/``hook`` (the local site name),
    ``layer`` (-1 for stack sites) and the unit kind. Axes: ``("site", unit)`` or ``("site",)``.
    """
    names = expand_site_patterns(config, [sites] if isinstance(sites, str) else list(sites))
    if unit is not None and unit not in UNIT_KINDS:
        raise InterventionError(f"unit '{unit}' is not one of {', '.join(UNIT_KINDS)}")
    parsed = [parse_site(config, n) for n in names]
    size, chosen = 1, np.zeros(1, np.int64)
    if unit is not None:
        kind = {"head": "heads", "neuron": "neurons", "position": "positions"}[unit]
        for site in parsed:
            site_unit_axis(site, kind)  # raises for sites without that axis
        if unit == "position":
            if length is None:
                raise InterventionError("site_grid: unit 'position' needs the sequence `length`")
            size = int(length)
        else:
            size = config.num_heads if unit == "head" else config.d_ff
        chosen = np.arange(size) if units is None else np.asarray(list(units), dtype=np.int64).reshape(-1)
        if chosen.size == 0:
            raise InterventionError(f"site_grid: no {unit}s selected")
        bad = chosen[(chosen < 0) | (chosen >= size)]
        if bad.size:
            raise InterventionError(f"{unit} index {int(bad[0])} out of range: the sites {names[0]}... have "
                                    f"{size} {unit}s (0-{size - 1})")
    per_site = len(chosen)
    count = len(parsed) * per_site
    check_config_count(count, f"site_grid {names[0]}...")
    groups: dict[tuple[str, str], list[int]] = {}
    for i, site in enumerate(parsed):
        groups.setdefault((site.stack, site.local), []).append(i)
    terms = []
    for (stack_name, local), members in groups.items():
        template = Site(stack_name, local, None if local in STACK_SITES else 0)
        rank = len(site_shape(config, template, 1, 1))
        table = np.ones((1, 1) + (1,) * rank, np.float32) if local in STACK_SITES else \
            np.ones((1, 1, 1) + (1,) * rank, np.float32)
        row = np.full(count, -1, np.int64)
        layer = np.full(count, -1, np.int64)
        unit_index = np.full(count, -1, np.int64) if unit is not None else None
        for i in members:
            span = slice(i * per_site, (i + 1) * per_site)
            row[span] = 0
            layer[span] = parsed[i].layer if parsed[i].layer is not None else -1
            if unit_index is not None:
                unit_index[span] = chosen
        axis = None
        if unit is not None:
            kind = {"head": "heads", "neuron": "neurons", "position": "positions"}[unit]
            axis = site_unit_axis(template, kind)
        terms.append(Term(stack_name, local, _site_value(config, stack_name, local, value), table, row,
                          layer=layer if local not in STACK_SITES else None, unit=unit_index, unit_axis=axis,
                          unit_size=size))
    labels = {
        "site": _column([s.name for s in parsed for _ in range(per_site)]),
        "stack": _column([s.stack for s in parsed for _ in range(per_site)]),
        "component": _column([_component_of(s.local) for s in parsed for _ in range(per_site)]),
        "layer": np.repeat(np.asarray([-1 if s.layer is None else s.layer for s in parsed], np.int64), per_site),
    }
    if unit is not None:
        labels[unit] = np.tile(chosen, len(parsed))
    axes = ("site", unit) if unit is not None else ("site",)
    shape = (len(parsed), per_site) if unit is not None else (len(parsed),)
    return Sweep(tuple(terms), labels, axes, shape)


def _component_of(local: str) -> str:
    for component, site in COMPONENT_SITES.items():
        if local == site or local.startswith(component + "."):
            return component
    return local


def component_grid(config: T5Config, *, components: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                   value=ZERO, stack: str | None = None) -> Sweep:
    """One config per layer x component of a stack (the component's output patched): axes ("layer",
    "component"). `stack` defaults to the model's last ("decoder" for T5, "blocks" for decoder-only models).
    Components default to the stack's: attn, cross_attn, mlp (T5's decoder) or attn, mlp (T5's encoder,
    decoder-only blocks)."""
    known = stacks(config)
    stack = known[-1] if stack is None else stack
    if stack not in known:
        raise InterventionError(f"unknown stack '{stack}'; expected {' or '.join(repr(k) for k in known)}")
    available = layer_components(config) if stack == known[-1] else ("attn", "mlp")
    components = list(available if components is None else components)
    unknown = [c for c in components if c not in available]
    if unknown:
        raise InterventionError(f"unknown component(s) {unknown} in the {stack}; expected some of {', '.join(available)}")
    count = num_layers(config, stack)
    layers = list(range(count)) if layers is None else [int(l) for l in layers]
    for layer in layers:
        if not 0 <= layer < count:
            raise InterventionError(f"layer {layer} out of range: the {stack} has layers 0-{count - 1}")
    names = [component_site(stack, c, l) for l in layers for c in components]
    grid = site_grid(config, names, value=value)
    # site_grid orders configs by model order of the names; re-order to (layer, component) as asked.
    order = {name: i for i, name in enumerate(grid.labels["site"])}
    result = grid.take([order[n] for n in names])
    labels = dict(result.labels)
    labels["component"] = _column([c for _ in layers for c in components])
    return dataclasses.replace(result, labels=labels, axes=("layer", "component"), shape=(len(layers), len(components)))


# --------------------------------------------------------------------------------------------------
# Composition
# --------------------------------------------------------------------------------------------------

def _max_order(sweep: Sweep) -> int:
    return max((t.order for t in sweep.terms), default=-1)


def product(*sweeps: Sweep) -> Sweep:
    """Every combination of one config from each sweep (the first sweep's axis outermost); patches apply
    in the order of the sweeps. Labels are merged (a name used twice gets a ``_2`` suffix)."""
    if not sweeps:
        raise InterventionError("product: no sweeps given")
    check_config_count(int(np.prod([s.size for s in sweeps], dtype=object)), "product")
    result = sweeps[0]
    for other in sweeps[1:]:
        result = _product2(result, other)
    return result


def _product2(a: Sweep, b: Sweep) -> Sweep:
    ka, kb = a.size, b.size
    outer = np.repeat(np.arange(ka), kb)
    inner = np.tile(np.arange(kb), ka)
    offset = _max_order(a) + 1
    terms = [t.take(outer) for t in a.terms]
    terms += [dataclasses.replace(t.take(inner), order=t.order + offset) for t in b.terms]
    labels = {n: c[outer] for n, c in a.labels.items()}
    for name, column in b.labels.items():
        new = name
        while new in labels:
            new += "_2"
        labels[new] = column[inner]
    if a.receivers is not None and b.receivers is not None:
        raise InterventionError("product: both sweeps choose path-patching receivers; give receivers once")
    receivers = a.receivers.take(outer) if a.receivers is not None else (
        b.receivers.take(inner) if b.receivers is not None else None)
    axes = _unique_axes(a.axes + b.axes)
    return Sweep(tuple(terms), labels, axes, a.shape + b.shape, receivers)


def _unique_axes(axes: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    for axis in axes:
        name = axis
        while name in out:
            name += "_2"
        out.append(name)
    return tuple(out)


def concat(*sweeps: Sweep, axis: str = "config") -> Sweep:
    """The configs of each sweep in turn, along one axis. Labels missing in a part are None."""
    if not sweeps:
        raise InterventionError("concat: no sweeps given")
    sizes = [s.size for s in sweeps]
    total = sum(sizes)
    check_config_count(total, "concat")
    terms = []
    start = 0
    for sweep, size in zip(sweeps, sizes):
        for term in sweep.terms:
            index = np.full(total, -1, np.int64)
            index[start:start + size] = np.arange(size)
            safe = np.maximum(index, 0)
            taken = term.take(safe)
            row = np.where(index >= 0, taken.row, -1)
            terms.append(dataclasses.replace(taken, row=row))
        start += size
    names: list[str] = []
    for sweep in sweeps:
        names += [n for n in sweep.labels if n not in names]
    labels = {n: _column([v for s in sweeps for v in (s.labels[n].tolist() if n in s.labels else [None] * s.size)])
              for n in names}
    if any(s.receivers is not None for s in sweeps):
        if not all(s.receivers is not None for s in sweeps):
            raise InterventionError("concat: either every part or none chooses path-patching receivers")
        receivers = Receivers(np.concatenate([s.receivers.components for s in sweeps]),
                              np.concatenate([s.receivers.logits for s in sweeps]))
    else:
        receivers = None
    return Sweep(tuple(terms), labels, (axis,), (total,), receivers)


def relabel(sweep: Sweep, **columns) -> Sweep:
    """The same sweep with extra (or replaced) label columns, each a value or a sequence of K values."""
    labels = dict(sweep.labels)
    for name, values in columns.items():
        if isinstance(values, (str, int, float, bool)) or values is None:
            values = [values] * sweep.size
        labels[name] = _column(list(values))
    return dataclasses.replace(sweep, labels=labels)


# --------------------------------------------------------------------------------------------------
# Path patching
# --------------------------------------------------------------------------------------------------

def receivers(config: T5Config, *, components: Mapping[str, Iterable[int] | str] | None = None, logits: bool = False,
              label: str | None = None) -> Sweep:
    """A one-config sweep that only chooses path-patching receivers; combine it with senders by `product`.

    `components` maps the components of a layer of the model's last stack ("attn" / "cross_attn" / "mlp" of
    T5's decoder; "attn" / "mlp" of a decoder-only model's ``blocks``) to the layers whose component INPUT
    reads the senders' effect ("all" for every layer); `logits`: the final residual (the unembedding) reads it.
    Senders reach a receiver only if they are upstream of it. ``receivers(cfg, components={c: "all" for c
    in components(cfg)}, logits=True)`` is ordinary patching; ``receivers(cfg)`` reaches nothing (the clean run).
    The table is [1, layers, len(components(cfg))], components in `genir_jax.core.sites.components` order.
    """
    known = layer_components(config)
    layers = num_layers(config, stacks(config)[-1])
    table = np.zeros((1, layers, len(known)), np.float32)
    for component, chosen in (components or {}).items():
        if component not in known:
            raise InterventionError(f"receivers: unknown component '{component}'; expected one of {', '.join(known)}")
        chosen = range(layers) if chosen == "all" else [int(l) for l in chosen]
        for layer in chosen:
            if not 0 <= layer < layers:
                raise InterventionError(f"receivers: layer {layer} out of range 0-{layers - 1}")
            table[0, layer, known.index(component)] = 1.0
    text = label if label is not None else _describe_receivers(table[0], logits, known)
    return Sweep((), {"receivers": _column([text])}, ("receivers",), (1,),
                 Receivers(table, np.asarray([1.0 if logits else 0.0], np.float32)))


def _describe_receivers(table: np.ndarray, logits: bool, known: Sequence[str]) -> str:
    parts = []
    for c, component in enumerate(known):
        layers = np.flatnonzero(table[:, c])
        if layers.size:
            parts.append(f"{component}[{','.join(str(int(l)) for l in layers)}]")
    if logits:
        parts.append("logits")
    return "+".join(parts) or "none"


# --------------------------------------------------------------------------------------------------
# What a config touches (prefix sharing)
# --------------------------------------------------------------------------------------------------

def first_decoder_layer(config: T5Config, sweep: Sweep) -> tuple[np.ndarray, np.ndarray]:
    """Per config: (first layer of the model's last stack any patch touches (its layer count if none),
    encoder touch kind). The last stack is T5's decoder or a decoder-only model's ``blocks``.

    Encoder touch kind: 0 none, 1 only ``encoder.hook_out`` (the clean encoder output can be patched
    directly), 2 anything else in the encoder (the encoder runs per config). A config that touches the
    encoder, or the last stack's embedding, starts at layer 0.
    """
    count = sweep.size
    layers = num_layers(config, stacks(config)[-1])
    first = np.full(count, layers, np.int64)
    encoder = np.zeros(count, np.int64)
    for term in sweep.terms:
        active = term.row >= 0
        if not active.any():
            continue
        if term.table.size and not np.any(term.table):
            continue  # all-zero mask rows touch nothing
        row_nonzero = np.array([bool(np.any(term.table[r])) if r >= 0 else False for r in range(term.table.shape[0])])
        acts = active & row_nonzero[np.maximum(term.row, 0)]
        if term.stack == "encoder":
            kind = 1 if term.local == "hook_out" else 2
            encoder[acts] = np.maximum(encoder[acts], kind)
            first[acts] = 0
            continue
        if not term.is_layer_site:
            if term.local == "hook_embed":
                first[acts] = 0
            continue  # final-norm / hook_out sites act after every layer
        if term.layer is not None:
            first[acts] = np.minimum(first[acts], term.layer[acts])
            continue
        per_row = np.array([_first_nonzero_layer(term.table[r]) for r in range(term.table.shape[0])])
        first[acts] = np.minimum(first[acts], per_row[term.row[acts]])
    return first, encoder


def _first_nonzero_layer(mask: np.ndarray) -> int:
    flat = np.asarray(mask).reshape(mask.shape[0], -1).any(axis=1)
    hits = np.flatnonzero(flat)
    if mask.shape[0] == 1 and hits.size:
        return 0  # a size-1 layer axis broadcasts to every layer
    return int(hits[0]) if hits.size else np.iinfo(np.int64).max
