"""The experiments of `genir-jax reproduce`, one module per table / figure, found by discovery.

Every module of this package whose name does not start with ``_`` defines ``EXPERIMENT`` (a
`genir_jax.paper.panels.Experiment`): its configuration, the pipeline steps it runs (library calls), the steps it
reads, the paper's numbers and how its section of ``report.md`` is rendered. `registry` imports them all and
orders them by ``EXPERIMENT.position`` (the paper's order), so a new analysis needs its analysis module and
its experiment module here (and, to run it alone, an entry point in the top-level `experiments`),
nothing else.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil


@functools.lru_cache(maxsize=None)
def registry() -> tuple:
    """Every experiment of this package, in report (and pipeline) order; refuses two experiments with the
    same id or the same step name, or a module without ``EXPERIMENT``."""
    from genir_jax.base.errors import GenIRError
    from genir_jax.paper.panels import Experiment

    found = []
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        experiment = getattr(module, "EXPERIMENT", None)
        if not isinstance(experiment, Experiment):
            raise GenIRError(f"{module.__file__}: an experiment module must define EXPERIMENT (a "
                             "genir_jax.paper.panels.Experiment)")
        found.append(experiment)
    found.sort(key=lambda experiment: (experiment.position, experiment.id))
    ids, steps = set(), set()
    for experiment in found:
        if experiment.id in ids:
            raise GenIRError(f"two experiments have the id {experiment.id!r}")
        ids.add(experiment.id)
        for step in experiment.runs:
            if step in steps:
                raise GenIRError(f"experiment {experiment.id!r}: step {step!r} is already run by another experiment")
            steps.add(step)
    return tuple(found)
