"""The T5 encoder-decoder as Flax Linen modules, and the pure functions that run it.

Architecture (as transformers' PyTorch T5): shared token embedding; an encoder stack of
[self-attention, MLP] layers and a decoder stack of [causal self-attention, cross-attention, MLP] layers,
each sub-layer pre-normed with RMS norm and added to the residual stream; one relative position bias per
stack; a final RMS norm per stack; the unembedding is either the shared embedding (optionally after a
``d_model ** -0.5`` rescale) or a separate `lm_head`.

Layers of a stack run under `nn.scan`, so a 24-layer model compiles one layer body; their parameters are
stacked along a leading `layers` axis.

The functional boundary: `forward`, `forward_with_cache`, `encode`, `decode` and `unembed` take a
`T5Config`, the parameter pytree, arrays and an explicit ``interventions`` argument, and return arrays.
Interventions are ``{"encoder"|"decoder": {local site: Patch | tuple[Patch, ...]}}`` where layer sites'
patches carry a leading layer axis (see `genir_jax.core.taps`, `genir_jax.core.sites`, `genir_jax.interp.interventions`).
`T5.init_decode_cache` / `T5.decode_step` run the same decoder one position at a time with a key/value
cache (`DecodeCache`; beam search, `genir_jax.docids.decoding`), and `decode_suffix` from a layer on
(prefix sharing).
Caches are requested by full site name and recorded only for the layers asked for: a site wanted in all
layers is stacked by the scan, one wanted in a few layers is written into a buffer of that many slots.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genir_jax.base.program_cache import cached_jit, cached_value
from genir_jax.core.config import T5Config
from genir_jax.core.dropout import Dropout
from genir_jax.core.modules import MLP, MultiHeadAttention, RelativePositionBias, RMSNorm, partitioned
from genir_jax.core.sites import STACK_SITES, Site, expand_site_patterns, num_layers, parse_site, site_shape
from genir_jax.core.taps import Patch, SiteTap, per_layer
from genir_jax.core.validation import validate

Params = Mapping[str, Any]
Interventions = Mapping[str, Mapping[str, Any]]
# Static cache request of one stack: ((local site, layers or None for all layers), ...), sorted.
StackCacheSpec = tuple[tuple[str, tuple[int, ...] | None], ...]


class DecodeCache(NamedTuple):
    """The decoder's key/value cache for decoding one position at a time (`T5.init_decode_cache`,
    `decode_step`): self-attention keys and values of all positions so far ``[L, N, T, H, dk]`` (zeros
    beyond), cross-attention keys and values of the encoder output ``[L, N, S, H, dk]``, computed once.

    An explicit pytree carried functionally, not flax's "cache" collection: the model keeps its boundary
    (params, arrays and interventions in, arrays out), a search can reorder it like any array (beams
    swap rows), and the same modules run teacher-forced and decoding with no mutable state."""

    self_k: Any
    self_v: Any
    cross_k: Any
    cross_v: Any


class _Layer(nn.Module):
    """One encoder or decoder layer; the scan body.

    Carry: (residual, buffers for sites recorded at some layers). Output: sites recorded at all layers.
    """

    config: T5Config
    is_decoder: bool
    record_all: frozenset[str] = frozenset()
    record_some: tuple[tuple[str, tuple[int, ...]], ...] = ()
    deterministic: bool = True
    dtype: Any = None
    fold_cross_attention: bool = False

    @nn.compact
    def __call__(self, carry, self_bias, self_mask, encoded, cross_mask, layer_index, layer_interventions,
                 layer_receivers=None, layer_cache=None, position=None):
        """`layer_receivers` (path patching, [3] for attn / cross_attn / mlp): the carry then holds a third
        item, the senders' summed effect on the residual stream so far; a component whose receiver entry
        is 0 reads the residual without it, and every component's sender effect (its patched output minus
        its output without patches, from the same input) is added to it. None: ordinary patching.

        `layer_cache` (decoding mode, this layer's `DecodeCache` slice): without cross-attention keys yet,
        only they are computed from `encoded` (the residual is untouched); else the carry's residual is
        the one decoder `position` and the self-attention cache is updated. Outputs: (recorded sites, the
        layer's cache or None)."""
        x, buffers = carry[0], carry[1]
        paths = layer_receivers is not None
        delta = carry[2] if paths else None
        cfg = self.config
        tap = SiteTap(layer_interventions, self.record_all | {name for name, _ in self.record_some}, position)
        unpatched = SiteTap(None)
        attention = functools.partial(
            MultiHeadAttention, num_heads=cfg.num_heads, d_kv=cfg.d_kv, d_model=cfg.d_model,
            dropout_rate=cfg.dropout_rate, deterministic=self.deterministic,
            initializer_factor=cfg.initializer_factor, dtype=self.dtype,
        )
        norm = functools.partial(RMSNorm, epsilon=cfg.layer_norm_epsilon, dtype=self.dtype)
        dropout = Dropout(cfg.dropout_rate)
        if layer_cache is not None and layer_cache.cross_k is None:  # decoding: cross-attention keys, once
            cross_k, cross_v = attention(name="cross_attn").project_kv(encoded, tap.scoped("cross_attn."))
            return carry, ({}, layer_cache._replace(cross_k=cross_k, cross_v=cross_v))
        decoding = layer_cache is not None

        def read(index):  # the residual as component `index` reads it
            return x if not paths else x - (1.0 - layer_receivers[index]).astype(x.dtype) * delta

        x = tap("hook_resid_pre", nn.with_logical_constraint(x, ("batch", "length", "embed")))
        normed = norm(name="self_attn_norm")(read(0))
        self_attn = attention(name="self_attn")
        if decoding:
            attn_out, (self_k, self_v) = self_attn(normed, normed, self_bias, self_mask, tap.scoped("attn."),
                                                   cache=(layer_cache.self_k, layer_cache.self_v),
                                                   position=position)
            layer_cache = layer_cache._replace(self_k=self_k, self_v=self_v)
        else:
            attn_out = self_attn(normed, normed, self_bias, self_mask, tap.scoped("attn."))
        attn_out = tap("hook_attn_out", dropout(attn_out, deterministic=self.deterministic))
        if paths:
            delta = delta + attn_out - self_attn(normed, normed, self_bias, self_mask, unpatched.scoped("attn."))
        x = tap("hook_resid_mid", x + attn_out)
        if self.is_decoder:
            normed = norm(name="cross_attn_norm")(read(1))
            cross_attn = attention(name="cross_attn", fold_keys=self.fold_cross_attention)
            cross_kv = (layer_cache.cross_k, layer_cache.cross_v) if decoding else None
            cross_out = cross_attn(normed, encoded, None, cross_mask, tap.scoped("cross_attn."), kv=cross_kv)
            cross_out = tap("hook_cross_attn_out", dropout(cross_out, deterministic=self.deterministic))
            if paths:
                delta = delta + cross_out - cross_attn(normed, encoded, None, cross_mask, unpatched.scoped("cross_attn."))
            x = tap("hook_resid_mid_cross", x + cross_out)
        normed = norm(name="mlp_norm")(read(2))
        mlp = MLP(
            d_model=cfg.d_model, d_ff=cfg.d_ff, activation=cfg.dense_act_fn, gated=cfg.is_gated_act,
            dropout_rate=cfg.dropout_rate, deterministic=self.deterministic,
            initializer_factor=cfg.initializer_factor, dtype=self.dtype, name="mlp",
        )
        mlp_out = tap("hook_mlp_out", dropout(mlp(normed, tap.scoped("mlp.")), deterministic=self.deterministic))
        if paths:
            delta = delta + mlp_out - mlp(normed, unpatched.scoped("mlp."))
        x = tap("hook_resid_post", x + mlp_out)

        new_buffers = {}
        for name, layers in self.record_some:
            slots = np.full(self._num_layers, len(layers), dtype=np.int32)  # last slot: a discard bin
            slots[list(layers)] = np.arange(len(layers), dtype=np.int32)
            slot = jnp.asarray(slots)[layer_index]
            new_buffers[name] = jax.lax.dynamic_update_index_in_dim(buffers[name], tap.cache[name], slot, 0)
        new_carry = (x, new_buffers, delta) if paths else (x, new_buffers)
        return new_carry, ({name: tap.cache[name] for name in self.record_all}, layer_cache)

    @property
    def _num_layers(self) -> int:
        return self.config.num_decoder_layers if self.is_decoder else self.config.num_layers


class _Stack(nn.Module):
    """The layers of the encoder or the decoder with their relative position bias and final norm."""

    config: T5Config
    is_decoder: bool
    cache_spec: StackCacheSpec = ()
    deterministic: bool = True
    dtype: Any = None
    fold_cross_attention: bool = False
    unroll_layers: bool = False

    @nn.compact
    def __call__(self, embedded, self_mask, encoded=None, cross_mask=None, interventions=None, *, start=None,
                 receivers=None, cache: DecodeCache | None = None, position=None):
        """embedded [B, T, D]; self_mask broadcastable to [B, 1, T, T]. Returns (output, cache) where the
        cache maps local names to [layers asked, B, ...] (stack sites: [B, ...]).

        Three more ways to run the same layers (decoder only):
        - `start` (possibly traced): `embedded` is the residual entering layer `start`, and layers before
          it are skipped by `lax.cond` (prefix sharing, `decode_suffix`); `receivers` as there.
        - `cache` without cross-attention keys: computes them from `encoded` (`T5.init_decode_cache`); returns
          the filled `DecodeCache` only.
        - `cache` and `position` (possibly traced): `embedded` [B, 1, D] is that one decoder position, the
          self-attention reads the cache (`decode_step`); returns (output, recorded sites, updated cache).
        """
        cfg = self.config
        stack = "decoder" if self.is_decoder else "encoder"
        interventions = dict(interventions or {})
        stack_tap = SiteTap({k: v for k, v in interventions.items() if k in STACK_SITES},
                            {name for name, _ in self.cache_spec if name in STACK_SITES}, position)
        count = num_layers(cfg, stack)
        layer_interventions = {k: per_layer(v, count) for k, v in interventions.items() if k not in STACK_SITES}
        record_all = frozenset(n for n, layers in self.cache_spec if n not in STACK_SITES and layers is None)
        record_some = tuple((n, layers) for n, layers in self.cache_spec if n not in STACK_SITES and layers)
        layer_kwargs = dict(config=cfg, is_decoder=self.is_decoder, deterministic=self.deterministic, dtype=self.dtype)

        def scanned_layers():
            return nn.scan(
                _Layer,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, 0, 0, nn.broadcast),
                length=count,
                unroll=count if self.unroll_layers else 1,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(record_all=record_all, record_some=record_some, fold_cross_attention=self.fold_cross_attention,
              name="layers", **layer_kwargs)

        indices = jnp.arange(count, dtype=jnp.int32)
        if cache is not None and cache.cross_k is None:
            _, (_, cache) = scanned_layers()((None, {}), None, None, encoded, None, indices,
                                             layer_interventions or None, None, cache, None)
            return cache

        if position is not None:  # one decoder position; keys 0..T-1 of the cache, those after it masked
            length = cache.self_k.shape[2]
            self_mask = (jnp.arange(length) <= position)[None, None, None, :]
        else:
            length = embedded.shape[1]
        batch = embedded.shape[0]
        key_length = encoded.shape[1] if encoded is not None else embedded.shape[1]
        self_bias = RelativePositionBias(
            num_buckets=cfg.relative_attention_num_buckets, max_distance=cfg.relative_attention_max_distance,
            num_heads=cfg.num_heads, bidirectional=not self.is_decoder,
            embedding_init=nn.initializers.normal(cfg.initializer_factor * cfg.d_model ** -0.5),
            dtype=self.dtype, name="relpos_bias",
        )(length, length, position)

        x = stack_tap("hook_embed", embedded)
        x = Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
        paths = receivers is not None
        if start is not None:  # prefix sharing: the same layer, applied by lax.cond from layer `start` on
            layer = _Layer(**layer_kwargs, parent=None)
            carry = (x, {}, jnp.zeros_like(x)) if paths else (x, {})

            def body(carry, xs):
                layer_params, index, patches, layer_receivers = xs

                def run(c):
                    return layer.apply({"params": layer_params}, c, self_bias, self_mask, encoded, cross_mask, index,
                                       patches or None, layer_receivers)[0]

                return jax.lax.cond(index >= start, run, lambda c: c, carry), None

            carry, _ = jax.lax.scan(body, carry, (self.variables["params"]["layers"], indices, layer_interventions,
                                                  receivers[0] if paths else None))
            x, stacked, buffers = carry[0], {}, {}
            if paths:  # the output reads the senders' effect only if it is a receiver
                x = x - (1.0 - jnp.asarray(receivers[1], x.dtype)) * carry[2]
        else:
            query_length = embedded.shape[1]
            buffers = {
                name: jnp.zeros((len(layers) + 1, batch) + site_shape(cfg, Site(stack, name, 0), query_length,
                                                                      key_length), dtype=x.dtype)
                for name, layers in record_some
            }
            (x, buffers), (stacked, cache) = scanned_layers()(
                (x, buffers), self_bias, self_mask, encoded, cross_mask, indices, layer_interventions or None, None,
                cache, position)
        x = RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="final_norm")(
            x, stack_tap.scoped("final_ln."))
        x = stack_tap("hook_out", x)
        x = Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
        recorded = dict(stacked)
        recorded.update({name: buffer[:-1] for name, buffer in buffers.items()})
        recorded.update(stack_tap.cache)
        return (x, recorded) if position is None else (x, recorded, cache)


class T5(nn.Module):
    """T5 encoder-decoder. Use `encode`, `decode`, `unembed` or `__call__` through `apply`."""

    config: T5Config
    encoder_cache: StackCacheSpec = ()
    decoder_cache: StackCacheSpec = ()
    deterministic: bool = True
    dtype: Any = None
    fold_cross_attention: bool = False  # see MultiHeadAttention.fold_keys
    unroll_layers: bool = False  # each stack runs its layers as straight-line code, not as a loop

    def setup(self):
        cfg = self.config
        self.shared = self.param(
            "shared", partitioned(nn.initializers.normal(cfg.initializer_factor), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), jnp.float32,
        )
        self.encoder = _Stack(cfg, is_decoder=False, cache_spec=self.encoder_cache,
                              deterministic=self.deterministic, dtype=self.dtype, unroll_layers=self.unroll_layers)
        self.decoder = _Stack(cfg, is_decoder=True, cache_spec=self.decoder_cache,
                              deterministic=self.deterministic, dtype=self.dtype,
                              fold_cross_attention=self.fold_cross_attention, unroll_layers=self.unroll_layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", partitioned(nn.initializers.normal(cfg.initializer_factor), ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size), jnp.float32,
            )

    def _table(self, array):
        return array if self.dtype is None else array.astype(self.dtype)

    def encode(self, input_ids, attention_mask, interventions=None):
        """Encoder output after its final norm [B, S, D], and the encoder cache."""
        key_mask = attention_mask.astype(bool)[:, None, None, :]
        embedded = jnp.take(self._table(self.shared), input_ids, axis=0)
        return self.encoder(embedded, key_mask, interventions=(interventions or {}).get("encoder"))

    def decode(self, encoded, attention_mask, decoder_input_ids, decoder_attention_mask=None, interventions=None):
        """Decoder output after its final norm [B, T, D], and the decoder cache."""
        causal, cross_mask = _decoder_masks(decoder_input_ids.shape[1], attention_mask, decoder_attention_mask)
        embedded = jnp.take(self._table(self.shared), decoder_input_ids, axis=0)
        return self.decoder(embedded, causal, encoded, cross_mask, interventions=(interventions or {}).get("decoder"))

    def init_decode_cache(self, encoded, length: int, interventions=None) -> DecodeCache:
        """An empty self-attention cache for `length` decoder positions and the cross-attention keys and
        values of `encoded` [N, S, D] (decoder interventions on ``cross_attn.hook_k`` / ``hook_v`` apply)."""
        cfg = self.config
        shape = (cfg.num_decoder_layers, encoded.shape[0], length, cfg.num_heads, cfg.d_kv)
        empty = DecodeCache(jnp.zeros(shape, encoded.dtype), jnp.zeros(shape, encoded.dtype), None, None)
        return self.decoder(None, None, encoded, None, (interventions or {}).get("decoder"), cache=empty)

    def decode_step(self, tokens, position, cache: DecodeCache, attention_mask, interventions=None):
        """Logits [N, V] of decoder `position` (traced) reading `tokens` [N] there, and the updated cache.
        The decoder's interventions apply as at that position of `decode` (`genir_jax.core.taps.at_position`)."""
        cross_mask = attention_mask.astype(bool)[:, None, None, :]
        embedded = jnp.take(self._table(self.shared), tokens[:, None], axis=0)
        hidden, _, cache = self.decoder(embedded, None, None, cross_mask, (interventions or {}).get("decoder"),
                                        cache=cache, position=position)
        return self.unembed(hidden[:, 0]), cache

    def unembed(self, hidden):
        """Logits from decoder outputs after the final norm ([..., D] -> [..., V]): T5's unembedding."""
        cfg = self.config
        if cfg.scale_decoder_outputs:
            hidden = hidden * (cfg.d_model ** -0.5)
        if cfg.tie_word_embeddings:
            return jnp.einsum("...d,vd->...v", hidden, self._table(self.shared))
        return jnp.einsum("...d,dv->...v", hidden, self._table(self.lm_head))

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                 interventions=None):
        encoded, encoder_cache = self.encode(input_ids, attention_mask, interventions)
        hidden, decoder_cache = self.decode(encoded, attention_mask, decoder_input_ids, decoder_attention_mask,
                                            interventions)
        return self.unembed(hidden), {"encoder": encoder_cache, "decoder": decoder_cache}


