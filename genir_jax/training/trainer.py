"""The training driver shared by `pretrain` and `train`: steps, logging, validation, checkpoints, resume.

`train_loop` runs `RunSpec.steps` updates of `genir_jax.training.loop` on batches planned by
`genir_jax.training.batching`, and in the run directory:

- writes ``metrics.jsonl``: one JSON object per line, ``{"event": "train", "step", "loss", "accuracy",
  "learning_rate", "grad_norm", "examples_per_s", "elapsed_s"}`` every `log_every` steps and
  ``{"event": "eval", "step", <validation metrics>, "best"}`` after every validation;
- validates every `eval_every` steps and at the end, keeping the best parameters (`best_metric`) in
  ``best/``;
- checkpoints every `checkpoint_every` steps and at the end (``checkpoints/``, the newest
  `keep_checkpoints` kept);
- shows a tqdm bar with the loss and examples/s.

Resume (``resume=True``) restores the newest checkpoint, checks that the data and the settings are the
ones it was written with, drops the metrics lines and best checkpoints written after it, and continues:
the final parameters equal those of an uninterrupted run bit for bit (same devices, same settings).

Multi-process runs (`genir_jax.scale.distributed`; every process runs the same command): each process asks
its `DataSource` for only the rows of every batch that its devices hold (`loop.local_rows`) and the
global batch is assembled from the processes' rows; checkpoints are collective orbax saves (each process
writes its shards); only process 0 writes ``metrics.jsonl``; validation runs on gathered parameters in
every process, with process 0's values broadcast so that all take the same decisions.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genir_jax.core.config import T5Config
from genir_jax.base.errors import CheckpointError, ConfigError
from genir_jax.base.io import write_text
from genir_jax.scale.partitioning import current, fetch
from genir_jax.training.batching import BatchPlan, DataSource
from genir_jax.training.checkpointing import Checkpoints, abstract_like
from genir_jax.training.loop import (as_partitioner, create_state, data_mesh, local_rows, make_train_step,
                                     put_local_batch, put_state, state_shardings)
from genir_jax.training.optim import OptimizerSpec, make_optimizer

METRICS_FILE = "metrics.jsonl"
# Compiled train steps of this process, by everything they depend on: a second run with the same model,
# optimizer and shapes (a resume, a test) reuses them instead of compiling again.
_COMPILED_STEPS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_COMPILED_STEPS_KEPT = 8


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """How long and how to train: everything that must match for a resume to be exact."""

    steps: int
    batch_size: int
    optimizer: OptimizerSpec = OptimizerSpec()
    seed: int = 0
    log_every: int = 50
    eval_every: int = 0  # 0: validate only at the end
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    dropout: bool = True
    bf16: bool = False
    # each stack's layers as straight-line code instead of a loop: faster steps for a few small layers
    # (the CPU presets), longer compilation for many
    unroll_layers: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"training setting '{name}' must be a positive integer, got {value!r}")
        if self.eval_every < 0:
            raise ConfigError(f"training setting 'eval_every' must be >= 0, got {self.eval_every!r}")
        self.optimizer.validate("training setting 'optimizer'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resume_key(self) -> dict:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        data = self.to_dict()
        data.pop("log_every")
        data.pop("keep_checkpoints")
        return data


@dataclasses.dataclass
class TrainResult:
    """What a finished run returns."""

    params: Any  # the best parameters (by validation) if validation ran, else the last ones
    last_params: Any
    best: dict | None  # {"step", metric: value, ...} of the best validation
    evaluations: list[dict]
    steps: int
    train_seconds: float  # time spent in training steps of this invocation (no validation, no saving)
    examples_per_s: float | None  # training throughput of this invocation (compilation excluded)
    compile_seconds: float
    resumed_from: int | None


class MetricsLog:
    """Append-only JSON lines; on resume the lines after the resumed step are dropped. In a multi-process
    run only process 0 writes (`enabled`); every process computes the same lines. `sinks`
    (`genir_jax.training.metric_sinks`) get each written record too."""

    def __init__(self, path: str, enabled: bool = True, sinks: Sequence[Callable[[dict], None]] = ()):
        self.path = path
        self.enabled = enabled
        self.sinks = tuple(sinks)

    def records(self) -> list[dict]:
        if not os.path.isfile(self.path):
            return []
        out = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by a kill
                    continue
        return out

    def truncate_after(self, step: int) -> None:
        if not self.enabled:
            return
        kept = [r for r in self.records() if int(r.get("step", 0)) <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def reset(self) -> None:
        if self.enabled:
            write_text(self.path, "")

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(record)) + "\n")
            handle.flush()
        for sink in self.sinks:
            sink(dict(record))

    def close(self) -> None:
        """Close the sinks that need it (TensorBoard's writer)."""
        for sink in self.sinks:
            close = getattr(sink, "close", None)
            if close is not None:
                close()


def _better(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def _host(tree) -> Any:
    return jax.tree_util.tree_map(lambda x: float(np.asarray(x)), jax.device_get(tree))


def train_loop(
    config: T5Config,
    params,
    source: DataSource,
    spec: RunSpec,
    run_dir: str,
    *,
    evaluate: Callable[[Any], dict] | None = None,
    best_metric: str | None = None,
    best_mode: str = "max",
    resume: bool = False,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
    description: str = "train",
    partitioner=None,
    sinks: Sequence[Callable[[dict], None]] = (),
) -> TrainResult:
    """Train `params` of `config` on `source` as `spec` says, with checkpoints and metrics in `run_dir`.

    `evaluate(params) -> {name: value}` runs at validation steps; with `best_metric` the parameters with
    the best value of that metric (``best_mode`` "max" or "min") are kept and returned.
    `partitioner` (`genir_jax.scale.partitioning.Partitioner`): the mesh and rules that place parameters,
    optimizer state and batches (checkpoints are saved and restored sharded); None: a command's ``--mesh``
    (`genir_jax.scale.partitioning.current`), else data parallel over `devices`. `sinks`
    (`genir_jax.training.metric_sinks`): more receivers of the metrics records (stdout, TensorBoard).
    The progress bar (`description`) says when it is compiling the step and validating.
    """
    spec.validate()
    if best_mode not in ("max", "min"):
        raise ConfigError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if best_metric is not None and evaluate is None:
        raise ConfigError("best_metric needs an evaluate function")
    if partitioner is None and devices is None:
        partitioner = current()  # a command's --mesh
    if partitioner is None and devices is None and jax.process_count() > 1:
        devices = jax.devices()  # a multi-process run trains on every process's devices together
    partitioner = as_partitioner(partitioner if partitioner is not None else data_mesh(devices))
    if spec.batch_size % partitioner.data_size:
        raise ConfigError(f"batch size {spec.batch_size} is not divisible by the number of data-parallel devices "
                          f"({partitioner.data_size}); choose a multiple")
    optimizer, schedule = make_optimizer(spec.optimizer, spec.steps)
    plan = BatchPlan(source.group_sizes, spec.batch_size, spec.seed)
    compute_dtype = jnp.bfloat16 if spec.bf16 else None
    shardings = state_shardings(partitioner, config, optimizer, params)
    step_fn = make_train_step(config, optimizer, partitioner, schedule=schedule, dropout=spec.dropout,
                              compute_dtype=compute_dtype, shardings=shardings, unroll_layers=spec.unroll_layers,
                              scored_per_row=getattr(source, "scored_per_row", None))
    barrier("genir_jax.train_loop.start")  # every process has checked the output directory before any writes
    os.makedirs(run_dir, exist_ok=True)
    checkpoints = Checkpoints(run_dir, every=spec.checkpoint_every, keep=spec.keep_checkpoints)
    log = MetricsLog(os.path.join(run_dir, METRICS_FILE), enabled=jax.process_index() == 0, sinks=sinks)
    fingerprint = source.fingerprint()
    identity = {"fingerprint": fingerprint, "spec": spec.resume_key(), "config": config.to_hf_dict()}

    state = put_state(create_state(params, optimizer, spec.seed), partitioner, shardings)
    best: dict | None = None
    evaluations: list[dict] = []
    resumed_from = None
    latest = checkpoints.latest_step()
    bar = None
    try:
        if latest is not None and not resume:
            raise CheckpointError(f"{run_dir}: already holds checkpoints (newest: step {latest}); "
                                  "resume them (--resume) or choose another output directory")
        if latest is not None:
            meta = checkpoints.restore_meta(latest)
            for key, value in identity.items():
                if meta.get(key) != value:
                    raise CheckpointError(
                        f"{run_dir}/checkpoints/{latest}: was written with a different {key} "
                        f"({_describe_difference(meta.get(key), value)}); resume with the original settings "
                        "or choose another output directory")
            state, meta = checkpoints.restore(abstract_like(state, shardings), latest)
            latest = meta["step"]  # an unreadable newest checkpoint falls back to an older one
            best = meta.get("best")
            evaluations = list(meta.get("evaluations", []))
            resumed_from = latest
            log.truncate_after(latest)
            checkpoints.discard_after(latest)
        else:
            log.reset()

        start = int(jax.device_get(state.step))
        from tqdm.auto import tqdm

        bar = tqdm(total=spec.steps, initial=start, desc=f"{description} (compiling the step)", unit="step",
                   disable=not progress, dynamic_ncols=True, smoothing=0.1)
        bar.refresh()  # shown while XLA compiles, which can take a minute
        rows = local_rows(partitioner, spec.batch_size)  # this process loads only its rows of every batch
        # Compile the step for every group's batch shape up front, so compilation never lands inside a
        # timed interval (each group has its own array widths).
        compile_started = time.perf_counter()
        compiled: dict[tuple, Any] = {}
        for group, size in enumerate(source.group_sizes):
            if size and start < spec.steps:
                sample = put_local_batch(source.batch(group, rows % size, 0), rows, spec.batch_size, partitioner)
                shape = _shape_key(sample)
                if shape not in compiled:
                    cache_key = (config, spec.optimizer, spec.steps, spec.dropout, spec.bf16, spec.unroll_layers,
                                 partitioner, shape, _abstract_key(state))
                    if cache_key not in _COMPILED_STEPS:
                        _COMPILED_STEPS[cache_key] = step_fn.lower(state, sample).compile()
                        while len(_COMPILED_STEPS) > _COMPILED_STEPS_KEPT:
                            _COMPILED_STEPS.popitem(last=False)
                    compiled[shape] = _COMPILED_STEPS[cache_key]
        compile_seconds = time.perf_counter() - compile_started
        train_seconds, timed_examples = 0.0, 0
        interval_start, interval_examples = time.perf_counter(), 0
        pending: list[dict] = []
        bar.reset(total=spec.steps)  # the rate and the elapsed time count from here, not from before compilation
        bar.n = start
        bar.set_description(description)
        run_started = time.perf_counter()
        for step in range(start, spec.steps):
            group, indices, epoch = plan.at(step)
            batch = put_local_batch(source.batch(group, indices[rows], epoch), rows, spec.batch_size, partitioner)
            state, metrics = compiled[_shape_key(batch)](state, batch)
            pending.append(metrics)
            interval_examples += spec.batch_size
            done = step + 1
            bar.update(1)
            is_eval = evaluate is not None and (done == spec.steps or (spec.eval_every and done % spec.eval_every == 0))
            is_ckpt = done == spec.steps or done % spec.checkpoint_every == 0
            if done % spec.log_every == 0 or done == spec.steps or is_eval or is_ckpt:
                host = _host(pending)
                now = time.perf_counter()
                seconds = now - interval_start
                if interval_examples:
                    train_seconds += seconds
                    timed_examples += interval_examples
                record = {"event": "train", "step": done, "epoch": round(done / plan.steps_per_epoch, 4)}
                for name in host[-1]:
                    record[name] = float(np.mean([m[name] for m in host]))
                record["examples_per_s"] = round(interval_examples / seconds, 2) if interval_examples else None
                record["elapsed_s"] = round(now - run_started, 2)
                log.write(record)
                postfix = {"loss": f"{record['loss']:.4f}"}
                if record["examples_per_s"]:
                    postfix["ex/s"] = f"{record['examples_per_s']:.1f}"
                if best is not None and best_metric:
                    postfix[f"best {best_metric}"] = f"{best[best_metric]:.4f}"
                bar.set_postfix(postfix, refresh=False)
                pending = []
                interval_start, interval_examples = time.perf_counter(), 0
            if is_eval:
                bar.set_description(f"{description} (validating)")
                result = evaluate_everywhere(evaluate, state.params)
                bar.set_description(description, refresh=False)
                improved = best_metric is not None and _better(result[best_metric], None if best is None
                                                               else best[best_metric], best_mode)
                entry = {"step": done, **result}
                evaluations.append(entry)
                log.write({"event": "eval", **entry, "best": improved})
                if improved:
                    best = entry
                    checkpoints.save_best(done, state.params, {"step": done, **result})
                    bar.set_postfix({**postfix, f"best {best_metric}": f"{best[best_metric]:.4f}"}, refresh=False)
            if is_ckpt:
                meta = {**identity, "step": done, "best": best, "evaluations": evaluations}
                checkpoints.save(done, state, meta, force=done == spec.steps)
            if is_eval or is_ckpt:
                interval_start, interval_examples = time.perf_counter(), 0
        bar.close()
        last_params = state.params
        final = last_params
        if best_metric is not None and checkpoints.best_step() is not None:
            final, _ = checkpoints.restore_best(abstract_like(last_params, shardings.params))
    finally:
        if bar is not None:
            bar.close()  # an error's line comes after the bar, not inside it
        log.close()
        checkpoints.close()
    return TrainResult(
        params=final, last_params=last_params, best=best, evaluations=evaluations, steps=spec.steps,
        train_seconds=train_seconds,
        examples_per_s=(timed_examples / train_seconds) if train_seconds > 0 else None,
        compile_seconds=compile_seconds,
        resumed_from=resumed_from,
    )


def barrier(name: str) -> None:
    """Wait until every process of a multi-process run reaches `name` (nothing in a one-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def evaluate_everywhere(evaluate: Callable[[Any], dict], params) -> dict[str, float]:
    """``evaluate(params)`` as floats, counts (integers: ``queries``) as integers. In a multi-process run every
    process evaluates host copies of the parameters (gathered once) and process 0's values are broadcast, so
    every process takes the same best-checkpoint decisions (they are collective saves)."""
    if jax.process_count() == 1:
        return _as_numbers(evaluate(params))
    from jax.experimental import multihost_utils

    result = _as_numbers(evaluate(fetch(params)))
    names = sorted(result)
    bits = np.asarray([result[n] for n in names], dtype=np.float64).view(np.uint32)  # exact, without x64
    values = np.asarray(multihost_utils.broadcast_one_to_all(bits), dtype=np.uint32).view(np.float64)
    return {name: type(result[name])(value) for name, value in zip(names, values)}


def _as_numbers(result: Mapping[str, Any]) -> dict[str, float | int]:
    """Python numbers: integers (a query count) stay integers, everything else becomes a float."""
    return {name: int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            else float(value) for name, value in result.items()}


def _abstract_key(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (treedef, tuple((leaf.shape, str(leaf.dtype)) for leaf in leaves))


def _shape_key(batch: Mapping[str, Any]) -> tuple:
    return tuple((name, tuple(batch[name].shape)) for name in sorted(batch))


def _describe_difference(saved, current) -> str:
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        return ", ".join(f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in keys[:4])
    return f"{saved!r} then, {current!r} now"
