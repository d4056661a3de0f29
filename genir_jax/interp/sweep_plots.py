"""Heatmaps of sweep results: one value per config drawn on the sweep's own grid.

The layout is read off the sweep's labels (`genir_jax.interp.sweep`): layer x head, layer x position, layer x
component, a list of layers, or layer x neuron (every swept neuron as one image column; the `TOP_NEURONS` units
with the largest |value| marked and listed beside the map, never a number in every cell). Products and mixed
sweeps have no single grid (`heatmap_layout` returns None).

Colours are symmetric around 0 (a diverging colour-blind-safe map); `vmax` fixes the bound, so an exact map and
an attribution map of the same sweep drawn with one `vmax` compare by eye. Titles name the metric, the site, the
patching mode and the number of queries; a map whose values are all 0 says so.

    from genir_jax.interp.sweep_plots import heatmap
    heatmap(result.sweep, result.aggregates["logit_effect"], "heads.png", metric="logit", mode="zero", queries=50)
"""

from __future__ import annotations

import os
import re

import numpy as np

from genir_jax.base.errors import GenIRError

TOP_NEURONS = 10  # neurons marked and listed on a layer x neuron map


def _int_column(labels, name):
    column = labels.get(name)
    if column is None or column.dtype.kind not in "iu":
        return None
    return np.asarray(column, np.int64)


def _single(labels, name) -> bool:
    column = labels.get(name)
    return column is not None and len(set(column.tolist())) == 1 and None not in set(column.tolist())


def heatmap_layout(sweep) -> str | None:
    """Which heatmap a sweep gets: 'head', 'position', 'neuron', 'component', 'layer' or None."""
    labels = sweep.labels
    if any(name.endswith("_2") for name in labels) or "receivers" in labels:
        return None  # products: no single grid
    layer = _int_column(labels, "layer")
    if layer is None or layer.min() < 0 or not _single(labels, "stack"):
        return None
    for unit in ("head", "position", "neuron"):
        if unit in labels:
            if _int_column(labels, unit) is None or not _single(labels, "component"):
                return None
            pairs = set(zip(layer.tolist(), labels[unit].tolist()))
            return unit if len(pairs) == sweep.size else None
    if "component" in labels:
        pairs = set(zip(layer.tolist(), labels["component"].tolist()))
        if len(pairs) != sweep.size:
            return None
        return "component" if len(set(labels["component"].tolist())) > 1 else "layer"
    return None


def sweep_site(sweep) -> str:
    """The swept site(s) with layers as '*', for titles: 'decoder.*.cross_attn.hook_z', or several in braces
    ('decoder.*.hook_{attn,cross_attn,mlp}_out')."""
    names = sweep.labels.get("site")
    if names is None:
        return "sweep"
    names = list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", str(name)) for name in names.tolist()))
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    prefix = prefix[:max(prefix.rfind("."), prefix.rfind("_")) + 1]  # braces open after a separator
    rests = [name[len(prefix):] for name in names]
    suffix = os.path.commonprefix([rest[::-1] for rest in rests])[::-1]
    suffix = suffix[min([i for i in (suffix.find("."), suffix.find("_")) if i >= 0], default=len(suffix)):]
    return f"{prefix}{{{','.join(rest[:len(rest) - len(suffix)] for rest in rests)}}}{suffix}"