def decode_suffix(config: T5Config, params: Params, x, start, encoded, attention_mask, interventions=None,
                  receivers=None, dtype=None):
    """The decoder from the residual stream `x` entering layer `start` ([B, T, D]) to its output after the
    final norm ([B, T, D]); traceable, for use inside jit / vmap.

    Layers before `start` are skipped by `lax.cond` (`start` may be traced; when it is the same for every
    config of a vmapped sweep the skip is real), so configs that leave layers 0..start-1 untouched reuse a
    clean prefix computed once (prefix sharing). `interventions` are the decoder's ({local site: patches},
    layer sites with a leading layer axis); ``decoder.hook_embed`` patches apply to `x` (use them only with
    start 0). `receivers` (path patching): ``(components [L, 3], logits scalar)``, see `_Layer`.
    """
    causal, cross_mask = _decoder_masks(x.shape[1], attention_mask)
    out, _ = _Stack(config, is_decoder=True, dtype=dtype).apply(
        {"params": params["decoder"]}, x, causal, encoded, cross_mask, interventions, start=start, receivers=receivers)
    return out


def _decoder_masks(length: int, attention_mask, decoder_attention_mask=None):
    """The decoder's causal self-attention mask [B|1, 1, T, T] and cross-attention mask [B, 1, 1, S]."""
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
    if decoder_attention_mask is not None:
        causal = causal & decoder_attention_mask.astype(bool)[:, None, None, :]
    return causal, attention_mask.astype(bool)[:, None, None, :]


