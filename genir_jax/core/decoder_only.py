"""Decoder-only GenIR models (GPT-2, Llama, Qwen2) as Flax Linen modules, and the pure functions that run them.

Architecture (as transformers' `GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen2ForCausalLM`): token embedding
(plus learned positions for GPT-2), a stack of pre-normed [causal self-attention, MLP] layers added to the
residual stream, a final norm and the unembedding (the token embedding when tied, else `lm_head`). The
layers run under `nn.scan` with parameters stacked along a leading `layers` axis, as T5's stacks.

The functional boundary mirrors `genir_jax.core.model`: `forward` / `forward_with_cache` take the
`DecoderConfig`, the parameter pytree, arrays and an explicit ``interventions`` argument
``{"blocks": {local site: Patch | (Patch, ...)}}`` (layer sites with a leading layer axis; applied by the same
`SiteTap` as T5; build them with `genir_jax.interp.interventions` and names like ``blocks.3.attn.hook_z``).
`init_kv_cache` / `decode_step` run the same layers over a chunk of new tokens with a key/value cache
(`DecoderOnlyCache`): a prompt at slot 0, then one token at a time, equal to the full forward.

Positions: `positions` [B, T] may be given; otherwise they come from the attention mask as transformers'
`generate` computes them (`positions_from_mask`: ``cumsum(mask) - 1``, padding at 1), so left-padded rows
start at position 0 at their first real token, and right-padded rows are unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genir_jax.core.decoder_config import DecoderConfig
from genir_jax.core.decoder_modules import INIT_STD, CausalSelfAttention, DecoderMLP, LayerNorm
from genir_jax.core.modules import RMSNorm, partitioned
from genir_jax.core.sites import BLOCK_STACK_SITES, BLOCKS, expand_site_patterns, parse_site
from genir_jax.core.taps import SiteTap, per_layer
from genir_jax.core.validation import validate

Params = Mapping[str, Any]


class DecoderOnlyCache(NamedTuple):
    """Keys (after the rotary embedding) and values of every layer for `T_max` slots, ``[L, B, T_max, KVH, K]``
    (zeros where nothing was written yet): an explicit pytree carried functionally, as T5's `DecodeCache`."""

    k: Any
    v: Any


def _norm(config: DecoderConfig, dtype, name: str) -> nn.Module:
    if config.is_gpt2:
        return LayerNorm(epsilon=config.norm_epsilon, dtype=dtype, name=name)
    return RMSNorm(epsilon=config.norm_epsilon, dtype=dtype, name=name)


class _Block(nn.Module):
    """One layer; the scan body. Carry: the residual stream. Output: (recorded sites, keys and values)."""

    config: DecoderConfig
    record: frozenset[str] = frozenset()
    span: int = 1
    dtype: Any = None

    @nn.compact
    def __call__(self, x, positions, mask, layer_interventions, layer_cache, index, layer_receivers=None):
        """`layer_receivers` (path patching, [2] for attn / mlp; only without a cache): the carry is then
        (residual, the senders' summed effect on it so far); a component whose receiver entry is 0 reads the
        residual without that effect, and every component's sender effect (its patched output minus its output
        without patches, from the same input) is added to it, as T5's `genir_jax.core.model._Layer` does."""
        cfg = self.config
        paths = layer_receivers is not None
        if paths:
            x, delta = x
        tap = SiteTap(layer_interventions, self.record, index, self.span)
        unpatched = SiteTap(None)

        def read(component):  # the residual as component `component` (0 attn, 1 mlp) reads it
            return x if not paths else x - (1.0 - layer_receivers[component]).astype(x.dtype) * delta

        x = tap("hook_resid_pre", nn.with_logical_constraint(x, ("batch", "length", "embed")))
        attention = CausalSelfAttention(
            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, d_kv=cfg.d_kv, d_model=cfg.d_model,
            qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, rotary_theta=None if cfg.is_gpt2 else cfg.rope_theta,
            dtype=self.dtype, name="attn")
        normed = _norm(cfg, self.dtype, "attn_norm")(read(0))
        attn_out, kv = attention(normed, positions, mask, tap.scoped("attn."), layer_cache, index)
        attn_out = tap("hook_attn_out", attn_out)
        if paths:
            delta = delta + attn_out - attention(normed, positions, mask, unpatched.scoped("attn."), None, None)[0]
        x = tap("hook_resid_mid", x + attn_out)
        mlp = DecoderMLP(d_model=cfg.d_model, d_ff=cfg.d_ff, activation=cfg.activation, gated=cfg.is_gated_act,
                         bias=cfg.mlp_bias, dtype=self.dtype, name="mlp")
        normed = _norm(cfg, self.dtype, "mlp_norm")(read(1))
        mlp_out = tap("hook_mlp_out", mlp(normed, tap.scoped("mlp.")))
        if paths:
            delta = delta + mlp_out - mlp(normed, unpatched.scoped("mlp."))
        x = tap("hook_resid_post", x + mlp_out)
        return (x, delta) if paths else x, ({name: tap.cache[name] for name in self.record}, kv)


