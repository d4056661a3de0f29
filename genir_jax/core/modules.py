"""T5 building blocks as Flax Linen modules: RMS norm, attention, MLP, relative position buckets.

Parameters carry t5x-style logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`, `relpos_buckets`;
`layers` is added by the layer scan) so a sharding rule table can place them on a mesh later without
touching this code. Kernels are stored input-major (``x @ kernel``); attention kernels keep a separate
head axis (``[embed, heads, kv]`` and ``[heads, kv, embed]``) so per-head interventions need no reshapes.

Numerics follow transformers' PyTorch T5: RMS statistics in float32, softmax in float32, no
``1/sqrt(d_kv)`` scaling of attention scores, masked scores set to the dtype's minimum.
Computation runs in ``dtype`` if given, otherwise in the parameters' dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genir_jax.core.dropout import Dropout
from genir_jax.core.taps import ScopedTap

Dtype = Any


def partitioned(init: Callable, names: tuple[str, ...]) -> Callable:
    """An initializer whose parameter is annotated with logical axis names."""
    return nn.with_logical_partitioning(init, names)


def activation_fn(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The activation called `name` in transformers' ACT2FN (only the ones T5 checkpoints use)."""
    if name == "relu":
        return jax.nn.relu
    if name == "gelu":  # transformers' GELUActivation: the exact erf form
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):  # the tanh approximation
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name in ("silu", "swish"):
        return jax.nn.silu
    raise ValueError(f"unsupported activation {name!r}")  # T5Config.validate rejects these earlier


def cast_to(x: jnp.ndarray, dtype: Dtype | None) -> jnp.ndarray:
    """`x` in `dtype` (None: as it is): parameters are stored in float32 and cast for the computation."""
    return x if dtype is None else x.astype(dtype)


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square, no mean subtraction, no bias."""

    epsilon: float = 1e-6
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, tap: ScopedTap | None = None) -> jnp.ndarray:
        """Site ``hook_normalized``: x / rms(x), before the learned scale (TransformerLens semantics)."""
        scale = self.param("scale", partitioned(nn.initializers.ones, ("embed",)), (x.shape[-1],), jnp.float32)
        scale = cast_to(scale, self.dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = (x32 * jax.lax.rsqrt(variance + self.epsilon)).astype(scale.dtype)
        if tap is not None:
            normed = tap("hook_normalized", normed)
        return normed * scale.reshape((1,) * (x.ndim - 1) + (-1,))


def relative_position_bucket(
    relative_position: np.ndarray, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Bucket of each relative position (key index minus query index), as T5 / Mesh TensorFlow define it.

    Half the buckets (per direction when bidirectional) hold exact small distances, the other half
    logarithmically wider bins up to `max_distance`; farther positions share the last bucket.
    Computed with numpy on static shapes, so it is a constant inside a compiled forward.
    """
    relative_position = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # float32 log like the reference implementation, so boundary positions land in the same bucket.
    with np.errstate(divide="ignore"):
        scaled = (
            np.log(distance.astype(np.float32) / np.float32(max_exact))
            / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact)
        )
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Learned per-head bias for each relative-position bucket, shared by all layers of a stack."""

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    embedding_init: Callable = nn.initializers.normal(1.0)
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, query_length: int, key_length: int, query_position=None) -> jnp.ndarray:
        """Bias of shape [1, heads, query_length, key_length]; with `query_position` (decoding mode,
        possibly traced) only that query's row, [1, heads, 1, key_length]."""
        table = self.param(
            "embedding",
            partitioned(self.embedding_init, ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads),
            jnp.float32,
        )
        table = cast_to(table, self.dtype)
        relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        values = jnp.take(table, jnp.asarray(buckets, dtype=jnp.int32), axis=0)  # [q, k, heads]
        bias = jnp.transpose(values, (2, 0, 1))[None]
        if query_position is not None:
            bias = jax.lax.dynamic_slice_in_dim(bias, query_position, 1, axis=2)
        return bias


_SCORE_SITES = ("hook_q", "hook_k", "hook_attn_scores", "hook_pattern")


def folding_keys_is_cheaper(query_length: int, key_length: int, d_model: int, num_heads: int, d_kv: int) -> bool:
    """Whether attention costs fewer multiply-adds with the key and value projections folded into the
    queries' side (`MultiHeadAttention.fold_keys`) than with keys and values projected."""
    projected = 2 * key_length * d_model * num_heads * d_kv + 2 * query_length * key_length * num_heads * d_kv
    folded = 2 * query_length * num_heads * d_kv * d_model + 2 * query_length * key_length * num_heads * d_model
    return folded < projected


