"""Figure 3: how much each component adds to the residual stream, per decoder layer (ratio and cosine)."""

import dataclasses

import numpy as np

from genir_jax.analysis.stages import describe_stages, stage_names
from genir_jax.paper.panels import (
    BOTH_FAMILIES, Experiment, Section, figure, md_table, read_json, record_settings, save_figure, shade_stages,
)

from genir_jax.paper.experiments._common import correct_inputs, model_description, stages_of

PAPER = {"stages_t5_large": "I = layers 0-6, II = 7-17, III = 18-23"}
PARTS = (("attn", "self-attention"), ("cross_attn", "cross-attention"), ("mlp", "MLP"))


def parts_of(summary: dict) -> tuple:
    """The `PARTS` the run measured: all three for a T5, attn and mlp for a decoder-only model (it has no
    cross-attention, so residual-rank writes none)."""
    return tuple((key, label) for key, label in PARTS if key in summary["contributions"]["ratio"])


@dataclasses.dataclass(frozen=True)
class Config:
    batch_size: int | None = None  # queries per step (None: the analysis' default)


def run_residual_rank(layout, settings, config: Config) -> dict:
    """Residual contributions and logit-lens ranks of the correct validation queries (Fig. 3 and Fig. 4):
    `genir_jax.analysis.residual`, as `genir-jax residual-rank` runs it."""
    from genir_jax.analysis.residual import docid_mask, run_residual_rank, write_residual_rank

    inputs = correct_inputs(layout)
    model = inputs.model
    result = run_residual_rank(model.config, model.params, inputs.input_ids, inputs.attention_mask, inputs.targets,
                               docid_mask(model.tokenizer, model.config.vocab_size),
                               query_ids=[q.query_id for q in inputs.queries], batch_size=config.batch_size,
                               progress=settings.progress)
    output = layout.analysis("residual-rank")
    write_residual_rank(output, result)
    return record_settings(output, "figure3", config, checkpoint=layout.full, queries=len(inputs.queries))


def per_query_contributions(layout) -> dict[tuple[str, str], np.ndarray]:
    """{(func, part): [N, L]} per correct query and decoder layer, from all_dec_resid_results.csv (funcs
    ratio / norm / cosine, parts attn / cross_attn / mlp / resid_pre / resid_post)."""
    import csv

    from genir_jax.analysis.residual import FUNCS, PARTS as RESIDUAL_PARTS, RESID_CSV

    func_of = {label: key for key, label in FUNCS}
    part_of = {label: key for key, label, _ in RESIDUAL_PARTS}
    values: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    with open(layout.analysis("residual-rank") / RESID_CSV, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            key = (func_of[row["func"]], part_of[row["component"]])
            values.setdefault(key, {}).setdefault(row["query"], {})[int(row["layer"])] = float(row["value"])
    return {key: np.asarray([[layers[l] for l in sorted(layers)] for layers in queries.values()])
            for key, queries in values.items()}


ERROR_BARS = "error bars: ±1 standard deviation over the queries"


def draw(layout):
    """(Figure, PNG path): per decoder layer the mean over the correct queries (±1 SD) of each component's ratio
    and cosine, stages shaded."""
    from genir_jax.base.figures import LINE_COLOURS, legend_outside

    summary = read_json(layout.analysis("residual-rank") / "residual_rank_summary.json")
    stages = stages_of(layout)
    layers = np.arange(summary["num_decoder_layers"])
    plt, path = figure(layout, "figure3_residual_contributions")
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for index, (key, label) in enumerate(parts_of(summary)):
        offset = (index - 1) * 0.12  # side by side, so the error bars do not hide each other
        for axis, func in zip(axes, ("ratio", "cosine")):
            values = summary["contributions"][func][key]
            axis.errorbar(layers + offset, values["mean"], yerr=values["std"], label=label, marker="o",
                          markersize=4, capsize=2, color=LINE_COLOURS[index])
    axes[0].set(xlabel="decoder layer", ylabel="||component|| / ||resid_post - resid_pre||")
    axes[1].set(xlabel="decoder layer", ylabel="cosine(component, resid_post)")
    for axis in axes:
        shade_stages(axis, stages)
    legend_outside(axes[1], title=ERROR_BARS.replace(": ", ":\n"), title_fontsize=8)
    fig.suptitle(f"Residual stream contributions per decoder layer: mean over {summary['num_queries']} correct "
                 f"validation queries ({model_description(layout)})", y=1.06)
    return fig, path


def render(layout) -> Section:
    from genir_jax.analysis.evidence import bootstrap

    summary = read_json(layout.analysis("residual-rank") / "residual_rank_summary.json")
    stages = stages_of(layout)
    fig, path = draw(layout)
    save_figure(fig, path)
    per_query = per_query_contributions(layout)
    parts = parts_of(summary)
    rows = []
    for name, stage in zip(stage_names(len(stages)), stages):
        cells = [bootstrap(per_query[func, k][:, stage].mean(axis=1)).format(2)
                 for func in ("ratio", "cosine") for k, _ in parts]
        rows.append((name, f"{stage[0]}-{stage[-1]}", *cells))
    text = ("Per stage, the mean over the stage's layers of the per-layer means over the correct queries of "
            "||component|| / ||resid_post - resid_pre|| (ratio) and of cosine(component, resid_post), with its "
            "95% bootstrap interval over the queries (of their means over the stage's layers) and n:\n\n")
    text += md_table(["stage", "layers", *(f"{func}: {label}" for func in ("ratio", "cosine") for _, label in parts)],
                     rows)
    text += f"\n\nStages: {describe_stages(stages, named=True)} (paper, T5-large: {PAPER['stages_t5_large']}).\n"
    text += (f"\nFigure: per decoder layer the mean over the {summary['num_queries']} correct queries, "
             f"{ERROR_BARS}; the {len(parts)} components are drawn side by side "
             "within each layer.\n")
    text += ("\nCosine: the paper's text says the cosine similarity of each component's output with the residual "
             "stream without saying which; the reference code (eval_residual_rank.py) computes it with the "
             "layer's OUTPUT residual, resid_post (`decoder.{l}.hook_resid_post`, which already contains the "
             "component's output), not with the residual before the layer (resid_pre) nor with the layer's update "
             "resid_post - resid_pre (the denominator of the ratio). We plot and tabulate the reference's: "
             "cosine(component, resid_post).\n")
    return Section(text, [path])


EXPERIMENT = Experiment(
    id="figure3", title="Residual stream contributions", paper_ref="Sec. 5, Fig. 3", position=30,
    command="genir-jax residual-rank", paper=PAPER, render=render, config=Config(),
    runs={"residual-rank": run_residual_rank}, families=BOTH_FAMILIES,
)
