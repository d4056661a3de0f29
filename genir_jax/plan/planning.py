"""Plan a run before the pod: compile it ahead of time on simulated devices and read its memory and FLOPs.

`make_plan` builds the program a run compiles (the model forward, the sweep's config-chunk function, the
attribution-patching gradient or the training step) with abstract arguments (`jax.ShapeDtypeStruct` with
the shardings a `genir_jax.scale.partitioning.Partitioner` gives them, no weights), lowers and compiles it for
a mesh of devices (simulated CPU devices when planning on a laptop: `--xla_force_host_platform_device_count`),
and reads, per device:

- memory from ``compiled.memory_analysis()``: parameters (and optimizer state) as the shardings place
  them, the other arguments and the outputs (minus what donation aliases), XLA's temporary buffers;
- FLOPs and bytes accessed per step from ``compiled.cost_analysis()`` (the SPMD program of one device),
  which counts a loop body once: they are multiplied by the program's dot FLOPs (and estimated bytes moved)
  with loop trip counts over those counted once (`genir_jax.plan.hlo_loops`), so scanned layers count as often
  as they run;

and projects the step time on named accelerators (`ACCELERATORS`) as the larger of FLOPs / peak and
bytes / HBM bandwidth (a roofline lower bound: no collectives, no launch overheads), with a verdict on
whether the per-device memory fits the accelerator's HBM.

Shapes (`SHAPES`) are the Hugging Face configurations of T5-large (v1.0: ReLU, tied embeddings) and the
T5 v1.1 XL and XXL (gated GELU, untied); any ``config.json`` or checkpoint directory is accepted too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from genir_jax.core.config import T5Config, t5_v1_0, t5_v1_1
from genir_jax.base.errors import ConfigError
from genir_jax.plan.hlo_loops import scales as loop_scales

TASKS = ("forward", "sweep", "attribute", "train")
DTYPES = ("float32", "bfloat16")

# The Hugging Face configurations (config.json) of the named shapes:
# t5-large: https://huggingface.co/google-t5/t5-large/blob/main/config.json (d_model 1024, d_ff 4096, 16 heads,
#   d_kv 64, 24+24 layers, relu, vocab 32128; tied and rescaled, as google/t5-large-ssm-nqo's config shows);
# t5-xl:  https://huggingface.co/google/t5-v1_1-xl/blob/main/config.json (d_model 2048, d_ff 5120, 32 heads,
#   d_kv 64, 24+24 layers, gated-gelu, tie_word_embeddings false, vocab 32128);
# t5-xxl: https://huggingface.co/google/t5-v1_1-xxl/blob/main/config.json (d_model 4096, d_ff 10240, 64 heads,
#   d_kv 64, 24+24 layers, gated-gelu, tie_word_embeddings false, vocab 32128).
SHAPES: dict[str, T5Config] = {
    "t5-large": t5_v1_0(vocab_size=32128, d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    "t5-xl": t5_v1_1(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_heads=32),
    "t5-xxl": t5_v1_1(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
}


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Per chip: dense bfloat16 peak FLOP/s, HBM bytes and HBM bytes/s."""

    name: str
    peak_bf16_flops: float
    hbm_bytes: float
    hbm_bandwidth: float


