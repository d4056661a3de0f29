"""The reproduction report, assembled from the experiments (`genir_jax.paper.experiments`): a header with
the run's settings and pipeline state, then each experiment's section (`genir_jax.paper.panels.Experiment`).
"""

from __future__ import annotations

import os
import pathlib

from genir_jax.analysis.evidence import BESIDE_NOTE, RESAMPLES, SEED
from genir_jax.base.io import write_text
from genir_jax.paper.panels import *  # noqa: F401,F403 (the panels' helpers, also importable from here)
from genir_jax.paper.panels import DECODER, ENCODER_DECODER, FEW_QUERIES, Experiment, md_table, read_json, step_record


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------

INTERVALS_HEADER = ("Intervals: every share, mean and rank statistic over queries below is given as `estimate [low, "
                    "high] (n=queries)`, a 95% percentile bootstrap interval over the queries ({resamples:,} "
                    "resamples, seed {seed}; `genir_jax.analysis.evidence`); counts and settings have none. "
                    + BESIDE_NOTE)

def _header(layout, settings, pipeline=()) -> str:
    decoder = getattr(settings, "model_type", ENCODER_DECODER) == DECODER
    family = ", decoder-only models" if decoder else ""
    lines = [f"# genir-jax reproduction: {settings.dataset}, preset {settings.preset}{family}", ""]
    lines.append("Reusch & Belinkov, *Reverse-Engineering the Retrieval Process in GenIR Models* (SIGIR 2025), "
                 "re-run with genir-jax. The paper's numbers are for T5-large DSI models on NQ10k; ours come from "
                 "this run's models, so compare tendencies, not values.")
    lines.append("")
    if getattr(settings, "seeds", 1) > 1:
        lines += [f"Training seed {settings.seed}, one of {settings.seeds} (`--seeds`): this folder holds this seed's "
                  "models and analyses; the run's `report.md` gives every statistic per seed and pooled.", ""]
    if decoder:
        lines.append("Models: decoder-only (`--model-type decoder`): Llama-style DSI models on the T5 vocabulary that "
                     "read the query and predict the docid after the prompt ' Document:' in one causal stack. "
                     "Only the experiments that apply to this family ran: see \"Not applicable to decoder-only "
                     "models\" below for the others and why.")
        lines.append("")
        lines.append(f"Base model: `{settings.base}` (`--base`), fine-tuned into the DSI models." if settings.base else
                     "Base model: our own corpus-only decoder-only model, pre-trained as a causal language model (the "
                     "`pretrain` step).")
    elif getattr(settings, "base", None):
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
    lines += [_stages_note(layout, settings), ""]
    lines += [INTERVALS_HEADER.format(resamples=RESAMPLES, seed=SEED), ""]
    if layout.correct_valid.is_file():
        correct = len(read_json(layout.correct_valid))
        if correct < FEW_QUERIES:
            lines += [f"**Warning: every analysis below rests on {correct} correct validation "
                      f"quer{'y' if correct == 1 else 'ies'} (fewer than {FEW_QUERIES}); read its percentages and "
                      "medians as anecdotes, not estimates.**", ""]
    rows, total = [], 0.0
    for step in pipeline:
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
    if decoder:
        lines += [not_applicable_section(), ""]
    return "\n".join(lines)


def not_applicable_section() -> str:
    """The experiments a decoder-only reproduction leaves out, each with the analyses it needs and why they do
    not run on decoder-only models (`Experiment.family_reasons`: the table of `genir_jax.analysis.applicability`)."""
    from genir_jax.paper.experiments import registry

    rows = [(f"{experiment.title} ({experiment.paper_ref})", f"`{name}`", reason)
            for experiment in registry() if not experiment.handles_family(DECODER)
            for name, reason in experiment.family_reasons()]
    return "\n".join([NOT_APPLICABLE_HEADING, "", "These experiments are not run on decoder-only models "
                      "(reasons from `genir_jax.analysis.applicability`):", "",
                      md_table(["experiment", "analysis", "why not"], rows)])


NOT_APPLICABLE_HEADING = "## Not applicable to decoder-only models"
FAMILY_WORDS = {DECODER: "decoder-only", ENCODER_DECODER: "encoder-decoder (T5)"}


def _stages_note(layout, settings) -> str:
    """Which decoder stages the tables use (`--stages`) and how they were obtained: Table 3's stages.json, which
    every panel shares (for automatic stages: fit and held-out sizes, k and its criterion, bootstrap stability)."""
    from genir_jax.analysis.stages import STAGES_JSON, Stages
    from genir_jax.paper.panels import REPORT_STAGES_STEP

    asked = getattr(settings, "stages", None)
    text = (f"Decoder stages: `--stages {asked}`." if asked else
            "Decoder stages: each experiment's default (the paper's for a 24-layer decoder, otherwise `auto`).")
    directory = layout.analysis(REPORT_STAGES_STEP)
    if (directory / STAGES_JSON).is_file():
        text += " " + Stages.read(directory).describe_fit()
    return text


def _missing_steps(layout, experiment: Experiment) -> list[str]:
    problems = []
    for name in experiment.steps:
        state = step_record(layout, name)
        if state is None:
            problems.append(f"step `{name}` has not run")
        elif state.get("skipped"):
            problems.append(f"step `{name}` was skipped: {state['skipped']}")
    return problems


def write_report(layout, settings, pipeline=()) -> pathlib.Path:
    """Render every experiment and write ``report.md`` (atomically); `pipeline`: the run's steps
    (`genir_jax.paper.reproduce.steps`, passed down by the pipeline), listed with their state."""
    from genir_jax.paper.experiments import registry

    parts = [_header(layout, settings, pipeline)]
    for experiment in registry():
        parts.append(f"## {experiment.title} ({experiment.paper_ref})\n")
        family = getattr(settings, "model_type", ENCODER_DECODER)
        parts.append(f"Produced by `{experiment.command_for(family)}`.\n")
        scheme = getattr(settings, "docids", "atomic")
        if not experiment.handles(scheme):
            parts.append(f"Not run: this analysis handles {' and '.join(experiment.docids)} docids; this reproduction "
                         f"trains {scheme} docids.\n")
            continue
        if not experiment.handles_family(family):
            parts.append(f"Not run: not applicable to {FAMILY_WORDS[family]} models"
                         + (" (see \"Not applicable to decoder-only models\" above).\n" if family == DECODER else ".\n"))
            continue
        problems = _missing_steps(layout, experiment)
        if problems and not experiment.chosen(settings):  # opt-in, not asked for (and not run before)
            parts.append(f"Not run: opt-in; add `{experiment.opt_in_flag}` to `genir-jax reproduce`, or run it on "
                         f"this folder with `python -m experiments {experiment.id} --run OUT`.\n")
            continue
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
