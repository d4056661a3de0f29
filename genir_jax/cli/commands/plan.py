"""`genir-jax plan`: per-device memory, FLOPs and projected step time of a run, compiled on simulated devices.

The program is the one the run compiles (model forward, sweep chunk, attribution gradient, training step),
lowered with abstract arrays (no weights are made) on a mesh of simulated CPU devices and compiled ahead
of time; see `genir_jax.plan.planning`. When this process has fewer CPU devices than the mesh needs and JAX is
already initialised, the command runs itself again in a fresh process with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``.
"""

from __future__ import annotations

from genir_jax.base.options import MAX_CONFIGS, POSITIVE, ROWS, TOKENS, bounded_int
from genir_jax.core.config import MAX_SIZES
import argparse
import os
import re
import subprocess
import sys

_CHILD_ENV = "GENIR_JAX_PLAN_CHILD"


ORDER = 180  # where `genir-jax --help` lists it
SUMMARY = "per-device memory, FLOPs and projected time of a run on a mesh, compiled ahead of time without weights"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help=SUMMARY,
        description="Compile a run's step (forward, sweep, attribute or train) for a model shape on a device mesh "
                    "with abstract arrays (no weights, simulated CPU devices) and print, per device, parameter / "
                    "activation / temporary memory from the compiled program's memory analysis, FLOPs per step "
                    "from its cost analysis, and a projected step time (roofline: FLOPs / peak bf16 FLOP/s, bytes "
                    "/ HBM bandwidth) and a fits / does-not-fit verdict on TPU v4, v5e, v5p, A100 80GB, H100 and "
                    "H200. Example: genir-jax plan --shape t5-xxl --mesh data=2,model=8 --task train --batch 64",
    )
    parser.add_argument("--shape", required=True,
                        help="t5-large, t5-xl, t5-xxl (the Hugging Face configs; xl/xxl are T5 v1.1), or a "
                             "config.json / checkpoint directory")
    parser.add_argument("--mesh", default=None,
                        help="mesh, e.g. 'data=4,model=2' (axes data, configs, model; data takes the devices "
                             "the others leave over when --devices is given). Default: as every other command, "
                             "all devices on data (--devices of them, else this process's local devices)")
    parser.add_argument("--mesh-rules", default=None,
                        help="overrides of the logical-axis rules, e.g. 'vocab=none' (genir_jax.scale.partitioning)")
    parser.add_argument("--devices", type=POSITIVE, default=None,
                        help="number of devices (default: the mesh's size); the mesh must divide it")
    parser.add_argument("--task", default="forward", choices=["forward", "sweep", "attribute", "train"],
                        help="what to compile: forward (logits), sweep (one config chunk of a patching sweep), "
                             "attribute (AtP gradients), train (one DSI update with Adafactor). Default: forward")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="parameters and compute (train: float32 master weights, bfloat16 compute)")
    parser.add_argument("--batch", type=ROWS, default=64,
                        help="queries (forward / sweep / attribute) or training examples per step, over the "
                             "whole mesh (default 64)")
    parser.add_argument("--query-length", type=TOKENS, default=32, help="encoder tokens per query / example (32)")
    parser.add_argument("--target-length", type=TOKENS, default=1, help="decoder tokens (1: atomic docids)")
    parser.add_argument("--configs", type=ROWS, default=64, help="sweep: configs per step (default 64)")
    parser.add_argument("--total-configs", type=bounded_int(1, MAX_CONFIGS), default=None,
                        help="sweep: configs of the whole sweep (default: the size of the --sites grid)")
    parser.add_argument("--total-queries", type=POSITIVE, default=None,
                        help="queries of the whole job, for the projected total time (default: one step's)")
    parser.add_argument("--sites", default="decoder.*.mlp.hook_post",
                        help="sweep / attribute: the site grid (default: every decoder MLP activation)")
    parser.add_argument("--unit", default="neuron", choices=["neuron", "head", "position", "none"],
                        help="sweep / attribute: one config per site x this unit (default neuron; none: whole sites)")
    parser.add_argument("--docids", type=bounded_int(0, MAX_SIZES["vocab_size"]), default=0,
                        help="extra vocabulary rows, one per document (atomic docid tokens); default 0")
    parser.add_argument("--accelerators", default=None,
                        help="comma-separated subset of tpu-v4, tpu-v5e, tpu-v5p, a100-80gb, h100, h200 (default all)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan as JSON to PATH")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from genir_jax.base.errors import ConfigError
    from genir_jax.plan.planning import (
        ACCELERATORS,
        Workload,
        format_plan,
        make_plan,
        required_devices,
        resolve_shape,
    )

    resolve_shape(args.shape)  # bad shapes fail before any device work
    accelerators = None
    if args.accelerators:
        accelerators = [a.strip() for a in args.accelerators.split(",") if a.strip()]
        unknown = [a for a in accelerators if a not in ACCELERATORS]
        if unknown:
            raise ConfigError(f"--accelerators: unknown {unknown[0]!r}; expected some of {', '.join(ACCELERATORS)}")
    if args.mesh is None:
        args.mesh = f"data={args.devices if args.devices is not None else _local_device_count()}"
    needed = required_devices(args.mesh, args.devices)
    work = Workload(task=args.task, batch=args.batch, query_length=args.query_length,
                    target_length=args.target_length, configs=args.configs, total_configs=args.total_configs,
                    total_queries=args.total_queries, sites=args.sites, unit=None if args.unit == "none" else args.unit,
                    dtype=args.dtype, docids=args.docids)
    work.validate()
    devices = _cpu_devices(needed)
    if devices is None:
        return _rerun(args, needed)
    plan = make_plan(args.shape, args.mesh, work, devices[:needed], rules=args.mesh_rules)
    print(format_plan(plan, accelerators))
    if args.json:
        from genir_jax.base.io import write_json

        write_json(args.json, plan.to_dict(), indent=2)
    return 0


