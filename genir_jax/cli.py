"""The `genir-jax` command line.

Each subcommand lives in its own module under `genir_jax.commands` and exposes ``add_parser(subparsers)``,
which registers its arguments and a ``handler(args) -> int``. Errors caused by bad input (`GenIRError`)
print one clear line and exit with code 2; nothing half-written is left behind.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from genir_jax import __version__
from genir_jax.errors import GenIRError

# Subcommand modules, in the order `--help` lists them.
COMMAND_MODULES = (
    "reproduce",
    "prepare-data", "pretrain", "train", "evaluate", "bm25", "inspect",
    "patch-stages", "swap-encoder", "circuit", "residual-rank", "neuron-reading", "crattn-reading",
    "crattn-writes", "crattn-head-tokens",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genir-jax",
        description="Mechanistic interpretability of generative retrieval (DSI-style T5) models in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"genir-jax {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"genir_jax.commands.{name.replace('-', '_')}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except GenIRError as exc:
        print(f"genir-jax {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
