"""The train step, data parallelism, data order, and the training driver (checkpoints, resume, metrics)."""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genir_jax.core.config import t5_v1_0
from genir_jax.base.errors import CheckpointError, ConfigError
from genir_jax.core.model import init_params
from genir_jax.training.batching import ArraySource, BatchPlan
from genir_jax.training.loop import (create_state, cross_entropy, data_mesh, make_eval_step, make_train_step,
                                     put_batch, put_state, shift_right)
from genir_jax.training.optim import OptimizerSpec, make_optimizer
from genir_jax.training.trainer import RunSpec, train_loop

CONFIG = t5_v1_0(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.1)


def _batch(seed: int = 0, size: int = 8, length: int = 10, targets: int = 3) -> dict:
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(2, 100, size=(size, length)).astype(np.int32)
    attention_mask = np.ones_like(input_ids)
    attention_mask[0, 7:] = 0  # some padding
    input_ids[0, 7:] = 0
    target_ids = rng.integers(100, 128, size=(size, targets)).astype(np.int32)
    target_mask = np.ones_like(target_ids)
    target_mask[1, 2:] = 0
    target_ids[1, 2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": target_ids,
            "target_mask": target_mask}


def _source(count: int = 24, seed: int = 0) -> ArraySource:
    full = _batch(seed, size=count)
    short = {k: v[:, :6] if k in ("input_ids", "attention_mask") else v for k, v in _batch(seed + 1, size=10).items()}
    return ArraySource([full, short])


@functools.lru_cache(maxsize=None)
def _params():
    return init_params(CONFIG, 0)


@functools.lru_cache(maxsize=None)
def _step(devices: tuple, steps: int, dropout: bool, bf16: bool):
    """One jitted step per setting for the whole module (compiling is the slow part of these tests)."""
    optimizer, schedule = make_optimizer(OptimizerSpec("adafactor", 1e-2), steps)
    mesh = data_mesh(devices)
    step = make_train_step(CONFIG, optimizer, mesh, schedule=schedule, dropout=dropout,
                           compute_dtype=jnp.bfloat16 if bf16 else None)
    return optimizer, mesh, step


def _run(devices, steps=3, seed=0, dropout=True, bf16=False):
    optimizer, mesh, step = _step(tuple(devices), steps, dropout, bf16)
    state = put_state(create_state(_params(), optimizer, seed), mesh)
    losses = []
    for i in range(steps):
        state, metrics = step(state, put_batch(_batch(i), mesh))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses


def test_shift_right_and_cross_entropy():
    targets = jnp.array([[5, 6, 7], [8, 0, 0]])
    np.testing.assert_array_equal(shift_right(targets, 0), [[0, 5, 6], [0, 8, 0]])
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 10))
    targets = jnp.array([[1, 2, 3], [4, 5, 6]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    loss, metrics = cross_entropy(logits, targets, mask)
    log_probs = np.asarray(jax.nn.log_softmax(logits))
    expected = -np.mean([log_probs[0, 0, 1], log_probs[0, 1, 2], log_probs[1, 0, 4]])
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["tokens"]) == 3


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_one_step_decreases_loss_on_a_fixed_batch():
    optimizer, _ = make_optimizer(OptimizerSpec("adafactor", 1e-2), 1)
    mesh = data_mesh(jax.local_devices()[:1])
    step = make_train_step(CONFIG, optimizer, mesh, dropout=False)
    evaluate = make_eval_step(CONFIG)
    state = put_state(create_state(init_params(CONFIG, 0), optimizer, 0), mesh)
    batch = _batch(0)
    before, _ = evaluate(state.params, batch)
    state, metrics = step(state, put_batch(batch, mesh))
    after, _ = evaluate(state.params, batch)
    assert float(metrics["loss"]) == pytest.approx(float(before), rel=1e-5)  # the step saw that same loss
    assert float(after) < float(before) - 0.01
    assert int(state.step) == 1


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_data_parallel_matches_single_device():
    devices = jax.local_devices()
    assert len(devices) >= 4, "conftest should simulate 4 CPU devices"
    one, losses_one = _run(devices[:1])
    four, losses_four = _run(devices[:4])
    np.testing.assert_allclose(losses_one, losses_four, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(four.params)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_same_seed_same_params_other_seed_other_dropout():
    devices = jax.local_devices()[:4]  # the step compiled for the data-parallel test
    a, _ = _run(devices, seed=3)
    b, _ = _run(devices, seed=3)
    c, _ = _run(devices, seed=4)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a.params),
                                                         jax.tree_util.tree_leaves(c.params)))


def test_each_step_draws_new_dropout_masks_and_a_step_reproduces_its_own():
    """The step number is folded into the run's key: on the same parameters and batch, steps 0 and 1 see
    different dropout masks (different losses), step 0 again sees the same ones (the same loss), and the
    loss is the one the forward gives with the key ``fold_in(PRNGKey(seed), step)`` (what a resumed run
    draws). The step is the one the seed test above compiled (compiling is the slow part)."""
    from genir_jax.training.loop import seq2seq_loss

    optimizer, mesh, step = _step(tuple(jax.local_devices()[:4]), 3, True, False)
    config, params, batch = CONFIG, _params(), _batch(0)

    def loss_at(number):
        state = create_state(params, optimizer, 3).replace(step=jnp.asarray(number, jnp.int32))
        return float(step(put_state(state, mesh), put_batch(batch, mesh))[1]["loss"])

    first, second, again = loss_at(0), loss_at(1), loss_at(0)
    assert first == again
    assert abs(first - second) > 1e-4
    reference = jax.jit(lambda key: seq2seq_loss(config, params, batch, dropout_rng=key)[0])
    for number, loss in ((0, first), (1, second)):
        assert loss == pytest.approx(float(reference(jax.random.fold_in(jax.random.PRNGKey(3), number))), rel=1e-5)


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_bfloat16_compute_keeps_float32_master_weights():
    state, losses = _run(jax.local_devices()[:1], steps=2, bf16=True, dropout=False)
    assert all(np.isfinite(losses))
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(state.params))
    reference, losses32 = _run(jax.local_devices()[:1], steps=2, dropout=False)
    assert losses[0] == pytest.approx(losses32[0], rel=2e-2)


