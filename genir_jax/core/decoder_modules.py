"""Building blocks of decoder-only models (GPT-2, Llama, Qwen2) as Flax Linen modules.

LayerNorm (GPT-2), rotary position embeddings (Llama / Qwen2), causal self-attention with optional biases
and grouped-query attention, and the MLP (GELU, or SwiGLU when gated). T5's `RMSNorm` (same numerics as
Llama's) and `activation_fn` come from `genir_jax.core.modules`.

Layouts as in the T5 modules: kernels input-major with a separate head axis (``[embed, heads, kv]``,
``[heads, kv, embed]``), so per-head interventions need no reshapes. Numerics follow transformers: norm
statistics and softmax in float32, scores scaled by ``d_head ** -0.5``, masked scores set to the dtype's
minimum, rotary angles in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genir_jax.core.modules import activation_fn, cast_to, partitioned
from genir_jax.core.taps import ScopedTap

Dtype = Any
INIT_STD = 0.02  # transformers' initializer_range for GPT-2, Llama and Qwen2


class LayerNorm(nn.Module):
    """GPT-2's layer norm: subtract the mean, divide by the standard deviation, learned scale and bias."""

    epsilon: float = 1e-5
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, tap: ScopedTap | None = None) -> jnp.ndarray:
        """Site ``hook_normalized``: the normalised x before scale and bias (TransformerLens semantics)."""
        width = x.shape[-1]
        scale = cast_to(self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (width,), jnp.float32),
                      self.dtype)
        bias = cast_to(self.param("bias", partitioned(nn.initializers.zeros, ("embed",)), (width,), jnp.float32),
                     self.dtype)
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        normed = (centred * jax.lax.rsqrt(variance + self.epsilon)).astype(scale.dtype)
        if tap is not None:
            normed = tap("hook_normalized", normed)
        lead = (1,) * (x.ndim - 1)
        return normed * scale.reshape(lead + (-1,)) + bias.reshape(lead + (-1,))


def rotate(x: jnp.ndarray, positions: jnp.ndarray, theta: float) -> jnp.ndarray:
    """Rotary position embedding of queries or keys ``x`` [B, T, H, K] at integer `positions` [B, T]
    (transformers' default RoPE: the two halves of the head dimension rotated by ``position * theta ** (-2i/K)``)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # [B, T, K/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    first, second = x[..., : dim // 2], x[..., dim // 2:]
    return x * cos + jnp.concatenate([-second, first], axis=-1) * sin


class CausalSelfAttention(nn.Module):
    """Self-attention of a decoder-only layer. Sites: hook_q, hook_k, hook_v (before the rotary embedding,
    as TransformerLens), hook_attn_scores, hook_pattern, hook_z ([B, T, H, K], the query heads).

    `num_kv_heads` < `num_heads`: grouped-query attention, query head h reads key/value head
    ``h // (num_heads // num_kv_heads)`` (transformers' `repeat_kv`). `rotary_theta` None: no rotary
    embedding (GPT-2's positions are added to the embeddings)."""

    num_heads: int
    num_kv_heads: int
    d_kv: int
    d_model: int
    qkv_bias: bool = False
    out_bias: bool = False
    rotary_theta: float | None = None
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, positions: jnp.ndarray, mask: jnp.ndarray, tap: ScopedTap,
                 cache: tuple[jnp.ndarray, jnp.ndarray] | None = None, index=None):
        """x [B, T, D], positions [B, T], mask broadcastable to [B, 1, T, S] (True: may attend).
        Returns (output [B, T, D], keys and values [B, S, KVH, K] attended to).

        With `cache` ([B, T_max, KVH, K] keys after the rotary embedding, and values), this chunk's keys and
        values are written at slot `index` (possibly traced) and the queries attend over the whole cache."""
        d, h, g, k = self.d_model, self.num_heads, self.num_kv_heads, self.d_kv
        normal, zeros = nn.initializers.normal(INIT_STD), nn.initializers.zeros

        def project(name, heads, site):
            kernel = self.param(name, partitioned(normal, ("embed", "heads", "kv")), (d, heads, k), jnp.float32)
            y = jnp.einsum("btd,dhk->bthk", x, cast_to(kernel, self.dtype))
            if self.qkv_bias:
                y = y + cast_to(self.param(f"{name}_bias", partitioned(zeros, ("heads", "kv")), (heads, k),
                                         jnp.float32), self.dtype)[None, None]
            return tap(site, y)

        q, key, value = project("query", h, "hook_q"), project("key", g, "hook_k"), project("value", g, "hook_v")
        if self.rotary_theta is not None:
            q, key = rotate(q, positions, self.rotary_theta), rotate(key, positions, self.rotary_theta)
        if cache is not None:
            key = jax.lax.dynamic_update_slice_in_dim(cache[0], key.astype(cache[0].dtype), index, axis=1)
            value = jax.lax.dynamic_update_slice_in_dim(cache[1], value.astype(cache[1].dtype), index, axis=1)
        group = h // g
        scores = jnp.einsum("bthk,bshk->bhts", q, jnp.repeat(key, group, axis=2) if group > 1 else key)
        scores = scores * jnp.asarray(k ** -0.5, scores.dtype)
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        scores = tap("hook_attn_scores", scores)
        pattern = tap("hook_pattern", jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(x.dtype))
        z = tap("hook_z", jnp.einsum("bhts,bshk->bthk", pattern, jnp.repeat(value, group, axis=2) if group > 1
                                     else value))
        kernel = self.param("out", partitioned(normal, ("heads", "kv", "embed")), (h, k, d), jnp.float32)
        out = jnp.einsum("bthk,hkd->btd", z, cast_to(kernel, self.dtype))
        if self.out_bias:
            out = out + cast_to(self.param("out_bias", partitioned(zeros, ("embed",)), (d,), jnp.float32),
                              self.dtype)[None, None]
        return out, (key, value)


class DecoderMLP(nn.Module):
    """The MLP of a decoder-only layer: ``wo(act(wi x))`` (GPT-2) or gated ``wo(act(wi_0 x) * wi_1 x)``
    (SwiGLU: wi_0 is Llama's gate_proj, wi_1 its up_proj). Sites: hook_pre (the activation's input),
    hook_pre_linear (gated only), hook_post (the neurons `wo` reads)."""

    d_model: int
    d_ff: int
    activation: str
    gated: bool
    bias: bool = False
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, tap: ScopedTap) -> jnp.ndarray:
        normal, zeros = nn.initializers.normal(INIT_STD), nn.initializers.zeros

        def dense(name, y, shape, axes):
            out = y @ cast_to(self.param(name, partitioned(normal, axes), shape, jnp.float32), self.dtype)
            if self.bias:
                bias = self.param(f"{name}_bias", partitioned(zeros, axes[-1:]), shape[-1:], jnp.float32)
                out = out + cast_to(bias, self.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
            return out

        d, f = self.d_model, self.d_ff
        act = activation_fn(self.activation)
        if self.gated:
            pre = tap("hook_pre", dense("wi_0", x, (d, f), ("embed", "mlp")))
            post = act(pre) * tap("hook_pre_linear", dense("wi_1", x, (d, f), ("embed", "mlp")))
        else:
            post = act(tap("hook_pre", dense("wi", x, (d, f), ("embed", "mlp"))))
        return dense("wo", tap("hook_post", post), (f, d), ("mlp", "embed"))
