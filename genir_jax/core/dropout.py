"""Dropout whose masks are bit for bit `jax.random.bernoulli`'s, drawn several times faster on the CPU.

JAX lowers its threefry-2x32 hash on the CPU as a rolled loop of five iterations (to keep compile times
short), so XLA:CPU writes and reads every intermediate of a dropout mask five times: a 64 x 4 x 128 x 128
attention-probability mask took 17 ms. `threefry2x32` here is the same hash (Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011: 20 rounds, rotations 13 15 26 6 / 17 29 16 24, a key
injection every 4 rounds) written out in full, so XLA fuses it into one elementwise loop: 3.9 ms for that
mask, the same bits.

`bernoulli_mask` draws exactly what ``jax.random.bernoulli(key, p, shape)`` draws (JAX's partitionable
threefry counters, the float32 uniform from the top 23 bits); `Dropout` is a drop-in for
`flax.linen.Dropout` (same key from ``make_rng("dropout")``, same auto-name, same mask and scaling), so a
model's dropout and a resumed run's masks do not change. Where they would differ (64-bit floats enabled,
a key that is not threefry's, JAX's non-partitionable counters, 2**32 or more elements) the masks come
from `jax.random.bernoulli` itself.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jnp.ndarray, bits: int) -> jnp.ndarray:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(key_0, key_1, counter_0: jnp.ndarray, counter_1: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The threefry-2x32 block cipher (20 rounds) of counter pairs under a key pair, all uint32."""
    keys = (key_0, key_1, key_0 ^ key_1 ^ _KEY_PARITY)
    x_0, x_1 = counter_0 + keys[0], counter_1 + keys[1]
    for block in range(5):
        for rotation in _ROTATIONS[block % 2]:
            x_0 = x_0 + x_1
            x_1 = _rotate_left(x_1, rotation) ^ x_0
        x_0 = x_0 + keys[(block + 1) % 3]
        x_1 = x_1 + keys[(block + 2) % 3] + np.uint32(block + 1)
    return x_0, x_1


def _threefry_key_data(key) -> jnp.ndarray | None:
    """The uint32 [2] key words when `key` is a threefry key `jax.random.bernoulli` would hash as we do."""
    if jax.config.jax_enable_x64 or not jax.config.jax_threefry_partitionable:
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if "threefry" not in str(jax.random.key_impl(key)):
            return None
        key = jax.random.key_data(key)
    elif jax.config.jax_default_prng_impl != "threefry2x32":
        return None
    return key if key.shape == (2,) and key.dtype == jnp.uint32 else None


def _flat_index(shape: Sequence[int]) -> jnp.ndarray:
    """Row-major element index as uint32 (JAX's counters, for fewer than 2**32 elements)."""
    strides = np.cumprod((1,) + tuple(shape[:0:-1]))[::-1]
    index = jnp.zeros(shape, jnp.uint32)
    for axis, stride in enumerate(strides):
        if shape[axis] > 1:
            index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    return index


def bernoulli_mask(key, p: float, shape: Sequence[int]) -> jnp.ndarray:
    """``jax.random.bernoulli(key, p, shape)`` for a Python float `p`, bit for bit, with the unrolled hash."""
    shape = tuple(int(d) for d in shape)
    words = _threefry_key_data(key)
    if words is None or math.prod(shape) >= 2 ** 32:
        return jax.random.bernoulli(key, p, shape)
    bits_0, bits_1 = threefry2x32(words[0], words[1], jnp.zeros(shape, jnp.uint32), _flat_index(shape))
    mantissa = (bits_0 ^ bits_1) >> np.uint32(32 - 23)  # the uniform's 23 mantissa bits, as JAX takes them
    uniform = jax.lax.bitcast_convert_type(mantissa | np.uint32(0x3F800000), jnp.float32) - np.float32(1.0)
    return uniform < np.float32(p)


class Dropout(nn.Module):
    """`flax.linen.Dropout` (rate, broadcast_dims, deterministic, rng_collection; same masks) drawing its
    mask with `bernoulli_mask`. The class name is Flax's, so automatic names (``Dropout_0``, ...) and
    hence the ``make_rng`` keys are the ones `flax.linen.Dropout` would get."""

    rate: float
    broadcast_dims: Sequence[int] = ()
    deterministic: bool | None = None
    rng_collection: str = "dropout"

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep_prob = 1.0 - self.rate
        if rng is None:
            rng = self.make_rng(self.rng_collection)
        mask_shape = list(inputs.shape)
        for axis in self.broadcast_dims:
            mask_shape[axis] = 1
        mask = jnp.broadcast_to(bernoulli_mask(rng, keep_prob, mask_shape), inputs.shape)
        return jax.lax.select(mask, inputs / keep_prob, jnp.zeros_like(inputs))
