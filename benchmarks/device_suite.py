"""The accelerator suite: the neuron sweep, attribution, training and `plan` against measurement, on the
devices at hand (GPU, TPU or CPU), in one run that writes one JSON.

Parts (each timed, compile included and excluded; memory from the device's allocator counters, on a CPU the
process's peak resident memory):

1. exact zero-ablation sweep of decoder MLP neurons (`--sweep-layers` decoder layers x d_ff neurons, or every
   `--neuron-stride`-th neuron of every decoder layer) over `--queries` queries whose targets are the clean top
   token: config-queries/s end to end and steady, peak device memory, and the projection to every decoder
   neuron of the shape;
2. AtP* over the same neurons (seconds and its share of the exact sweep), and over every decoder neuron
   (cold and warm) against the exact sweep's projection to every neuron: the share a user who ranks every
   neuron by AtP* instead of patching each pays;
3. training: `--train-steps` Adafactor steps of `make_train_step` on a `--train-batch` batch (32-token
   queries, one docid target): examples/s (`--train-steps 0` skips it and its plan);
4. `plan` against measurement: `genir_jax.plan.planning.make_plan` for the sweep and training steps above on
   the same mesh, its predicted per-device bytes and FLOPs beside the measured peak memory and step time.

    python benchmarks/device_suite.py --out suite.json                   # T5-large shape (the accelerator run)
    python benchmarks/device_suite.py --size small --out /tmp/suite.json  # seconds on a CPU (the test's setting)
    python benchmarks/device_suite.py --queries 32 --neuron-stride 64 --train-steps 0 --out cpu.json  # T5-large, CPU

The moonshot it measures toward: every T5-large decoder neuron (98,304) exactly over 1,000 queries in under
10 minutes on one H100 (`sweep.projected_all_neurons_s` with `--queries 1000`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time

import jax
import numpy as np

import genir_jax as gj
from genir_jax.interp.attribution import attribute
from genir_jax.interp.patching import run_sweep
from genir_jax.interp.sweep import site_grid
from genir_jax.plan.planning import Workload, make_plan, resolve_shape
from genir_jax.training.loop import create_state, data_mesh, make_train_step, put_batch, put_state
from genir_jax.training.optim import OptimizerSpec, make_optimizer

SIZES = {
    # name: (shape for resolve_shape, default queries, default sweep layers, train batch, train steps)
    "small": ("small", 16, 2, 8, 3),
    "t5-large": ("t5-large", 1000, 2, 64, 20),
}
QUERY_LENGTH = 32


def small_config() -> gj.T5Config:
    """A 2+2-layer T5 v1.0 that compiles and runs in seconds on a CPU."""
    return gj.t5_v1_0(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0)


def device_peak_bytes() -> int:
    """Peak bytes in use on the first device since start, from the device's allocator; on a CPU (no allocator
    counters) the process's peak resident memory, which includes the host's own use."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn):
    started = time.perf_counter()
    out = fn()
    jax.block_until_ready(out) if not isinstance(out, (np.ndarray, type(None), dict)) else None
    return out, time.perf_counter() - started


