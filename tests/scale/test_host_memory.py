"""Keeping freed host memory: applied before JAX starts, refused after, opt-out, and what it buys."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from genir_jax.scale.host_memory import computes_on_cpu

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt is what this tunes")

# One jitted call with a 64 MiB temporary, allocated and freed by every call: the page faults of each of 20
# calls (after 5 that compile it and grow the heap).
PROBE = textwrap.dedent("""
    import resource, sys
    from genir_jax.scale.host_memory import keep_freed_host_memory
    applied = keep_freed_host_memory() if sys.argv[1] == "keep" else False
    import jax, jax.numpy as jnp
    step = jax.jit(lambda x: (jnp.tanh(jnp.outer(x, x)) @ jnp.ones((x.shape[0], 8)))[0])
    x = jnp.ones(4096)
    faults = []
    for _ in range(25):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    late = keep_freed_host_memory()
    print(applied, late, *faults[5:])
""")


def _probe(mode: str, **env) -> tuple[str, str, list[int]]:
    environment = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=environment, timeout=120)
    applied, late, *faults = out.stdout.split()
    return applied, late, [int(f) for f in faults]


def _calls_without_faults(faults: list[int]) -> int:
    return sum(count < 100 for count in faults)


def test_kept_memory_stops_the_page_faults_of_repeated_steps():
    applied, late, kept = _probe("keep")
    assert applied == "True"
    assert late == "False"  # once JAX's backend has started, it is too late and says so
    _, _, default = _probe("default")
    # glibc's defaults map and unmap the 64 MiB temporary in every call: about 16k faults each time.
    # Kept, the freed block is reused (now and then a call still gets fresh pages: most calls have none).
    assert _calls_without_faults(default) == 0 and min(default) > 15000
    assert _calls_without_faults(kept) >= len(kept) // 2


def test_environment_opts_out():
    applied, _, faults = _probe("keep", GENIR_JAX_HOST_MEMORY="default")
    assert applied == "False"
    assert _calls_without_faults(faults) == 0


def test_computes_on_cpu_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert computes_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not computes_on_cpu()
