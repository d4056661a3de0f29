"""The `genir-jax` command line.

Each subcommand lives in its own module under `genir_jax.cli.commands` and exposes ``add_parser(subparsers)``,
which registers its arguments and a ``handler(args) -> int``. Errors caused by bad input (`GenIRError`)
print one clear line and exit with code 2; nothing half-written is left behind. So does any `OSError`
(writing an output: permission denied, disk full, ...), naming the path. An output directory (`-o`) that is
a file, a link to one, or lies in a folder we cannot write is refused before the command computes anything
(`genir_jax.base.io.check_output_dir`). Ctrl-C (SIGINT) exits with code 130 and one line, no traceback: staged
outputs are removed, and a commit of finished files is completed first (`genir_jax.base.io.deferred_interrupt`).

Only the chosen subcommand's module is imported to parse a command line (the others are listed by their
one-line summary in `COMMANDS`), and handlers import JAX, Flax and transformers themselves, so
``genir-jax --help`` and argument errors answer without loading them. Every command runs with the
persistent XLA compilation cache (`genir_jax.scale.compile_cache`) unless ``--no-compile-cache`` is given or
``GENIR_JAX_CACHE=off``. As the console command computing on the CPU, glibc is first asked to keep freed
memory (`genir_jax.scale.host_memory`; ``GENIR_JAX_HOST_MEMORY=default`` opts out). As the console command, a
finished command that loaded JAX ends after the atexit handlers without the interpreter's slow tear-down
of JAX (`_leave_now`); `main(argv)` returns normally and changes neither.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Iterable

from genir_jax import __version__
from genir_jax.base.errors import GenIRError

# Subcommands in the order `--help` lists them, with the summary their own `add_parser` gives as `help`
# (tests/cli/test_startup.py checks that the two agree).
COMMANDS = {
    "reproduce": "prepare data, pretrain a base T5, train the DSI models, run every analysis, write report.md",
    "prepare-data": "write documents, train/val/test queries and qrels of a corpus in the reference JSON format",
    "pretrain": "pre-train a T5 from scratch with span corruption on a prepared corpus (a base for `train`)",
    "train": "fine-tune a base T5 into a DSI model (indexing + retrieval; atomic, naive or semantic docids)",
    "evaluate": "evaluate a DSI checkpoint: Hits@1/10, Recall@5, MRR@10, nDCG@10, run file, correct_valid.json",
    "bm25": "rank documents with BM25 and evaluate like `evaluate` (baseline for a DSI model)",
    "inspect": "describe a Hugging Face T5 checkpoint as genir-jax loads it",
    "patch-stages": "zero / mean / T5 patching of each component type in each decoder stage (paper Table 3)",
    "sweep": "exact activation patching of any sites, heads, neurons or positions (resumable, tidy CSV, heatmaps)",
    "attribute": "attribution patching (AtP, AtP*) or exact effects of any sites, heads or neurons on a logit metric",
    "swap-encoder": "run the full model's decoder on encoders of models trained without some documents (Table 2)",
    "circuit": "evaluate the model with only a minimal circuit of components left (Table 4)",
    "residual-rank": "residual contributions per decoder layer and logit-lens ranks (paper Fig. 3 and Fig. 4)",
    "neuron-reading": "what MLP neurons read from earlier components (paper Fig. 5, MLPs)",
    "crattn-reading": "what cross-attention heads read from earlier components (paper Fig. 5, cross-attention)",
    "crattn-writes": "share of docid tokens among the top tokens of cross-attention outputs (paper Table 5)",
    "crattn-head-tokens": "top word tokens of single cross-attention heads' outputs for given queries (paper Table 6)",
    "plan": "per-device memory, FLOPs and projected time of a run on a mesh, compiled ahead of time without weights",
}
COMMAND_MODULES = tuple(COMMANDS)


def command_module(name: str):
    """The module of subcommand `name` (e.g. ``patch-stages`` -> `genir_jax.cli.commands.patch_stages`)."""
    return importlib.import_module(f"genir_jax.cli.commands.{name.replace('-', '_')}")


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. `commands`: the subcommands registered in full (their modules imported); the
    others are listed with their summary only. None: all of them in full."""
    full = set(COMMANDS) if commands is None else set(commands)
    parser = argparse.ArgumentParser(
        prog="genir-jax",
        description="Mechanistic interpretability of generative retrieval (DSI-style T5) models in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"genir-jax {__version__}")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not use the persistent XLA compilation cache ($GENIR_JAX_CACHE, default "
                             "~/.cache/genir-jax/xla; GENIR_JAX_CACHE=off also disables it)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name, summary in COMMANDS.items():
        if name in full:
            command_module(name).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named on a command line (the first word that is not an option), if it is one."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv_given = argv is not None
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = _chosen_command(argv)
    parser = build_parser([chosen] if chosen else [])
    args = parser.parse_args(argv)
    if not argv_given:
        from genir_jax.scale.host_memory import computes_on_cpu, keep_freed_host_memory

        if computes_on_cpu():
            keep_freed_host_memory()  # before JAX starts: XLA:CPU's step buffers then stop page-faulting
    try:
        if not args.no_compile_cache:
            from genir_jax.scale.compile_cache import enable_compilation_cache

            enable_compilation_cache()
        output = getattr(args, "output", None)
        if isinstance(output, str) and "[checkpoint]" not in output:  # placeholders: checked once resolved
            from genir_jax.base.io import check_output_dir

            check_output_dir(output)  # a file, a link to one, a read-only folder: refused before any computation
        code = int(args.handler(args) or 0)
        if not argv_given and "jax" in sys.modules:
            _leave_now(code)  # the console command: skip the interpreter's slow tear-down of JAX
        return code
    except GenIRError as exc:
        print(f"genir-jax {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # writing outputs (disk full, permissions, a path that turned into a file, ...)
        where = exc.filename if exc.filename is not None else getattr(args, "output", None)
        reason = exc.strerror or str(exc)
        print(f"genir-jax {args.command}: error: {where}: {reason}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: outputs are staged and removed, or were committed whole (genir_jax.base.io)
        print(f"genir-jax {args.command}: interrupted", file=sys.stderr)
        if argv_given:
            return 130
        # as the console command: leave without interpreter finalisation, which can race JAX's threads
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def _leave_now(code: int) -> None:
    """End the process with `code` after the atexit handlers (JAX's own clean-up, logging) but without
    interpreter finalisation: tearing down JAX's modules and runtime objects takes 0.3-0.6 s and there is
    nothing of ours left to do (outputs are committed and closed, standard streams are flushed)."""
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
