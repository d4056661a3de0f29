"""Compiled programs kept on disk, so that a second run of a command skips tracing, lowering and compiling.

JAX's persistent compilation cache (`genir_jax.scale.compile_cache`) skips only XLA's compilation: every
process still traces each jitted function and lowers it to StableHLO before it can look the executable up,
about a second for the analyses' 24+24-layer programs. `cached_jit` is `jax.jit` plus a cache of the
compiled executables themselves (`jax.experimental.serialize_executable`), keyed by everything that
decides the program: the function, a fingerprint of genir_jax's source files, the static arguments, the
tree, shapes, dtypes and shardings of the others, the JAX / jaxlib versions, the devices, the flags that
change lowering (x64, matmul precision, XLA_FLAGS) and the ambient mesh and flax axis rules. A hit runs
the very executable the traced path compiled, so results are identical; anything unusable (no entry, a
truncated or corrupted file, a failed load) falls back to tracing and rewrites the entry.

Off unless a directory is set (`set_program_cache_dir`); the `genir-jax` command sets one next to the XLA
cache (`genir_jax.scale.compile_cache.enable_compilation_cache`). The directory is bounded: every code change
makes new entries (the source fingerprint is in every key), so after each write the least recently used
entries (a hit renews an entry's modification time) are removed until the directory is under its size limit. Static arguments must have a repr that
says what they are (a dataclass, a tuple, ...) or a ``program_key()`` method; one whose repr is the default
``<... at 0x...>`` makes the call run the plain jitted function, as does a multi-process run.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import pickle
import tempfile
import weakref
from typing import Any, Callable

_MAGIC = b"genir-jax program v1\n"
DEFAULT_MAX_BYTES = 4 << 30  # the directory's size limit unless `set_program_cache_dir` is given another
_PRUNED_TO = 0.8             # a directory over its limit is pruned to this share of it (not after every write)
_directory: str | None = None
_max_bytes: int = DEFAULT_MAX_BYTES
_instances: "weakref.WeakSet[CachedJit]" = weakref.WeakSet()


def set_program_cache_dir(path: str | os.PathLike | None, max_bytes: int = DEFAULT_MAX_BYTES) -> str | None:
    """Keep compiled programs of `cached_jit` functions in `path` (None: off), at most about `max_bytes` of
    them (least recently used first out); returns the directory."""
    global _directory, _max_bytes
    if max_bytes < 1:
        raise ValueError(f"program cache size limit must be positive, got {max_bytes}")
    _directory = None if path is None else os.path.abspath(os.fspath(path))
    _max_bytes = int(max_bytes)
    return _directory


def program_cache_dir() -> str | None:
    """The directory in use, or None when the program cache is off."""
    return _directory


def forget_loaded_programs() -> None:
    """Drop the executables this process has loaded or compiled through the cache (as `jax.clear_caches`
    drops jit's): the next call reads the directory again, as a new process would."""
    for instance in list(_instances):
        instance.loaded.clear()


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """sha256 of every genir_jax source file (path and bytes): any code change invalidates every entry."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _environment() -> str:
    """The parts of the key that are fixed for a process: versions, devices, source fingerprint."""
    import jax
    import jaxlib

    devices = [(d.id, d.platform, getattr(d, "device_kind", ""), d.process_index) for d in jax.devices()]
    return repr((jax.__version__, jaxlib.__version__, jax.default_backend(), devices, source_fingerprint()))


def _static_text(value: Any) -> str | None:
    """A stable description of a static argument, or None when it has none (a default object repr)."""
    key = getattr(value, "program_key", None)
    if callable(key):
        return key()
    text = repr(value)
    return None if " at 0x" in text else text


def _leaf_text(leaf: Any) -> str:
    import jax

    if isinstance(leaf, jax.Array):  # a mesh's repr names its axes, not its devices: add them, in mesh order
        sharding = leaf.sharding
        mesh = getattr(getattr(sharding, "mesh", None), "device_ids", None)
        devices = mesh.tolist() if mesh is not None else sorted(d.id for d in sharding.device_set)
        return f"A{leaf.shape}{leaf.dtype}{'w' if leaf.weak_type else ''}{sharding!r}{devices}"
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        return f"N{tuple(leaf.shape)}{leaf.dtype}"
    return f"P{type(leaf).__name__}"  # a Python scalar: weakly typed


class CachedJit:
    """A jitted function whose compiled executables are also kept in the program cache (see the module)."""

    def __init__(self, fun: Callable, static_argnames: tuple[str, ...]):
        import jax

        self.jitted = jax.jit(fun, static_argnames=static_argnames)
        self.name = f"{fun.__module__}.{fun.__qualname__}"
        self.static = frozenset(static_argnames)
        self.signature = inspect.signature(fun)
        self.loaded: dict[str, Any] = {}  # key digest -> executable, this process
        functools.update_wrapper(self, fun)
        _instances.add(self)

    def lower(self, *args, **kwargs):
        """`jax.jit`'s ``lower`` (planning lowers the programs without running them)."""
        return self.jitted.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        directory = _directory
        if directory is None:
            return self.jitted(*args, **kwargs)
        call = self._canonical(args, kwargs)
        if call is None:
            return self.jitted(*args, **kwargs)
        dynamic, static, key = call
        digest = hashlib.sha256(key.encode()).hexdigest()
        compiled = self.loaded.get(digest)
        if compiled is None:
            path = os.path.join(directory, f"{self.name.rsplit('.', 1)[-1]}-{digest}.bin")
            compiled = _load(path, key)
            if compiled is None:
                compiled = self.jitted.lower(**dynamic, **static).compile()
                _store(path, key, compiled)
            self.loaded[digest] = compiled
        return compiled(**dynamic)

    def _canonical(self, args, kwargs):
        """(dynamic arguments, static arguments, key text), all by name, or None when not cacheable."""
        import jax

        if jax.process_count() > 1:
            return None
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        dynamic, static, static_texts = {}, {}, []
        for name, value in bound.arguments.items():  # every argument by keyword: one calling convention
            if self.signature.parameters[name].kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                            inspect.Parameter.KEYWORD_ONLY):
                return None
            if name in self.static:
                text = _static_text(value)
                if text is None:
                    return None
                static[name] = value
                static_texts.append(f"{name}={text}")
            else:
                dynamic[name] = value
        leaves, tree = jax.tree_util.tree_flatten(dynamic)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return None  # called inside another trace (jax.eval_shape, an outer jit): nothing to run yet
        key = "\n".join([self.name, _environment(), _flags(), ";".join(static_texts), str(tree),
                         ";".join(_leaf_text(leaf) for leaf in leaves)])
        return dynamic, static, key