def test_batch_must_divide_over_devices():
    mesh = data_mesh(jax.local_devices()[:4])
    with pytest.raises(ConfigError, match="divisible"):
        put_batch(_batch(0, size=6), mesh)


def test_batch_plan_covers_every_example_each_epoch():
    plan = BatchPlan([10, 3, 0], batch_size=4, seed=1)
    assert plan.steps_per_epoch == 3 + 1
    for epoch in range(2):
        seen = {0: [], 1: []}
        for step in range(epoch * plan.steps_per_epoch, (epoch + 1) * plan.steps_per_epoch):
            group, indices, step_epoch = plan.at(step)
            assert step_epoch == epoch and len(indices) == 4
            seen[group].extend(indices.tolist())
        assert set(seen[0]) == set(range(10)) and len(seen[0]) == 12  # topped up with 2 repeats
        assert set(seen[1]) == set(range(3))
    again = BatchPlan([10, 3, 0], batch_size=4, seed=1)
    for step in (5, 0, 7):  # a pure function of (seed, step), in any order
        a, b = plan.at(step), again.at(step)
        assert a[0] == b[0] and np.array_equal(a[1], b[1])
    other = BatchPlan([10, 3, 0], batch_size=4, seed=2)
    assert any(not np.array_equal(plan.at(s)[1], other.at(s)[1]) for s in range(4))


def _spec(**changes) -> RunSpec:
    base = RunSpec(steps=12, batch_size=4, optimizer=OptimizerSpec("adafactor", 1e-2, "linear", 2), seed=0,
                   log_every=2, eval_every=4, checkpoint_every=4, keep_checkpoints=3)
    return RunSpec(**{**base.__dict__, **changes})


def _evaluate(params):
    loss, _ = make_eval_step(CONFIG)(params, _batch(99, size=4))
    return {"loss": float(loss)}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_train_loop_resume_is_exact(tmp_path):
    devices = jax.local_devices()[:2]
    params = _params()
    full = train_loop(CONFIG, params, _source(), _spec(), str(tmp_path / "full"), evaluate=_evaluate,
                      best_metric="loss", best_mode="min", progress=False, devices=devices)
    records = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["step"] for r in records if r["event"] == "eval"] == [4, 8, 12]
    assert all("loss" in r and "examples_per_s" in r for r in records if r["event"] == "train")
    assert sorted(os.listdir(tmp_path / "full" / "checkpoints")) == ["12", "4", "8"]
    assert full.best["loss"] == min(e["loss"] for e in full.evaluations)

    # A run that got to step 12 but whose checkpoints after step 4 are lost resumes from 4 and ends equal.
    partial = tmp_path / "partial"
    train_loop(CONFIG, params, _source(), _spec(), str(partial), evaluate=_evaluate, best_metric="loss",
               best_mode="min", progress=False, devices=devices)
    for step in ("8", "12"):
        shutil.rmtree(partial / "checkpoints" / step)
    resumed = train_loop(CONFIG, params, _source(), _spec(), str(partial), evaluate=_evaluate, best_metric="loss",
                         best_mode="min", resume=True, progress=False, devices=devices)
    assert resumed.resumed_from == 4
    for a, b in zip(_leaves(full.last_params), _leaves(resumed.last_params)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_leaves(full.params), _leaves(resumed.params)):
        np.testing.assert_array_equal(a, b)
    assert resumed.best == full.best and resumed.evaluations == full.evaluations
    resumed_records = [json.loads(line) for line in open(partial / "metrics.jsonl")]
    assert [r["step"] for r in resumed_records] == [r["step"] for r in records]  # no duplicated lines


def test_train_loop_refuses_foreign_checkpoints(tmp_path):
    devices = jax.local_devices()[:2]  # same settings as the resume test: its compiled steps are reused
    params = _params()
    spec = _spec()
    train_loop(CONFIG, params, _source(), spec, str(tmp_path), progress=False, devices=devices)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train_loop(CONFIG, params, _source(), spec, str(tmp_path), progress=False, devices=devices)
    with pytest.raises(CheckpointError, match="different spec"):
        train_loop(CONFIG, params, _source(), _spec(seed=1), str(tmp_path), resume=True, progress=False,
                   devices=devices)
    with pytest.raises(CheckpointError, match="different fingerprint"):
        train_loop(CONFIG, params, _source(seed=5), spec, str(tmp_path), resume=True, progress=False,
                   devices=devices)


def test_run_spec_validation():
    with pytest.raises(ConfigError, match="steps"):
        _spec(steps=0).validate()
    with pytest.raises(ConfigError, match="divisible"):
        train_loop(CONFIG, init_params(CONFIG, 0), _source(), _spec(batch_size=6), "/nonexistent/never-written",
                   progress=False, devices=jax.local_devices()[:4])
    assert not os.path.exists("/nonexistent/never-written")