class MultiHeadAttention(nn.Module):
    """T5 attention (self or cross). Sites: hook_q, hook_k, hook_v, hook_attn_scores, hook_pattern, hook_z.

    `fold_keys`: where it costs less (`folding_keys_is_cheaper`: few queries, many keys, as a DSI decoder's
    one step reading a long encoder output) and no tap wants ``hook_k`` / ``hook_v``, keys and values are
    never projected: the scores are the queries mapped back through the key kernel times the key inputs,
    and ``z`` is the value kernel applied to the pattern-weighted key inputs. Equal in exact arithmetic;
    in floats the sums run in another order (differences of float rounding).
    """

    num_heads: int
    d_kv: int
    d_model: int
    dropout_rate: float = 0.0
    deterministic: bool = True
    initializer_factor: float = 1.0
    dtype: Dtype | None = None
    fold_keys: bool = False

    def setup(self):
        f, d, h, k = self.initializer_factor, self.d_model, self.num_heads, self.d_kv
        normal = nn.initializers.normal
        # transformers' T5 initialisation (the 1/sqrt(d_kv) score scaling is folded into the query).
        self.query = self.param("query", partitioned(normal(f * (d * k) ** -0.5), ("embed", "heads", "kv")),
                                (d, h, k), jnp.float32)
        self.key = self.param("key", partitioned(normal(f * d ** -0.5), ("embed", "heads", "kv")),
                              (d, h, k), jnp.float32)
        self.value = self.param("value", partitioned(normal(f * d ** -0.5), ("embed", "heads", "kv")),
                                (d, h, k), jnp.float32)
        self.out = self.param("out", partitioned(normal(f * (h * k) ** -0.5), ("heads", "kv", "embed")),
                              (h, k, d), jnp.float32)
        self.attn_dropout = Dropout(self.dropout_rate)

    def project_kv(self, inputs_kv: jnp.ndarray, tap: ScopedTap) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Keys and values [B, S, H, dk] of `inputs_kv` [B, S, D] (sites hook_k, hook_v)."""
        k = tap("hook_k", jnp.einsum("bsd,dhk->bshk", inputs_kv, cast_to(self.key, self.dtype)))
        v = tap("hook_v", jnp.einsum("bsd,dhk->bshk", inputs_kv, cast_to(self.value, self.dtype)))
        return k, v

    def __call__(
        self,
        inputs_q: jnp.ndarray,
        inputs_kv: jnp.ndarray | None,
        bias: jnp.ndarray | None,
        key_mask: jnp.ndarray | None,
        tap: ScopedTap,
        *,
        cache: tuple[jnp.ndarray, jnp.ndarray] | None = None,
        position=None,
        kv: tuple[jnp.ndarray, jnp.ndarray] | None = None,
    ):
        """inputs_q [B, T, D], inputs_kv [B, S, D], bias broadcastable to [B, H, T, S] (added to the
        scores), key_mask broadcastable to [B, H, T, S] (True = may attend). Returns [B, T, D].

        Decoding mode (one query position at a time, `genir_jax.core.model.T5.decode_step`): with `kv`, the
        keys and values [B, S, H, dk] were projected once (`project_kv`, cross-attention of the encoder
        output) and `inputs_kv` is not read; with `cache` ([B, T_max, H, dk] keys and values of earlier
        positions, self-attention), the keys and values of `inputs_kv` [B, 1, D] are written at `position`
        and the query attends over the cache; it then returns (output, updated cache)."""
        dtype = inputs_q.dtype
        value = cast_to(self.value, self.dtype)
        if kv is not None or cache is not None:
            if cache is not None:
                k_new, v_new = self.project_kv(inputs_kv, tap)
                k = jax.lax.dynamic_update_slice_in_dim(cache[0], k_new.astype(cache[0].dtype), position, axis=1)
                v = jax.lax.dynamic_update_slice_in_dim(cache[1], v_new.astype(cache[1].dtype), position, axis=1)
            else:
                k, v = kv
            fold, key_length = False, k.shape[1]
        else:
            k = None
            key_length = inputs_kv.shape[1]
            fold = (self.fold_keys and not tap.wants("hook_k") and not tap.wants("hook_v")
                    and folding_keys_is_cheaper(inputs_q.shape[1], key_length, self.d_model, self.num_heads,
                                                self.d_kv))
            v = None if fold else tap("hook_v", jnp.einsum("bsd,dhk->bshk", inputs_kv, value))
        if key_length == 1 and not any(tap.wants(name) for name in _SCORE_SITES):
            # One key (the decoder's self-attention at its first step, which is all a DSI model runs): the
            # softmax over it is 1 whatever the scores, so queries, keys and scores are never computed.
            pattern = jnp.ones((inputs_q.shape[0], self.num_heads, inputs_q.shape[1], 1), dtype)
        else:
            q = tap("hook_q", jnp.einsum("btd,dhk->bthk", inputs_q, cast_to(self.query, self.dtype)))
            if fold:  # q . (W_k x) = (W_k^T q) . x
                scores = jnp.einsum("bthd,bsd->bhts", jnp.einsum("bthk,dhk->bthd", q, cast_to(self.key, self.dtype)),
                                    inputs_kv)
            else:
                if k is None:
                    k = tap("hook_k", jnp.einsum("bsd,dhk->bshk", inputs_kv, cast_to(self.key, self.dtype)))
                scores = jnp.einsum("bthk,bshk->bhts", q, k)
            if bias is not None:
                scores = scores + _batch_broadcast(bias.astype(scores.dtype), scores.shape[0])
            if key_mask is not None:
                scores = jnp.where(key_mask, scores, jnp.finfo(scores.dtype).min)
            scores = tap("hook_attn_scores", scores)
            pattern = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)
        pattern = tap("hook_pattern", pattern)
        pattern = self.attn_dropout(pattern, deterministic=self.deterministic)
        if fold:  # sum_s p_s (W_v x_s) = W_v (sum_s p_s x_s)
            z = jnp.einsum("bthd,dhk->bthk", jnp.einsum("bhts,bsd->bthd", pattern, inputs_kv), value)
        else:
            z = jnp.einsum("bhts,bshk->bthk", pattern, v)
        z = tap("hook_z", z)
        out = jnp.einsum("bthk,hkd->btd", z, cast_to(self.out, self.dtype))
        return out if cache is None else (out, (k, v))


def _batch_broadcast(bias: jnp.ndarray, batch: int) -> jnp.ndarray:
    """A bias shared by the batch ([1, ...]) repeated `batch` times, as a product with ones: the same values,
    but its gradient (the sum over the batch) is then a matrix product, about 3x faster on the CPU for the
    relative position bias of 64 x 128 tokens than XLA:CPU's reduction over the batch axis."""
    if bias.shape[0] != 1 or batch == 1:
        return bias
    return jnp.einsum("b,x...->b...", jnp.ones((batch,), bias.dtype), bias)


