"""Multi-process (multi-host) runs: `jax.distributed` initialised when flags or the environment ask for it.

One process per host (a TPU pod slice's workers, several GPU hosts, or processes on one machine for tests)
joins a coordinator; afterwards `jax.devices()` lists every process's devices, a
`genir_jax.scale.partitioning.Partitioner` spans them all, each process transfers only its devices' shards of
the queries / batches, and `genir_jax.scale.partitioning.fetch` gathers results. Asked for by
``--coordinator HOST:PORT --num-processes N --process-id I`` (or ``GENIR_JAX_COORDINATOR``,
``GENIR_JAX_NUM_PROCESSES``, ``GENIR_JAX_PROCESS_ID``), or by ``--distributed auto`` where JAX finds the
cluster itself (Cloud TPU pods, SLURM, Open MPI). The processes first meet on the coordinator's port
(`_rendezvous`: process 0 listens, the others greet it), each side bounded by ``--coordinator-timeout``, so a
coordinator that does not answer, a process that never starts, a port in use or different counts are a
`GenIRError` (exit 2, one line) on every process that started, not JAX's abort (SIGABRT with a C++ stack on
process 0). CPU processes talk through gloo collectives.
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
    if "coordinator_address" in settings and settings["num_processes"] > 1:
        # JAX aborts a process (SIGABRT, a C++ stack) when the others never come: meet on the port first
        _rendezvous(where, settings["num_processes"], settings["process_id"], timeout_s)
    try:
        jax.distributed.initialize(**settings, initialization_timeout=max(1, int(timeout_s)))
    except Exception as exc:  # XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE), RuntimeError, ValueError
        raise DistributedError(f"--coordinator {where}: could not join the {settings.get('num_processes', '?')} "
                               f"processes within {timeout_s} s ({type(exc).__name__}: {str(exc)[:300]})") from exc
    return True


_JOIN = b"genir-jax join"  # a process's greeting: b"genir-jax join <process id> <process count>\n"
_GO = b"go\n"


def _rendezvous(address: str, count: int, index: int, timeout_s: float) -> None:
    """Meet on the coordinator's port before `jax.distributed.initialize`, each side bounded by `timeout_s`:
    process 0 listens there (so a port in use is refused at once) until every other process has greeted
    it, then tells them to go and frees the port for JAX's coordination service; the others greet it and
    wait for the go. A process missing, a port in use or a count that differs is a `DistributedError`
    naming --coordinator on every process that came, never JAX's abort."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    if index == 0:
        _gather(address, int(port), count, deadline, timeout_s)
        return
    with _connect(host.strip("[]"), int(port), deadline, address, timeout_s) as sock:
        sock.sendall(b"%s %d %d\n" % (_JOIN, index, count))
        answer = _read_line(sock, deadline)
    if answer is None:
        raise DistributedError(f"--coordinator {address}: process 0 did not let the {count} processes start within "
                               f"{timeout_s} s; start every process with the same --coordinator and --num-processes")
    if answer != _GO:
        raise DistributedError(f"--coordinator {address}: process 0 refused this process: "
                               f"{answer.decode('utf-8', 'replace').strip()}")


def _gather(address: str, port: int, count: int, deadline: float, timeout_s: float) -> None:
    """Process 0's side of `_rendezvous`: every other process's greeting, then the go."""
    family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
    try:
        server = socket.create_server(("", port), family=family, dualstack_ipv6=family == socket.AF_INET6,
                                      reuse_port=False)
    except OSError as exc:
        raise DistributedError(f"--coordinator {address}: process 0 cannot listen on port {port} ({exc}); "
                               "choose a free port") from None
    joined: dict[int, socket.socket] = {}
    try:
        with server:
            while len(joined) < count - 1:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [i for i in range(1, count) if i not in joined]
                    raise DistributedError(
                        f"--coordinator {address}: process(es) {', '.join(map(str, missing))} of {count} did not "
                        f"join within {timeout_s} s; start every process with the same --coordinator and "
                        "--num-processes (--coordinator-timeout sets the wait)")
                server.settimeout(remaining)
                try:
                    conn, _ = server.accept()
                except (socket.timeout, OSError):
                    continue
                line = _read_line(conn, min(deadline, time.monotonic() + 5.0))
                parts = (line or b"").split()
                if len(parts) != 4 or b" ".join(parts[:2]) != _JOIN or not all(p.isdigit() for p in parts[2:]):
                    conn.close()  # not one of ours (a port scan, a health check): keep listening
                    continue
                other, their_count = int(parts[2]), int(parts[3])
                problem = (f"--num-processes {their_count} there, {count} on process 0" if their_count != count
                           else f"--process-id {other} is taken" if other in joined or not 0 < other < count
                           else None)
                if problem:
                    conn.sendall(f"{problem}\n".encode())
                    conn.close()
                    raise DistributedError(f"--coordinator {address}: a process that joined does not fit: {problem}")
                joined[other] = conn
            for conn in joined.values():
                conn.sendall(_GO)
            for conn in joined.values():  # they hang up first, so the port is not held in TIME_WAIT here
                _read_line(conn, time.monotonic() + 2.0)
    finally:
        for conn in joined.values():
            conn.close()


def _connect(host: str, port: int, deadline: float, address: str, timeout_s: float) -> socket.socket:
    """A connection to HOST:PORT, retried until `deadline`; `DistributedError` when nothing answers."""
    while True:
        try:
            return socket.create_connection((host, port), timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise DistributedError(f"--coordinator {address}: did not answer within {timeout_s} s ({exc}); "
                                       "start process 0 first, or check the address and the port") from None
            time.sleep(0.2)


def _read_line(sock: socket.socket, deadline: float) -> bytes | None:
    """One newline-ended line (at most 256 bytes) from `sock` before `deadline`; None on EOF or time-out."""
    data = b""
    try:
        while not data.endswith(b"\n") and len(data) < 256:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(256 - len(data))
            if not chunk:
                return None
            data += chunk
    except OSError:  # socket.timeout is an OSError
        return None
    return data
