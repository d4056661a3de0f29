"""Loop trip counts in compiled HLO: dot FLOPs counted per run, and plans that count every layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from genir_jax.core.config import t5_v1_0
from genir_jax.plan.hlo_loops import bytes_scale, dot_flops, flops_scale, scales
from genir_jax.core.model import _forward, param_shapes
from genir_jax.plan.planning import Workload, make_plan


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def _xla_cost(compiled, key: str) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)[key])


def _xla_flops(compiled) -> float:
    return _xla_cost(compiled, "flops")


def test_dot_flops_of_a_matmul_and_of_a_loop():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    plain = _compiled(lambda a, b: jnp.tanh(a @ b), a, b).as_text()
    assert dot_flops(plain) == dot_flops(plain, with_trip_counts=False) == 2 * 8 * 16 * 4
    assert flops_scale(plain) == 1.0

    def looped(a, b):
        return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ b[:4]) + i, a @ b)

    text = _compiled(looped, a, b).as_text()
    once, per_run = 2 * 8 * 16 * 4 + 2 * 8 * 4 * 4, 2 * 8 * 16 * 4 + 5 * 2 * 8 * 4 * 4
    assert dot_flops(text, with_trip_counts=False) == once
    assert dot_flops(text) == per_run
    assert flops_scale(text) == pytest.approx(per_run / once)
    assert scales(text) == (flops_scale(text), bytes_scale(text)) and bytes_scale(text) > 1.0


@pytest.mark.parametrize("layers", [(2, 2), (4, 4), (2, 6)])
def test_scanned_layers_counted_like_unrolled_ones(layers):
    """XLA counts the scanned layers once; scaled, the count equals the unrolled program's."""
    config = t5_v1_0(vocab_size=1000, d_model=64, d_kv=16, d_ff=256, num_layers=layers[0],
                     num_decoder_layers=layers[1], num_heads=4)
    params = param_shapes(config)
    ids, dec = jax.ShapeDtypeStruct((8, 32), jnp.int32), jax.ShapeDtypeStruct((8, 1), jnp.int32)
    scanned, unrolled = (_forward.lower(config, params, ids, ids, dec, None, None, None, ((), ()), True, None, None,
                                        False, unroll).compile() for unroll in (False, True))
    assert dot_flops(scanned.as_text()) == pytest.approx(dot_flops(unrolled.as_text()), rel=1e-9)
    assert flops_scale(unrolled.as_text()) == 1.0
    corrected = _xla_flops(scanned) * flops_scale(scanned.as_text())
    assert corrected == pytest.approx(_xla_flops(unrolled), rel=0.02)
    assert _xla_flops(scanned) < 0.8 * _xla_flops(unrolled)  # what the plan reported before
    corrected_bytes = _xla_cost(scanned, "bytes accessed") * bytes_scale(scanned.as_text())
    assert corrected_bytes == pytest.approx(_xla_cost(unrolled, "bytes accessed"), rel=0.05)


def test_training_step_counted_like_its_unrolled_version():
    from genir_jax.training.loop import create_state, data_mesh, make_train_step
    from genir_jax.training.optim import OptimizerSpec, make_optimizer
    from genir_jax.core.model import init_params

    config = t5_v1_0(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=4, num_heads=4)
    optimizer, _ = make_optimizer(OptimizerSpec("adafactor", 1e-2), 10)
    state = create_state(init_params(config, 0), optimizer, 0)
    batch = {"input_ids": jnp.ones((4, 16), jnp.int32), "attention_mask": jnp.ones((4, 16), jnp.int32),
             "targets": jnp.ones((4, 1), jnp.int32), "target_mask": jnp.ones((4, 1), jnp.int32)}
    mesh = data_mesh(jax.devices()[:1])
    scanned, unrolled = (make_train_step(config, optimizer, mesh, unroll_layers=unroll).lower(state, batch).compile()
                         for unroll in (False, True))
    flops = _xla_cost(scanned, "flops") * flops_scale(scanned.as_text())
    assert flops == pytest.approx(_xla_cost(unrolled, "flops"), rel=0.3)
    # bytes: the scanned program really moves more (stacked per-layer residuals written and read back)
    moved = _xla_cost(scanned, "bytes accessed") * bytes_scale(scanned.as_text())
    assert 1.0 < moved / _xla_cost(unrolled, "bytes accessed") < 1.6


def test_plan_flops_grow_with_depth(tmp_path):
    plans = []
    for layers in (2, 4):
        path = tmp_path / f"config{layers}.json"
        t5_v1_0(vocab_size=256, d_model=64, d_kv=16, d_ff=256, num_layers=layers, num_heads=4).to_json_file(path)
        plans.append(make_plan(str(path), "data=1", Workload(batch=8, query_length=32), jax.devices()[:1]))
    shallow, deep = plans
    assert deep.flops_scale > shallow.flops_scale > 1.0
    assert 1.7 < deep.flops / shallow.flops < 2.0  # the layers dominate; embedding and head are shared