# --------------------------------------------------------------------------------------------------
# Cache requests: full site names <-> per-stack static specs
# --------------------------------------------------------------------------------------------------

def cache_specs(config: T5Config, names: Iterable[str]) -> tuple[StackCacheSpec, StackCacheSpec]:
    """Static (encoder, decoder) cache specs for full site names (validated)."""
    wanted: dict[str, dict[str, set]] = {"encoder": {}, "decoder": {}}
    for name in names:
        site = parse_site(config, name)
        wanted[site.stack].setdefault(site.local, set())
        if site.layer is not None:
            wanted[site.stack][site.local].add(site.layer)

    def spec(stack: str) -> StackCacheSpec:
        out = []
        for local, layers in sorted(wanted[stack].items()):
            if local in STACK_SITES or len(layers) == num_layers(config, stack):
                out.append((local, None))
            else:
                out.append((local, tuple(sorted(layers))))
        return tuple(out)

    return spec("encoder"), spec("decoder")


def named_cache(config: T5Config, names: Iterable[str], raw: Mapping[str, Mapping[str, jnp.ndarray]],
                 specs: tuple[StackCacheSpec, StackCacheSpec]) -> dict[str, jnp.ndarray]:
    """Per-stack raw caches -> {full site name: [B, ...]}."""
    layout = {"encoder": dict(specs[0]), "decoder": dict(specs[1])}
    out = {}
    for name in names:
        site = parse_site(config, name)
        array = raw[site.stack][site.local]
        if site.layer is None:
            out[name] = array
        else:
            layers = layout[site.stack][site.local]
            out[name] = array[site.layer if layers is None else layers.index(site.layer)]
    return out


