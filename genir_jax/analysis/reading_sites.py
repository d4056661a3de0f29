"""Who reads from whom, the catalogue: the readers (MLP neurons, cross-attention heads), the components each
reads in the reference scripts' key order, which of them enter the proportions, the names of the output
files, and the options selecting reader layers and top-k (see `genir_jax.analysis.reading`)."""

from __future__ import annotations

from typing import Sequence

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
EMBEDDING = site_name("decoder", "hook_resid_pre", 0)  # the embedding, as layer 0 reads it
RAW_PREFIX = {"mlp": "all_queries_neuron_similarities", "cross_attn": "all_queries_crattn_similarities"}
RATIO_PREFIX = {"mlp": "neuron_ratio_of_top_k_layers", "cross_attn": "crattn_ratio_of_top_k_layers"}
SUMMARY_FILE = {"mlp": "neuron_reading_summary.json", "cross_attn": "crattn_reading_summary.json"}
ANALYSIS_NAME = {"mlp": "neuron_reading", "cross_attn": "crattn_reading"}



def block_names(layer: int, num_heads: int, heads: bool) -> list[str]:
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
    names = [n for p in range(layer) for n in block_names(p, config.num_heads, heads)]
    return names + [site_name("decoder", site, layer) for site in CURRENT_LAYER[reader]]


def component_index(config: T5Config, layer: int, reader: str) -> tuple[int, ...]:
    """Positions of `component_names` in the flattened [layer, vector] catalogue of `_vector_blocks`."""
    heads = reader == "mlp"
    block = block_names(0, config.num_heads, heads)
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
        if last < first:
            raise GenIRError(f"{option}: range {part!r} is reversed (the end is below the start); write "
                             f"'{last}-{first}'")
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