GB = 1e9
GIB = 2 ** 30
# Sources (per chip; dense bf16, no sparsity):
# TPU v4: https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB HBM2, 1200 GB/s)
# TPU v5e: https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16, 16 GB HBM2, 819 GB/s)
# TPU v5p: https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16, 95 GB HBM2e, 2765 GB/s)
# A100 80GB SXM: https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
#   nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (312 TFLOP/s bf16 dense, 80 GB HBM2e, 2039 GB/s)
# H100 SXM: https://www.nvidia.com/en-us/data-center/h100/ (989 TFLOP/s bf16 dense = 1979 with sparsity / 2,
#   80 GB HBM3, 3.35 TB/s)
# H200 SXM: https://www.nvidia.com/en-us/data-center/h200/ (989 TFLOP/s bf16 dense, 141 GB HBM3e, 4.8 TB/s)
ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("tpu-v4", 275e12, 32 * GIB, 1200 * GB),
    Accelerator("tpu-v5e", 197e12, 16 * GB, 819 * GB),
    Accelerator("tpu-v5p", 459e12, 95 * GB, 2765 * GB),
    Accelerator("a100-80gb", 312e12, 80 * GB, 2039 * GB),
    Accelerator("h100", 989e12, 80 * GB, 3350 * GB),
    Accelerator("h200", 989e12, 141 * GB, 4800 * GB),
)}


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one compiled step processes.

    forward: `batch` queries of `query_length` tokens, `target_length` decoder steps (1: atomic docids).
    sweep: `configs` configs (vmapped) x `batch` queries per step; `total_configs` x `total_queries` for
    the projected total (a zero-ablation grid over every decoder MLP neuron unless `sites` says otherwise).
    attribute: AtP gradients of `batch` queries w.r.t. the masks of the `sites` grid.
    train: one update on a global batch of `batch` examples (dropout, Adafactor as the presets).
    `batch` and `configs` are global (over the whole mesh).
    """

    task: str = "forward"
    batch: int = 64
    query_length: int = 32
    target_length: int = 1
    configs: int = 64
    total_configs: int | None = None
    total_queries: int | None = None
    sites: str = "decoder.*.mlp.hook_post"
    unit: str | None = "neuron"
    dtype: str = "float32"
    docids: int = 0  # extra vocabulary rows (one atomic docid token per document)

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        for name in ("batch", "query_length", "target_length", "configs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("total_configs", "total_queries"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.docids < 0:
            raise ConfigError(f"--docids must be >= 0, got {self.docids!r}")


def resolve_shape(shape: str) -> tuple[str, T5Config]:
    """(name, config) of a named shape, a ``config.json`` or a checkpoint directory holding one."""
    if shape in SHAPES:
        return shape, SHAPES[shape]
    path = os.fspath(shape)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"--shape {shape}: directory has no config.json")
        return shape, T5Config.from_json_file(path)
    if os.path.isfile(path):
        return shape, T5Config.from_json_file(path)
    raise ConfigError(f"--shape {shape!r}: not a known shape ({', '.join(SHAPES)}) nor a config.json or checkpoint "
                      "directory")


# --------------------------------------------------------------------------------------------------
# Abstract arguments and the compiled programs
# --------------------------------------------------------------------------------------------------

def _sds(shape, dtype, sharding) -> Any:
    import jax

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def abstract_params(config: T5Config, partitioner, dtype) -> Any:
    """The parameters as `jax.ShapeDtypeStruct` (no memory) with the partitioner's shardings."""
    import jax

    from genir_jax.core.model import logical_axes, param_shapes

    shapes = param_shapes(config)
    return jax.tree_util.tree_map(lambda s, sh: _sds(s.shape, dtype, sh), shapes,
                                  partitioner.param_shardings(logical_axes(config), shapes))


def _rows(partitioner, shape, dtype, leading: str = "batch"):
    """An abstract array whose leading axis is split as `leading` (replicated if the mesh does not divide it)."""
    from jax.sharding import NamedSharding, PartitionSpec

    spec = partitioner.spec((leading,) + (None,) * (len(shape) - 1))
    if shape[0] % max(1, partitioner.logical_size(leading)):
        spec = PartitionSpec()
    return _sds(shape, dtype, NamedSharding(partitioner.mesh, spec))


def lower(config: T5Config, partitioner, work: Workload):
    """The lowered program of `work` (``jax.stages.Lowered``) and what its arguments are."""
    import jax.numpy as jnp

    dtype = jnp.bfloat16 if work.dtype == "bfloat16" else jnp.float32
    if work.task == "forward":
        return _lower_forward(config, partitioner, work, dtype)
    if work.task == "sweep":
        return _lower_sweep(config, partitioner, work, dtype)
    if work.task == "attribute":
        return _lower_attribute(config, partitioner, work, dtype)
    return _lower_train(config, partitioner, work, dtype)