class DecoderOnly(nn.Module):
    """A decoder-only language model. `record`: local site names to record (layer sites at every layer)."""

    config: DecoderConfig
    record: frozenset[str] = frozenset()
    dtype: Any = None

    def _table(self, array):
        return array if self.dtype is None else array.astype(self.dtype)

    @nn.compact
    def __call__(self, input_ids, positions, key_mask, interventions=None, cache: DecoderOnlyCache | None = None,
                 index=None):
        """Logits [B, T, V] of tokens `input_ids` [B, T] at `positions` [B, T]; `key_mask` [B, S] marks the
        keys that may be attended (S = T, or the cache's T_max). Returns (logits, recorded sites, cache).

        With `cache`, the tokens fill slots ``index .. index + T - 1`` (`index` possibly traced); each attends
        to the slots up to its own that `key_mask` allows, and the updated cache is returned."""
        cfg = self.config
        count, length = cfg.num_layers, input_ids.shape[1]
        interventions = dict((interventions or {}).get(BLOCKS) or {})
        stack_tap = SiteTap({k: v for k, v in interventions.items() if k in BLOCK_STACK_SITES},
                            self.record & set(BLOCK_STACK_SITES), index, length)
        layer_interventions = {k: per_layer(v, count) for k, v in interventions.items() if k not in BLOCK_STACK_SITES}
        normal = nn.initializers.normal(INIT_STD)
        embed = self.param("embed", partitioned(normal, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model),
                           jnp.float32)
        x = stack_tap("hook_embed", jnp.take(self._table(embed), input_ids, axis=0))
        if cfg.is_gpt2:
            pos_embed = self.param("pos_embed", partitioned(normal, ("length", "embed")),
                                   (cfg.max_position_embeddings, cfg.d_model), jnp.float32)
            x = x + jnp.take(self._table(pos_embed), positions, axis=0)
        if cache is None:
            causal = jnp.tril(jnp.ones((length, length), dtype=bool))
        else:
            causal = jnp.arange(cache.k.shape[2])[None, :] <= (index + jnp.arange(length))[:, None]
        mask = causal[None, None] & key_mask.astype(bool)[:, None, None, :]
        layers = nn.scan(
            _Block, variable_axes={"params": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0, 0, nn.broadcast), length=count,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(config=cfg, record=self.record - set(BLOCK_STACK_SITES), span=length, dtype=self.dtype, name="layers")
        x, (recorded, kv) = layers(x, positions, mask, layer_interventions or None,
                                   None if cache is None else tuple(cache), index)
        x = _norm(cfg, self.dtype, "final_norm")(x, stack_tap.scoped("final_ln."))
        if cfg.tie_word_embeddings:
            logits = jnp.einsum("btd,vd->btv", x, self._table(embed))
        else:
            lm_head = self.param("lm_head", partitioned(normal, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size),
                                 jnp.float32)
            logits = jnp.einsum("btd,dv->btv", x, self._table(lm_head))
        recorded = dict(recorded)
        recorded.update(stack_tap.cache)
        return logits, recorded, None if cache is None else DecoderOnlyCache(*kv)


# --------------------------------------------------------------------------------------------------
# The functional boundary: params in, interventions in, arrays out.
# --------------------------------------------------------------------------------------------------

def positions_from_mask(attention_mask):
    """Position ids as transformers' `generate` derives them from an attention mask [B, T]:
    ``cumsum(mask) - 1``, and 1 where the mask is 0 (padding; those positions are never attended)."""
    mask = jnp.asarray(attention_mask, dtype=jnp.int32)
    return jnp.where(mask == 0, 1, jnp.cumsum(mask, axis=-1) - 1)


def last_positions(attention_mask):
    """Per row of an attention mask [B, T], the index of its last real token: where a prompt (left- or
    right-padded) predicts its next token, e.g. a generative-retrieval query its atomic docid."""
    mask = jnp.asarray(attention_mask, dtype=jnp.int32)
    return mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)


def _inputs(input_ids, attention_mask, positions):
    ids = jnp.asarray(input_ids, dtype=jnp.int32)
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, dtype=jnp.int32)
    if np.shape(mask) != np.shape(ids):
        raise ValueError(f"attention_mask has shape {np.shape(mask)}, input_ids {np.shape(ids)}")
    positions = positions_from_mask(mask) if positions is None else jnp.asarray(positions, dtype=jnp.int32)
    return ids, mask, positions


