"""The T5 encoder-decoder as Flax Linen modules, and the pure functions that run it.

Architecture (as transformers' PyTorch T5): shared token embedding; an encoder stack of
[self-attention, MLP] layers and a decoder stack of [causal self-attention, cross-attention, MLP] layers,
each sub-layer pre-normed with RMS norm and added to the residual stream; one relative position bias per
stack; a final RMS norm per stack; the unembedding is either the shared embedding (optionally after a
``d_model ** -0.5`` rescale) or a separate `lm_head`.

Layers of a stack are run with `nn.scan`, so a 24-layer model compiles one layer body, and their
parameters are stacked along a leading `layers` axis.

Named sites (TransformerLens 2.x vocabulary), local to a layer: ``hook_resid_pre``, ``hook_attn_out``,
``hook_resid_mid``, ``hook_cross_attn_out`` and ``hook_resid_mid_cross`` (decoder), ``hook_mlp_out``,
``hook_resid_post``, ``attn.hook_{q,k,v,attn_scores,pattern,z}``, ``cross_attn.hook_*`` (decoder),
``mlp.hook_{pre,pre_linear,post}``. Per stack: ``hook_embed`` (token embeddings entering layer 0) and
``final_ln.hook_normalized`` (the stack's output after its final norm).

The functional boundary: `forward`, `encode` and `decode` take a `T5Config`, the parameter pytree, arrays
and an explicit ``interventions`` argument, and return arrays. Interventions and caches are organised
per stack (``"encoder"``, ``"decoder"``) and per local site name; see `genir_jax.taps`.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from genir_jax.config import T5Config
from genir_jax.modules import MLP, MultiHeadAttention, RelativePositionBias, RMSNorm, partitioned
from genir_jax.taps import Patch, SiteTap

Params = Mapping[str, Any]
# {"encoder": {site: Patch}, "decoder": {site: Patch}}; layer sites' Patch arrays have a leading layer axis.
Interventions = Mapping[str, Mapping[str, Patch]]

ENCODER_LAYER_SITES = (
    "hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z",
    "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post",
)
DECODER_LAYER_SITES = ENCODER_LAYER_SITES + (
    "hook_cross_attn_out", "hook_resid_mid_cross",
    "cross_attn.hook_q", "cross_attn.hook_k", "cross_attn.hook_v", "cross_attn.hook_attn_scores",
    "cross_attn.hook_pattern", "cross_attn.hook_z",
)
STACK_SITES = ("hook_embed", "final_ln.hook_normalized")


def _split_sites(names: frozenset[str]) -> tuple[frozenset[str], frozenset[str]]:
    """Split a stack's site names into (stack-level, per-layer)."""
    stack = frozenset(n for n in names if n in STACK_SITES)
    return stack, frozenset(names) - stack


class _Layer(nn.Module):
    """One encoder or decoder layer; the scan body. Returns (residual, recorded sites of this layer)."""

    config: T5Config
    is_decoder: bool
    cache_sites: frozenset[str] = frozenset()
    deterministic: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x, self_bias, self_mask, encoded, cross_mask, layer_interventions):
        cfg = self.config
        tap = SiteTap(layer_interventions, self.cache_sites)
        attention = functools.partial(
            MultiHeadAttention, num_heads=cfg.num_heads, d_kv=cfg.d_kv, d_model=cfg.d_model,
            dropout_rate=cfg.dropout_rate, deterministic=self.deterministic,
            initializer_factor=cfg.initializer_factor, dtype=self.dtype,
        )
        norm = functools.partial(RMSNorm, epsilon=cfg.layer_norm_epsilon, dtype=self.dtype)
        dropout = nn.Dropout(cfg.dropout_rate)

        x = tap("hook_resid_pre", x)
        normed = norm(name="self_attn_norm")(x)
        attn_out = attention(name="self_attn")(normed, normed, self_bias, self_mask, tap.scoped("attn."))
        attn_out = tap("hook_attn_out", dropout(attn_out, deterministic=self.deterministic))
        x = tap("hook_resid_mid", x + attn_out)
        if self.is_decoder:
            normed = norm(name="cross_attn_norm")(x)
            cross_out = attention(name="cross_attn")(normed, encoded, None, cross_mask, tap.scoped("cross_attn."))
            cross_out = tap("hook_cross_attn_out", dropout(cross_out, deterministic=self.deterministic))
            x = tap("hook_resid_mid_cross", x + cross_out)
        normed = norm(name="mlp_norm")(x)
        mlp_out = MLP(
            d_model=cfg.d_model, d_ff=cfg.d_ff, activation=cfg.dense_act_fn, gated=cfg.is_gated_act,
            dropout_rate=cfg.dropout_rate, deterministic=self.deterministic,
            initializer_factor=cfg.initializer_factor, dtype=self.dtype, name="mlp",
        )(normed, tap.scoped("mlp."))
        mlp_out = tap("hook_mlp_out", dropout(mlp_out, deterministic=self.deterministic))
        x = tap("hook_resid_post", x + mlp_out)
        return x, tap.cache