class MLP(nn.Module):
    """T5 feed-forward block: ``wo(act(wi x))`` or gated ``wo(act(wi_0 x) * wi_1 x)``.

    Sites: hook_pre (activation input), hook_pre_linear (gated only: the linear branch), hook_post
    (the d_ff-dimensional neuron activations that `wo` reads).
    """

    d_model: int
    d_ff: int
    activation: str = "relu"
    gated: bool = False
    dropout_rate: float = 0.0
    deterministic: bool = True
    initializer_factor: float = 1.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, tap: ScopedTap) -> jnp.ndarray:
        f, d, ff = self.initializer_factor, self.d_model, self.d_ff
        normal = nn.initializers.normal
        act = activation_fn(self.activation)
        if self.gated:
            wi_0 = self.param("wi_0", partitioned(normal(f * d ** -0.5), ("embed", "mlp")), (d, ff), jnp.float32)
            wi_1 = self.param("wi_1", partitioned(normal(f * d ** -0.5), ("embed", "mlp")), (d, ff), jnp.float32)
            pre = tap("hook_pre", x @ cast_to(wi_0, self.dtype))
            linear = tap("hook_pre_linear", x @ cast_to(wi_1, self.dtype))
            post = act(pre) * linear
        else:
            wi = self.param("wi", partitioned(normal(f * d ** -0.5), ("embed", "mlp")), (d, ff), jnp.float32)
            pre = tap("hook_pre", x @ cast_to(wi, self.dtype))
            post = act(pre)
        post = tap("hook_post", post)
        post = Dropout(self.dropout_rate)(post, deterministic=self.deterministic)
        wo = self.param("wo", partitioned(normal(f * ff ** -0.5), ("mlp", "embed")), (ff, d), jnp.float32)
        return post @ cast_to(wo, self.dtype)