def _flags() -> str:
    """Process state that changes how a function lowers: JAX flags, XLA_FLAGS, the ambient mesh and flax rules."""
    import jax

    texts = [repr(jax.config.jax_enable_x64), repr(jax.config.jax_default_matmul_precision),
             repr(jax.config.jax_numpy_rank_promotion), repr(jax.config.jax_numpy_dtype_promotion),
             repr(jax.config.jax_default_device),
             os.environ.get("XLA_FLAGS", ""), repr(jax.sharding.get_abstract_mesh())]
    try:
        import flax.linen as nn

        texts.append(repr(nn.get_logical_axis_rules()))
    except ImportError:  # pragma: no cover
        pass
    return ";".join(texts)


def cached_jit(fun: Callable | None = None, *, static_argnames: tuple[str, ...] = ()):
    """`jax.jit(fun, static_argnames=...)` with the program cache (`CachedJit`); usable as a decorator."""
    if fun is None:
        return functools.partial(cached_jit, static_argnames=tuple(static_argnames))
    return CachedJit(fun, tuple(static_argnames))


def cached_value(name: str, key: str, compute: Callable[[], Any]) -> Any:
    """`compute()`, kept (pickled) in the program cache under `name` and `key` plus the environment (versions,
    devices, source fingerprint); for traced-once host values such as a model's abstract parameters. Computed
    anew when the cache is off or the entry unusable."""
    directory = _directory
    if directory is None:
        return compute()
    key = "\n".join([name, _environment(), key])
    path = os.path.join(directory, f"{name}-{hashlib.sha256(key.encode()).hexdigest()}.bin")
    entry = _read_entry(path, key)
    if entry is not None:
        return entry["value"]
    value = compute()
    try:
        _write_entry(path, {"key": key, "value": value})
    except Exception:  # noqa: BLE001 (unpicklable or a full disk: the value is still returned)
        pass
    return value


