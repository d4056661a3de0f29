"""Heatmaps of sweep results: one value per config drawn on the sweep's own grid.

The layout is read off the sweep's labels (`genir_jax.interp.sweep`): layer x head, layer x position, layer x
component, a list of layers, or layer x top neurons (the `TOP_NEURONS` neurons with the largest |value| in
each layer, annotated with their ids). Products and mixed sweeps have no single grid (`heatmap_layout`
returns None).

    from genir_jax.interp.sweep_plots import heatmap
    heatmap(result.sweep, result.aggregates["logit_effect"], "heads.png", metric="logit")
"""

from __future__ import annotations

import os

import numpy as np

from genir_jax.base.errors import GenIRError

TOP_NEURONS = 20


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


def write_heatmaps(directory: str, sweep, effects: dict[str, np.ndarray], *, what: str = "mean effect",
                   names: dict[str, str] | None = None) -> list[str]:
    """``heatmap_<metric>.png`` for each metric's per-config values (e.g. the mean effect), where the sweep
    is a layer x head / position / component grid, a layer x neuron sweep (top neurons per layer by
    |effect|) or a list of layers. Returns the file names written."""
    layout = heatmap_layout(sweep)
    if layout is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sweep.labels
    layers = sorted(set(labels["layer"].tolist()))
    row_of = {l: i for i, l in enumerate(layers)}
    stack = labels["stack"][0]
    written = []
    for metric, values in effects.items():
        values = np.asarray(values, np.float64)
        annotations = None
        if layout == "neuron":
            top = min(TOP_NEURONS, max(int(np.sum(labels["layer"] == l)) for l in layers))
            grid = np.full((len(layers), top), np.nan)
            annotations = np.full((len(layers), top), "", dtype=object)
            for l in layers:
                index = np.flatnonzero(labels["layer"] == l)
                order = index[np.argsort(-np.abs(values[index]), kind="stable")][:top]
                grid[row_of[l], :len(order)] = values[order]
                annotations[row_of[l], :len(order)] = [str(int(n)) for n in labels["neuron"][order]]
            columns = [f"#{i + 1}" for i in range(top)]
            xlabel = f"top {top} neurons by |effect| (cells: neuron id)"
        elif layout == "layer":
            grid = np.full((len(layers), 1), np.nan)
            for k in range(sweep.size):
                grid[row_of[labels["layer"][k]], 0] = values[k]
            columns = [str(labels["component"][0])]
            xlabel = "site"
        else:
            unit_values = labels[layout].tolist()
            columns = list(dict.fromkeys(unit_values)) if layout == "component" else sorted(set(unit_values))
            col_of = {c: i for i, c in enumerate(columns)}
            grid = np.full((len(layers), len(columns)), np.nan)
            for k in range(sweep.size):
                grid[row_of[labels["layer"][k]], col_of[unit_values[k]]] = values[k]
            xlabel = layout
        width = min(24.0, 2.5 + 0.45 * grid.shape[1] * (1.6 if annotations is not None else 1.0))
        height = min(24.0, 1.8 + 0.3 * grid.shape[0])
        fig, ax = plt.subplots(figsize=(width, height))
        bound = np.nanmax(np.abs(grid)) if np.isfinite(grid).any() else 1.0
        bound = bound if bound > 0 else 1.0
        image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        if len(columns) <= 64:
            ax.set_xticks(range(len(columns)), [str(c) for c in columns], rotation=90 if len(columns) > 16 else 0)
        ax.set_ylabel(f"{stack} layer")
        ax.set_xlabel(xlabel)
        if annotations is not None and grid.size <= 2000:
            for (i, j), text in np.ndenumerate(annotations):
                if text:
                    ax.text(j, i, text, ha="center", va="center", fontsize=6)
        fig.colorbar(image, ax=ax, label=f"{metric} {what}")
        ax.set_title(f"{metric}: {what} (patched - clean)")
        fig.tight_layout()
        name = (names or {}).get(metric, f"heatmap_{metric}.png")
        fig.savefig(os.path.join(directory, name), dpi=120)
        plt.close(fig)
        written.append(name)
    return written


def heatmap(sweep, values, path: str, *, metric: str = "value", what: str = "mean effect") -> str:
    """Draw one value per config of `sweep` (e.g. a mean effect) as a PNG at `path`; returns `path`."""
    if heatmap_layout(sweep) is None:
        raise GenIRError("heatmap: this sweep is not a layer x head / position / component / neuron grid")
    directory, name = os.path.split(os.path.abspath(path))
    written = write_heatmaps(directory, sweep, {metric: values}, what=what, names={metric: name})
    return os.path.join(directory, written[0])
