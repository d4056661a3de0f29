"""Sweep heatmaps a reader can trust (issue 23, item 4): the Figure objects say what they show (metric, site,
mode, query count), integer layer ticks, one colour scale when asked, a message when every value is 0, and
neuron maps as one image with the top units marked, never a number in every cell."""

from __future__ import annotations

import time

import numpy as np
import pytest

from genir_jax.core.config import T5Config
from genir_jax.interp.site_grammar import parse_sweep
from genir_jax.interp.sweep_plots import TOP_NEURONS, colour_bound, heatmap, heatmap_figure, sweep_site

SMALL = T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_decoder_layers=6, num_heads=4)


def _sweep(spec: str, config: T5Config = SMALL):
    return parse_sweep(config, [spec], value=0.0, length=5, decoder_length=1)


@pytest.fixture
def close_figures():
    from genir_jax.base.figures import pyplot

    yield
    pyplot().close("all")


def _image(fig):
    (image,) = fig.axes[0].get_images()
    return image


def test_title_names_metric_site_mode_and_queries(close_figures):
    heads = _sweep("decoder.*.cross_attn.hook_z[head]")
    fig = heatmap_figure(heads, np.linspace(-1, 1, heads.size), metric="logit", mode="resample", queries=37)
    title = fig.axes[0].get_title()
    assert "logit" in title and "decoder.*.cross_attn.hook_z" in title
    assert "resample patching" in title and "37 queries" in title
    assert sweep_site(_sweep("decoder.*.*")) == "decoder.*.hook_{attn,cross_attn,mlp}_out"
    assert sweep_site(_sweep("decoder.*.{attn,mlp}")) == "decoder.*.hook_{attn,mlp}_out"
    both = parse_sweep(SMALL, ["decoder.*.attn.hook_z[head]", "decoder.*.cross_attn.hook_z[head]"], value=0.0,
                       length=5, decoder_length=1)
    assert sweep_site(both) == "decoder.*.{attn,cross_attn}.hook_z"


@pytest.mark.parametrize("spec", ["decoder.*.cross_attn.hook_z[head]", "decoder.*.*", "decoder.*.mlp",
                                  "decoder.*.mlp.hook_post[neuron]"])
def test_layer_ticks_are_whole_layers(spec, close_figures):
    sweep = _sweep(spec)
    ax = heatmap_figure(sweep, np.arange(sweep.size, dtype=float) - 3, mode="zero", queries=2).axes[0]
    ticks = ax.get_yticks()
    assert np.all(ticks == np.round(ticks))
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(layer) for layer in range(6)]


def test_shared_vmax_puts_exact_and_attribution_maps_on_one_scale(close_figures):
    heads = _sweep("decoder.*.cross_attn.hook_z[head]")
    exact, estimate = np.linspace(-0.5, 0.2, heads.size), np.linspace(-3.0, 4.0, heads.size)
    maps = [heatmap_figure(heads, v, mode="zero", queries=3, vmax=2.0) for v in (exact, estimate)]
    assert [_image(fig).get_clim() for fig in maps] == [(-2.0, 2.0)] * 2
    # without vmax each map is symmetric around 0 on its own largest |value|
    assert _image(heatmap_figure(heads, estimate, mode="zero", queries=3)).get_clim() == (-4.0, 4.0)
    assert colour_bound(estimate, 2.0) == 2.0 and colour_bound(np.zeros(3)) == 1.0


def test_an_all_zero_map_says_so(close_figures):
    heads = _sweep("decoder.*.cross_attn.hook_z[head]")
    texts = [t.get_text() for t in heatmap_figure(heads, np.zeros(heads.size), metric="rank", mode="mean",
                                                  queries=5).axes[0].texts]
    assert texts == ["every value is 0: no config changes rank"]
    assert len(heatmap_figure(heads, np.ones(heads.size), mode="mean", queries=5).axes[0].texts) == 0


def test_neuron_map_is_one_image_with_the_top_units_marked_outside_the_cells(close_figures):
    neurons = _sweep("decoder.*.mlp.hook_post[neuron]")  # 6 layers x 16 neurons
    values = np.random.default_rng(0).normal(size=neurons.size)
    ax = heatmap_figure(neurons, values, metric="logit", mode="zero", queries=4).axes[0]
    assert _image(ax.figure).get_array().shape == (6, 16)
    ranks = [t for t in ax.texts if t.get_text().isdigit()]
    assert len(ranks) == TOP_NEURONS < neurons.size  # a rank beside each marked unit, no text per cell
    (key,) = [t for t in ax.texts if t.get_text().startswith("largest |value|")]
    assert key.get_position()[0] > 1  # the list of units sits right of the axes
    top = np.argsort(-np.abs(values), kind="stable")[0]
    layer, neuron = neurons.labels["layer"][top], neurons.labels["neuron"][top]
    assert f" 1. L{layer} n{neuron}: {values[top]:+.3g}" in key.get_text()
    (markers,) = ax.collections
    assert len(markers.get_offsets()) == TOP_NEURONS


def test_t5_large_neuron_map_renders_quickly_without_cell_text(tmp_path, close_figures):
    large = T5Config(vocab_size=64, d_model=8, d_kv=4, d_ff=4096, num_layers=2, num_decoder_layers=24, num_heads=4)
    neurons = _sweep("decoder.*.mlp.hook_post[neuron]", large)
    values = np.random.default_rng(1).normal(scale=0.01, size=neurons.size)
    started = time.perf_counter()
    path = heatmap(neurons, values, str(tmp_path / "neurons.png"), metric="logit", mode="mean", queries=1000)
    assert time.perf_counter() - started < 30
    assert open(path, "rb").read(4) == b"\x89PNG"
    ax = heatmap_figure(neurons, values, metric="logit", mode="mean", queries=1000).axes[0]
    assert _image(ax.figure).get_array().shape == (24, 4096)
    assert len(ax.texts) == TOP_NEURONS + 1  # the ranks and the list of units, nothing per cell
    assert all(float(t).is_integer() for t in ax.get_xticks())