# --------------------------------------------------------------------------------------------------
# The functional boundary: params in, interventions in, arrays out.
# --------------------------------------------------------------------------------------------------

def _as_int(array) -> jnp.ndarray:
    """int32 ids for a jitted step; host arrays stay numpy (jit transfers them, where jnp.asarray would lower
    and compile a copy per shape)."""
    if isinstance(array, (np.ndarray, list, tuple)):
        return np.asarray(array, dtype=np.int32)
    return jnp.asarray(array, dtype=jnp.int32)


def _rngs(deterministic: bool, dropout_rng):
    if not deterministic and dropout_rng is None:
        raise ValueError("deterministic=False (dropout) needs a dropout_rng")
    return {"dropout": dropout_rng} if dropout_rng is not None else None


def _axis_rules() -> tuple:
    """The enclosing ``nn.logical_axis_rules`` as a hashable static jit argument: flax's rules context is
    not part of jit's cache key, so a program traced under one set of rules must not serve another."""
    return tuple((name, tuple(axis) if isinstance(axis, list) else axis)
                 for name, axis in nn.get_logical_axis_rules())


@cached_jit(static_argnames=("config", "specs", "deterministic", "dtype", "axis_rules", "fold_cross_attention",
                             "unroll_layers"))
def _forward(config, params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
             interventions, rngs, specs, deterministic, dtype, axis_rules=(), fold_cross_attention=False,
             unroll_layers=False):
    model = T5(config, encoder_cache=specs[0], decoder_cache=specs[1], deterministic=deterministic, dtype=dtype,
               fold_cross_attention=fold_cross_attention, unroll_layers=unroll_layers)
    with nn.logical_axis_rules(axis_rules):  # activations placed by logical name (nn.with_logical_constraint)
        return model.apply({"params": params}, input_ids, attention_mask, decoder_input_ids,
                           decoder_attention_mask, interventions, rngs=rngs)