def _read_entry(path: str, key: str) -> dict | None:
    """The entry stored at `path` for `key`, or None (missing, another key, truncated or damaged)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        if not data.startswith(_MAGIC):
            return None
        body = data[len(_MAGIC) + 64:]
        if hashlib.sha256(body).hexdigest().encode() != data[len(_MAGIC):len(_MAGIC) + 64]:
            return None  # truncated or damaged: never unpickled
        entry = pickle.loads(body)
        if entry.get("key") != key:
            return None
    except Exception:  # noqa: BLE001 (an unusable entry is only a cache miss)
        return None
    try:
        os.utime(path)  # recently used: the last to be pruned
    except OSError:
        pass
    return entry


def _write_entry(path: str, entry: dict) -> None:
    """Pickle `entry` to `path` atomically, behind the magic line and the body's sha256."""
    body = pickle.dumps(entry)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(_MAGIC + hashlib.sha256(body).hexdigest().encode() + body)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    prune(os.path.dirname(path), _max_bytes, keep=path)


def prune(directory: str, max_bytes: int, keep: str | None = None) -> list[str]:
    """Remove the least recently used entries of `directory` (oldest modification time first, never `keep`)
    while it holds more than `max_bytes`, down to `_PRUNED_TO` of it; returns the removed paths. Entries that
    another process removes meanwhile are skipped (a reader that has one open still reads it whole)."""
    entries = []
    for name in os.listdir(directory):
        if name.endswith(".bin") and not name.startswith(".tmp-"):
            try:
                status = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            entries.append((status.st_mtime_ns, name, status.st_size))
    total = sum(size for _, _, size in entries)
    if total <= max_bytes:
        return []
    removed = []
    for _, name, size in sorted(entries):
        if total <= max_bytes * _PRUNED_TO:
            break
        path = os.path.join(directory, name)
        if path == keep:
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        total -= size
        removed.append(path)
    return removed


def _load(path: str, key: str):
    """The executable stored at `path` for `key`, or None (missing, another key, corrupted, not loadable)."""
    entry = _read_entry(path, key)
    if entry is None:
        return None
    try:
        import jax
        from jax.experimental.serialize_executable import deserialize_and_load

        by_id = {device.id: device for device in jax.devices()}
        return deserialize_and_load(entry["payload"], entry["in_tree"], entry["out_tree"],
                                    execution_devices=[by_id[i] for i in entry["devices"]])
    except Exception:  # noqa: BLE001 (an unusable entry is only a cache miss)
        return None


def _store(path: str, key: str, compiled) -> None:
    """Write `compiled` for `key` at `path` atomically; a program that cannot be serialised is not kept."""
    try:
        from jax.experimental.serialize_executable import serialize

        payload, in_tree, out_tree = serialize(compiled)
        devices = [device.id for device in compiled.runtime_executable().local_devices()]  # where it runs
        _write_entry(path, {"key": key, "payload": payload, "in_tree": in_tree, "out_tree": out_tree,
                            "devices": devices})
    except Exception:  # noqa: BLE001 (a full disk or an unserialisable program: the run goes on uncached)
        return
