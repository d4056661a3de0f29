"""Named activation sites: TransformerLens 2.x names, their parsing, validation and shapes.

Full names (what users write) and where they live in the model:

- ``encoder.{l}.<layer site>`` / ``decoder.{l}.<layer site>`` with layer sites ``hook_resid_pre``,
  ``hook_attn_out``, ``hook_resid_mid``, ``hook_cross_attn_out`` and ``hook_resid_mid_cross`` (decoder),
  ``hook_mlp_out``, ``hook_resid_post``, ``attn.hook_{q,k,v,attn_scores,pattern,z}``,
  ``cross_attn.hook_*`` (decoder), ``mlp.hook_{pre,pre_linear,post}`` (``pre_linear``: gated MLPs only).
- ``hook_embed``: the encoder's input token embeddings (TransformerLens' name); ``decoder.hook_embed``
  the decoder's (a genir-jax addition).
- ``encoder_final_ln.hook_normalized`` / ``decoder_final_ln.hook_normalized``: the final RMS norm's output
  before its learned scale (TransformerLens semantics).
- ``encoder.hook_out`` / ``decoder.hook_out``: a stack's output after its final norm, i.e. what the
  cross-attention reads / what is unembedded (genir-jax additions; TransformerLens has no hook there).
  The encoder output *before* the final norm is ``encoder.{L-1}.hook_resid_post``.

Decoder-only models (`genir_jax.core.decoder_only`, a `DecoderConfig`) have one stack, ``blocks``, and
TransformerLens' own names: ``blocks.{l}.<layer site>`` with the layer sites above less the cross-attention
ones (``mlp.hook_pre_linear``: the SwiGLU up projection of Llama / Qwen2), ``hook_embed`` (token
embeddings; GPT-2's learned positions are added after it) and ``ln_final.hook_normalized``. Their keys and
values (``attn.hook_k`` / ``hook_v``) have the model's key/value heads (fewer under grouped-query attention);
``attn.hook_q`` / ``hook_k`` are before the rotary embedding, as in TransformerLens.

Internally a site is (stack, local name, layer or None). Activation shapes, per example and layer:
residual sites [T, D]; q / z [T, H, K]; k / v [S, H, K] (S: the attended sequence); attention scores and
pattern [H, T, S]; MLP sites [T, F]. A leading batch axis comes first.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Iterable, NamedTuple

from genir_jax.base.errors import GenIRError
from genir_jax.core.config import T5Config
from genir_jax.core.decoder_config import DecoderConfig

ATTENTION_SITES = ("hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z")
RESIDUAL_SITES = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
DECODER_RESIDUAL_SITES = ("hook_cross_attn_out", "hook_resid_mid_cross")
MLP_SITES = ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post")
STACK_SITES = ("hook_embed", "final_ln.hook_normalized", "hook_out")

STACKS = ("encoder", "decoder")
# The decoder-only family: its one stack and the sites of that stack that take no layer.
BLOCKS = "blocks"
BLOCK_STACK_SITES = ("hook_embed", "final_ln.hook_normalized")
# The components of a layer, in layer order, and the site of each one's output.
COMPONENT_SITES = {"attn": "hook_attn_out", "cross_attn": "hook_cross_attn_out", "mlp": "hook_mlp_out"}
COMPONENTS = tuple(COMPONENT_SITES)
BLOCK_COMPONENTS = ("attn", "mlp")  # a decoder-only layer has no cross-attention
# The layer of a site pattern that stands for every layer (`site_name`, `expand_site_patterns`).
ALL_LAYERS = "*"


class SiteError(GenIRError, KeyError):
    """An unknown or malformed site name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class Site(NamedTuple):
    """A parsed site: stack ("encoder" / "decoder", or "blocks" for decoder-only models), local name, and
    layer (None for stack sites; `ALL_LAYERS` in a pattern built by `site_name`)."""

    stack: str
    local: str
    layer: int | str | None

    @property
    def name(self) -> str:
        """The full (TransformerLens-style) name."""
        if self.layer is not None:
            return f"{self.stack}.{self.layer}.{self.local}"
        if self.local == "hook_embed":
            return "hook_embed" if self.stack in ("encoder", BLOCKS) else "decoder.hook_embed"
        if self.local == "final_ln.hook_normalized":
            return "ln_final.hook_normalized" if self.stack == BLOCKS else f"{self.stack}_final_ln.hook_normalized"
        return f"{self.stack}.{self.local}"


