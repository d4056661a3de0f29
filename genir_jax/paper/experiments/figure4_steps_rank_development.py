"""Figures 3 and 4 per decoding step, for naive / semantic docids: logit-lens rank of each docid token at its
step given the gold prefix, and the components' contributions, through the decoder layers."""

import dataclasses

import numpy as np

from genir_jax.analysis.stages import describe_stages, stage_names
from genir_jax.paper.panels import (
    Experiment, Section, figure, md_table, read_json, record_settings, save_figure, shade_stages,
)

from genir_jax.paper.experiments._common import correct_sequence_inputs, model_description, stages_of

PAPER = {"note": "the paper's models use atomic docids (one decoding step); no per-step values"}
SITES = (("resid_post", "residual after layer"), ("cross_attn_out", "cross-attention output"),
         ("mlp_out", "MLP output"))
PARTS = (("attn", "self-attn"), ("cross_attn", "cross-attn"), ("mlp", "MLP"))


@dataclasses.dataclass(frozen=True)
class Config:
    batch_size: int = 8  # queries per step (lens logits of one layer: batch x docid length x vocabulary)


def run_steps_logit_lens(layout, settings, config: Config) -> dict:
    """`genir_jax.analysis.sequence_logit_lens` on the correct validation queries of a naive / semantic model."""
    from genir_jax.analysis.sequence_logit_lens import run_sequence_logit_lens, write_sequence_logit_lens

    inputs = correct_sequence_inputs(layout)
    model = inputs.model
    result = run_sequence_logit_lens(model.config, model.params, inputs.input_ids, inputs.attention_mask,
                                     inputs.targets, inputs.target_mask, batch_size=config.batch_size,
                                     progress=settings.progress)
    output = layout.analysis("steps-logit-lens")
    write_sequence_logit_lens(output, result, [q.query_id for q in inputs.queries])
    return record_settings(output, "figure4-steps", config, checkpoint=layout.full, queries=len(inputs.queries),
                           docids=inputs.scheme.name)


def _cell(entry: dict, keys: tuple[str, ...], layers, digits: int) -> str:
    """The mean over the entry's queries of their mean over `layers` of the statistic at `keys`, with its 95%
    bootstrap interval over those queries (runs from before the per-query values were kept: the mean only)."""
    from genir_jax.analysis.evidence import bootstrap

    per_query = entry.get("per_query")
    if per_query is None:
        means = entry[keys[0]]
        for key in keys[1:]:
            means = means[key]
        means = means["mean"] if isinstance(means, dict) else means
        return f"{np.mean([means[l] for l in layers]):.{digits}f}"
    values = per_query
    for key in keys:
        values = values[key]
    return bootstrap(np.asarray(values, dtype=np.float64)[:, list(layers)].mean(axis=1)).format(digits)


def draw(layout):
    """(Figure, PNG path): per site the logit-lens rank + 1 of each step's docid token through the decoder.
    The EOS step is a grey dashed line drawn underneath, so a step whose ranks equal it stays visible."""
    from genir_jax.analysis.sequence_logit_lens import SUMMARY_JSON
    from genir_jax.base.figures import LINE_COLOURS, legend_outside

    summary = read_json(layout.analysis("steps-logit-lens") / SUMMARY_JSON)
    stages = stages_of(layout)
    layers = np.arange(summary["num_decoder_layers"])
    plt, path = figure(layout, "figure4_steps_rank_development")
    fig, axes = plt.subplots(1, len(SITES), figsize=(5 * len(SITES), 3.8), sharey=True)
    markers = "osD^vP*X"
    for axis, (site, label) in zip(axes, SITES):
        for index, entry in enumerate(summary["steps"]):
            if entry["label"].startswith("last"):
                style = dict(linestyle="--", linewidth=4, color="0.6", zorder=2)
            else:
                style = dict(marker=markers[index % len(markers)], markersize=5, linewidth=1.5, zorder=3,
                             color=LINE_COLOURS[index % len(LINE_COLOURS)])
            axis.plot(layers, np.asarray(entry["relevant_rank"][site]["mean"]) + 1,
                      label=f"{entry['label']} ({entry['queries']} q.)", **style)
        axis.set(yscale="log", xlabel="decoder layer")
        axis.set_title(label, pad=16)
        shade_stages(axis, stages)
    axes[0].set_ylabel("docid token rank + 1 (logit lens; mean over queries)")
    legend_outside(axes[-1])
    fig.suptitle(f"Rank of each docid token at its decoding step (teacher forcing): {summary['num_queries']} "
                 f"correct validation queries ({model_description(layout)})", y=1.07)
    return fig, path


def render(layout) -> Section:
    from genir_jax.analysis.sequence_logit_lens import SUMMARY_JSON

    summary = read_json(layout.analysis("steps-logit-lens") / SUMMARY_JSON)
    stages = stages_of(layout)
    layers = np.arange(summary["num_decoder_layers"])
    steps = summary["steps"]
    fig, path = draw(layout)
    save_figure(fig, path)
    lengths = ", ".join(f"{length} tokens: {count} queries" for length, count in summary["docid_lengths"].items())
    text = (f"{summary['num_queries']} correct queries (docid lengths with EOS: {lengths}). At decoding step t the "
            "decoder has the gold prefix (teacher forcing); each cell is the MEAN over the queries whose docid has "
            "that step of the 0-based logit-lens rank of the step's docid token in the residual after the layer "
            "(the paper's Fig. 4 statistic, per step). \"last step (EOS)\" is every docid's final step, which must "
            "put EOS on top; the figure draws it as a wide grey dashed line under the other steps, so a step with "
            "the same ranks stays visible. Each cell: the mean with its 95% bootstrap interval over those queries, "
            "n queries.\n\n")
    text += md_table(["layer", *(f"{entry['label']}" for entry in steps)],
                     [(int(layer), *(_cell(entry, ("relevant_rank", "resid_post"), [layer], 1) for entry in steps))
                      for layer in layers])
    names = stage_names(len(stages))
    rows = [(entry["label"], *(_cell(entry, ("contributions", "ratio", part), stage, 2)
                               for stage in stages for part, _ in PARTS)) for entry in steps]
    text += ("\n\nContributions per step (Fig. 3's ratio ||component|| / ||resid_post - resid_pre||, mean over the "
             "stage's layers of the per-layer means over queries):\n\n")
    text += md_table(["step", *(f"{name}: {label}" for name in names for _, label in PARTS)], rows)
    text += f"\n\nStages: {describe_stages(stages, named=True)}. {PAPER['note'].capitalize()}.\n"
    return Section(text, [path])


EXPERIMENT = Experiment(
    id="figure4-steps", title="Rank development per decoding step (logit lens, multi-token docids)",
    paper_ref="beyond the paper: Fig. 3 and Fig. 4 per decoding step", position=61,
    command="genir_jax.analysis.sequence_logit_lens", paper=PAPER, render=render, config=Config(),
    runs={"steps-logit-lens": run_steps_logit_lens}, reads=("patch-stages",), docids=("naive", "semantic"),
)
