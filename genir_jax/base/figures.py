"""One look for every figure genir-jax draws (report panels, sweep heatmaps): the headless pyplot, colour-blind-safe
palettes, integer layer ticks, legends outside the data and a message on empty panels.

Palettes: lines take the Okabe-Ito colours (Okabe & Ito 2008; safe under the common colour-vision deficiencies),
up to ten categories a grey and Paul Tol's nine "muted" hues (no light/dark pairs of one hue), signed values the
diverging ColorBrewer RdBu map centred on 0.
"""

from __future__ import annotations

from typing import Sequence

# Okabe-Ito, without its yellow (too pale for lines on white): orange, sky blue, bluish green, blue, vermillion,
# reddish purple, black.
LINE_COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#0072B2", "#D55E00", "#CC79A7", "#000000")
# Ten categories (stacked bars): a mid grey first (e.g. the embedding), then Paul Tol's nine "muted" hues.
CATEGORY_COLOURS = ("#666666", "#332288", "#88CCEE", "#44AA99", "#117733", "#999933", "#DDCC77", "#CC6677",
                    "#882255", "#AA4499")
DIVERGING_CMAP = "RdBu_r"  # blue < 0 < red; colour-blind safe (ColorBrewer)
STAGE_SHADES = ("0.95", "0.88")  # alternating greys of the stage bands


def pyplot():
    """matplotlib.pyplot on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_ticks(axis, which: str = "x") -> None:
    """Ticks only at whole numbers on an axis that counts layers, heads or neurons (no 0.25, 0.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    for name in which:
        getattr(axis, f"{name}axis").set_major_locator(MaxNLocator(integer=True))


def legend_outside(axis, handles: Sequence | None = None, labels: Sequence[str] | None = None, **options):
    """The legend to the right of `axis`, off the data (save with ``bbox_inches="tight"`` to keep it)."""
    settings = dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False)
    settings.update(options)
    if handles is None:
        return axis.legend(**settings)
    return axis.legend(handles, labels, **settings)


def centre_message(axis, text: str) -> None:
    """A message in the middle of an axis whose data cannot show anything (e.g. every value is 0)."""
    axis.text(0.5, 0.5, text, transform=axis.transAxes, ha="center", va="center", fontsize=10,
              bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.4"))
