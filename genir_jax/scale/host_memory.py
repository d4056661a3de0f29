"""Keep freed host memory in the process, so that XLA:CPU's per-call buffers stop page-faulting (glibc).

XLA:CPU allocates an executable's temporary buffers (hundreds of MB for a training step: activations kept
for the backward pass, dropout masks) anew on every call. glibc serves allocations above its mmap
threshold (32 MiB at most) with a fresh ``mmap`` that ``free`` unmaps again, and threads other than the
main one allocate from arenas of at most 64 MiB that shrink when memory is freed. So every step of the
`cpu` preset's DSI training touched about 570 MB of new pages: 139,000 page faults and about 265 ms of
kernel time in a 128-token step of 524 ms (``benchmarks/bench_train.py``, docs/speed.md).

`keep_freed_host_memory` asks glibc (``mallopt``) to serve every allocation from one arena on the heap
(``M_ARENA_MAX`` 1, ``M_MMAP_MAX`` 0) and to give memory back to the system only when more than 2 GiB
are free at its top (``M_TRIM_THRESHOLD``): buffers freed by one step are reused by the next, without
faults. The price: the process keeps its peak host memory, and all threads share one allocator lock.

It has to run before JAX creates its CPU client (the first array, `jax.devices()`, ...): arenas made by
then stay. The `genir-jax` command calls it first thing when JAX computes on the CPU;
``GENIR_JAX_HOST_MEMORY=default`` leaves glibc's behaviour alone. Library users call it themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import sys

ENVIRONMENT_VARIABLE = "GENIR_JAX_HOST_MEMORY"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2 ** 31 - 1  # bytes; mallopt takes an int
# Accelerator plugins: where one is installed JAX computes there, and host memory is not the step's.
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin",
                        "libtpu")


def jax_backend_started() -> bool:
    """Whether JAX has already created its backends (then arenas exist and tuning comes too late).

    Asked through JAX's public config: ``jax_num_cpu_devices`` refuses a new value once the backends exist
    (its documented "must be set before JAX is initialized"); the probe puts the old value back."""
    if "jax" not in sys.modules:
        return False
    import jax

    try:
        current = jax.config.jax_num_cpu_devices
        jax.config.update("jax_num_cpu_devices", current + 1)
    except RuntimeError:  # the backends exist
        return True
    except AttributeError:  # pragma: no cover - a JAX without the option: assume the worst
        return True
    jax.config.update("jax_num_cpu_devices", current)
    return False


def computes_on_cpu() -> bool:
    """Whether JAX will compute on the CPU: ``JAX_PLATFORMS`` says only cpu, or no accelerator plugin is
    installed (checked without importing JAX)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def keep_freed_host_memory() -> bool:
    """Tune glibc's allocator as the module docstring says. True when it was applied; False on another C
    library, when ``GENIR_JAX_HOST_MEMORY=default``, or when JAX's backend has already started."""
    if os.environ.get(ENVIRONMENT_VARIABLE, "").strip().lower() == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or jax_backend_started():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover - glibc reported but not loadable
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
