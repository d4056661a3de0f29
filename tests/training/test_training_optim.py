"""Learning-rate schedules and the Adafactor / AdamW optimizers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genir_jax.base.errors import ConfigError
from genir_jax.training.optim import OptimizerSpec, learning_rate_schedule, make_optimizer


def _values(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_constant_with_warmup():
    schedule = learning_rate_schedule("constant", 1e-3, warmup_steps=4, total_steps=100)
    np.testing.assert_allclose(_values(schedule, [0, 1, 2, 3, 4, 50, 99, 500]),
                               [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-6)


def test_no_warmup_starts_at_peak():
    schedule = learning_rate_schedule("constant", 0.01, warmup_steps=0, total_steps=10)
    assert float(schedule(0)) == pytest.approx(0.01)


def test_linear_decay():
    schedule = learning_rate_schedule("linear", 1.0, warmup_steps=10, total_steps=110, end_fraction=0.1)
    np.testing.assert_allclose(_values(schedule, [0, 9, 10, 60, 110, 200]), [0.1, 1.0, 1.0, 0.55, 0.1, 0.1],
                               rtol=1e-6)


def test_cosine_decay():
    schedule = learning_rate_schedule("cosine", 2.0, warmup_steps=0, total_steps=100, end_fraction=0.0)
    np.testing.assert_allclose(_values(schedule, [0, 50, 100]), [2.0, 1.0, 0.0], atol=1e-6)
    assert float(schedule(25)) == pytest.approx(1.0 + math.cos(math.pi / 4), rel=1e-6)


def test_rsqrt_is_t5_inverse_square_root():
    schedule = learning_rate_schedule("rsqrt", 0.01, warmup_steps=100, total_steps=10_000)
    assert float(schedule(99)) == pytest.approx(0.01)
    assert float(schedule(100)) == pytest.approx(0.01)
    assert float(schedule(400)) == pytest.approx(0.005)  # 0.01 * sqrt(100 / 400)
    assert float(schedule(10_000)) == pytest.approx(0.001)


@pytest.mark.parametrize("spec", [
    OptimizerSpec("adafactor", 0.1),
    OptimizerSpec("adafactor", 1.0, multiply_by_parameter_scale=True),  # steps relative to the parameters' RMS
    OptimizerSpec("adamw", 0.1, "linear", 2, weight_decay=0.01),
])
def test_optimizers_minimise_a_quadratic(spec):
    optimizer, _ = make_optimizer(spec, total_steps=50)
    target = jnp.arange(256 * 130, dtype=jnp.float32).reshape(256, 130) / 1e4
    params = {"w": jnp.full((256, 130), 0.5), "b": jnp.ones((3,))}

    def loss(p):
        return jnp.mean((p["w"] - target) ** 2) + jnp.mean(p["b"] ** 2)

    state = optimizer.init(params)
    first = float(loss(params))
    for _ in range(20):
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    assert float(loss(params)) < 0.5 * first


def test_adafactor_factors_large_matrices():
    optimizer, _ = make_optimizer(OptimizerSpec("adafactor"), total_steps=10)
    state = optimizer.init({"w": jnp.zeros((256, 130)), "b": jnp.zeros((3,))})
    factored = [s for s in jax.tree_util.tree_leaves(state) if getattr(s, "shape", None) in ((256,), (130,))]
    assert len(factored) == 2  # a row and a column second moment instead of a [256, 130] one


@pytest.mark.parametrize("changes", [
    {"name": "sgd"}, {"schedule": "step"}, {"learning_rate": 0.0}, {"warmup_steps": -1}, {"end_fraction": 2.0},
    {"clip_norm": 0.0},
])
def test_invalid_specs_raise(changes):
    with pytest.raises(ConfigError):
        make_optimizer(OptimizerSpec().replace(**changes), total_steps=10)