def forward_with_cache(
    config: T5Config,
    params: Params,
    input_ids,
    attention_mask,
    decoder_input_ids,
    decoder_attention_mask=None,
    interventions: Interventions | None = None,
    *,
    cache_sites: Iterable[str] = (),
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
    dtype=None,
    fold_cross_attention: bool = False,
    unroll_layers: bool = False,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Logits [B, T_dec, V] and ``{full site name: activation [B, ...]}`` for the requested sites.

    `cache_sites` holds full names or shell-style patterns (``"decoder.*.hook_mlp_out"``). Only the
    requested (site, layer) pairs are kept in memory. `dtype` (e.g. ``jnp.bfloat16``) casts the
    parameters at use; None computes in the parameters' dtype. Activations are constrained by logical
    axis name under the enclosing ``nn.logical_axis_rules`` and mesh (``with partitioner.activate():``,
    `genir_jax.scale.partitioning`; place the parameters and inputs to match); outside one, as the arrays lie.
    `fold_cross_attention`: the decoder's cross-attention skips projecting keys and values where that
    costs less (few decoder positions; `genir_jax.core.modules.MultiHeadAttention.fold_keys`): faster, equal up
    to float rounding; training uses it, analyses keep the projected keys of the reference's computation.
    `unroll_layers`: the layers of a stack run as straight-line code instead of a loop over stacked
    parameters (faster for a few layers on the CPU, slower to compile for many; training presets choose).
    """
    names = expand_site_patterns(config, cache_sites)
    specs = cache_specs(config, names)
    if interventions:
        validate(config, interventions, np.shape(input_ids)[0], np.shape(input_ids)[1],
                 np.shape(decoder_input_ids)[1])
    dec_mask = None if decoder_attention_mask is None else _as_int(decoder_attention_mask)
    logits, raw = _forward(config, params, _as_int(input_ids), _as_int(attention_mask), _as_int(decoder_input_ids),
                           dec_mask, interventions, _rngs(deterministic, dropout_rng), specs, deterministic,
                           _jnp_dtype(dtype), _axis_rules(), fold_cross_attention, unroll_layers)
    return logits, named_cache(config, names, raw, specs)


def forward(
    config: T5Config,
    params: Params,
    input_ids,
    attention_mask,
    decoder_input_ids,
    decoder_attention_mask=None,
    interventions: Interventions | None = None,
    *,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
    dtype=None,
    fold_cross_attention: bool = False,
    unroll_layers: bool = False,
) -> jnp.ndarray:
    """Logits [B, T_dec, V] of T5 for token ids (numpy or jax arrays). Jittable (config is static).
    Options as `forward_with_cache`."""
    logits, _ = forward_with_cache(
        config, params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, interventions,
        deterministic=deterministic, dropout_rng=dropout_rng, dtype=dtype,
        fold_cross_attention=fold_cross_attention, unroll_layers=unroll_layers,
    )
    return logits


def _one_stack_request(config: T5Config, cache_sites: Iterable[str], stack: str):
    """Expanded site names and cache specs for `encode` / `decode`, which see only one stack."""
    names = expand_site_patterns(config, cache_sites)
    specs = cache_specs(config, names)
    if specs[1 if stack == "encoder" else 0]:
        raise ValueError(f"{stack[:6]}() records {stack} sites only")
    return names, specs


def _jnp_dtype(dtype):
    return None if dtype is None else jnp.dtype(dtype)


@functools.partial(jax.jit, static_argnames=("config", "spec", "dtype"))
def _encode(config, params, input_ids, attention_mask, interventions, spec, dtype):
    return T5(config, encoder_cache=spec, dtype=dtype).apply(
        {"params": params}, input_ids, attention_mask, interventions, method=T5.encode)


def encode(config: T5Config, params: Params, input_ids, attention_mask, interventions=None, *,
           cache_sites: Iterable[str] = (), dtype=None):
    """Encoder output after its final norm [B, S, D], and the requested encoder sites."""
    names, specs = _one_stack_request(config, cache_sites, "encoder")
    out, raw = _encode(config, params, _as_int(input_ids), _as_int(attention_mask), interventions, specs[0],
                       _jnp_dtype(dtype))
    return out, named_cache(config, names, {"encoder": raw, "decoder": {}}, specs)


@functools.partial(jax.jit, static_argnames=("config", "spec", "dtype"))
def _decode(config, params, encoded, attention_mask, decoder_input_ids, interventions, spec, dtype):
    return T5(config, decoder_cache=spec, dtype=dtype).apply(
        {"params": params}, encoded, attention_mask, decoder_input_ids, None, interventions, method=T5.decode)


def decode(config: T5Config, params: Params, encoded, attention_mask, decoder_input_ids, interventions=None, *,
           cache_sites: Iterable[str] = (), dtype=None):
    """Decoder output after its final norm [B, T, D] given encoder output, and the requested decoder sites."""
    names, specs = _one_stack_request(config, cache_sites, "decoder")
    out, raw = _decode(config, params, encoded, _as_int(attention_mask), _as_int(decoder_input_ids), interventions,
                       specs[1], _jnp_dtype(dtype))
    return out, named_cache(config, names, {"encoder": {}, "decoder": raw}, specs)


def unembed(config: T5Config, params: Params, hidden, dtype=None) -> jnp.ndarray:
    """T5's unembedding of decoder outputs after the final norm ([..., D] -> [..., V])."""
    return T5(config, dtype=_jnp_dtype(dtype)).apply(
        {"params": params}, hidden, method=T5.unembed)


def unembedding_rows(config: T5Config, params: Params):
    """The unembedding as (table [V, D], scale): ``logits = (scale * hidden) @ table.T`` equals `unembed`.

    For metrics computed block by block over the vocabulary (`genir_jax.interp.metrics.streamed_target_metrics`).
    """
    scale = config.d_model ** -0.5 if config.scale_decoder_outputs else 1.0
    table = params["shared"] if config.tie_word_embeddings else jnp.transpose(params["lm_head"])
    return table, scale


def init_params(config: T5Config, rng: jax.Array | int = 0) -> dict:
    """Fresh parameters with transformers' T5 initialisation, as a plain nested dict of float32 arrays."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    model = T5(config)
    dummy = jnp.zeros((1, 2), dtype=jnp.int32)
    variables = jax.jit(model.init)(rng, dummy, jnp.ones_like(dummy), dummy)
    return nn.meta.unbox(variables["params"])


@functools.lru_cache(maxsize=16)
def _abstract_variables(config: T5Config):
    """Shapes and logical axes of every variable, traced once per config (placing a model's parameters needs
    both, and each trace of a 24+24-layer init takes about 0.1-0.2 s), and kept by the program cache across
    runs (`genir_jax.base.program_cache.cached_value`)."""
    def trace():
        dummy = jax.ShapeDtypeStruct((1, 2), jnp.int32)
        return jax.eval_shape(T5(config).init, jax.random.PRNGKey(0), dummy, dummy, dummy)

    return cached_value("t5_abstract_variables", repr(config), trace)


def param_shapes(config: T5Config) -> dict:
    """Parameter shapes (a pytree of `jax.ShapeDtypeStruct`) without allocating anything."""
    return nn.meta.unbox(_abstract_variables(config)["params"])


def logical_axes(config: T5Config) -> dict:
    """Logical axis names of every parameter (a pytree of `PartitionSpec`), for sharding rules."""
    return nn.get_partition_spec(_abstract_variables(config))["params"]


__all__ = [
    "Patch", "T5", "cache_specs", "decode", "decode_suffix", "encode", "forward", "forward_with_cache", "init_params",
    "logical_axes", "param_shapes", "unembed", "unembedding_rows",
]