def site_name(stack: str, local: str, layer: int | str | None = None) -> str:
    """The full name of a site: the one constructor of site names (TransformerLens' ``get_act_name`` idea).

    ``site_name("decoder", "hook_mlp_out", 3)`` -> ``"decoder.3.hook_mlp_out"``;
    ``site_name("decoder", "cross_attn.hook_q", 2)`` -> ``"decoder.2.cross_attn.hook_q"``;
    ``site_name("encoder", "hook_out")`` -> ``"encoder.hook_out"``; ``site_name("encoder", "hook_embed")`` ->
    ``"hook_embed"``; decoder-only models: ``site_name("blocks", "attn.hook_z", 1)`` -> ``"blocks.1.attn.hook_z"``,
    ``site_name("blocks", "final_ln.hook_normalized")`` -> ``"ln_final.hook_normalized"``. Layer sites need a
    layer, stack sites (`stack_sites`) take none; nothing is validated against a model (`parse_site` does that).
    The layer `ALL_LAYERS` builds the pattern of a layer site in every layer, for `expand_site_patterns`:
    ``site_name("decoder", "hook_mlp_out", ALL_LAYERS)`` -> ``"decoder.*.hook_mlp_out"``.
    """
    if isinstance(layer, str) and layer != ALL_LAYERS:
        raise SiteError(f"layer {layer!r}: expected a layer number or ALL_LAYERS ({ALL_LAYERS!r})")
    if stack not in STACKS + (BLOCKS,):
        raise SiteError(f"unknown stack {stack!r}; expected one of {', '.join(STACKS + (BLOCKS,))}")
    if layer is None and local in STACK_SITES and local not in stack_sites(stack):
        raise SiteError(f"site {local!r} does not exist in the {stack!r} stack")
    if (layer is None) != (local in STACK_SITES):
        raise SiteError(f"site {local!r} " + ("takes no layer" if local in STACK_SITES else "needs a layer"))
    return Site(stack, local, layer).name


def stack_sites(stack: str) -> tuple[str, ...]:
    """Local names of the sites of `stack` that take no layer."""
    return BLOCK_STACK_SITES if stack == BLOCKS else STACK_SITES


def is_decoder_only(config) -> bool:
    """Whether `config` is of the decoder-only family (one ``blocks`` stack) rather than T5."""
    return isinstance(config, DecoderConfig)


def stacks(config) -> tuple[str, ...]:
    """The stacks of a model: ("encoder", "decoder") for T5, ("blocks",) for a decoder-only model."""
    return (BLOCKS,) if is_decoder_only(config) else STACKS


def components(config) -> tuple[str, ...]:
    """The components of a layer of the model's last stack, in layer order (T5: `COMPONENTS`)."""
    return BLOCK_COMPONENTS if is_decoder_only(config) else COMPONENTS


def component_site(stack: str, component: str, layer: int | str) -> str:
    """The full name of a component's output in one layer: ``component_site("decoder", "mlp", 3)`` ->
    ``"decoder.3.hook_mlp_out"`` (components: `COMPONENTS`); in every layer with `ALL_LAYERS`."""
    if component not in COMPONENT_SITES or (stack == BLOCKS and component not in BLOCK_COMPONENTS):
        known = BLOCK_COMPONENTS if stack == BLOCKS else tuple(COMPONENT_SITES)
        raise SiteError(f"unknown component {component!r}; expected one of {', '.join(known)}")
    return site_name(stack, COMPONENT_SITES[component], layer)


def layer_sites(config: T5Config | DecoderConfig, stack: str) -> tuple[str, ...]:
    """Local names of the per-layer sites of a stack."""
    names = list(RESIDUAL_SITES) + [f"attn.{s}" for s in ATTENTION_SITES]
    if stack == "decoder":
        names += list(DECODER_RESIDUAL_SITES) + [f"cross_attn.{s}" for s in ATTENTION_SITES]
    names += [s for s in MLP_SITES if config.is_gated_act or s != "mlp.hook_pre_linear"]
    return tuple(names)


def num_layers(config: T5Config | DecoderConfig, stack: str) -> int:
    return config.num_decoder_layers if stack == "decoder" else config.num_layers


def all_site_names(config: T5Config | DecoderConfig) -> list[str]:
    """Every valid full site name of a model, in model order."""
    names = []
    for stack in stacks(config):
        names.append(Site(stack, "hook_embed", None).name)
        for layer in range(num_layers(config, stack)):
            names += [f"{stack}.{layer}.{local}" for local in layer_sites(config, stack)]
        names += [Site(stack, local, None).name for local in stack_sites(stack) if local != "hook_embed"]
    return names


