"""Experiments as objects, and the reproduction report assembled from them.

Each table and figure of the paper (and each robustness check beyond it) is an `Experiment`, declared as
``EXPERIMENT`` in one module of the `experiments` package, which collects them (`experiments.registry`):

- its configuration (a frozen dataclass, `config`),
- its pipeline steps (`runs`: step name -> ``run(layout, settings, config)``): plain calls of the library
  analyses (`genir_jax.analysis.*`) that write ``OUT/analysis/<step>/``, with the stages and settings
  used, and return the details kept in ``.steps/<step>.json``,
- the steps whose outputs it reads besides its own (`reads`), and
- its rendering (`render(layout)`: a markdown section and PNG figures, beside the paper's numbers).

`genir_jax.paper.reproduce` runs the experiments' steps in registry order; `write_report` renders them into
``OUT/report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

from genir_jax.base.io import write_text


@dataclasses.dataclass
class Section:
    """Rendered markdown of one experiment (figures are written by the renderer and linked here)."""

    markdown: str
    figures: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One table or figure of the paper (or one check of its claims): configuration, runs, rendering."""

    id: str
    title: str
    paper_ref: str
    command: str           # the genir-jax subcommand(s) that produce the same outputs by hand
    paper: dict            # the paper's numbers (NQ10k, T5-large) for the side-by-side
    render: Callable[[Any], Section]
    position: float        # place in the report (the paper's order); steps run in this order too
    config: Any = None     # a frozen dataclass handed to every run
    runs: Mapping[str, Callable[[Any, Any, Any], dict | None]] = dataclasses.field(default_factory=dict)
    reads: tuple[str, ...] = ()    # steps of the pipeline (or of other experiments) whose outputs it reads
    after_removed_models: bool = False  # its runs need the models trained without some documents
    docids: tuple[str, ...] = ("atomic",)  # docid schemes it handles (`reproduce --docids`); others skip it

    def handles(self, scheme: str) -> bool:
        return scheme in self.docids

    @property
    def steps(self) -> tuple[str, ...]:
        """Every step whose outputs `render` reads: its own runs, then `reads`."""
        return tuple(self.runs) + tuple(name for name in self.reads if name not in self.runs)


def record_settings(directory: pathlib.Path, experiment_id: str, config: Any, **used: Any) -> dict:
    """Write ``experiment.json`` (the experiment, its configuration and what the run used, e.g. its stages
    and checkpoints) into an output directory, and return it for the step record."""
    from genir_jax.base.io import write_json

    record = {"experiment": experiment_id,
              "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
              **{key: str(value) if isinstance(value, pathlib.PurePath) else value for key, value in used.items()}}
    write_json(pathlib.Path(directory) / EXPERIMENT_JSON, record, indent=2)
    return record


EXPERIMENT_JSON = "experiment.json"


# --------------------------------------------------------------------------------------------------
# Formatting helpers shared by the experiment renderers
# --------------------------------------------------------------------------------------------------

def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    def cell(value):
        if isinstance(value, float):
            return f"{value:.2f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def read_json(path: pathlib.Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def stage_names(count: int) -> list[str]:
    """"I", "II", ... as the analyses' files name the stages."""
    from genir_jax.analysis.cross_attention_writes import roman

    return [roman(index) for index in range(1, count + 1)]


def describe_stages(stages: Sequence[Sequence[int]]) -> str:
    return ", ".join(f"{name} = layers {s[0]}-{s[-1]}" for name, s in zip(stage_names(len(stages)), stages))


