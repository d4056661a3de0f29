"""Multi-process (multi-host) runs: `jax.distributed` initialised when flags or the environment ask for it.

One process per host (a TPU pod slice's workers, several GPU hosts, or processes on one machine for tests)
joins a coordinator; afterwards `jax.devices()` lists every process's devices, a
`genir_jax.scale.partitioning.Partitioner` spans them all, each process transfers only its devices' shards of
the queries / batches, and `genir_jax.scale.partitioning.fetch` gathers results. Asked for by
``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``GENIR_JAX_COORDINATOR``,
``GENIR_JAX_NUM_PROCESSES``, ``GENIR_JAX_PROCESS_ID``), or by ``--distributed auto`` where JAX finds the
cluster itself (Cloud TPU pods, SLURM, Open MPI). A coordinator that does not answer within the timeout
is a `GenIRError` (exit 2). CPU processes talk through gloo collectives.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from genir_jax.base.errors import ConfigError

ENVIRONMENT = {"coordinator": "GENIR_JAX_COORDINATOR", "num_processes": "GENIR_JAX_NUM_PROCESSES",
               "process_id": "GENIR_JAX_PROCESS_ID"}


class DistributedError(ConfigError):
    """The processes of a multi-host run could not be joined (bad settings, no coordinator)."""


def settings_from(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                  auto: bool = False, environ: Mapping[str, str] | None = None) -> dict | None:
    """The settings of `jax.distributed.initialize` the flags (else the environment) ask for; None: one
    process. Checked: all three of coordinator / count / id, HOST:PORT, 0 <= id < count."""
    environ = os.environ if environ is None else environ
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
        given = {k: environ.get(name) for k, name in ENVIRONMENT.items()}
    if all(v is None for v in given.values()):
        return {} if auto else None
    missing = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is None]
    if missing:
        raise DistributedError(f"a multi-process run needs --coordinator, --num-processes and --process-id "
                               f"(or {', '.join(ENVIRONMENT.values())}); missing {', '.join(missing)}")
    host, _, port = str(given["coordinator"]).rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DistributedError(f"--coordinator {given['coordinator']!r}: expected HOST:PORT (port in 1..65535)")
    try:
        count, index = int(given["num_processes"]), int(given["process_id"])
    except (TypeError, ValueError):
        raise DistributedError("--num-processes and --process-id must be integers") from None
    if count < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {count}")
    if not 0 <= index < count:
        raise DistributedError(f"--process-id {index} must be in 0..{count - 1} (--num-processes {count})")
    return {"coordinator_address": str(given["coordinator"]), "num_processes": count, "process_id": index}


def initialize(settings: dict | None, timeout_s: int = 300) -> bool:
    """Join the processes (`jax.distributed.initialize`) unless `settings` is None; True if joined.

    Must run before anything touches a JAX backend. CPU collectives use gloo, so CPU processes can run
    sharded programs together."""
    if settings is None:
        return False
    import jax

    if jax.distributed.is_initialized():
        return True
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = settings.get("coordinator_address", "the cluster's coordinator")
    if settings.get("process_id", 0) != 0:  # JAX aborts the process when the coordinator never answers: ask first
        _wait_for(where, timeout_s)
    try:
        jax.distributed.initialize(**settings, initialization_timeout=max(1, int(timeout_s)))
    except Exception as exc:  # XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE), RuntimeError, ValueError
        raise DistributedError(f"--coordinator {where}: could not join the {settings.get('num_processes', '?')} "
                               f"processes within {timeout_s} s ({type(exc).__name__}: {str(exc)[:300]})") from exc
    return True


def _wait_for(address: str, timeout_s: float) -> None:
    """Return once something listens at HOST:PORT; `DistributedError` after `timeout_s` seconds."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, max(0.1, timeout_s))):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise DistributedError(f"--coordinator {address}: did not answer within {timeout_s} s ({exc}); "
                                       "start process 0 first, or check the address and the port") from None
            time.sleep(0.2)
