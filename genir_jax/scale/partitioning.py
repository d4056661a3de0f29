"""Logical axes -> device mesh: one rules table and one partitioner for forward, sweeps, attribution, training.

As in t5x (``partitioning.py``, ``standard_logical_axis_rules``): model code names the logical axes of its
parameters (`genir_jax.core.model.logical_axes`) and of a few activations (`nn.with_logical_constraint`);
one table of rules maps logical names to mesh axes; a `Partitioner` (mesh + rules) turns that into
shardings. Model code never sees a mesh, and this module imports nothing from the model: callers pass the
logical axes tree (t5x's ``get_mesh_axes``). Mapping names to mesh axes is flax's `nn.logical_to_mesh_axes`.

Mesh axes: ``data`` (batch / queries), ``configs`` (the config axis of a sweep) and ``model`` (tensor
parallel: `mlp`, `heads`, `vocab`). A rule whose mesh axis is absent from the mesh (or has size 1) maps to
nothing, so one table serves every mesh.

Public API (stable; `genir-jax plan` and the benchmarks build on it)::

    parse_mesh("data=4,model=2")  -> {"data": 4, "model": 2}       (syntax only)
    parse_rules("vocab=none")     -> (("vocab", None),)             (user overrides)
    make_mesh(shape, devices=None) -> jax.sharding.Mesh             (checks the device count)
    DEFAULT_RULES                                                  ((logical, mesh axis or None), ...)
    p = Partitioner("data=4,model=2" | {"data": 4} | Mesh, rules=DEFAULT_RULES, devices=None)
    p.mesh, p.rules, p.axis_size("data"), p.data_size, p.config_size
    p.spec(("batch", "length")) / p.sharding(names)              logical names -> PartitionSpec / NamedSharding
    p.param_specs(axes, shapes) / p.param_shardings(axes, shapes)  per parameter (divisibility checked);
                                                                 axes = genir_jax.core.model.logical_axes(config),
                                                                 shapes = param_shapes(config) or the params
    p.shard_params(params, axes)                                 place a parameter pytree as the rules say
    p.opt_state_shardings(optimizer, params, axes)               optax state: like its parameters
    p.batch_sharding(ndim) / p.replicated                        leading axis on `data` / everywhere
    with p.activate(): ...                                       the rules and the mesh for the model's
                                                                 nn.with_logical_constraint (in or outside jit)
    with use(p): ...  /  current()                               the partitioner a command's --mesh chose
    fetch(tree)                                                  host copies (gathered across processes)

Errors are `PartitioningError` (a `GenIRError`: the CLI prints one line and exits 2): a malformed mesh,
a mesh whose size does not divide the device count, a rule that would shard a parameter dimension the
mesh axis does not divide (naming the parameter and the dimension), an unknown logical or mesh axis.

Jitted functions take the partitioner as a static argument and trace under ``with p.activate()``, so a
compiled program is keyed by its mesh and rules (a context manager alone would not be part of jit's
cache key; the model's own `forward` keys its program by the rules it finds). Dimensions a mesh axis does
not divide are constrained all the same: XLA pads them, and results are unchanged (checked on 8
simulated CPU devices, JAX 0.10.2).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genir_jax.base.errors import ConfigError

MESH_AXES = ("data", "configs", "model")
# Logical names: those of the parameters (`genir_jax.core.modules`, `layers` from the layer scan) and of activations.
LOGICAL_AXES = ("batch", "configs", "length", "key_length", "embed", "mlp", "heads", "kv", "vocab", "layers",
                "relpos_buckets")
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("configs", "configs"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("embed", None),
    ("kv", None),
    ("layers", None),
    ("length", None),
    ("key_length", None),
    ("relpos_buckets", None),
)


class PartitioningError(ConfigError):
    """A mesh or sharding rule that cannot be used (bad syntax, device count, divisibility, unknown axis)."""


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------

def parse_mesh(text: str | Mapping[str, int]) -> dict[str, int]:
    """``"data=4,model=2"`` -> ``{"data": 4, "model": 2}``; axes are `MESH_AXES`, sizes positive integers."""
    if isinstance(text, Mapping):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, size = part.partition("=")
            if not sep:
                raise PartitioningError(f"--mesh {text!r}: '{part}' is not AXIS=SIZE (e.g. data=4,model=2)")
            items.append((name.strip(), size.strip()))
    shape: dict[str, int] = {}
    for name, size in items:
        if name not in MESH_AXES:
            raise PartitioningError(f"--mesh {text!r}: unknown mesh axis '{name}'; expected some of "
                                    f"{', '.join(MESH_AXES)}")
        if name in shape:
            raise PartitioningError(f"--mesh {text!r}: axis '{name}' given twice")
        try:
            value = int(size)
        except (TypeError, ValueError):
            raise PartitioningError(f"--mesh {text!r}: size of '{name}' must be a positive integer, "
                                    f"got {size!r}") from None
        if value <= 0 or isinstance(size, bool):
            raise PartitioningError(f"--mesh {text!r}: size of '{name}' must be a positive integer, got {size!r}")
        shape[name] = value
    if not shape:
        raise PartitioningError(f"--mesh {text!r}: no axes given (e.g. data=4,model=2)")
    return shape


def parse_rules(text: str | Iterable[tuple[str, str | None]] | None) -> tuple[tuple[str, str | None], ...]:
    """User rule overrides: ``"vocab=none,length=model"`` (or pairs) -> ``(("vocab", None), ...)``."""
    if text is None:
        return ()
    pairs = []
    if isinstance(text, str):
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, axis = part.partition("=")
            if not sep:
                raise PartitioningError(f"sharding rules {text!r}: '{part}' is not LOGICAL=MESH_AXIS "
                                        "(e.g. vocab=none)")
            axis = axis.strip()
            pairs.append((name.strip(), None if axis.lower() in ("", "none") else axis))
    else:
        pairs = [(str(name), axis) for name, axis in text]
    for name, axis in pairs:
        if name not in LOGICAL_AXES:
            raise PartitioningError(f"sharding rules: unknown logical axis '{name}'; expected one of "
                                    f"{', '.join(LOGICAL_AXES)}")
        if axis is not None and axis not in MESH_AXES:
            raise PartitioningError(f"sharding rules: '{name}' maps to unknown mesh axis '{axis}'; expected "
                                    f"one of {', '.join(MESH_AXES)} or none")
    return tuple(pairs)


def merge_rules(overrides, base: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> tuple:
    """`base` with the logical names of `overrides` (parsed by `parse_rules`) remapped; order kept."""
    overrides = dict(parse_rules(overrides))
    merged = [(name, overrides.pop(name, axis)) for name, axis in base]
    return tuple(merged + list(overrides.items()))


def make_mesh(shape: str | Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes in `MESH_AXES` order over `devices` (default: all devices).

    An axis left out has size 1, except ``data``, which takes the devices the others leave over
    (``model=2`` on 8 devices is data=4, model=2). A mesh smaller than the device count uses the first
    devices; one whose size does not divide the device count is refused.
    """
    shape = parse_mesh(shape)
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    others = math.prod(v for k, v in shape.items() if k != "data")
    if "data" not in shape:
        if count % others:
            raise PartitioningError(f"--mesh {_text(shape)}: {others} devices per data replica do not divide the "
                                    f"{count} devices")
        shape = {**shape, "data": count // others}
    size = math.prod(shape.values())
    if count % size:
        raise PartitioningError(f"--mesh {_text(shape)}: the mesh has {size} devices, which does not divide the "
                                f"{count} available devices")
    sizes = tuple(shape.get(axis, 1) for axis in MESH_AXES)
    chosen = devices[:size]
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(sizes, devices=chosen, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError, TypeError):  # no topology info: plain order
        grid = np.asarray(chosen, dtype=object).reshape(sizes)
    return Mesh(grid, MESH_AXES)


def _text(shape: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


# --------------------------------------------------------------------------------------------------
# The partitioner
# --------------------------------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar["Partitioner | None"] = contextvars.ContextVar("genir_partitioner", default=None)


class Partitioner:
    """A mesh and the rules that place logical axes on it; hashable (a static argument of jit)."""

    def __init__(self, mesh: Mesh | str | Mapping[str, int], rules=DEFAULT_RULES,
                 devices: Sequence[jax.Device] | None = None):
        self.mesh = mesh if isinstance(mesh, Mesh) else make_mesh(mesh, devices)
        unknown = [a for a in self.mesh.axis_names if a not in MESH_AXES]
        if unknown:
            raise PartitioningError(f"mesh axis {unknown[0]!r} is not one of {', '.join(MESH_AXES)}")
        self.rules = tuple((name, axis) for name, axis in parse_rules(rules))
        # What flax maps with: rules onto axes this mesh really splits (absent or size-1 axes map to nothing).
        sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape))
        self._effective = tuple((name, axis if axis is not None and sizes.get(axis, 1) > 1 else None)
                                for name, axis in self.rules)

    @classmethod
    def data_parallel(cls, devices: Sequence[jax.Device] | None = None) -> "Partitioner":
        """Today's default: every device on ``data`` (queries / batch split, parameters replicated)."""
        devices = list(jax.local_devices() if devices is None else devices)
        if not devices:
            raise PartitioningError("no devices to run on")
        return cls(make_mesh({"data": len(devices)}, devices))

    # ---------------------------------------------------------------- identity
    def _key(self):
        return (self.mesh, self.rules)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, Partitioner) and self._key() == other._key()

    def __repr__(self):
        return f"Partitioner({self.describe()})"

    def program_key(self) -> str:
        """What a compiled program depends on (`genir_jax.base.program_cache`): the mesh, its devices, the rules."""
        return repr((self.mesh.axis_names, self.mesh.device_ids.tolist(), self.rules))

    def describe(self) -> str:
        """``data=4,configs=1,model=2``."""
        return _text(dict(zip(self.mesh.axis_names, self.mesh.devices.shape)))

    # ---------------------------------------------------------------- sizes
    def axis_size(self, mesh_axis: str) -> int:
        sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape))
        return int(sizes.get(mesh_axis, 1))

    def logical_size(self, name: str) -> int:
        """How many ways the logical axis `name` is split on this mesh."""
        spec = self.spec((name,))[0]
        axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
        return math.prod(self.axis_size(a) for a in axes)

    @property
    def data_size(self) -> int:
        return self.logical_size("batch")

    @property
    def config_size(self) -> int:
        return self.logical_size("configs")

    @property
    def devices(self) -> list:
        return list(self.mesh.devices.flat)

    # ---------------------------------------------------------------- specs and shardings
    def spec(self, names: Sequence[str | None]) -> PartitionSpec:
        """Mesh axes of an array whose dimensions have these logical names (None: replicated dimension)."""
        return nn.logical_to_mesh_axes(tuple(names), self._effective)

    def sharding(self, names: Sequence[str | None]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self, ndim: int = 1) -> NamedSharding:
        """An array whose leading axis is the batch (split on ``data``), the rest replicated."""
        return self.sharding(("batch",) + (None,) * (ndim - 1))

    def param_specs(self, axes, shapes) -> Any:
        """Mesh `PartitionSpec` of every parameter, checking each split dimension divides.

        `axes`: the logical axis names of each parameter (a pytree of `PartitionSpec`,
        `genir_jax.core.model.logical_axes(config)`); `shapes`: a pytree of the same structure whose leaves
        have a ``shape`` (`genir_jax.core.model.param_shapes(config)` or the parameters themselves)."""
        def one(path, logical, shape):
            spec = self.spec(tuple(logical))
            self._check_divisible(_path_name(path), tuple(logical), np.shape(shape), spec)
            return spec

        return jax.tree_util.tree_map_with_path(one, axes, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))

    def param_shardings(self, axes, shapes) -> Any:
        """`param_specs` as `NamedSharding` on this mesh."""
        return jax.tree_util.tree_map(lambda s: NamedSharding(self.mesh, s), self.param_specs(axes, shapes),
                                      is_leaf=lambda x: isinstance(x, PartitionSpec))

    def shard_params(self, params, axes) -> Any:
        """`params` (host or device arrays, any dtype) placed as the rules say; `axes` as in `param_specs`."""
        by_path = {_path_name(path): logical for path, logical in jax.tree_util.tree_flatten_with_path(
            axes, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]}

        def place(path, array):
            logical = by_path.get(_path_name(path))
            if logical is None:
                raise PartitioningError(f"parameter {_path_name(path)} is not a parameter of this model config")
            spec = self.spec(tuple(logical))
            self._check_divisible(_path_name(path), tuple(logical), np.shape(array), spec)
            return jax.device_put(array, NamedSharding(self.mesh, spec))

        return jax.tree_util.tree_map_with_path(place, params)

    def opt_state_shardings(self, optimizer, params, axes) -> Any:
        """Shardings of ``optimizer.init(params)``: a state leaf shaped like a parameter (Adam's moments)
        is placed like it; factored or scalar leaves (Adafactor's row/column statistics, counts) are
        replicated."""
        import optax

        specs = self.param_specs(axes, params)
        abstract = jax.eval_shape(optimizer.init, params)
        shapes = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), getattr(x, "dtype", np.float32)), params)

        def place(leaf, spec, param):
            if isinstance(leaf, jax.ShapeDtypeStruct) and tuple(leaf.shape) == tuple(param.shape):
                return NamedSharding(self.mesh, spec)
            return self.replicated

        return optax.tree_map_params(optimizer, place, abstract, specs, shapes,
                                     transform_non_params=lambda _: self.replicated,
                                     is_leaf=lambda x: isinstance(x, PartitionSpec))

    def _check_divisible(self, what: str, names, shape, spec: PartitionSpec) -> None:
        for dim, (name, axes) in enumerate(zip(names, tuple(spec) + (None,) * (len(shape) - len(spec)))):
            if axes is None:
                continue
            ways = math.prod(self.axis_size(a) for a in ((axes,) if isinstance(axes, str) else axes))
            if shape[dim] % ways:
                raise PartitioningError(
                    f"parameter {what}: dimension {dim} ('{name}', size {shape[dim]}) cannot be split {ways} ways "
                    f"over mesh axis {axes!r} ({self.describe()}); choose a mesh that divides it or replicate "
                    f"it with --mesh-rules {name}=none")

    # ---------------------------------------------------------------- activations
    @contextlib.contextmanager
    def activate(self):
        """Within, ``nn.with_logical_constraint`` places activations on this mesh by these rules: flax's
        logical axis rules and the mesh (``jax.set_mesh``; inside a jit trace, where that is refused, the
        mesh's abstract mesh, the devices coming from the arguments). Neither is part of jit's cache key:
        jit under it with this partitioner as a static argument."""
        token = _ACTIVE.set(self)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(nn.logical_axis_rules(self._effective))
                try:
                    stack.enter_context(jax.sharding.set_mesh(self.mesh))
                except ValueError:  # "set_mesh can only be used outside of jax.jit"
                    stack.enter_context(jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh))
                yield self
        finally:
            _ACTIVE.reset(token)


