"""`python -m experiments NAME --run DIR`: one experiment of `genir_jax.paper.experiments` on a reproduce folder."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the experiment NAME (its id or its module name) on ``--run DIR``; 2 on a refused input."""
    import importlib
    import pkgutil

    from genir_jax.base.errors import GenIRError
    from genir_jax.paper import experiments as package
    from genir_jax.paper.reproduce import run_experiment

    experiments = {experiment.id: experiment for experiment in package.registry()}
    modules = {info.name: importlib.import_module(f"{package.__name__}.{info.name}").EXPERIMENT
               for info in pkgutil.iter_modules(package.__path__) if not info.name.startswith("_")}
    parser = argparse.ArgumentParser(prog="python -m experiments",
                                     description="Run one experiment on a genir-jax reproduce output folder (its "
                                                 "settings, models and earlier steps).")
    parser.add_argument("name", nargs="?", help="experiment id or module name (--list shows them)")
    parser.add_argument("--run", metavar="DIR", help="output folder of genir-jax reproduce")
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.list:
        for experiment in experiments.values():
            print(f"{experiment.id:<28} {experiment.title}")
        return 0
    if not args.name or not args.run:
        parser.error("give an experiment NAME and --run DIR (or --list)")
    experiment = experiments.get(args.name) or modules.get(args.name)
    if experiment is None:
        parser.error(f"unknown experiment {args.name!r}; --list shows them")
    try:
        run_experiment(args.run, experiment.id, progress=not args.no_progress)
    except GenIRError as error:
        print(f"python -m experiments: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