def make_queries(config, params, count: int, seed: int = 0):
    """`count` random queries of 8..QUERY_LENGTH tokens, targets the clean top token (rank 0, as correct queries)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, QUERY_LENGTH + 1, size=count)
    ids = np.zeros((count, QUERY_LENGTH), np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(3, config.vocab_size - 1, size=length)
        ids[row, length - 1] = 1
        mask[row, :length] = 1
    logits = np.asarray(gj.forward(config, params, ids, mask, np.zeros((count, 1), np.int32)))[:, 0]
    return ids, mask, logits.argmax(-1).astype(np.int32)


def sampled_neurons(config, layers: int, stride: int):
    """The swept neurons: every `stride`-th neuron of every decoder layer when `stride` > 0, else every neuron
    of the last `layers` decoder layers; returns the grid and the layers it covers."""
    grid = site_grid(config, "decoder.*.mlp.hook_post", unit="neuron")
    if stride > 0:
        return grid.take(np.flatnonzero(grid.labels["neuron"] % stride == 0)), range(config.num_decoder_layers)
    chosen = range(config.num_decoder_layers - layers, config.num_decoder_layers)
    return grid.take(np.flatnonzero(np.isin(grid.labels["layer"], list(chosen)))), chosen


def sweep_part(config, params, ids, mask, targets, layers: int, query_chunk: int, stride: int = 0) -> dict:
    """Part 1: the exact neuron sweep of the sampled neurons (`sampled_neurons`), cold then warm."""
    grid, chosen = sampled_neurons(config, layers, stride)
    kwargs = dict(metrics=("rank", "logit"), per_query=False, query_chunk=query_chunk, progress=False)
    cold, cold_s = timed(lambda: run_sweep(config, params, ids, mask, targets, grid, **kwargs))
    _, warm_s = timed(lambda: run_sweep(config, params, ids, mask, targets, grid, **kwargs))
    config_queries = grid.size * len(ids)
    all_neurons = config.num_decoder_layers * config.d_ff
    # the last layers are the cheapest with prefix sharing: project with the mean decoder depth a config
    # needs (layers l..L-1 for a neuron of layer l), relative to the sampled layers' mean
    sampled_depth = np.mean([config.num_decoder_layers - l for l in chosen])
    all_depth = np.mean([config.num_decoder_layers - l for l in range(config.num_decoder_layers)])
    return {"configs": grid.size, "queries": len(ids), "layers": list(chosen), "neuron_stride": stride,
            "cold_s": cold_s, "warm_s": warm_s,
            "compile_s": max(0.0, cold_s - warm_s), "steady_cq_per_s": config_queries / warm_s,
            "end_to_end_cq_per_s": config_queries / cold_s,
            "projected_all_neurons_s": warm_s * (all_neurons / grid.size) * (all_depth / sampled_depth),
            "all_neurons": all_neurons, "clean_rank0_fraction": float(np.mean(cold.clean["rank"] == 0)),
            "peak_device_bytes": device_peak_bytes(), "stats": {k: v for k, v in cold.stats.items()
                                                                 if isinstance(v, (int, float, str))}}


def attribution_part(config, params, ids, mask, targets, layers: int, query_chunk: int, sweep: dict,
                     stride: int = 0) -> dict:
    """Part 2: AtP* over the swept neurons, then over every decoder neuron, each cold then warm. The all-neuron
    shares compare with the exact sweep projected to every neuron: cold with the sweep's compile added, warm
    with its steady projection."""
    sampled, _ = sampled_neurons(config, layers, stride)
    every = site_grid(config, "decoder.*.mlp.hook_post", unit="neuron")

    def timed_atp(grid):
        run = lambda: attribute(config, params, ids, mask, targets, grid, method="atp*", metric="logit",  # noqa: E731
                                query_chunk=query_chunk, progress=False).scores
        _, cold_s = timed(run)
        _, warm_s = timed(run)
        return cold_s, warm_s

    cold_s, warm_s = timed_atp(sampled)
    all_cold_s, all_warm_s = timed_atp(every)
    exact_all_cold_s = sweep["projected_all_neurons_s"] + sweep["compile_s"]
    return {"configs": sampled.size, "cold_s": cold_s, "warm_s": warm_s, "share_of_exact_warm": warm_s / sweep["warm_s"],
            "all_neurons": every.size, "all_cold_s": all_cold_s, "all_warm_s": all_warm_s,
            "exact_all_neurons_projected_cold_s": exact_all_cold_s,
            "all_share_of_exact_cold": all_cold_s / exact_all_cold_s,
            "all_share_of_exact_warm": all_warm_s / sweep["projected_all_neurons_s"],
            "peak_device_bytes": device_peak_bytes()}


def training_part(config, batch_size: int, steps: int) -> dict:
    """Part 3: Adafactor training steps on one device (`make_train_step`, what `genir-jax train` runs)."""
    mesh = data_mesh(jax.devices()[:1])
    optimizer, schedule = make_optimizer(OptimizerSpec("adafactor"), steps + 1)
    step_fn = make_train_step(config, optimizer, mesh, schedule=schedule, dropout=True)
    state = put_state(create_state(gj.init_params(config, 0), optimizer, 0), mesh)
    rng = np.random.default_rng(0)
    batch = put_batch({"input_ids": rng.integers(3, config.vocab_size, (batch_size, QUERY_LENGTH)).astype(np.int32),
                       "attention_mask": np.ones((batch_size, QUERY_LENGTH), np.int32),
                       "targets": rng.integers(3, config.vocab_size, (batch_size, 1)).astype(np.int32),
                       "target_mask": np.ones((batch_size, 1), np.int32)}, mesh)
    started = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    steady_s = (time.perf_counter() - started) / steps
    return {"batch": batch_size, "steps": steps, "first_step_s": first_s, "step_s": steady_s,
            "examples_per_s": batch_size / steady_s, "loss": float(metrics["loss"]),
            "peak_device_bytes": device_peak_bytes()}


def plan_part(shape: str, queries: int, query_chunk: int, train_batch: int, measured: dict) -> dict:
    """Part 4: `plan`'s predictions for the sweep step and the training step, beside the measurements."""
    out = {}
    devices = jax.devices()[:1]
    for task, work in (("sweep", Workload(task="sweep", batch=query_chunk, query_length=QUERY_LENGTH,
                                          total_queries=queries)),
                       ("train", Workload(task="train", batch=train_batch, query_length=QUERY_LENGTH))):
        if task not in measured:
            continue
        plan = make_plan(shape, "data=1", work, devices)
        out[task] = {"predicted_device_bytes": plan.argument_bytes + plan.output_bytes + plan.temp_bytes
                     - plan.alias_bytes, "predicted_flops_per_step": plan.flops, "steps": plan.steps,
                     "compile_s": plan.compile_seconds, "measured_peak_bytes": measured[task]}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="t5-large")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--queries", type=int, default=None, help="sweep queries (default: the size's)")
    parser.add_argument("--sweep-layers", type=int, default=None, help="decoder layers swept (default: the size's)")
    parser.add_argument("--neuron-stride", type=int, default=0,
                        help="sweep every K-th neuron of every decoder layer instead of the last --sweep-layers layers")
    parser.add_argument("--query-chunk", type=int, default=64)
    parser.add_argument("--train-batch", type=int, default=None)
    parser.add_argument("--train-steps", type=int, default=None, help="0 skips the training part and its plan")
    args = parser.parse_args(argv)
    shape, queries, layers, train_batch, train_steps = SIZES[args.size]
    queries, layers = args.queries or queries, args.sweep_layers or layers
    train_batch = args.train_batch or train_batch
    train_steps = train_steps if args.train_steps is None else args.train_steps
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if shape == "small":
            shape = os.path.join(tmp, "config.json")
            small_config().to_json_file(shape)
        _, config = resolve_shape(shape)
        config = config.replace(dropout_rate=0.0)
        query_chunk = min(args.query_chunk, queries)
        out = {"size": args.size, "devices": [str(d) for d in jax.devices()], "platform": jax.default_backend(),
               "jax": jax.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
               "config": {k: getattr(config, k) for k in ("d_model", "d_ff", "num_layers", "num_decoder_layers",
                                                          "num_heads", "vocab_size")}}
        params = gj.init_params(config, 0)
        ids, mask, targets = make_queries(config, params, queries)
        swept = (f"every {args.neuron_stride}th neuron of {config.num_decoder_layers} layers" if args.neuron_stride
                 else f"{layers} layers x {config.d_ff} neurons")
        print(f"[suite] {args.size} on {out['devices']}: sweep {swept} x {queries} queries", file=sys.stderr, flush=True)
        out["sweep"] = sweep_part(config, params, ids, mask, targets, layers, query_chunk, args.neuron_stride)
        print(f"[suite] sweep: {json.dumps({k: v for k, v in out['sweep'].items() if k != 'stats'})}", file=sys.stderr,
              flush=True)
        out["attribution"] = attribution_part(config, params, ids, mask, targets, layers, query_chunk, out["sweep"],
                                              args.neuron_stride)
        print(f"[suite] attribution: {json.dumps(out['attribution'])}", file=sys.stderr, flush=True)
        del params
        measured = {"sweep": out["sweep"]["peak_device_bytes"]}
        if train_steps > 0:
            out["training"] = training_part(config.replace(dropout_rate=0.1), train_batch, train_steps)
            measured["train"] = out["training"]["peak_device_bytes"]
        out["plan"] = plan_part(shape, queries, query_chunk, train_batch, measured)
    out["total_s"] = time.perf_counter() - began
    with open(args.out, "w") as handle:
        json.dump(out, handle, indent=2, default=lambda x: x.item() if hasattr(x, "item") else str(x))
    print(f"[suite] wrote {args.out} in {out['total_s']:.0f} s", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
