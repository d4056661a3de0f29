"""A persistent XLA compilation cache, so that a second run with the same shapes skips compiling.

With it, the analyses' programs themselves are kept too (`genir_jax.base.program_cache`, in the
``programs`` folder of the cache directory), which also skips tracing and lowering them.

The `genir-jax` command enables it for every subcommand (``--no-compile-cache`` or
``GENIR_JAX_CACHE=off`` turn it off). The library never enables it on import: it is process-wide JAX
state, so a library user opts in by calling `enable_compilation_cache()` once, before the first
compilation that should be cached.

Where: `path`, else ``$GENIR_JAX_CACHE``, else ``~/.cache/genir-jax/xla``. JAX keys every entry by the
computation, the JAX/XLA version, the devices and the compile options, so one directory serves every
model, shape and backend; a stale or foreign entry is simply never looked up.

How much: at most ``$GENIR_JAX_CACHE_MAX_GB`` gigabytes (default 8), half for XLA's executables (JAX evicts
the least recently used: ``jax_compilation_cache_max_size``) and half for the programs folder (pruned the
same way by `genir_jax.base.program_cache.prune`). Without a bound the directory would only grow: every change
of genir_jax's code or of a shape adds entries.
"""

from __future__ import annotations

import math
import os

from genir_jax.base.program_cache import set_program_cache_dir

ENV_VAR = "GENIR_JAX_CACHE"
DISABLED_VALUES = frozenset({"off", "0", "false", "no", "none", "disabled"})
SIZE_ENV_VAR = "GENIR_JAX_CACHE_MAX_GB"
DEFAULT_MAX_GB = 8.0


def cache_size_limit() -> int:
    """The cache directory's size limit in bytes: ``$GENIR_JAX_CACHE_MAX_GB`` gigabytes (a positive number,
    default `DEFAULT_MAX_GB`), at least one megabyte."""
    from genir_jax.base.errors import GenIRError

    configured = os.environ.get(SIZE_ENV_VAR, "").strip()
    try:
        gigabytes = float(configured) if configured else DEFAULT_MAX_GB
    except ValueError:
        gigabytes = math.nan
    if not (math.isfinite(gigabytes) and gigabytes > 0):
        raise GenIRError(f"${SIZE_ENV_VAR} must be a positive number of gigabytes, got {configured!r}")
    return max(1 << 20, int(gigabytes * (1 << 30)))


def default_cache_dir() -> str | None:
    """The cache directory `enable_compilation_cache()` uses without a `path`; None when
    ``$GENIR_JAX_CACHE`` switches the cache off (``off``, ``0``, ``false``, ``no``, ``none``)."""
    configured = os.environ.get(ENV_VAR)
    if configured is not None and configured.strip().lower() in DISABLED_VALUES:
        return None
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    return os.path.join(os.path.expanduser("~"), ".cache", "genir-jax", "xla")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Persist compiled XLA executables in `path` (default: `default_cache_dir()`) and reuse them.

    Every compilation is cached, however quick or small (``jax_persistent_cache_min_compile_time_secs``
    0; ``jax_persistent_cache_min_entry_size_bytes`` -1, JAX's "no size limit, no override": 0 would let
    JAX substitute a file-system-dependent minimum). Returns the directory in use, or None when
    ``$GENIR_JAX_CACHE`` disables the cache and no `path` is given (then nothing is changed).
    Safe to call again; a different path takes effect for the following compilations. Also keeps the
    compiled programs of `genir_jax.base.program_cache.cached_jit` functions in ``<directory>/programs``.
    """
    directory = os.path.abspath(os.fspath(path)) if path is not None else default_cache_dir()
    if directory is None:
        return None
    os.makedirs(directory, exist_ok=True)

    import jax
    from jax.experimental.compilation_cache import compilation_cache

    previous = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    limit = cache_size_limit()
    previous_limit = jax.config.jax_compilation_cache_max_size
    jax.config.update("jax_compilation_cache_max_size", limit // 2)
    if (previous and previous != directory) or previous_limit != limit // 2:
        compilation_cache.reset_cache()  # JAX opens its cache once; re-open it at the new place or size
    set_program_cache_dir(os.path.join(directory, "programs"), max_bytes=limit - limit // 2)
    return directory
