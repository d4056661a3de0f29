"""Training as two processes on localhost (`jax.distributed`, gloo CPU collectives, 2 simulated devices each,
a data=2,model=2 mesh spanning both) equals training as one process with 4 devices and the same mesh; a
SIGKILL of one process mid-run, then a resume of both (`train --resume`), ends with the parameters of the
uninterrupted run.

The comparisons are bit for bit where the arithmetic allows (they are exact today: the same partitioned
program runs either way); the issue asks for 1e-5, which is what the assertions allow for the
one-process vs two-process comparison. Adafactor (the presets' default) is used throughout.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.training.test_training_cli import make_base, make_prepared
from tests.training.test_training_kill_resume import _evals, _safetensors

STEPS = 20
TWO_PROCESS_ENV = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "GENIR_JAX_CACHE": "off"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_train_loop_in_two_processes_equals_one_process(tmp_path):
    """`train_loop` (20 Adafactor steps with dropout, two batch widths): the same loss curve and final
    parameters in two processes as in one, and each process loads only its half of every batch."""
    from tests.multihost_training_case import BATCH, STEPS as CASE_STEPS, train

    port = free_port()
    env = dict(os.environ, **TWO_PROCESS_ENV)
    logs = [open(tmp_path / f"worker{i}.log", "w+", encoding="utf-8") for i in range(2)]  # never a full pipe
    workers = [subprocess.Popen([sys.executable, "-m", "tests.multihost_training_case", str(i), str(port),
                                 str(tmp_path / "two"), str(tmp_path / f"result{i}.json")], cwd=REPO_ROOT, env=env,
                                stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
    single = train(str(tmp_path / "one"))  # this process: 4 simulated devices, the same mesh
    results = []
    for worker, log, index in zip(workers, logs, range(2)):
        worker.wait(timeout=600)
        log.seek(0)
        assert worker.returncode == 0, log.read()[-3000:]
        log.close()
        results.append(json.loads((tmp_path / f"result{index}.json").read_text()))
    assert sorted(r["process"] for r in results) == [0, 1]
    assert single["rows_loaded"] == [BATCH] * CASE_STEPS
    first = next(r for r in results if r["process"] == 0)
    np.testing.assert_allclose(first["losses"], single["losses"], atol=1e-5, rtol=0)
    assert len(single["losses"]) == CASE_STEPS
    for result in results:
        assert result["processes"] == 2 and result["devices"] == 4
        assert result["rows_loaded"] == [BATCH // 2] * CASE_STEPS  # its half of every batch, no more
        assert result["params"].keys() == single["params"].keys()
        worst = max(float(np.max(np.abs(np.asarray(result["params"][k]) - np.asarray(single["params"][k]))))
                    for k in single["params"])
        print(f"process {result['process']}: largest parameter difference to one process {worst:.3g}, "
              f"largest loss difference {np.max(np.abs(np.subtract(first['losses'], single['losses']))):.3g}")
        assert worst <= 1e-5


@pytest.fixture(scope="module")
def dsi_inputs(tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.conftest import _shared_data_dir

    root = tmp_path_factory.mktemp("multihost_dsi")
    tokenizer = AutoTokenizer.from_pretrained(str(_shared_data_dir() / "t5-tokenizer"))
    return make_prepared(root / "prepared"), make_base(root / "base", tokenizer), root


def _train_args(prepared, base, out) -> list[str]:
    return [sys.executable, "-m", "genir_jax.cli.main", "train", "--data", str(prepared), "--base", str(base),
            "--preset", "tiny", "--steps", str(STEPS), "--checkpoint-every", "5", "--log-every", "1",
            "--keep-checkpoints", "2", "--no-progress", "--mesh", "data=2,model=2", "-o", str(out)]


def _start_two(args: list[str], port: int, logs) -> list[subprocess.Popen]:
    """Two processes of `args` joined at `port`; their output goes to files `logs`/process<i>.log (a pipe
    nobody reads could fill and block one process while the other waits for it)."""
    env = dict(os.environ, **TWO_PROCESS_ENV)
    logs.mkdir(parents=True, exist_ok=True)
    workers = []
    for i in range(2):
        with open(logs / f"process{i}.log", "w", encoding="utf-8") as log:
            workers.append(subprocess.Popen(args + ["--coordinator", f"localhost:{port}", "--num-processes", "2",
                                                    "--process-id", str(i)], cwd=REPO_ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT))
    return workers


def _finish(workers: list[subprocess.Popen], logs) -> None:
    for i, worker in enumerate(workers):
        worker.wait(timeout=600)
        assert worker.returncode == 0, (logs / f"process{i}.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def two_process_run(dsi_inputs):
    """An uninterrupted `genir-jax train` as two processes (20 steps, checkpoints every 5)."""
    prepared, base, root = dsi_inputs
    out = root / "two"
    _finish(_start_two(_train_args(prepared, base, out), free_port(), root / "logs_two"), root / "logs_two")
    return out


def _state_arrays(run_dir, step: int) -> dict[str, np.ndarray]:
    """Every array of the checkpointed training state at `step`, by path, read onto this process's first
    device (the checkpoint may have been written by two processes, a topology this process does not have)."""
    import jax
    import orbax.checkpoint as ocp

    path = run_dir / "checkpoints" / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)
    restored = checkpointer.restore(path, target)
    checkpointer.close()
    return {jax.tree_util.keystr(p): np.asarray(leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(restored)[0]}


def _train_losses(run_dir) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["event"] == "train"]


@pytest.mark.slow
def test_train_command_in_two_processes_equals_one_process(dsi_inputs, two_process_run):
    """`genir-jax train --coordinator ...` as two processes: the loss curve, the final training state, the
    exported model and the validation metrics of one process with the same mesh (within 1e-5); process 0
    alone writes metrics.jsonl, train.json and the export."""
    prepared, base, root = dsi_inputs
    one = root / "one"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", GENIR_JAX_CACHE="off")
    done = subprocess.run(_train_args(prepared, base, one), cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    losses_one, losses_two = _train_losses(one), _train_losses(two_process_run)
    assert len(losses_one) == len(losses_two) == STEPS  # one line per step: no process wrote twice
    np.testing.assert_allclose(losses_two, losses_one, atol=1e-5, rtol=0)
    state_one, state_two = _state_arrays(one, STEPS), _state_arrays(two_process_run, STEPS)
    assert state_one.keys() == state_two.keys()
    for name in state_one:  # parameters, optimizer state, step, PRNG key
        np.testing.assert_allclose(state_two[name], state_one[name], atol=1e-5, rtol=0, err_msg=name)
    export_one, export_two = _safetensors(one), _safetensors(two_process_run)
    for name in export_one:
        np.testing.assert_allclose(export_two[name], export_one[name], atol=1e-5, rtol=0, err_msg=name)
    summary_one = json.loads((one / "train.json").read_text())
    summary_two = json.loads((two_process_run / "train.json").read_text())
    assert summary_two["processes"] == 2 and summary_two["devices"] == 4 and summary_one["processes"] == 1
    assert summary_two["final"] == summary_one["final"]
    print(f"largest loss difference {np.max(np.abs(np.subtract(losses_two, losses_one))):.3g}, largest state "
          f"difference {max(float(np.max(np.abs(state_two[k] - state_one[k]))) for k in state_one):.3g}")


@pytest.mark.slow
def test_sigkill_of_one_process_then_resume_of_both_equals_uninterrupted(dsi_inputs, two_process_run):
    """Process 1 is killed (SIGKILL) after the first checkpoint; process 0, left without its peer, is killed
    too if it has not stopped within 20 s; both resume with ``--resume`` and end bit-identical to the
    uninterrupted two-process run."""
    prepared, base, root = dsi_inputs
    killed = root / "killed"
    args = _train_args(prepared, base, killed)
    workers = _start_two(args, free_port(), root / "logs_killed")
    first = killed / "checkpoints" / "5"
    deadline = time.monotonic() + 600
    while not first.is_dir() and all(w.poll() is None for w in workers) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(workers[1].pid, signal.SIGKILL)
    workers[1].wait(timeout=60)
    assert workers[1].returncode == -signal.SIGKILL, "process 1 ended before it could be killed mid-run"
    try:
        workers[0].wait(timeout=20)
    except subprocess.TimeoutExpired:  # blocked in a collective with its dead peer
        os.kill(workers[0].pid, signal.SIGKILL)
        workers[0].wait(timeout=60)
    assert workers[0].returncode != 0
    steps_on_disk = sorted(int(name) for name in os.listdir(killed / "checkpoints") if name.isdigit())
    assert steps_on_disk and steps_on_disk[-1] < STEPS
    assert not (killed / "model.safetensors").exists()

    _finish(_start_two(args + ["--resume"], free_port(), root / "logs_resumed"), root / "logs_resumed")
    summary = json.loads((killed / "train.json").read_text())
    assert summary["resumed_from"] is not None and summary["resumed_from"] < STEPS
    final_a, final_b = _state_arrays(two_process_run, STEPS), _state_arrays(killed, STEPS)
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        np.testing.assert_array_equal(final_b[name], final_a[name], err_msg=name)
    export_a, export_b = _safetensors(two_process_run), _safetensors(killed)
    assert export_a.keys() == export_b.keys()
    for name in export_a:
        np.testing.assert_array_equal(export_b[name], export_a[name], err_msg=name)
    assert _train_losses(killed) == _train_losses(two_process_run)  # the same curve, no duplicated lines
    assert _evals(killed) == _evals(two_process_run)


def test_on_demand_tokenizing_source_equals_the_eager_arrays(t5_tokenizer, tmp_path):
    """The source a multi-process DSI run uses (each process tokenizes only the rows it is asked for)
    returns the rows of the eagerly tokenized arrays, for atomic and for sequence docids."""
    from genir_jax.data.prepare import load_prepared
    from genir_jax.training.dsi import dsi_source
    from genir_jax.training.presets import TINY

    documents, splits = load_prepared(make_prepared(tmp_path / "prepared"))
    rng = np.random.default_rng(0)
    for sequences in (None, {doc.id: [5 + i % 7, 9 + i % 3, 1][i % 2:] for i, doc in enumerate(documents)}):
        from genir_jax.docids.tokens import add_docid_tokens

        tokenizer = t5_tokenizer
        if sequences is None:  # atomic docids need their tokens
            from genir_jax.checkpoints.hf import PretrainedModel
            from genir_jax.core.model import init_params

            config = TINY.model.config(32100)
            model = add_docid_tokens(PretrainedModel(config, init_params(config, 0), t5_tokenizer),
                                     [doc.id for doc in documents], seed=0)
            tokenizer = model.tokenizer
        eager, stats = dsi_source(documents, splits["train"], tokenizer, TINY.dsi, progress=False,
                                  docid_sequences=sequences, on_demand=False)
        lazy, lazy_stats = dsi_source(documents, splits["train"], tokenizer, TINY.dsi, progress=False,
                                      docid_sequences=sequences, on_demand=True)
        again, _ = dsi_source(documents, splits["train"], tokenizer, TINY.dsi, progress=False,
                              docid_sequences=sequences, on_demand=True)
        assert lazy.group_sizes == eager.group_sizes
        assert lazy_stats["index_examples"] == stats["index_examples"]
        assert lazy.fingerprint() == again.fingerprint()
        asked = [set() for _ in eager.group_sizes]
        for group, size in enumerate(eager.group_sizes):
            for _ in range(3):
                rows = rng.choice(size, size=min(size, 5), replace=False)
                asked[group].update(rows.tolist())
                expected, got = eager.batch(group, rows, 0), lazy.batch(group, rows, 0)
                assert expected.keys() == got.keys()
                for name in expected:
                    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        assert [set(rows) for rows in lazy._rows] == asked  # it tokenized only what it was asked for