class _Stack(nn.Module):
    """The layers of the encoder or the decoder with their relative position bias and final norm."""

    config: T5Config
    is_decoder: bool
    cache_sites: frozenset[str] = frozenset()
    deterministic: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, embedded, self_mask, encoded=None, cross_mask=None, interventions=None):
        """embedded [B, T, D]; self_mask broadcastable to [B, 1, T, T]; returns (output, cache)."""
        cfg = self.config
        interventions = dict(interventions or {})
        stack_sites, layer_sites = _split_sites(self.cache_sites)
        stack_tap = SiteTap({k: v for k, v in interventions.items() if k in STACK_SITES}, stack_sites)
        layer_interventions = {k: v for k, v in interventions.items() if k not in STACK_SITES}
        num_layers = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers

        length = embedded.shape[1]
        self_bias = RelativePositionBias(
            num_buckets=cfg.relative_attention_num_buckets, max_distance=cfg.relative_attention_max_distance,
            num_heads=cfg.num_heads, bidirectional=not self.is_decoder,
            embedding_init=nn.initializers.normal(cfg.initializer_factor * cfg.d_model ** -0.5),
            dtype=self.dtype, name="relpos_bias",
        )(length, length)

        x = stack_tap("hook_embed", embedded)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
        layers = nn.scan(
            _Layer,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(
            config=cfg, is_decoder=self.is_decoder, cache_sites=layer_sites,
            deterministic=self.deterministic, dtype=self.dtype, name="layers",
        )
        x, layer_cache = layers(x, self_bias, self_mask, encoded, cross_mask, layer_interventions or None)
        x = RMSNorm(epsilon=cfg.layer_norm_epsilon, dtype=self.dtype, name="final_norm")(x)
        x = stack_tap("final_ln.hook_normalized", x)
        x = nn.Dropout(cfg.dropout_rate)(x, deterministic=self.deterministic)
        return x, {**layer_cache, **stack_tap.cache}


class T5(nn.Module):
    """T5 encoder-decoder. Use `encode`, `decode` or `__call__` through `apply` (or the functions below)."""

    config: T5Config
    cache_sites: Mapping[str, frozenset[str]] | None = None  # {"encoder": {...}, "decoder": {...}}
    deterministic: bool = True
    dtype: Any = None

    def setup(self):
        cfg = self.config
        sites = dict(self.cache_sites or {})
        self.shared = self.param(
            "shared", partitioned(nn.initializers.normal(cfg.initializer_factor), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), jnp.float32,
        )
        self.encoder = _Stack(cfg, is_decoder=False, cache_sites=frozenset(sites.get("encoder", ())),
                              deterministic=self.deterministic, dtype=self.dtype)
        self.decoder = _Stack(cfg, is_decoder=True, cache_sites=frozenset(sites.get("decoder", ())),
                              deterministic=self.deterministic, dtype=self.dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", partitioned(nn.initializers.normal(cfg.initializer_factor), ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size), jnp.float32,
            )

    def _embed(self, ids):
        table = self.shared if self.dtype is None else self.shared.astype(self.dtype)
        return jnp.take(table, ids, axis=0)

    def encode(self, input_ids, attention_mask, interventions=None):
        """Encoder output after its final norm [B, S, D], and the encoder cache."""
        key_mask = attention_mask.astype(bool)[:, None, None, :]
        return self.encoder(self._embed(input_ids), key_mask, interventions=(interventions or {}).get("encoder"))

    def decode(self, encoded, attention_mask, decoder_input_ids, decoder_attention_mask=None, interventions=None):
        """Decoder output after its final norm [B, T, D], and the decoder cache."""
        length = decoder_input_ids.shape[1]
        causal = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]
        if decoder_attention_mask is not None:
            causal = causal & decoder_attention_mask.astype(bool)[:, None, None, :]
        cross_mask = attention_mask.astype(bool)[:, None, None, :]
        return self.decoder(self._embed(decoder_input_ids), causal, encoded, cross_mask,
                            interventions=(interventions or {}).get("decoder"))

    def unembed(self, hidden):
        """Logits from decoder outputs (after the final norm): the T5 unembedding."""
        cfg = self.config
        if cfg.tie_word_embeddings:
            table = self.shared if self.dtype is None else self.shared.astype(self.dtype)
            if cfg.scale_decoder_outputs:
                hidden = hidden * (cfg.d_model ** -0.5)
            return jnp.einsum("btd,vd->btv", hidden, table)
        kernel = self.lm_head if self.dtype is None else self.lm_head.astype(self.dtype)
        if cfg.scale_decoder_outputs:
            hidden = hidden * (cfg.d_model ** -0.5)
        return hidden @ kernel

    def __call__(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                 interventions=None):
        encoded, encoder_cache = self.encode(input_ids, attention_mask, interventions)
        hidden, decoder_cache = self.decode(encoded, attention_mask, decoder_input_ids, decoder_attention_mask,
                                            interventions)
        return self.unembed(hidden), {"encoder": encoder_cache, "decoder": decoder_cache}


