"""`genir-jax plan`: ahead-of-time memory / FLOP plans on simulated devices agree with real runs; bad input exits 2."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from genir_jax.cli import main as cli
from genir_jax.core.config import t5_v1_0
from genir_jax.plan.planning import SHAPES, Workload, make_plan, measure, per_device_bytes

TINY = t5_v1_0(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=3, num_heads=4)


@pytest.fixture
def tiny_shape(tmp_path):
    path = tmp_path / "config.json"
    TINY.to_json_file(path)
    return str(path)


@pytest.mark.parametrize("task", ["forward", "train"])
def test_predicted_memory_matches_what_the_program_allocates(tmp_path, task):
    """The plan's per-device arguments + outputs (from abstract shardings and XLA's memory analysis) against
    the bytes the real arrays hold on that device after running the same compiled program (training: the
    donated state's buffers are reused by the new state, so it is not counted twice)."""
    path = tmp_path / "config.json"
    TINY.replace(num_layers=1, num_decoder_layers=1, d_ff=64, vocab_size=256).to_json_file(path)
    work = Workload(task=task, batch=4, query_length=8)
    result = measure(str(path), "data=2,model=2", work, jax.devices()[:4])
    plan = result["plan"]
    predicted = plan.parameter_bytes + plan.activation_bytes
    assert abs(predicted - result["resident_bytes"]) <= 0.2 * result["resident_bytes"], (predicted, result)
    assert abs(plan.total_bytes - result["allocated_bytes"]) <= 0.2 * result["allocated_bytes"]
    assert plan.temp_bytes > 0 and plan.flops > 0


def test_parameters_are_split_as_the_mesh_says(tiny_shape):
    """model=2 halves the vocab / mlp / heads dimensions; data=2 replicates: the plan's per-device parameter
    bytes (abstract shardings) against the shards of real sharded arrays; and data=2 halves the FLOPs."""
    from genir_jax.core.model import logical_axes, param_shapes
    from genir_jax.scale.partitioning import Partitioner
    from genir_jax.plan.planning import abstract_params

    params = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, np.float32), param_shapes(TINY))
    full = sum(int(np.prod(x.shape)) * 4 for x in jax.tree_util.tree_leaves(params))
    for mesh in ("data=2", "model=2"):
        partitioner = Partitioner(mesh, devices=jax.devices()[:2])
        real = partitioner.shard_params(params, logical_axes(TINY))
        on_first = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(real) for s in x.addressable_shards
                       if s.device == jax.devices()[0])
        predicted = per_device_bytes(abstract_params(TINY, partitioner, np.float32))
        assert predicted == on_first == per_device_bytes(real)
        if mesh == "data=2":
            assert predicted == full
        else:
            assert full / 2 < predicted < full * 0.6  # norms and relative biases stay replicated
    work = Workload(batch=8, query_length=8)
    two = make_plan(tiny_shape, "data=2", work, jax.devices()[:2])
    one = make_plan(tiny_shape, "data=1", work, jax.devices()[:1])
    assert two.parameter_bytes == one.parameter_bytes == full
    assert two.flops == pytest.approx(one.flops / 2, rel=0.05)


def test_cli_plan_prints_and_writes_json(tiny_shape, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = cli.main(["--no-compile-cache", "plan", "--shape", tiny_shape, "--mesh", "data=2,model=2", "--task",
                     "sweep", "--batch", "8", "--configs", "4", "--query-length", "16", "--accelerators",
                     "tpu-v5e,h100", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "temporaries" in text and "tpu-v5e" in text and "h100" in text and "fits" in text
    assert "tpu-v4 " not in text
    data = json.loads(out.read_text())
    assert data["mesh"] == {"data": 2, "configs": 1, "model": 2}
    # a zero-ablation grid over every decoder neuron: 3 layers x 128 neurons, 4 configs x 8 queries per step
    assert data["steps"] == 3 * 128 // 4
    assert data["per_device"]["total_bytes"] > data["per_device"]["parameter_bytes"] > 0


def test_named_shapes_are_the_hugging_face_configs():
    large, xl, xxl = SHAPES["t5-large"], SHAPES["t5-xl"], SHAPES["t5-xxl"]
    assert (large.d_model, large.d_ff, large.num_heads, large.feed_forward_proj, large.tie_word_embeddings) == \
        (1024, 4096, 16, "relu", True)
    assert (xl.d_model, xl.d_ff, xl.num_heads, xl.feed_forward_proj, xl.tie_word_embeddings) == \
        (2048, 5120, 32, "gated-gelu", False)
    assert (xxl.d_model, xxl.d_ff, xxl.num_heads, xxl.num_layers, xxl.num_decoder_layers) == (4096, 10240, 64, 24, 24)


@pytest.mark.parametrize("argv, message", [
    (["--shape", "t5-huge", "--mesh", "data=2"], "not a known shape"),
    (["--shape", "t5-large", "--mesh", "data=3", "--devices", "4"], "does not divide"),
    (["--shape", "t5-large", "--mesh", "data=2,pipeline=2"], "unknown mesh axis"),
    (["--shape", "t5-large", "--mesh", "data=2", "--accelerators", "tpu-v9"], "unknown 'tpu-v9'"),
])
def test_bad_input_exits_2(argv, message, capsys):
    assert cli.main(["--no-compile-cache", "plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genir-jax plan: error:") and message in err, err


def test_bad_batch_or_dimension_exits_2(tiny_shape, capsys):
    assert cli.main(["--no-compile-cache", "plan", "--shape", tiny_shape, "--mesh", "data=2", "--batch", "7"]) == 2
    assert "not divisible by the mesh's data axis" in capsys.readouterr().err
    # 4 heads cannot be split 3 ways
    assert cli.main(["--no-compile-cache", "plan", "--shape", tiny_shape, "--mesh", "model=3", "--batch", "3"]) == 2
    assert "cannot be split 3 ways" in capsys.readouterr().err


def test_more_devices_than_this_process_has_runs_in_a_fresh_process(tiny_shape, tmp_path, capfd):
    out = tmp_path / "plan.json"
    assert len(jax.devices()) < 8
    code = cli.main(["--no-compile-cache", "plan", "--shape", tiny_shape, "--mesh", "data=8", "--batch", "8",
                     "--query-length", "8", "--json", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["devices"] == 8
    assert "8 devices" in capfd.readouterr().out


def test_mesh_defaults_to_every_device_on_data(tiny_shape, tmp_path, capsys):
    """As every other command: no --mesh is all devices on data (--devices of them, else the local devices)."""
    out = tmp_path / "plan.json"
    assert cli.main(["--no-compile-cache", "plan", "--shape", tiny_shape, "--task", "sweep", "--batch", "8",
                     "--configs", "4", "--query-length", "16", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["mesh"] == {"data": jax.local_device_count(), "configs": 1, "model": 1}
    assert cli.main(["--no-compile-cache", "plan", "--shape", tiny_shape, "--devices", "2", "--batch", "8",
                     "--json", str(out)]) == 0
    assert json.loads(out.read_text())["mesh"] == {"data": 2, "configs": 1, "model": 1}