_LAYER_NAME = re.compile(r"(encoder|decoder)\.(\d+)\.(.+)")
_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


def parse_site(config: T5Config | DecoderConfig, name: str) -> Site:
    """Parse and validate a full site name; unknown names raise `SiteError` suggesting the closest."""
    site = _parse_blocks(name) if is_decoder_only(config) else _parse(name)
    if site is not None:
        if site.layer is None and site.local in stack_sites(site.stack):
            return site
        if site.layer is not None and site.local in layer_sites(config, site.stack):
            if site.layer < num_layers(config, site.stack):
                return site
            raise SiteError(
                f"site '{name}': layer {site.layer} does not exist; the {site.stack} has "
                f"{num_layers(config, site.stack)} layers (0-{num_layers(config, site.stack) - 1})"
            )
    close = difflib.get_close_matches(name, all_site_names(config), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise SiteError(f"unknown site '{name}'{hint}")


def _parse(name: str) -> Site | None:
    if name == "hook_embed":
        return Site("encoder", "hook_embed", None)
    if name == "decoder.hook_embed":
        return Site("decoder", "hook_embed", None)
    for stack in ("encoder", "decoder"):
        if name == f"{stack}_final_ln.hook_normalized":
            return Site(stack, "final_ln.hook_normalized", None)
        if name == f"{stack}.hook_out":
            return Site(stack, "hook_out", None)
    match = _LAYER_NAME.fullmatch(name)
    if match:
        return Site(match.group(1), match.group(3), int(match.group(2)))
    return None


def _parse_blocks(name: str) -> Site | None:
    if name == "hook_embed":
        return Site(BLOCKS, "hook_embed", None)
    if name == "ln_final.hook_normalized":
        return Site(BLOCKS, "final_ln.hook_normalized", None)
    match = _BLOCK_NAME.fullmatch(name)
    return Site(BLOCKS, match.group(2), int(match.group(1))) if match else None


def expand_site_patterns(config: T5Config | DecoderConfig, patterns: Iterable[str]) -> list[str]:
    """Full names matching each name or shell-style pattern (``decoder.*.hook_mlp_out``), model order."""
    everything = all_site_names(config)
    selected: set[str] = set()
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = fnmatch.filter(everything, pattern)
            if not matches:
                raise SiteError(f"site pattern '{pattern}' matches no site")
            selected.update(matches)
        else:
            selected.add(parse_site(config, pattern).name)
    return [name for name in everything if name in selected]


def site_shape(config: T5Config | DecoderConfig, site: Site, query_length: int, key_length: int
               ) -> tuple[int, ...]:
    """Per-example activation shape of a site (no batch or layer axis).

    `query_length` is the stack's own sequence length; `key_length` the length attended to (the stack's
    own for self-attention, the encoder's for cross-attention). Keys and values have the key/value heads
    (`DecoderConfig.num_kv_heads` under grouped-query attention).
    """
    t, d, h, k, f = query_length, config.d_model, config.num_heads, config.d_kv, config.d_ff
    local = site.local
    if local.startswith("mlp."):
        return (t, f)
    if local.startswith(("attn.", "cross_attn.")):
        s = key_length if local.startswith("cross_attn.") else query_length
        leaf = local.split(".", 1)[1]
        if leaf in ("hook_q", "hook_z"):
            return (t, h, k)
        if leaf in ("hook_k", "hook_v"):
            return (s, getattr(config, "num_kv_heads", h), k)
        return (h, t, s)
    return (t, d)


def position_axis(local: str) -> int | None:
    """Axis of the decoder position in a decoder site's activation, counted from the end (`site_shape`
    ends with it: -2 for [T, D] / [T, F] and the query axis of [H, T, S] scores, -3 for [T, H, dk]); None
    for cross-attention keys and values, whose positions are the encoder's. Decoding one position at a
    time (`genir_jax.core.model.T5.decode_step`) cuts a patch's position axis at this axis."""
    leaf = local.split(".", 1)[1] if local.startswith(("attn.", "cross_attn.")) else None
    if leaf is None:
        return -2
    if leaf in ("hook_k", "hook_v"):
        return None if local.startswith("cross_attn.") else -3
    return -3 if leaf in ("hook_q", "hook_z") else -2
