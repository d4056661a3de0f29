"""What the experiments are made of: `Experiment` and `Section`, and the helpers their runs and panels share
(recorded settings, markdown tables, figures, stage names, the reproduction's step records and base T5).

Each table and figure of the paper (and each robustness check beyond it) is an `Experiment`, declared as
``EXPERIMENT`` in one module of `genir_jax.paper.experiments`, which collects them (its `registry`):

- its configuration (a frozen dataclass, `config`),
- its pipeline steps (`runs`: step name -> ``run(layout, settings, config)``): plain calls of the library
  analyses (`genir_jax.analysis.*`) that write ``OUT/analysis/<step>/``, with the stages and settings
  used, and return the details kept in ``.steps/<step>.json``,
- the steps whose outputs it reads besides its own (`reads`), and
- its rendering (`render(layout)`: a markdown section and PNG figures, beside the paper's numbers).

`genir_jax.paper.reproduce` runs the experiments' steps in registry order; `genir_jax.paper.report.write_report`
renders them into ``OUT/report.md``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping, Sequence

from genir_jax.base.options import MODEL_TYPES


REPORT_STAGES_STEP = "patch-stages"  # the run whose stages (Table 3's) every panel of a report shares
ENCODER_DECODER, DECODER = MODEL_TYPES  # model families: T5, decoder-only (`reproduce --model-type`)
BOTH_FAMILIES = MODEL_TYPES


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
    opt_in: str | None = None  # a reproduce setting (e.g. "attribution_agreement") without which it does not run
    # model families it handles (`reproduce --model-type`: encoder-decoder, decoder); others skip it
    families: tuple[str, ...] = (ENCODER_DECODER,)
    # why a family it does not handle cannot run it: keys of `genir_jax.analysis.applicability`'s tables
    # (NOT_APPLICABLE_TO_DECODER_ONLY, NOT_YET_ON_DECODER_ONLY), the one source of those reasons
    not_applicable: tuple[str, ...] = ()
    # `command` as it reads for a family whose run differs (e.g. Table 3 without T5 mode on decoder-only models)
    family_commands: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def command_for(self, model_type: str) -> str:
        """The subcommand(s) that produce this experiment's outputs for a `model_type` run."""
        return self.family_commands.get(model_type, self.command)

    def handles(self, scheme: str) -> bool:
        return scheme in self.docids

    def handles_family(self, model_type: str) -> bool:
        return model_type in self.families

    def chosen(self, settings) -> bool:
        """Whether the pipeline under `settings` runs it: it handles the docid scheme and the model family and,
        if opt-in, was asked."""
        return (self.handles(getattr(settings, "docids", "atomic"))
                and self.handles_family(getattr(settings, "model_type", ENCODER_DECODER))
                and (self.opt_in is None or bool(getattr(settings, self.opt_in, False))))

    def family_reasons(self) -> list[tuple[str, str]]:
        """(analysis, reason) for each entry of `not_applicable`: why a decoder-only model cannot run it, from
        `genir_jax.analysis.applicability` (its wording: "not applicable" or "not on decoder-only models yet")."""
        from genir_jax.analysis.applicability import NOT_APPLICABLE_TO_DECODER_ONLY, NOT_YET_ON_DECODER_ONLY

        return [(name, NOT_APPLICABLE_TO_DECODER_ONLY[name] if name in NOT_APPLICABLE_TO_DECODER_ONLY else
                 "not on decoder-only models yet: " + NOT_YET_ON_DECODER_ONLY[name]) for name in self.not_applicable]

    @property
    def opt_in_flag(self) -> str:
        """The `genir-jax reproduce` flag of an opt-in experiment."""
        return "--" + str(self.opt_in).replace("_", "-")

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


def figure(layout, name: str):
    """pyplot (headless, `genir_jax.base.figures`) and the path figure `name` will be saved to (`save_figure`)."""
    from genir_jax.base.figures import pyplot

    layout.figures.mkdir(parents=True, exist_ok=True)
    return pyplot(), layout.figures / f"{name}.png"


def save_figure(fig, path) -> None:
    """Write a report figure (legends outside the axes included) and close it."""
    from genir_jax.base.figures import pyplot

    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)


def layer_span(layers: Sequence[int]) -> str:
    """A stage's layers in a label: '7-17', or '4' for a stage of one layer."""
    return f"{layers[0]}" if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def shade_stages(axis, stages: Sequence[Sequence[int]]) -> None:
    """A per-layer x axis: integer layer ticks, every stage a shaded band (alternating greys) labelled above the
    axes with its name and layers, e.g. 'I (0-6)'."""
    from genir_jax.analysis.stages import stage_names
    from genir_jax.base.figures import STAGE_SHADES, integer_ticks

    integer_ticks(axis, "x")
    for index, (name, layers) in enumerate(zip(stage_names(len(stages)), stages)):
        axis.axvspan(layers[0] - 0.5, layers[-1] + 0.5, color=STAGE_SHADES[index % 2], zorder=0, linewidth=0)
        axis.text((layers[0] + layers[-1]) / 2, 1.01, f"{name} ({layer_span(layers)})",
                  transform=axis.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    axis.set_xlim(stages[0][0] - 0.5, stages[-1][-1] + 0.5)


FEW_QUERIES = 30  # below this many correct validation queries the report warns that statistics are anecdotal


def step_record(layout, name: str) -> dict | None:
    """A finished step's record (``.steps/<step>.json``), or None."""
    path = layout.steps / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def base_model(layout, settings) -> pathlib.Path:
    """The base T5 every step fine-tunes from and compares with: `--base`, else the pretrain step's."""
    return pathlib.Path(settings.base) if settings.base else layout.base
