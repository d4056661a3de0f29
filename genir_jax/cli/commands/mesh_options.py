"""``--mesh`` / ``--mesh-rules``, the multi-process flags (`genir_jax.scale.distributed`) and ``--dtype`` (where
asked) for every command that computes.

`add_mesh_arguments(parser)` adds the options and wraps the command's handler so it runs inside
``genir_jax.scale.partitioning.use(partitioner)``: library calls made without an explicit partitioner
(`load_pretrained`, `run_sweep`, `attribute`, `train_loop`) then place parameters, optimizer state, queries
and configs on that mesh as the rules say. Without ``--mesh`` nothing changes (data parallel over the
local devices, parameters replicated).
"""

from __future__ import annotations

from genir_jax.base.options import MAX_PROCESSES, NON_NEGATIVE, bounded_int
import argparse
import functools

MESH_HELP = ("device mesh, e.g. 'data=4,model=2' (axes: data = queries / batch, model = tensor parallel "
             "(mlp, heads, vocab), configs = the config axis of sweeps); an axis left out has size 1, except data, "
             "which takes the remaining devices. Default: every local device on data")
RULES_HELP = ("overrides of the logical-axis rules, e.g. 'vocab=none' (replicate the embedding when the mesh does "
              "not divide the vocabulary) or 'length=model'; see genir_jax.scale.partitioning.DEFAULT_RULES")


def add_mesh_arguments(parser: argparse.ArgumentParser, *, dtype: bool = False) -> None:
    """Add --mesh / --mesh-rules, --coordinator / --num-processes / --process-id / --distributed /
    --coordinator-timeout (and --dtype when `dtype`); call after ``set_defaults(handler=...)``."""
    group = parser.add_argument_group("devices")
    group.add_argument("--mesh", default=None, help=MESH_HELP)
    group.add_argument("--mesh-rules", default=None, help=RULES_HELP)
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="multi-process run: the coordinator (process 0's host and a free port); with "
                            "--num-processes and --process-id (or GENIR_JAX_COORDINATOR / _NUM_PROCESSES / "
                            "_PROCESS_ID). Every process runs the same command and computes the same results")
    group.add_argument("--num-processes", type=bounded_int(1, MAX_PROCESSES), default=None, help="multi-process run: how many processes")
    group.add_argument("--process-id", type=NON_NEGATIVE, default=None, help="multi-process run: this process (0..N-1)")
    group.add_argument("--distributed", choices=["auto"], default=None,
                       help="auto: join the processes of a Cloud TPU pod slice / SLURM / Open MPI job as JAX "
                            "detects them")
    group.add_argument("--coordinator-timeout", type=bounded_int(1, 86_400), default=300,
                       help="seconds to wait for the other processes (default 300, at most a day)")
    if dtype:
        group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                           help="parameter and compute dtype (logits, ranks and metrics stay float32)")
    handler = parser.get_default("handler")
    if handler is not None:
        parser.set_defaults(handler=functools.partial(_with_mesh, handler))


def partitioner_from_args(args: argparse.Namespace):
    """The `Partitioner` that --mesh / --mesh-rules ask for, or None (neither given)."""
    mesh, rules = getattr(args, "mesh", None), getattr(args, "mesh_rules", None)
    if not mesh and not rules:
        return None
    import jax

    from genir_jax.scale.partitioning import DEFAULT_RULES, Partitioner, merge_rules

    return Partitioner(mesh or {"data": jax.device_count()}, merge_rules(rules, DEFAULT_RULES))


def _with_mesh(handler, args: argparse.Namespace) -> int:
    from genir_jax.scale.distributed import initialize, settings_from
    from genir_jax.base.errors import GenIRError
    from genir_jax.scale.partitioning import use

    if getattr(args, "devices", None) is not None and (args.mesh or args.mesh_rules):
        raise GenIRError("--devices and --mesh: give one (--mesh data=N is --devices N)")
    initialize(settings_from(args.coordinator, args.num_processes, args.process_id, args.distributed == "auto"),
               args.coordinator_timeout)
    with use(partitioner_from_args(args)):
        return handler(args)