# --------------------------------------------------------------------------------------------------
# The functional boundary: params in, interventions in, arrays out.
# --------------------------------------------------------------------------------------------------

def _as_int(array) -> jnp.ndarray:
    return jnp.asarray(array, dtype=jnp.int32)


def _freeze_sites(cache_sites: Mapping[str, Any] | None) -> tuple | None:
    if not cache_sites:
        return None
    return tuple(sorted((stack, tuple(sorted(names))) for stack, names in cache_sites.items()))


def _module(config: T5Config, frozen_sites: tuple | None, deterministic: bool, dtype) -> T5:
    sites = {stack: frozenset(names) for stack, names in (frozen_sites or ())}
    return T5(config, cache_sites=sites or None, deterministic=deterministic, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("config", "frozen_sites", "deterministic", "dtype"))
def _forward(config, params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
             interventions, rngs, frozen_sites, deterministic, dtype):
    model = _module(config, frozen_sites, deterministic, dtype)
    return model.apply({"params": params}, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                       interventions, rngs=rngs)


def forward_with_cache(
    config: T5Config,
    params: Params,
    input_ids,
    attention_mask,
    decoder_input_ids,
    decoder_attention_mask=None,
    interventions: Interventions | None = None,
    *,
    cache_sites: Mapping[str, Any] | None = None,
    deterministic: bool = True,
    dropout_rng: jax.Array | None = None,
    dtype=None,
):
    """Logits [B, T_dec, V] and the recorded sites ``{"encoder": {site: array}, "decoder": {...}}``.

    Layer sites come stacked over layers ([L, B, ...]); stack sites have no layer axis.
    `dtype` (e.g. ``jnp.bfloat16``) casts parameters at use; None computes in the parameters' dtype.
    """
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    if not deterministic and dropout_rng is None:
        raise ValueError("deterministic=False (dropout) needs a dropout_rng")
    if decoder_attention_mask is not None:
        decoder_attention_mask = _as_int(decoder_attention_mask)
    return _forward(config, params, _as_int(input_ids), _as_int(attention_mask), _as_int(decoder_input_ids),
                    decoder_attention_mask, interventions, rngs, _freeze_sites(cache_sites), deterministic,
                    None if dtype is None else jnp.dtype(dtype))


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
) -> jnp.ndarray:
    """Logits [B, T_dec, V] of T5 for token ids (numpy or jax arrays). Jittable (config is static)."""
    logits, _ = forward_with_cache(
        config, params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, interventions,
        deterministic=deterministic, dropout_rng=dropout_rng, dtype=dtype,
    )
    return logits


def init_params(config: T5Config, rng: jax.Array | int = 0) -> dict:
    """Fresh parameters with transformers' T5 initialisation, as a plain nested dict of float32 arrays."""
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    model = T5(config)
    dummy = jnp.zeros((1, 2), dtype=jnp.int32)
    variables = jax.jit(model.init)(rng, dummy, jnp.ones_like(dummy), dummy)
    return nn.meta.unbox(variables["params"])


def param_shapes(config: T5Config) -> dict:
    """Parameter shapes (a pytree of `jax.ShapeDtypeStruct`) without allocating anything."""
    model = T5(config)
    dummy = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy, dummy, dummy)
    return nn.meta.unbox(variables["params"])


def logical_axes(config: T5Config) -> dict:
    """Logical axis names of every parameter (a pytree of `PartitionSpec`), for sharding rules."""
    model = T5(config)
    dummy = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy, dummy, dummy)
    return nn.get_partition_spec(variables)["params"]