def _local_device_count() -> int:
    import jax

    return jax.local_device_count()


def _cpu_devices(needed: int):
    """`needed` CPU devices of this process (asking XLA for them if JAX has not started yet), or None."""
    from genir_jax.scale.host_memory import jax_backend_started

    if not jax_backend_started():
        os.environ["XLA_FLAGS"] = _with_device_count(os.environ.get("XLA_FLAGS", ""), needed)
    import jax

    devices = jax.devices("cpu")
    return devices if len(devices) >= needed else None


def _with_device_count(flags: str, count: int) -> str:
    """XLA_FLAGS with at least `count` simulated host devices."""
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if match:
        if int(match.group(1)) >= count:
            return flags
        return flags.replace(match.group(0), f"--xla_force_host_platform_device_count={count}")
    return f"{flags} --xla_force_host_platform_device_count={count}".strip()


def _rerun(args: argparse.Namespace, needed: int) -> int:
    """Run the same plan in a fresh process that has `needed` simulated CPU devices."""
    from genir_jax.base.errors import ConfigError

    if os.environ.get(_CHILD_ENV):
        raise ConfigError(f"could not get {needed} simulated CPU devices (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})")
    argv = [sys.executable, "-m", "genir_jax.cli.main"]
    if args.no_compile_cache:
        argv.append("--no-compile-cache")
    argv += ["plan", "--shape", args.shape, "--mesh", args.mesh, "--task", args.task, "--dtype", args.dtype,
             "--batch", str(args.batch), "--query-length", str(args.query_length), "--target-length",
             str(args.target_length), "--configs", str(args.configs), "--sites", args.sites, "--unit", args.unit,
             "--docids", str(args.docids), "--devices", str(needed)]
    for option, value in (("--mesh-rules", args.mesh_rules), ("--total-configs", args.total_configs),
                          ("--total-queries", args.total_queries), ("--accelerators", args.accelerators),
                          ("--json", args.json)):
        if value is not None:
            argv += [option, str(value)]
    env = {**os.environ, _CHILD_ENV: "1", "XLA_FLAGS": _with_device_count(os.environ.get("XLA_FLAGS", ""), needed)}
    sys.stdout.flush()
    return subprocess.run(argv, env=env, check=False).returncode
