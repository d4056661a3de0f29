"""Our dropout draws exactly the masks of `jax.random.bernoulli` / `flax.linen.Dropout`, in a model too."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genir_jax.core.dropout as dropout_module
from genir_jax.core.config import t5_v1_0
from genir_jax.core.dropout import Dropout, bernoulli_mask, threefry2x32
from genir_jax.core.model import T5, init_params


def test_threefry_matches_the_random123_known_answers():
    """Known-answer vectors of Threefry-2x32-20 (Random123's kat_vectors)."""
    cases = [((0x0, 0x0), (0x0, 0x0), (0x6B200159, 0x99BA4EFE)),
             ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
             ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
    for key, counter, expected in cases:
        out = threefry2x32(np.uint32(key[0]), np.uint32(key[1]), jnp.uint32(counter[0]), jnp.uint32(counter[1]))
        assert [int(x) for x in out] == list(expected)


@pytest.mark.parametrize("shape", [(1,), (3,), (5, 7), (2, 3, 4, 5), (7, 1, 3), (16, 4, 32, 32)])
@pytest.mark.parametrize("p", [0.9, 0.5, 0.37, 0.0, 1.0])
def test_masks_equal_jax_random_bernoulli(shape, p):
    for key in (jax.random.PRNGKey(11), jax.random.key(5), jax.random.fold_in(jax.random.PRNGKey(2), 7)):
        expected = jax.random.bernoulli(key, p, shape)
        np.testing.assert_array_equal(bernoulli_mask(key, p, shape), expected)
        jitted = jax.jit(bernoulli_mask, static_argnums=(1, 2))(key, p, shape)
        np.testing.assert_array_equal(jitted, expected)


def test_keep_rate_is_the_asked_rate():
    mask = bernoulli_mask(jax.random.PRNGKey(0), 0.9, (1000, 1000))
    assert abs(float(mask.mean()) - 0.9) < 1e-3


def test_other_generators_fall_back_to_jax(monkeypatch):
    """A key of another generator, or 64-bit mode, draws through jax.random itself (same masks)."""
    rbg = jax.random.key(3, impl="rbg")
    np.testing.assert_array_equal(bernoulli_mask(rbg, 0.8, (6, 9)), jax.random.bernoulli(rbg, 0.8, (6, 9)))
    with jax.enable_x64(True):
        key = jax.random.PRNGKey(4)
        np.testing.assert_array_equal(bernoulli_mask(key, 0.8, (6, 9)), jax.random.bernoulli(key, 0.8, (6, 9)))
    calls = []
    monkeypatch.setattr(dropout_module.jax.random, "bernoulli",
                        lambda *args: calls.append(args) or jnp.zeros(args[2], bool))
    bernoulli_mask(rbg, 0.8, (2, 2))
    assert calls, "an rbg key must not be hashed as threefry"


class _Three(nn.Module):
    """Auto-named, explicitly named and broadcast dropout, as our model uses them."""

    cls: type

    @nn.compact
    def __call__(self, x):
        first = self.cls(0.1)
        y = first(x, deterministic=False)
        y = first(y, deterministic=False)  # one instance called twice draws two masks
        y = self.cls(0.3, broadcast_dims=(-1,))(y, deterministic=False)
        return y + self.cls(0.2, name="named")(x, deterministic=False) + self.cls(0.5)(x, deterministic=True)


def test_module_equals_flax_dropout():
    x = jnp.arange(2 * 3 * 40, dtype=jnp.float32).reshape(2, 3, 40) + 1.0
    rngs = {"dropout": jax.random.PRNGKey(3)}
    ours = _Three(Dropout).apply({}, x, rngs=rngs)
    flax_out = _Three(nn.Dropout).apply({}, x, rngs=rngs)
    np.testing.assert_array_equal(ours, flax_out)
    single = Dropout(0.5).apply({}, x, deterministic=False, rngs=rngs)
    np.testing.assert_array_equal(single, nn.Dropout(0.5).apply({}, x, deterministic=False, rngs=rngs))
    assert 0.3 < float((single == 0).mean()) < 0.7  # masks were drawn
    np.testing.assert_array_equal(Dropout(1.0).apply({}, x, deterministic=False), jnp.zeros_like(x))


def test_model_dropout_equals_jax_random_bernoulli(monkeypatch):
    """A whole T5 forward in train mode: our masks against jax.random.bernoulli's, same outputs bit for bit."""
    config = t5_v1_0(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=2, num_heads=4,
                     dropout_rate=0.25)
    params = init_params(config, 0)
    ids = jnp.asarray(np.random.default_rng(0).integers(2, 64, size=(3, 9)), jnp.int32)
    decoder_ids = ids[:, :4]
    rngs = {"dropout": jax.random.PRNGKey(9)}

    def run():
        return T5(config, deterministic=False).apply({"params": params}, ids, jnp.ones_like(ids), decoder_ids,
                                                     rngs=rngs)[0]

    ours = run()
    monkeypatch.setattr(dropout_module, "bernoulli_mask", jax.random.bernoulli)
    theirs = run()
    np.testing.assert_array_equal(ours, theirs)
    deterministic = T5(config).apply({"params": params}, ids, jnp.ones_like(ids), decoder_ids)[0]
    assert not np.allclose(ours, deterministic)
