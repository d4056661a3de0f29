"""Logical-axis partitioning (`genir_jax.scale.partitioning`): mesh parsing and rule errors, sharded safetensors
loading and orbax checkpoints, attribution on a mesh, and (in a subprocess with 8 simulated devices)
forward / sweep / one training step on 1x1, 8x1, 4x2, 2x4 and 1x8 meshes against one unsharded device, a
bfloat16 sweep against float32; two processes joined by jax.distributed against one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import sweep as sw
from genir_jax.cli.main import main
from genir_jax.checkpoints.hf import load_pretrained
from genir_jax.core.model import logical_axes, param_shapes
from genir_jax.scale.partitioning import (DEFAULT_RULES, Partitioner, PartitioningError, make_mesh, merge_rules, parse_mesh,
                                    parse_rules)
from genir_jax.interp.patching import run_sweep
from tests.conftest import REPO_ROOT

CONFIG = gj.t5_v1_0(vocab_size=160, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=2,
                           num_heads=4, dropout_rate=0.0)


def test_parse_mesh_and_its_errors():
    assert parse_mesh("data=4,model=2") == {"data": 4, "model": 2}
    assert parse_mesh(" configs=2 , data=2 ") == {"configs": 2, "data": 2}
    for bad, words in (("data=4,tensor=2", "unknown mesh axis 'tensor'"), ("data=0", "positive integer"),
                       ("data=two", "positive integer"), ("data", "not AXIS=SIZE"), ("data=2,data=2", "twice"),
                       ("", "no axes")):
        with pytest.raises(PartitioningError, match=words):
            parse_mesh(bad)


def test_mesh_must_divide_the_devices_and_data_takes_the_rest():
    assert len(jax.devices()) == 4  # tests/conftest.py
    with pytest.raises(PartitioningError, match="does not divide the 4 available devices"):
        make_mesh("data=3")
    with pytest.raises(PartitioningError, match="do not divide the 4 devices"):
        make_mesh("model=3")
    mesh = make_mesh("model=2")
    assert dict(zip(mesh.axis_names, mesh.devices.shape)) == {"data": 2, "configs": 1, "model": 2}
    assert make_mesh("data=2").devices.size == 2  # a mesh that divides the devices uses the first ones


def test_rules_errors_name_the_axis_parameter_and_dimension():
    with pytest.raises(PartitioningError, match="unknown logical axis 'hidden'"):
        parse_rules("hidden=model")
    with pytest.raises(PartitioningError, match="unknown mesh axis 'tensor'"):
        parse_rules("mlp=tensor")
    assert dict(merge_rules("vocab=none"))["vocab"] is None
    odd = CONFIG.replace(num_heads=3, d_kv=8)  # 3 heads cannot be split 2 ways
    with pytest.raises(PartitioningError, match=r"parameter decoder/layers/cross_attn/key: dimension 2 \('heads', "
                                                r"size 3\) cannot be split 2 ways"):
        Partitioner("model=2").param_specs(logical_axes(odd), param_shapes(odd))
    # replicating heads is fine
    Partitioner("model=2", merge_rules("heads=none")).param_specs(logical_axes(odd), param_shapes(odd))


# Each parameter's shard on a data=2,model=2 mesh, written out by hand from the model's shapes (vocab 160,
# d_model 32, 4 heads of 8, d_ff 64; 1 encoder and 2 decoder layers): the vocabulary, the heads and d_ff are
# halved over `model`; norms, d_model, head size, layers and relative-position buckets are whole.
MODEL_2_SHARDS = {
    "shared": (80, 32),
    **{f"{stack}/relpos_bias/embedding": (32, 2) for stack in ("encoder", "decoder")},
    **{f"{stack}/final_norm/scale": (32,) for stack in ("encoder", "decoder")},
    **{f"{stack}/layers/{attn}/{name}": (layers, 32, 2, 8)
       for stack, layers, attns in (("encoder", 1, ("self_attn",)), ("decoder", 2, ("self_attn", "cross_attn")))
       for attn in attns for name in ("query", "key", "value")},
    **{f"{stack}/layers/{attn}/out": (layers, 2, 8, 32)
       for stack, layers, attns in (("encoder", 1, ("self_attn",)), ("decoder", 2, ("self_attn", "cross_attn")))
       for attn in attns},
    **{f"{stack}/layers/{norm}/scale": (layers, 32)
       for stack, layers, norms in (("encoder", 1, ("self_attn_norm", "mlp_norm")),
                                    ("decoder", 2, ("self_attn_norm", "cross_attn_norm", "mlp_norm")))
       for norm in norms},
    **{f"{stack}/layers/mlp/wi": (layers, 32, 32) for stack, layers in (("encoder", 1), ("decoder", 2))},
    **{f"{stack}/layers/mlp/wo": (layers, 32, 32) for stack, layers in (("encoder", 1), ("decoder", 2))},
}


def test_parameter_shards_under_model_2_are_the_hand_written_shapes():
    """Parameters placed on data=2,model=2 (4 simulated devices, tests/conftest.py): every device holds the
    shard shape written out above, independently of the rules table, and each shard is the parameter's
    own slice."""
    params = jax.tree_util.tree_map(lambda leaf: np.arange(np.prod(leaf.shape), dtype=np.float32).reshape(leaf.shape),
                                    param_shapes(CONFIG))
    placed = Partitioner("data=2,model=2").shard_params(params, logical_axes(CONFIG))
    found = {}
    for (path, array), whole in zip(jax.tree_util.tree_flatten_with_path(placed)[0], jax.tree_util.tree_leaves(params)):
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        shapes = {tuple(shard.data.shape) for shard in array.addressable_shards}
        assert len(array.addressable_shards) == 4 and len(shapes) == 1, name
        found[name] = shapes.pop()
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index], err_msg=name)
    assert found == MODEL_2_SHARDS

def test_cli_refuses_a_bad_mesh_with_exit_2(capsys, tmp_path):
    common = ["residual-rank", "--checkpoint", str(tmp_path / "missing"), "--val-queries", str(tmp_path / "q.json")]
    code = main(common + ["--mesh", "data=3"])
    assert code == 2
    assert "--mesh data=3" in capsys.readouterr().err
    code = main(common + ["--mesh-rules", "hidden=model"])
    assert code == 2
    assert "unknown logical axis 'hidden'" in capsys.readouterr().err


def test_sharded_safetensors_load_equals_the_plain_load_and_reads_slices(hf_checkpoint):
    directory, _ = hf_checkpoint("sharded", fmt="sharded", num_heads=4, d_ff=64, vocab_size=128,
                                 tie_word_embeddings=False)
    plain = load_pretrained(directory, load_tokenizer=False)
    partitioner = Partitioner("data=2,model=2")
    import genir_jax.checkpoints.hf as hf

    files = hf.WeightFiles(str(directory))
    config, sharded = hf.sharded_params_from_safetensors(plain.config, files, partitioner)
    files.close()
    assert config == plain.config
    flat_plain = jax.tree_util.tree_leaves_with_path(plain.params)
    flat_sharded = dict(jax.tree_util.tree_leaves_with_path(sharded))
    assert len(flat_plain) == len(flat_sharded)
    specs = partitioner.param_shardings(logical_axes(config), param_shapes(config))
    for path, array in flat_plain:
        got = flat_sharded[path]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(array), err_msg=jax.tree_util.keystr(path))
        assert got.sharding.is_equivalent_to(_at(specs, path), got.ndim)
    wi = sharded["decoder"]["layers"]["mlp"]["wi"]
    assert wi.addressable_shards[0].data.shape == (2, 32, 32)  # d_ff 64 split over model=2
    # Every read of a model-split tensor was a proper slice: half of d_ff, half of the heads' rows.
    reads = {name: spans for name, spans in files.slices_read}
    assert reads["decoder.block.0.layer.2.DenseReluDense.wi.weight"][0][1] - \
        reads["decoder.block.0.layer.2.DenseReluDense.wi.weight"][0][0] == 32
    assert reads["encoder.block.1.layer.0.SelfAttention.q.weight"][0] in ((0, 16), (16, 32))
    # load_pretrained with a partitioner takes the same path
    loaded = load_pretrained(directory, load_tokenizer=False, partitioner=partitioner)
    assert loaded.params["shared"].sharding.is_equivalent_to(specs["shared"], 2)


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


# XLA's CPU backend optimisation off: compiling takes about half the time; every run compared is compiled alike.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@pytest.fixture(scope="module")
def mesh_cases(tmp_path_factory):
    """tests/partitioning_mesh_cases.py's results (one subprocess with 8 simulated devices)."""
    from tests.hf_fixtures import HFCheckpointFactory

    directory, _ = HFCheckpointFactory(tmp_path_factory.mktemp("mesh"))(
        "ckpt", num_heads=4, d_ff=64, vocab_size=128, tie_word_embeddings=False)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
    done = subprocess.run([sys.executable, "-m", "tests.partitioning_mesh_cases", str(directory)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_meshes_on_8_devices_match_one_device(mesh_cases):
    """Forward logits and one training step's loss / parameters within 1e-5, sweep ranks identical, and each
    parameter's (and its optimizer state's) per-device shard shape as the rules say; a 4x2 sharded load."""
    done = mesh_cases
    cases = done["cases"]
    assert set(cases) == {"data=1,model=1", "data=8", "data=4,model=2", "data=2,model=4", "data=1,model=8"}
    for mesh, case in cases.items():
        assert case["forward_max_diff"] < 1e-5, (mesh, case)
        assert case["sweep_ranks_equal"], (mesh, case)
        assert case["loss_diff"] < 1e-5 and case["params_max_diff"] < 1e-5, (mesh, case)
        assert case["shard_shape_errors"] == [], (mesh, case["shard_shape_errors"])
    assert cases["data=4,model=2"]["mlp_wi_shard"] == [1, 32, 32]  # model=2 halves d_ff
    assert cases["data=1,model=8"]["mlp_wi_shard"] == [1, 32, 8]
    assert done["configs_mesh_sweep_ranks_equal"]  # data=2,configs=2,model=2
    load = done["load"]  # 4x2: every device's shard read as a slice, values as the plain load
    assert load["different"] == [] and load["whole_reads_of_split_tensors"] == [], load
    assert load["partial_reads"] > 0 and load["wi_shard"] == [2, 32, 32]


def multihost_inputs():
    """The model, queries and sweep of the two-process test (built the same way in every process)."""
    config = CONFIG.replace(num_heads=8, num_decoder_layers=1)
    params = gj.init_params(config, 4)
    rng = np.random.default_rng(4)
    ids = rng.integers(2, config.vocab_size, (8, 6)).astype(np.int32)
    targets = rng.integers(2, config.vocab_size, 8).astype(np.int32)
    return config, params, ids, np.ones_like(ids), targets, sw.site_grid(config, "decoder.*.attn.hook_z", unit="head")


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_two_processes_give_the_results_of_one():
    """jax.distributed on localhost (gloo): a sweep over a 2x2 mesh spanning two processes returns, in each
    process, exactly the single-process ranks."""
    import socket

    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    workers = [subprocess.Popen([sys.executable, "-m", "tests.partitioning_multihost_case", str(i), str(port)],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    config, params, ids, mask, targets, grid = multihost_inputs()
    single = run_sweep(config, params, ids, mask, targets, grid, devices=jax.devices()[:1], prefix_sharing=False,
                       progress=False)
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    assert sorted(r["process"] for r in results) == [0, 1]
    for result in results:
        assert result["processes"] == 2 and result["devices"] == 4 and result["local_devices"] == 2
        np.testing.assert_array_equal(np.asarray(result["ranks"]), single.ranks)
        np.testing.assert_allclose(np.asarray(result["logits"]), single.values["logit"], atol=1e-5)


def test_a_coordinator_that_does_not_answer_is_exit_2(capsys, tmp_path):
    with socket_port() as port:  # a port nobody listens on
        code = main(["residual-rank", "--checkpoint", str(tmp_path / "m"), "--val-queries", str(tmp_path / "q"),
                     "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", "1",
                     "--coordinator-timeout", "1"])
    assert code == 2
    assert f"--coordinator localhost:{port}: did not answer within 1 s" in capsys.readouterr().err
    from genir_jax.scale.distributed import DistributedError, settings_from

    with pytest.raises(DistributedError, match="missing --process-id"):
        settings_from("localhost:1", 2, None, environ={})
    with pytest.raises(DistributedError, match="must be in 0..1"):
        settings_from("localhost:1", 2, 2, environ={})
    assert settings_from(environ={}) is None
    assert settings_from(environ={"GENIR_JAX_COORDINATOR": "h:1", "GENIR_JAX_NUM_PROCESSES": "2",
                                  "GENIR_JAX_PROCESS_ID": "0"})["num_processes"] == 2


def test_a_process_that_never_starts_is_exit_2_with_one_line_on_every_process(tmp_path):
    """Process 0 waits for a process 1 that never comes (it was given another port, where nothing listens):
    both exit 2 with one line naming --coordinator within the short timeout; process 0 used to die of
    JAX's abort (SIGABRT, exit 134, a C++ check-failure stack)."""
    with socket_port() as first, socket_port() as second:
        pass  # two free ports, released
    commands = [["residual-rank", "--checkpoint", str(tmp_path / "m"), "--val-queries", str(tmp_path / "q"),
                 "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(index),
                 "--coordinator-timeout", "3"] for index, port in enumerate((first, second))]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    workers = [subprocess.Popen([sys.executable, "-m", "genir_jax.cli.main", *command], cwd=REPO_ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for command in commands]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    for worker, (out, err), port in zip(workers, outputs, (first, second)):
        lines = err.strip().splitlines()
        assert worker.returncode == 2 and len(lines) == 1 and out == "", (worker.returncode, err[-2000:])
        assert f"--coordinator localhost:{port}:" in lines[0] and "Check failed" not in err
    assert "process(es) 1 of 2 did not join within 3 s" in outputs[0][1]
    assert "did not answer within 3 s" in outputs[1][1]


def test_the_rendezvous_joins_refuses_a_port_in_use_and_different_counts():
    """The meeting before `jax.distributed.initialize` (threads on localhost, no JAX): three processes
    meet; process 0 refuses a port already in use at once; counts that differ fail on both sides."""
    import threading

    from genir_jax.scale.distributed import DistributedError, _rendezvous

    def run(results, key, *args):
        try:
            _rendezvous(*args)
            results[key] = "joined"
        except DistributedError as exc:
            results[key] = str(exc)

    def meet(port, counts, timeout=10.0):
        results = {}
        threads = [threading.Thread(target=run, args=(results, index, f"localhost:{port}", count, index, timeout))
                   for index, count in enumerate(counts)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return results

    with socket_port() as port:
        pass
    assert meet(port, [3, 3, 3]) == {0: "joined", 1: "joined", 2: "joined"}
    with socket_port() as port:
        pass
    results = meet(port, [2, 3], timeout=5.0)
    assert "--num-processes 3 there, 2 on process 0" in results[0] and "refused this process" in results[1]
    import socket

    with socket.create_server(("localhost", 0)) as busy:
        taken = busy.getsockname()[1]
        with pytest.raises(DistributedError, match=f"--coordinator localhost:{taken}: process 0 cannot listen on "
                                                   f"port {taken}"):
            _rendezvous(f"localhost:{taken}", 2, 0, 30.0)


def socket_port():
    """A context holding a free localhost port (bound, not listening)."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def held():
        with socket.socket() as sock:
            sock.bind(("localhost", 0))
            yield sock.getsockname()[1]

    return held()


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_attribution_on_a_mesh_equals_the_unsharded_estimate():
    """AtP with parameters split over model=2 and queries over data=2 gives the single-device estimates."""
    from genir_jax.interp.attribution import attribute

    config = CONFIG.replace(num_heads=4)
    params = gj.init_params(config, 5)
    rng = np.random.default_rng(5)
    ids = rng.integers(2, config.vocab_size, (4, 6)).astype(np.int32)
    mask = np.ones_like(ids)
    targets = rng.integers(2, config.vocab_size, 4).astype(np.int32)
    grid = sw.site_grid(config, "decoder.*.attn.hook_z", unit="head")
    plain = attribute(config, params, ids, mask, targets, grid, progress=False)
    sharded = attribute(config, params, ids, mask, targets, grid, progress=False,
                        partitioner=Partitioner("data=2,model=2"))
    np.testing.assert_allclose(sharded.scores, plain.scores, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sharded.clean, plain.clean, rtol=1e-5, atol=1e-5)


def test_orbax_checkpoints_save_and_restore_sharded(tmp_path):
    """A train state split over model=2 is saved as it lies and restored into the same shardings."""
    import optax

    from genir_jax.training.checkpointing import Checkpoints, abstract_like
    from genir_jax.training.loop import create_state, put_state, state_shardings

    partitioner = Partitioner("data=2,model=2")
    optimizer = optax.adamw(1e-3)
    params = gj.init_params(CONFIG, 6)
    shardings = state_shardings(partitioner, CONFIG, optimizer, params)
    state = put_state(create_state(params, optimizer, 0), partitioner, shardings)
    checkpoints = Checkpoints(str(tmp_path), every=1, keep=1)
    try:
        checkpoints.save(1, state, {"step": 1}, force=True)
        restored, meta = checkpoints.restore(abstract_like(state, shardings), 1)
    finally:
        checkpoints.close()
    assert meta["step"] == 1
    wi = restored.params["decoder"]["layers"]["mlp"]["wi"]
    assert wi.sharding.is_equivalent_to(shardings.params["decoder"]["layers"]["mlp"]["wi"], 3)
    assert wi.addressable_shards[0].data.shape == (2, 32, 32)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_bfloat16_sweep_ranks_agree_with_float32(mesh_cases):
    """bf16 parameters and compute, float32 logits and metrics: on a small random model (16 configs x 8
    queries, targets the clean top tokens) nearly every rank is the float32 one."""
    bf16 = mesh_cases["bf16"]
    print(f"bf16 vs f32: {bf16['identical']:.1%} of ranks identical, {bf16['configs_identical']:.1%} of configs "
          f"identical on every query, {bf16['within_1']:.1%} within 1")
    assert bf16["dtypes"] == ["float32"] and bf16["rank_dtype"] == "int32"
    assert bf16["identical"] >= 0.9 and bf16["configs_identical"] >= 0.6 and bf16["within_1"] >= 0.98, bf16
    assert 0 < bf16["logit_max_diff"] < 0.05 * bf16["logit_max"], bf16  # bf16 did change the numbers, a little


def test_a_program_traced_under_one_mesh_or_rules_is_not_reused_under_another():
    """`forward` (rules and mesh from ``Partitioner.activate``) and `run_sweep` under data=8, data=2,model=4 and
    data=8 with batch=none, twice round with the same shapes (tests/partitioning_program_cases.py, 8 simulated
    devices): the constrained ``hook_resid_pre`` is split as each partitioner says, results unchanged."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
    done = subprocess.run([sys.executable, "-m", "tests.partitioning_program_cases"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {"data=8": [1, 5, 16], "data=2,model=4": [4, 5, 16], "data=8 batch=none": [8, 5, 16]}
    for name, shard in expected.items():
        assert [run["resid_shard"] for run in out["forward"][name]] == [shard, shard], (name, out["forward"][name])
        assert all(run["max_diff"] < 1e-5 for run in out["forward"][name]), out["forward"][name]
        assert out["sweep"][name] == [True, True], name
