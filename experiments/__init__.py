"""Runnable entry points, one per table / figure: ``python -m experiments.table3_stage_patching --run DIR``
runs that one experiment again on a `genir-jax reproduce` output folder DIR, through the library.

The experiments themselves (configuration, steps, paper numbers, rendering) and their registry live in
`genir_jax.paper.experiments`; these modules only name which one to run.
"""

from __future__ import annotations

import argparse
import importlib
import sys


def main(module: str, argv: list[str] | None = None) -> int:
    """Run the experiment of `genir_jax.paper.experiments.<module>` on ``--run DIR``; 2 on a refused input."""
    parser = argparse.ArgumentParser(prog=f"python -m experiments.{module}",
                                     description=f"Run the {module} experiment on a genir-jax reproduce output "
                                                 "folder (its settings, models and earlier steps).")
    parser.add_argument("--run", required=True, metavar="DIR", help="output folder of genir-jax reproduce")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    from genir_jax.base.errors import GenIRError
    from genir_jax.paper.reproduce import run_experiment

    experiment = importlib.import_module(f"genir_jax.paper.experiments.{module}").EXPERIMENT
    try:
        run_experiment(args.run, experiment.id, progress=not args.no_progress)
    except GenIRError as error:
        print(f"python -m experiments.{module}: error: {error}", file=sys.stderr)
        return 2
    return 0