def colour_bound(values, vmax: float | None = None) -> float:
    """The colour scale's bound: `vmax` when given (shared between maps), else the largest finite |value| (1 when
    there is none or it is 0)."""
    if vmax is not None:
        if not (np.isfinite(vmax) and vmax > 0):
            raise GenIRError(f"heatmap: vmax must be a finite number > 0, got {vmax}")
        return float(vmax)
    values = np.asarray(values, np.float64)
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _index_axis(axis, which: str, values: list) -> None:
    """Ticks of a grid axis whose cells are `values` (layers, heads, neurons): every cell when few, else
    integer positions labelled with the cell's value."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ticks = getattr(axis, f"{which}axis")
    if len(values) <= 32:
        getattr(axis, f"set_{which}ticks")(range(len(values)), [str(v) for v in values],
                                          **({"rotation": 90} if which == "x" and len(values) > 16 else {}))
        return
    ticks.set_major_locator(MaxNLocator(nbins=12, integer=True))
    ticks.set_major_formatter(FuncFormatter(lambda x, _: str(values[int(x)]) if 0 <= int(x) < len(values) else ""))


def _grid(sweep, values: np.ndarray, layout: str):
    """(grid [layers, columns] with NaN where no config, row values (layers), column values, x label)."""
    labels = sweep.labels
    layers = sorted(set(labels["layer"].tolist()))
    row_of = {l: i for i, l in enumerate(layers)}
    if layout == "layer":
        columns, unit_values = [str(labels["component"][0])], [str(labels["component"][0])] * sweep.size
        xlabel = "site"
    else:
        unit_values = labels[layout].tolist()
        columns = list(dict.fromkeys(unit_values)) if layout == "component" else sorted(set(unit_values))
        xlabel = layout
    col_of = {c: i for i, c in enumerate(columns)}
    grid = np.full((len(layers), len(columns)), np.nan)
    rows = [row_of[l] for l in labels["layer"].tolist()]
    grid[rows, [col_of[u] for u in unit_values]] = values
    return grid, layers, columns, xlabel


def heatmap_figure(sweep, values, *, metric: str = "value", what: str = "mean effect", mode: str | None = None,
                   queries: int | None = None, vmax: float | None = None, note: str | None = None):
    """The matplotlib Figure of one value per config of `sweep` on its grid (the caller saves and closes it).

    `mode` (zero, mean, resample, source) and `queries` go into the title; `vmax`: the colour bound (shared
    between maps; default: this map's largest |value|); `note`: an extra line under the title (e.g. that an
    attribution disagrees with exact patching)."""
    from genir_jax.base.figures import DIVERGING_CMAP, centre_message, pyplot

    layout = heatmap_layout(sweep)
    if layout is None:
        raise GenIRError("heatmap: this sweep is not a layer x head / position / component / neuron grid")
    values = np.asarray(values, np.float64).reshape(-1)
    if values.shape != (sweep.size,):
        raise GenIRError(f"heatmap: {values.size} values for a sweep of {sweep.size} configs")
    grid, layers, columns, xlabel = _grid(sweep, values, layout)
    bound = colour_bound(values, vmax)
    plt = pyplot()
    neurons = layout == "neuron"
    if neurons:
        width, height = 12.0, min(10.0, 2.6 + 0.22 * len(layers))
    else:
        width, height = min(24.0, 3.5 + 0.45 * len(columns)), min(24.0, 2.4 + 0.3 * len(layers))
    fig, ax = plt.subplots(figsize=(width, height))
    cmap = plt.get_cmap(DIVERGING_CMAP).with_extremes(bad="0.85")
    # downsampled (thousands of neurons in a few hundred pixels): antialiased, else one cell per value
    image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-bound, vmax=bound,
                      interpolation="antialiased" if neurons else "nearest")
    _index_axis(ax, "y", layers)
    _index_axis(ax, "x", columns)
    ax.set_ylabel(f"{sweep.labels['stack'][0]} layer")
    finite = values[np.isfinite(values)]
    if neurons:
        top = _mark_top_units(ax, grid, layers, columns, image)
        xlabel = f"neuron ({len(columns)} per layer; circles: the {top} largest |{metric} {what}|)" if top else "neuron"
    ax.set_xlabel(xlabel)
    if finite.size == 0:
        centre_message(ax, "no finite values")
    elif not finite.any():
        centre_message(ax, f"every value is 0: no config changes {metric}")
    clipped = vmax is not None and finite.size and np.abs(finite).max() > bound
    fig.colorbar(image, ax=ax, label=f"{metric} {what}", extend="both" if clipped else "neither",
                 pad=0.15 if neurons else 0.05)
    where = [sweep_site(sweep)] + ([f"{mode} patching"] if mode else []) \
        + ([f"{queries} quer{'y' if queries == 1 else 'ies'}"] if queries is not None else [])
    lines = [f"{metric}: {what} (patched - clean)", ", ".join(where)] + ([note] if note else [])
    ax.set_title("\n".join(lines), fontsize=10)
    fig.tight_layout()
    return fig


def _mark_top_units(ax, grid: np.ndarray, layers: list, columns: list, image) -> int:
    """Circle the `TOP_NEURONS` cells with the largest |value| (filled with their colour: one neuron is narrower
    than a pixel at T5-large size) and list them (rank, layer, neuron, value) to the right of the map, outside
    the cells; their ranks sit beside the circles. Returns how many were marked."""
    import matplotlib.patheffects as effects

    magnitude = np.where(np.isfinite(grid), np.abs(grid), -1.0)
    order = np.argsort(-magnitude, axis=None, kind="stable")[:TOP_NEURONS]
    order = [k for k in order if magnitude.flat[k] > 0]
    if not order:
        return 0
    rows, cols = np.unravel_index(np.asarray(order), grid.shape)
    ax.scatter(cols, rows, s=60, c=grid[rows, cols], cmap=image.get_cmap(), norm=image.norm, edgecolors="black",
               linewidths=1.2, zorder=3)
    outline = [effects.withStroke(linewidth=2.5, foreground="white")]
    key = []
    for rank, (r, c) in enumerate(zip(rows, cols), 1):
        ax.annotate(str(rank), (c, r), xytext=(5, 5), textcoords="offset points", fontsize=7, zorder=4,
                    path_effects=outline)
        key.append(f"{rank:>2}. L{layers[r]} n{columns[c]}: {grid[r, c]:+.3g}")
    ax.text(1.01, 1.0, "largest |value|\n" + "\n".join(key), transform=ax.transAxes, ha="left", va="top",
            fontsize=7, family="monospace")
    return len(order)


def write_heatmaps(directory: str, sweep, effects: dict[str, np.ndarray], *, what: str = "mean effect",
                   names: dict[str, str] | None = None, mode: str | None = None, queries: int | None = None,
                   vmax: float | None = None, note: str | None = None) -> list[str]:
    """``heatmap_<metric>.png`` for each metric's per-config values (e.g. the mean effect), where the sweep is a
    layer x head / position / component / neuron grid or a list of layers (`heatmap_figure`; `vmax`, `mode`,
    `queries` and `note` as there). Returns the file names written."""
    if heatmap_layout(sweep) is None:
        return []
    from genir_jax.base.figures import pyplot

    plt = pyplot()
    written = []
    for metric, values in effects.items():
        fig = heatmap_figure(sweep, values, metric=metric, what=what, mode=mode, queries=queries, vmax=vmax,
                             note=note)
        name = (names or {}).get(metric, f"heatmap_{metric}.png")
        fig.savefig(os.path.join(directory, name), dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(name)
    return written


def heatmap(sweep, values, path: str, *, metric: str = "value", what: str = "mean effect", **options) -> str:
    """Draw one value per config of `sweep` (e.g. a mean effect) as a PNG at `path`; returns `path`. `options`:
    `mode`, `queries`, `vmax`, `note` of `heatmap_figure`."""
    if heatmap_layout(sweep) is None:
        raise GenIRError("heatmap: this sweep is not a layer x head / position / component / neuron grid")
    directory, name = os.path.split(os.path.abspath(path))
    written = write_heatmaps(directory, sweep, {metric: values}, what=what, names={metric: name}, **options)
    return os.path.join(directory, written[0])