def _inputs(partitioner, work: Workload):
    import jax.numpy as jnp

    ids = _rows(partitioner, (work.batch, work.query_length), jnp.int32)
    return ids, _rows(partitioner, (work.batch, work.query_length), jnp.int32)


def _lower_forward(config, partitioner, work, dtype):
    """`genir_jax.core.model.forward` (logits of `target_length` decoder steps) on sharded parameters."""
    import jax
    import jax.numpy as jnp

    from genir_jax.core.model import forward

    params = abstract_params(config, partitioner, dtype)
    ids, mask = _inputs(partitioner, work)
    dec = _rows(partitioner, (work.batch, work.target_length), jnp.int32)

    def run(params, ids, mask, dec):  # a new jit per call: keyed by this partitioner
        with partitioner.activate():
            return forward(config, params, ids, mask, dec, dtype=dtype)

    logits = partitioner.sharding(("batch", "length", "vocab"))
    return jax.jit(run, out_shardings=logits).lower(params, ids, mask, dec), {
        "params": params, "inputs": (ids, mask, dec), "args": (params, ids, mask, dec)}


def _sweep_terms(config, work):
    from genir_jax.interp.sweep import site_grid

    return site_grid(config, work.sites, unit=work.unit, length=work.query_length)


def _lower_sweep(config, partitioner, work, dtype):
    """`genir_jax.interp.patching.config_chunk_step` (the program `run_sweep` runs per config chunk x query chunk) on a
    grid of `work.sites` (one config per site x unit; `work.configs` of them per step), metrics rank and logit,
    with the rank window where `run_sweep` would use it (float32 parameters)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from genir_jax.interp import patching
    from genir_jax.interp.metrics import METRICS
    from genir_jax.interp.rank_window import RANK_WINDOW
    from genir_jax.interp.sweep import first_decoder_layer

    sweep = _sweep_terms(config, work)
    steps = patching.sweep_steps(sweep)
    metrics = tuple(m for m in METRICS if m in ("rank", "logit"))
    params = abstract_params(config, partitioner, dtype)
    ids, mask = _inputs(partitioner, work)
    targets = _rows(partitioner, (work.batch,), jnp.int32)
    window = RANK_WINDOW if dtype is None or jnp.dtype(dtype) == jnp.float32 else 0
    state, _ = jax.eval_shape(
        lambda p, i, m, t: steps.clean_state(p, None, i, m, None, None, t, None, None, config=config,
                                             source_config=config, source_spec=None, metrics=metrics, top_k=0,
                                             window=window, partitioner=partitioner),
        params, ids, mask, targets)
    state = jax.tree_util.tree_map(lambda s: _rows(partitioner, s.shape, s.dtype) if s.ndim and s.shape[0] == work.batch
                                   else _batch_axis(partitioner, s, work.batch), state)
    configs = -(-work.configs // partitioner.config_size) * partitioner.config_size
    replicated = partitioner.replicated
    tables = tuple(_sds((t.table.shape[0] + 1,) + t.table.shape[1:], jnp.float32, replicated) for t in sweep.terms)
    values = tuple(_sds(np.shape(t.value), jnp.float32, replicated) for t in sweep.terms)
    index = tuple(tuple(_rows(partitioner, (configs,), jnp.int32, "configs") for _ in range(3)) for _ in sweep.terms)
    receivers = _rows(partitioner, (configs,), jnp.float32, "configs")
    start = _sds((), jnp.int32, replicated)
    # the costliest config group of the grid: configs patching inside the encoder run it per config (kind 2)
    encoder_kind = int(np.max(first_decoder_layer(config, sweep)[1]))
    lowered = steps.config_chunk_step.lower(
        params, state, ids, mask, targets, None, None, tables, values, index, receivers, start, config=config,
        plan=steps.plan, encoder_kind=encoder_kind, paths=False, metrics=metrics, top_k=0, partitioner=partitioner)
    inputs = (state, ids, mask, targets, tables, values, index, receivers, start)
    args = (params, state, ids, mask, targets, None, None, tables, values, index, receivers, start)
    return lowered, {"args": args, "params": params, "inputs": inputs, "sweep_size": sweep.size, "configs_per_step": configs}


def _batch_axis(partitioner, struct, batch):
    """Abstract clean-state arrays with the batch on axis 1 ([layers + 1, B, ...]): split like queries."""
    from jax.sharding import NamedSharding, PartitionSpec

    if struct.ndim >= 2 and struct.shape[1] == batch and batch % max(1, partitioner.data_size) == 0:
        spec = PartitionSpec(None, *partitioner.spec(("batch",)))
    else:
        spec = PartitionSpec()
    return _sds(struct.shape, struct.dtype, NamedSharding(partitioner.mesh, spec))


def _lower_attribute(config, partitioner, work, dtype):
    """`genir_jax.interp.attribution.gradient_step` (AtP: one forward + backward per query chunk) for the masks of
    the `work.sites` grid (zero ablation, logit metric)."""
    import jax.numpy as jnp

    from genir_jax.interp import attribution

    from genir_jax.interp import patching

    sweep = _sweep_terms(config, work)
    plan = patching.plan_terms(sweep.terms)
    params = abstract_params(config, partitioner, dtype)
    ids, mask = _inputs(partitioner, work)
    targets = _rows(partitioner, (work.batch,), jnp.int32)
    replicated = partitioner.replicated
    values = tuple(_sds((), jnp.float32, replicated) for _ in sweep.terms)
    zero_masks = []
    for term in sweep.terms:
        shape = attribution.mask_shape(config, term, work.batch, work.query_length)
        zero_masks.append(_batch_axis(partitioner, _sds(shape, jnp.float32, None), work.batch) if term.is_layer_site
                          else _rows(partitioner, shape, jnp.float32))
    lowered = attribution.gradient_step.lower(
        params, ids, mask, targets, None, values, tuple(zero_masks), {}, None, config=config, plan=plan,
        metric="logit", drop=False, partitioner=partitioner, dtype=None if dtype == jnp.float32 else dtype)
    inputs = (ids, mask, targets, values, tuple(zero_masks))
    args = (params, ids, mask, targets, None, values, tuple(zero_masks), {}, None)
    return lowered, {"args": args, "params": params, "inputs": inputs, "sweep_size": sweep.size}


def _lower_train(config, partitioner, work, dtype):
    """`genir_jax.training.loop.make_train_step` (dropout, the presets' Adafactor, donated state) with the
    state placed by the partitioner; float32 master weights, bfloat16 compute with ``--dtype bfloat16``."""
    import jax
    import jax.numpy as jnp

    from genir_jax.training.loop import TrainState, make_train_step, state_shardings
    from genir_jax.training.optim import OptimizerSpec, make_optimizer

    optimizer, schedule = make_optimizer(OptimizerSpec("adafactor", 1e-3, "constant", 1000), 10_000)
    params = abstract_params(config, partitioner, jnp.float32)
    shardings = state_shardings(partitioner, config, optimizer, params)
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_state = jax.tree_util.tree_map(lambda s, sh: _sds(s.shape, s.dtype, sh), opt_state, shardings.opt_state)
    state = TrainState(step=_sds((), jnp.int32, partitioner.replicated), params=params, opt_state=opt_state,
                       rng=_sds((2,), jnp.uint32, partitioner.replicated))
    batch = {"input_ids": _rows(partitioner, (work.batch, work.query_length), jnp.int32),
             "attention_mask": _rows(partitioner, (work.batch, work.query_length), jnp.int32),
             "targets": _rows(partitioner, (work.batch, work.target_length), jnp.int32),
             "target_mask": _rows(partitioner, (work.batch, work.target_length), jnp.int32)}
    step = make_train_step(config, optimizer, partitioner, schedule=schedule, dropout=True,
                           compute_dtype=dtype if dtype == jnp.bfloat16 else None, shardings=shardings)
    return step.lower(state, batch), {"params": params, "opt_state": opt_state,
                                       "inputs": (state.step, state.rng, batch), "args": (state, batch)}


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------

def per_device_bytes(tree, device_index: int = 0) -> int:
    """Bytes one device holds of abstract (or real) sharded arrays."""
    import jax
    import numpy as np

    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = tuple(leaf.shape)
        if sharding is not None:
            device = list(sharding.mesh.devices.flat)[device_index] if hasattr(sharding, "mesh") else None
            shard = sharding.shard_shape(shape) if device is None else _shard_shape_on(sharding, shape, device)
        else:
            shard = shape
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _shard_shape_on(sharding, shape, device):
    index = sharding.devices_indices_map(shape).get(device)
    if index is None:
        return (0,)
    return tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)) if index else ()


@dataclasses.dataclass
class Plan:
    """What one step of `workload` needs per device on `mesh`, and what it would take on accelerators."""

    shape: str
    config: T5Config
    mesh: dict
    devices: int
    workload: Workload
    parameter_bytes: int  # parameters (and optimizer state for train) on one device
    input_bytes: int  # the other arguments on one device (queries, clean state, masks, batch, ...)
    argument_bytes: int  # what XLA counts as arguments (unused ones, e.g. encoder weights of a sweep, are pruned)
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float  # per device per step, loops counted by their trip counts (see `flops_scale`)
    bytes_accessed: float  # likewise (`bytes_scale`)
    steps: int = 1  # steps of the whole job (sweep: config chunks x query chunks)
    compile_seconds: float = 0.0
    # XLA's cost analysis counts a loop body once (the layers under nn.scan: one per stack); its FLOPs and
    # bytes are multiplied by the program's dot FLOPs (bytes moved) with trip counts over those counted once
    # (`genir_jax.plan.hlo_loops`)
    flops_scale: float = 1.0
    bytes_scale: float = 1.0

    @property
    def activation_bytes(self) -> int:
        """The non-parameter arguments and the outputs (outputs that reuse a donated argument's buffer,
        i.e. the updated training state, are not counted twice)."""
        return self.input_bytes + max(0, self.output_bytes - self.alias_bytes)

    @property
    def total_bytes(self) -> int:
        """Peak per device: the resident parameters (and optimizer state), the other arguments, the
        outputs and XLA's temporaries, all at once."""
        return self.parameter_bytes + self.activation_bytes + self.temp_bytes

    def projection(self, accelerator: Accelerator) -> dict:
        compute = self.flops / accelerator.peak_bf16_flops
        memory = self.bytes_accessed / accelerator.hbm_bandwidth
        step = max(compute, memory)
        return {"accelerator": accelerator.name, "step_seconds": step, "bound": "compute" if compute >= memory else
                "memory", "total_seconds": step * self.steps, "fits": self.total_bytes <= accelerator.hbm_bytes,
                "hbm_fraction": self.total_bytes / accelerator.hbm_bytes}

    def to_dict(self) -> dict:
        return {"shape": self.shape, "mesh": self.mesh, "devices": self.devices,
                "workload": dataclasses.asdict(self.workload), "per_device": {
                    "parameter_bytes": self.parameter_bytes, "activation_bytes": self.activation_bytes,
                    "temp_bytes": self.temp_bytes, "total_bytes": self.total_bytes,
                    "input_bytes": self.input_bytes, "argument_bytes": self.argument_bytes, "output_bytes": self.output_bytes,
                    "alias_bytes": self.alias_bytes, "code_bytes": self.code_bytes,
                    "flops_per_step": self.flops, "bytes_accessed_per_step": self.bytes_accessed,
                    "flops_scale": self.flops_scale, "bytes_scale": self.bytes_scale},
                "steps": self.steps, "compile_seconds": round(self.compile_seconds, 2),
                "projections": [self.projection(a) for a in ACCELERATORS.values()]}


def make_plan(shape: str, mesh: str | Mapping[str, int], work: Workload, devices: Sequence | None = None,
              *, rules=None) -> Plan:
    """Compile `work` for `shape` on `mesh` with abstract arrays and read its memory and cost analyses."""
    return _compile(shape, mesh, work, devices, rules)[0]


def _compile(shape, mesh, work: Workload, devices, rules):
    """(plan, partitioner, compiled program, its abstract arguments)."""
    import time

    import jax

    from genir_jax.scale.partitioning import DEFAULT_RULES, Partitioner, merge_rules

    work.validate()
    name, config = resolve_shape(shape)
    if work.docids:
        config = config.replace(vocab_size=config.vocab_size + work.docids)
    devices = list(jax.devices("cpu") if devices is None else devices)
    partitioner = Partitioner(mesh, merge_rules(rules, DEFAULT_RULES) if rules else DEFAULT_RULES, devices=devices)
    _check_divides(partitioner, work)
    started = time.perf_counter()
    lowered, parts = lower(config, partitioner, work)
    compiled = lowered.compile()
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    scale, byte_scale = loop_scales(compiled.as_text())
    parameter_bytes = per_device_bytes(parts["params"]) + per_device_bytes(parts.get("opt_state", ()))
    steps = 1
    if work.task == "sweep":
        total_configs = work.total_configs or parts["sweep_size"]
        steps = -(-total_configs // parts["configs_per_step"]) * -(-(work.total_queries or work.batch) // work.batch)
    elif work.total_queries:
        steps = -(-work.total_queries // work.batch)
    plan = Plan(shape=name, config=config, mesh=dict(zip(partitioner.mesh.axis_names,
                                                         map(int, partitioner.mesh.devices.shape))),
                devices=int(partitioner.mesh.devices.size), workload=work, parameter_bytes=parameter_bytes,
                input_bytes=per_device_bytes(parts["inputs"]),
                argument_bytes=int(memory.argument_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
                alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
                code_bytes=int(memory.generated_code_size_in_bytes), flops=scale * float(cost.get("flops", 0.0)),
                bytes_accessed=byte_scale * float(cost.get("bytes accessed", 0.0)), steps=steps,
                compile_seconds=seconds, flops_scale=scale, bytes_scale=byte_scale)
    return plan, partitioner, compiled, parts


def measure(shape: str, mesh: str | Mapping[str, int], work: Workload, devices: Sequence | None = None,
            *, rules=None) -> dict:
    """Run the planned program with real (zero-filled) arrays on these devices and measure what it holds.

    Returns the plan's prediction and, per device (the first device of the mesh): ``resident_bytes``,
    the bytes of the real arguments and outputs on that device (from the arrays' shards), and, for the
    whole process, ``rss_peak_delta_bytes``: how much the peak resident memory rose while the program ran
    (the outputs and temporaries of every device; Linux only, None elsewhere), to compare with
    ``devices x (outputs + temporaries)`` of the plan.
    """
    import gc

    import jax
    import numpy as np

    plan, partitioner, compiled, parts = _compile(shape, mesh, work, devices, rules)
    first = partitioner.mesh.devices.flat[0]

    def real(leaf):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            return leaf
        return jax.device_put(np.zeros(leaf.shape, leaf.dtype), leaf.sharding)

    args = jax.tree_util.tree_map(real, parts["args"], is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    on_device = _bytes_on(args, first)
    gc.collect()
    baseline = _rss_reset()
    out = compiled(*args)
    jax.block_until_ready(out)
    peak = _rss_peak()
    outputs = _bytes_on(out, first)
    aliased = plan.alias_bytes if work.task == "train" else 0
    return {"plan": plan, "arguments_bytes": on_device, "outputs_bytes": outputs,
            "resident_bytes": on_device + outputs - aliased,
            "allocated_bytes": on_device + outputs - aliased + plan.temp_bytes,
            "rss_peak_delta_bytes": None if baseline is None or peak is None else peak - baseline,
            "devices": plan.devices}


def _bytes_on(tree, device) -> int:
    """Bytes of the shards of real arrays in `tree` that live on `device`."""
    import jax

    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            if shard.device == device:
                total += shard.data.nbytes
    return total


def _rss_reset() -> int | None:
    """Reset the process's peak RSS (Linux: /proc/self/clear_refs) and return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return None


def _rss_peak() -> int | None:
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        return None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def _check_divides(partitioner, work: Workload) -> None:
    data = partitioner.data_size
    if work.batch % data:
        raise ConfigError(f"--batch {work.batch} is not divisible by the mesh's data axis ({data}); "
                          "choose a multiple")


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------

def human_bytes(count: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def human_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.2f} ms"


def format_plan(plan: Plan, accelerators: Sequence[str] | None = None) -> str:
    """The plan as a short report: per-device memory, FLOPs, and a projection per accelerator."""
    w = plan.workload
    mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items() if v > 1) or "1 device"
    lines = [(f"plan: {plan.shape} ({plan.config.num_layers}+{plan.config.num_decoder_layers} layers, d_model "
              f"{plan.config.d_model}, vocab {plan.config.vocab_size}), task {w.task}, {w.dtype}, mesh {mesh} "
              f"({plan.devices} devices)")]
    what = {"forward": f"{w.batch} queries x {w.query_length} tokens, {w.target_length} decoder step(s)",
            "sweep": f"{w.configs} configs x {w.batch} queries x {w.query_length} tokens per step ({w.sites}"
                     f"{' x ' + w.unit if w.unit else ''}), {plan.steps} steps",
            "attribute": f"{w.batch} queries x {w.query_length} tokens, gradients w.r.t. {w.sites}"
                         f"{' x ' + w.unit if w.unit else ''}",
            "train": f"global batch {w.batch} x {w.query_length} tokens -> {w.target_length} target token(s), "
                     "Adafactor, dropout"}[w.task]
    lines.append(f"  step: {what}")
    lines.append("  per device:")
    label = "parameters + optimizer state" if w.task == "train" else "parameters"
    lines.append(f"    {label:<30} {human_bytes(plan.parameter_bytes):>12}")
    lines.append(f"    {'activations (args + outputs)':<30} {human_bytes(plan.activation_bytes):>12}")
    lines.append(f"    {'temporaries':<30} {human_bytes(plan.temp_bytes):>12}")
    lines.append(f"    {'total':<30} {human_bytes(plan.total_bytes):>12}")
    lines.append(f"    {'FLOPs per step':<30} {plan.flops:12.4g}  (XLA's count x {plan.flops_scale:.2f}: loop trip "
                 "counts)")
    lines.append(f"    {'HBM bytes per step':<30} {plan.bytes_accessed:12.4g}  (x {plan.bytes_scale:.2f})")
    lines.append(f"  compiled in {plan.compile_seconds:.1f} s on simulated CPU devices")
    lines.append(f"  {'accelerator':<12} {'HBM':>9} {'step (roofline)':>16} {'bound':>8} "
                 f"{'all ' + str(plan.steps) + ' steps' if plan.steps > 1 else '':>16}  verdict")
    for name in accelerators or ACCELERATORS:
        accelerator = ACCELERATORS[name]
        p = plan.projection(accelerator)
        if p["fits"]:
            verdict = f"fits ({100 * p['hbm_fraction']:.0f}% of HBM)"
        else:
            verdict = (f"does NOT fit: needs {human_bytes(plan.total_bytes)}, "
                       f"{human_bytes(plan.total_bytes - accelerator.hbm_bytes)} over "
                       f"({p['hbm_fraction']:.1f}x HBM)")
        total = human_seconds(p["total_seconds"]) if plan.steps > 1 else ""
        lines.append(f"  {name:<12} {human_bytes(accelerator.hbm_bytes):>9} {human_seconds(p['step_seconds']):>16} "
                     f"{p['bound']:>8} {total:>16}  {verdict}")
    return "\n".join(lines)


def required_devices(mesh: str | Mapping[str, int], devices: int | None) -> int:
    """How many devices a plan needs: `devices`, or the mesh's size; the mesh must divide it."""
    from genir_jax.scale.partitioning import PartitioningError, parse_mesh

    shape = parse_mesh(mesh)
    size = math.prod(shape.values())
    count = size if devices is None else int(devices)
    if count <= 0:
        raise ConfigError(f"--devices must be a positive integer, got {devices!r}")
    if count % size:
        raise PartitioningError(f"--mesh {mesh}: the mesh has {size} devices, which does not divide --devices {count}")
    return count