def _jnp_dtype(dtype):
    return None if dtype is None else jnp.dtype(dtype)


def _record_request(config: DecoderConfig, cache_sites: Iterable[str]) -> tuple[list[str], frozenset[str]]:
    names = expand_site_patterns(config, cache_sites)
    return names, frozenset(parse_site(config, name).local for name in names)


def _named(config: DecoderConfig, names: list[str], raw: Mapping[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """Recorded sites by full name: layer sites picked from their [L, B, ...] stack."""
    out = {}
    for name in names:
        site = parse_site(config, name)
        out[name] = raw[site.local] if site.layer is None else raw[site.local][site.layer]
    return out


@functools.partial(jax.jit, static_argnames=("config", "record", "dtype"))
def _forward(config, params, input_ids, attention_mask, positions, interventions, record, dtype):
    logits, raw, _ = DecoderOnly(config, record=record, dtype=dtype).apply(
        {"params": params}, input_ids, positions, attention_mask, interventions)
    return logits, raw


def forward_with_cache(config: DecoderConfig, params: Params, input_ids, attention_mask=None, interventions=None, *,
                       positions=None, cache_sites: Iterable[str] = (), dtype=None
                       ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Logits [B, T, V] and ``{full site name: activation [B, ...]}`` for the requested sites (names or
    patterns such as ``"blocks.*.hook_resid_post"``). `positions` [B, T]: default `positions_from_mask`.
    `dtype` (e.g. ``jnp.bfloat16``) casts the parameters at use."""
    ids, mask, positions = _inputs(input_ids, attention_mask, positions)
    names, record = _record_request(config, cache_sites)
    if interventions:
        validate(config, interventions, ids.shape[0], ids.shape[1], ids.shape[1])
    logits, raw = _forward(config, params, ids, mask, positions, interventions, record, _jnp_dtype(dtype))
    return logits, _named(config, names, raw)


def forward(config: DecoderConfig, params: Params, input_ids, attention_mask=None, interventions=None, *,
            positions=None, dtype=None) -> jnp.ndarray:
    """Logits [B, T, V] of a decoder-only model for token ids (options as `forward_with_cache`)."""
    return forward_with_cache(config, params, input_ids, attention_mask, interventions, positions=positions,
                              dtype=dtype)[0]


def init_kv_cache(config: DecoderConfig, batch: int, length: int, dtype=jnp.float32) -> DecoderOnlyCache:
    """An empty key/value cache of `length` slots for `batch` sequences."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.d_kv)
    return DecoderOnlyCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _decode_step(config, params, input_ids, positions, key_mask, cache, index, interventions, dtype):
    logits, _, cache = DecoderOnly(config, dtype=dtype).apply(
        {"params": params}, input_ids, positions, key_mask, interventions, cache, index)
    return logits, cache


def decode_step(config: DecoderConfig, params: Params, input_ids, cache: DecoderOnlyCache, index, key_mask,
                interventions=None, *, positions=None, dtype=None) -> tuple[jnp.ndarray, DecoderOnlyCache]:
    """Logits [B, n, V] of `n` new tokens `input_ids` [B, n] written at cache slots ``index .. index + n - 1``
    (`index` may be traced), and the updated cache: a prompt at index 0, then one token at a time.

    `key_mask` [B, T_max] marks the slots that may be attended (padding 0; slots not written yet are never
    attended, whatever it says). `positions` [B, n]: default, those `positions_from_mask` gives `key_mask` at
    these slots. Interventions are those of the full forward: position axes longer than 1 are cut to these
    slots (`genir_jax.core.taps.at_position`)."""
    ids = jnp.asarray(input_ids, dtype=jnp.int32)
    key_mask = jnp.asarray(key_mask, dtype=jnp.int32)
    slots = cache.k.shape[2]
    if np.shape(key_mask) != (ids.shape[0], slots):
        raise ValueError(f"decode_step: key_mask has shape {np.shape(key_mask)}, expected (batch, cache slots) = "
                         f"{(ids.shape[0], slots)}")
    if isinstance(index, (int, np.integer)) and not 0 <= index <= slots - ids.shape[1]:
        # (a traced index is not checked: lax.dynamic_update_slice would clamp it silently)
        raise ValueError(f"decode_step: {ids.shape[1]} token(s) at slot {index} do not fit a cache of {slots} slots")
    if positions is None:
        positions = jax.lax.dynamic_slice_in_dim(positions_from_mask(key_mask), index, ids.shape[1], axis=1)
    return _decode_step(config, params, ids, jnp.asarray(positions, dtype=jnp.int32), key_mask, cache,
                        jnp.asarray(index, dtype=jnp.int32), interventions, _jnp_dtype(dtype))


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _from_layer(config, params, x, start, positions, key_mask, interventions, receivers, dtype):
    count, length = config.num_layers, x.shape[1]
    sites = dict((interventions or {}).get(BLOCKS) or {})
    stack_tap = SiteTap({k: v for k, v in sites.items() if k in BLOCK_STACK_SITES})
    layer_interventions = {k: per_layer(v, count) for k, v in sites.items() if k not in BLOCK_STACK_SITES}
    mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None] & key_mask.astype(bool)[:, None, None, :]
    block = _Block(config, span=length, dtype=dtype)
    paths = receivers is not None

    def body(carry, xs):
        layer_params, index, patches, layer_receivers = xs

        def run(c):
            return block.apply({"params": layer_params}, c, positions, mask, patches or None, None, None,
                               layer_receivers)[0]

        return jax.lax.cond(index >= start, run, lambda c: c, carry), None

    carry = (x, jnp.zeros_like(x)) if paths else x
    carry, _ = jax.lax.scan(body, carry, (params["layers"], jnp.arange(count, dtype=jnp.int32), layer_interventions,
                                          receivers[0] if paths else None))
    if paths:  # the final norm (the logits) reads the senders' effect only if it is a receiver
        x = carry[0] - (1.0 - jnp.asarray(receivers[1], carry[0].dtype)) * carry[1]
    else:
        x = carry
    norm = _norm(config, dtype, "final_norm").clone(parent=None, name=None)
    return norm.apply({"params": params["final_norm"]}, x, stack_tap.scoped("final_ln."))


def forward_from_layer(config: DecoderConfig, params: Params, x, start, attention_mask=None, interventions=None, *,
                       positions=None, receivers=None, dtype=None) -> jnp.ndarray:
    """The residual stream `x` [B, T, D] entering layer `start` run through layers start..L-1 and the final
    norm: hidden states [B, T, D] (``unembed`` them). Traceable; `start` may be traced (layers before it are
    skipped by `lax.cond`), so configurations that leave layers 0..start-1 untouched reuse a clean prefix,
    as `genir_jax.core.model.decode_suffix` does for T5. Interventions as `forward` (``hook_embed`` ignored).
    `receivers` (path patching): ``(components [L, 2] for attn / mlp, logits scalar)``, 1 where that component's
    input (or the final norm's) reads the interventions' effect (see `_Block`); None: ordinary patching."""
    mask = jnp.ones(x.shape[:2], jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    positions = positions_from_mask(mask) if positions is None else jnp.asarray(positions, jnp.int32)
    return _from_layer(config, params, x, jnp.asarray(start, jnp.int32), positions, mask, interventions, receivers,
                       _jnp_dtype(dtype))


def unembedding_rows(config: DecoderConfig, params: Params):
    """The unembedding as (table [V, D], scale): ``logits = (scale * hidden) @ table.T`` (the token embedding
    when tied, else ``lm_head`` transposed; scale 1), as `genir_jax.core.model.unembedding_rows` for T5."""
    return (params["embed"] if config.tie_word_embeddings else jnp.transpose(params["lm_head"])), 1.0


def unembed(config: DecoderConfig, params: Params, hidden) -> jnp.ndarray:
    """Logits [..., V] of final-norm hidden states [..., D]."""
    table, scale = unembedding_rows(config, params)
    return jnp.einsum("...d,vd->...v", hidden * scale, table)


@functools.lru_cache(maxsize=16)
def _abstract_variables(config: DecoderConfig):
    dummy = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    return jax.eval_shape(DecoderOnly(config).init, jax.random.PRNGKey(0), dummy, dummy, dummy)


def param_shapes(config: DecoderConfig) -> dict:
    """Parameter shapes (a pytree of `jax.ShapeDtypeStruct`) without allocating anything."""
    return nn.meta.unbox(_abstract_variables(config)["params"])


def logical_axes(config: DecoderConfig) -> dict:
    """Logical axis names of every parameter (a pytree of `PartitionSpec`), for sharding rules."""
    return nn.get_partition_spec(_abstract_variables(config))["params"]


def init_params(config: DecoderConfig, rng: jax.Array | int = 0) -> dict:
    """Fresh parameters (normal(0.02) kernels, zero biases, unit norms), a plain nested dict of float32 arrays."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    dummy = jnp.zeros((1, 2), dtype=jnp.int32)
    variables = jax.jit(DecoderOnly(config).init)(rng, dummy, dummy, jnp.ones_like(dummy))
    return nn.meta.unbox(variables["params"])


__all__ = ["BLOCKS", "DecoderOnly", "DecoderOnlyCache", "decode_step", "forward", "forward_from_layer",
           "forward_with_cache", "init_kv_cache", "init_params", "last_positions", "logical_axes", "param_shapes",
           "positions_from_mask", "unembed", "unembedding_rows"]