_DEFAULT: contextvars.ContextVar["Partitioner | None"] = contextvars.ContextVar("genir_default_partitioner",
                                                                              default=None)


@contextlib.contextmanager
def use(partitioner: Partitioner | None):
    """Within, `current()` is `partitioner`: what a command's ``--mesh`` sets, so that library calls made
    without an explicit partitioner (`run_sweep`, `attribute`, `train_loop`, `load_pretrained`) use it."""
    token = _DEFAULT.set(partitioner)
    try:
        yield partitioner
    finally:
        _DEFAULT.reset(token)


def current() -> Partitioner | None:
    """The partitioner of the enclosing `use`, if any."""
    return _DEFAULT.get()


def active() -> Partitioner | None:
    """The partitioner of the enclosing `Partitioner.activate`, if any."""
    return _ACTIVE.get()


def fetch(tree) -> Any:
    """Host numpy copies of a pytree of arrays; arrays spread over several processes (a multi-host mesh)
    are gathered from every process (every process must call this, as for any collective)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def maybe_activate(partitioner: Partitioner | None):
    """``partitioner.activate()`` or a null context."""
    return partitioner.activate() if partitioner is not None else contextlib.nullcontext()


def put_rows(array, partitioner: Partitioner, leading: str = "batch"):
    """A host array with its leading axis split as logical axis `leading` (replicated if it does not divide)."""
    array = np.asarray(array)
    names = (leading,) + (None,) * (array.ndim - 1)
    spec = partitioner.spec(names)
    if array.ndim and array.shape[0] % max(1, partitioner.logical_size(leading)):
        spec = PartitionSpec()
    return jax.device_put(array, NamedSharding(partitioner.mesh, spec))


__all__ = [
    "DEFAULT_RULES", "LOGICAL_AXES", "MESH_AXES", "Partitioner", "PartitioningError", "active", "current", "fetch",
    "make_mesh", "maybe_activate", "merge_rules", "parse_mesh", "parse_rules", "put_rows", "use",
]
