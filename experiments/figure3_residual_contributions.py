"""Figure 3: how much each component adds to the residual stream, per decoder layer (ratio and cosine)."""

import dataclasses

import numpy as np

from genir_jax.report import (Experiment, Section, describe_stages, figure, md_table, read_json, record_settings,
                              shade_stages, stage_names)

from experiments._common import correct_inputs, stages_of

PAPER = {"stages_t5_large": "I = layers 0-6, II = 7-17, III = 18-23"}
PARTS = (("attn", "self-attention"), ("cross_attn", "cross-attention"), ("mlp", "MLP"))


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


def render(layout) -> Section:
    summary = read_json(layout.analysis("residual-rank") / "residual_rank_summary.json")
    stages = stages_of(layout)
    layers = np.arange(summary["num_decoder_layers"])
    plt, path = figure(layout, "figure3_residual_contributions")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for key, label in PARTS:
        ratio = summary["contributions"]["ratio"][key]
        axes[0].errorbar(layers, ratio["mean"], yerr=ratio["std"], label=label, marker="o", capsize=2)
        axes[1].plot(layers, summary["contributions"]["cosine"][key]["mean"], label=label, marker="o")
    axes[0].set(xlabel="decoder layer", ylabel="||component|| / ||resid_post - resid_pre||")
    axes[1].set(xlabel="decoder layer", ylabel="cosine(component, resid_post)")
    for axis in axes:
        shade_stages(axis, stages)
        axis.legend(fontsize=8)
    fig.suptitle(f"Residual contributions ({summary['num_queries']} correct queries)", y=1.04)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    rows = []
    for name, stage in zip(stage_names(len(stages)), stages):
        cells = [f"{np.mean([summary['contributions']['ratio'][k]['mean'][l] for l in stage]):.2f}" for k, _ in PARTS]
        rows.append((name, f"{stage[0]}-{stage[-1]}", *cells))
    text = "Mean ratio ||component|| / ||residual delta|| per stage:\n\n"
    text += md_table(["stage", "layers", "self-attn", "cross-attn", "MLP"], rows)
    text += f"\n\nStages: {describe_stages(stages)} (paper, T5-large: {PAPER['stages_t5_large']}).\n"
    return Section(text, [path])


EXPERIMENT = Experiment(
    id="figure3", title="Residual stream contributions", paper_ref="Sec. 5, Fig. 3", position=30,
    command="genir-jax residual-rank", paper=PAPER, render=render, config=Config(),
    runs={"residual-rank": run_residual_rank},
)