def figure(layout, name: str):
    """A new matplotlib figure and the path it will be saved to (headless backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout.figures.mkdir(parents=True, exist_ok=True)
    return plt, layout.figures / f"{name}.png"


def shade_stages(axis, stages: Sequence[Sequence[int]]) -> None:
    """Grey bands and labels for the stages on a per-layer x axis."""
    for index, (name, layers) in enumerate(zip(stage_names(len(stages)), stages)):
        if index % 2 == 1:
            axis.axvspan(layers[0] - 0.5, layers[-1] + 0.5, color="0.92", zorder=0)
        axis.text((layers[0] + layers[-1]) / 2, 1.01, name, transform=axis.get_xaxis_transform(), ha="center",
                  va="bottom", fontsize=9)


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------

def _header(layout, settings) -> str:
    from genir_jax.paper.reproduce import step_record, steps

    lines = [f"# genir-jax reproduction: {settings.dataset}, preset {settings.preset}", ""]
    lines.append("Reusch & Belinkov, *Reverse-Engineering the Retrieval Process in GenIR Models* (SIGIR 2025), "
                 "re-run with genir-jax. The paper's numbers are for T5-large DSI models on NQ10k; ours come from "
                 "this run's models, so compare tendencies, not values.")
    lines.append("")
    if getattr(settings, "base", None):
        lines.append(f"Base T5: `{settings.base}` (`--base`): the DSI models are fine-tuned from it, and it is the T5 of "
                     "T5-mode patching (Table 3) and of the base-encoder swap (Table 2).")
    else:
        lines.append("Base T5: our own corpus-only span-corruption model (the `pretrain` step), not a pretrained T5. "
                     "The T5-mode rows of Table 3 and the base-encoder swap of Table 2 are therefore NOT comparable "
                     "with the paper's, which use the pretrained T5-large; run with `--base` for comparable rows.")
    lines.append("")
    regime = ("the paper's (`--paper-regime`: validation and test documents only indexed, the NQ10k split; "
              "indexing:retrieval examples 32:1; 32-token documents and queries)" if getattr(settings, "paper_regime", False)
              else f"the `{settings.preset}` preset's (see the presets table in docs/training-and-presets.md)")
    scheme = getattr(settings, "docids", "atomic")
    lines += [f"Data regime: {regime}. Docids: {scheme}"
              + (" (one new token per document, as the paper's)." if scheme == "atomic" else
                 " (token sequences decoded step by step; the paper's models use atomic docids)."), ""]
    if layout.correct_valid.is_file():
        from genir_jax.paper.reproduce import FEW_QUERIES

        correct = len(read_json(layout.correct_valid))
        if correct < FEW_QUERIES:
            lines += [f"**Warning: every analysis below rests on {correct} correct validation "
                      f"quer{'y' if correct == 1 else 'ies'} (fewer than {FEW_QUERIES}); read its percentages and "
                      "medians as anecdotes, not estimates.**", ""]
    rows, total = [], 0.0
    for step in steps(settings):
        state = step_record(layout, step.name)
        if step.name == "report":
            continue  # this file
        if state is None:
            rows.append((step.name, "not run", ""))
            continue
        total += float(state.get("seconds", 0.0))
        rows.append((step.name, state.get("skipped") or "done", f"{state.get('seconds', 0):.0f}"))
    lines += ["## Pipeline", "", md_table(["step", "state", "seconds"], rows), "",
              f"Total step time: {total / 60:.1f} min.", ""]
    return "\n".join(lines)


def _missing_steps(layout, experiment: Experiment) -> list[str]:
    from genir_jax.paper.reproduce import step_record

    problems = []
    for name in experiment.steps:
        state = step_record(layout, name)
        if state is None:
            problems.append(f"step `{name}` has not run")
        elif state.get("skipped"):
            problems.append(f"step `{name}` was skipped: {state['skipped']}")
    return problems


def write_report(layout, settings) -> pathlib.Path:
    """Render every experiment and write ``report.md`` (atomically)."""
    from experiments import registry

    parts = [_header(layout, settings)]
    for experiment in registry():
        parts.append(f"## {experiment.title} ({experiment.paper_ref})\n")
        parts.append(f"Produced by `{experiment.command}`.\n")
        scheme = getattr(settings, "docids", "atomic")
        if not experiment.handles(scheme):
            parts.append(f"Not run: this analysis handles {' and '.join(experiment.docids)} docids; this reproduction "
                         f"trains {scheme} docids.\n")
            continue
        problems = _missing_steps(layout, experiment)
        if problems:
            parts.append("Not available: " + "; ".join(problems) + ".\n")
            continue
        section = experiment.render(layout)
        parts.append(section.markdown.rstrip() + "\n")
        for path in section.figures:
            relative = os.path.relpath(path, layout.root)
            parts.append(f"![{experiment.title}]({relative})\n")
    write_text(layout.report, "\n".join(parts))
    return layout.report
