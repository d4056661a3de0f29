"""Figure 5: what stage-III MLP neurons and cross-attention heads read from (share of each component type)."""

import dataclasses
import json
import os

import numpy as np

from genir_jax.analysis.stages import Stages, stage_names
from genir_jax.paper.panels import (
    Experiment, Section, figure, layer_span, md_table, read_json, record_settings, save_figure,
)

from genir_jax.paper.experiments._common import correct_inputs, model_description, resolve_stages

PAPER = {"finding": "stage-III MLP neurons read mostly from MLPs and cross-attention of the earlier stages; "
                    "cross-attention heads read mostly from the MLPs of stage I (priming)"}
READERS = (("neuron-reading", "neuron_reading_summary.json", "MLP neurons"),
           ("crattn-reading", "crattn_reading_summary.json", "cross-attention heads"))


@dataclasses.dataclass(frozen=True)
class Config:
    sim_type: str = "dot"                         # similarity of a reader with a component
    topks: tuple[int | None, ...] = (None, 10)    # top-k positive readings kept (None: all)
    stages: str | None = None                     # None: the paper's for 24 decoder layers, else auto
    batch_size: int = 16
    queries_per_file: int = 50                    # queries per per-entry file (as the reference)


def _run_reading(step: str, reader: str):
    """The run of one reader (`genir_jax.analysis.reading`): MLP neurons of the last stage, or the
    cross-attention heads of every layer, as `genir-jax neuron-reading` / `crattn-reading` read them."""
    def run(layout, settings, config: Config) -> dict:
        from genir_jax.analysis.reading import RawEntryWriter, run_reading, stale_raw_files, write_reading_outputs
        from genir_jax.analysis.stages import write_stages
        from genir_jax.base.io import atomic_directory

        stages, stages_record, inputs = resolve_stages(config.stages, correct_inputs(layout), settings.progress)
        model = inputs.model
        layers = list(stages[-1]) if reader == "mlp" else list(range(model.config.num_decoder_layers))
        raw_ids = [entry[1] for entry in json.loads(layout.correct_valid.read_text())]
        raw_ids = [raw_ids[row] for row in Stages.from_record(stages_record).held_out_rows(len(raw_ids))]
        output = layout.analysis(step)
        with atomic_directory(output) as staging:
            writer = RawEntryWriter(staging, reader, config.sim_type, raw_ids, config.queries_per_file)
            result = run_reading(model.config, model.params, model.tokenizer, inputs.texts, reader=reader,
                                 layers=layers, stages=stages, sim_type=config.sim_type, topks=list(config.topks),
                                 batch_size=config.batch_size, block=config.queries_per_file, sink=writer,
                                 progress=settings.progress)
            writer.close()
            write_reading_outputs(staging, result)
            write_stages(staging, stages_record)
        for path in stale_raw_files(output, reader, config.sim_type, keep=writer.files):
            os.remove(path)  # chunks of an earlier, longer run would be globbed with ours
        return record_settings(output, "figure5", config, checkpoint=layout.full, reader=reader,
                               reader_layers=layers, stages=stages, stages_method=stages_record["method"],
                               queries=len(inputs.queries))
    return run


def _buckets(mean: dict, stages: int) -> list[tuple[str, float]]:
    names = stage_names(stages)
    out = [("embedding", mean.get("embedding", 0.0))]
    for component in ("attn", "cross_attn", "mlp"):
        out += [(f"{component} {names[i]}", value) for i, value in enumerate(mean.get(component, []))]
    return out


def _mean_over(per_layer: dict, layers: list[int]) -> dict:
    """Unweighted mean of the per-layer proportions over the given reader layers."""
    entries = [per_layer[str(layer)] for layer in layers]
    mean = {"embedding": float(np.mean([e["embedding"] for e in entries]))}
    for component in ("attn", "cross_attn", "mlp"):
        mean[component] = list(np.mean([e[component] for e in entries], axis=0))
    return mean


COMPONENT_NAMES = {"attn": "self-attention", "cross_attn": "cross-attention", "mlp": "MLP"}
MIN_BAR_SLOTS = 4  # a panel is at least this many bars wide: one reader layer is one bar, not the whole panel


def _reading(layout, step: str, file: str) -> dict:
    """One reader's summary, the readings kept (top k or all), its reader layers (cross-attention heads: those
    after stage I, as the paper's figure) and per layer the shares per bucket."""
    summary = read_json(layout.analysis(step) / file)
    stages = summary["stages"]
    key = "all" if "all" in summary["results"] else sorted(summary["results"])[0]
    result = summary["results"][key]
    readers = sorted(int(layer) for layer in result["per_layer"])
    if step == "crattn-reading":
        readers = [layer for layer in readers if layer not in stages[0]] or readers
    per_layer = {layer: _buckets(result["per_layer"][str(layer)], len(stages)) for layer in readers}
    return dict(summary=summary, stages=stages, key=key, result=result, readers=readers, per_layer=per_layer,
                buckets=[name for name, _ in per_layer[readers[0]]])


def _bucket_label(bucket: str, stages) -> str:
    """A legend entry: the component type in words and the stage with its layers ('MLP I (0-6)')."""
    if bucket == "embedding":
        return "embedding"
    component, name = bucket.split(" ")
    layers = stages[stage_names(len(stages)).index(name)]
    return f"{COMPONENT_NAMES[component]} {name} ({layer_span(layers)})"


def draw(layout):
    """(Figure, PNG path): one stacked bar per reader layer, the shares of its positive readings per component
    type and stage, ten colour-blind-safe colours; one legend beside the panels."""
    from genir_jax.base.figures import CATEGORY_COLOURS, legend_outside

    plt, path = figure(layout, "figure5_reading")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    for axis, (step, file, label) in zip(axes, READERS):
        reading = _reading(layout, step, file)
        readers, per_layer, summary = reading["readers"], reading["per_layer"], reading["summary"]
        bottom = np.zeros(len(readers))
        for b, bucket in enumerate(reading["buckets"]):
            values = np.asarray([dict(per_layer[layer])[bucket] for layer in readers])
            axis.bar(range(len(readers)), values, bottom=bottom, width=0.7, color=CATEGORY_COLOURS[b % 10],
                     edgecolor="white", linewidth=0.4, label=_bucket_label(bucket, reading["stages"]))
            bottom += values
        pad = max(0, MIN_BAR_SLOTS - len(readers)) / 2
        axis.set_xlim(-0.5 - pad, len(readers) - 0.5 + pad)
        axis.set_xticks(range(len(readers)), [str(layer) for layer in readers], fontsize=8)
        axis.set(xlabel="reader layer", ylim=(0, 1))
        kept = "all positive readings" if reading["key"] == "all" else f"top {reading['key']} positive readings"
        axis.set_title(f"{label}: {kept}, {summary['queries']} queries", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    legend_outside(axes[1], handles[::-1], labels[::-1], title="read from (stack order)", title_fontsize=8)
    sim = {"dot": "dot product", "cosine": "cosine"}.get(summary["sim_type"], summary["sim_type"])
    axes[0].set_ylabel("share of positive readings")
    stages = reading["stages"]  # the readers are the last stage's (stage III of the paper's three)
    last = f"stage-{stage_names(len(stages))[-1]} (layers {layer_span(stages[-1])})"
    fig.suptitle(f"Who reads from whom: where {last} MLP neurons and cross-attention heads read from "
                 f"({model_description(layout)})", y=1.02)
    fig.text(0.0, -0.03, f"A reading: the {sim} of a reader's input direction with an earlier component's output (an "
             "active MLP neuron: its W_in column; a cross-attention head: the key of its most attended encoder "
             "position, with the output\nprojected by the head's W_Q). A bar: the share of a reader layer's positive "
             "readings that come from each component type and stage, averaged over the queries and the layer's "
             "readers (sums to 1).", fontsize=8, va="top")
    return fig, path


def render(layout) -> Section:
    fig, path = draw(layout)
    save_figure(fig, path)
    text_parts = []
    for step, file, label in READERS:
        reading = _reading(layout, step, file)
        summary, stages, key, result = reading["summary"], reading["stages"], reading["key"], reading["result"]
        readers, per_layer, buckets = reading["readers"], reading["per_layer"], reading["buckets"]
        stage_of = {layer: name for name, stage in zip(stage_names(len(stages)), stages) for layer in stage}
        rows = [(layer, stage_of.get(layer, ""), result["per_layer"][str(layer)].get("readers", ""),
                 *(f"{100 * value:.1f}" for _, value in per_layer[layer])) for layer in readers]
        mean = _buckets(_mean_over(result["per_layer"], readers), len(stages))
        rows.append(("mean over these layers", "", "", *(f"{100 * value:.1f}" for _, value in mean)))
        text_parts.append(f"{label} (top {key} readings, {summary['queries']} queries): % of each reader layer's "
                          "positive readings that come from each component type and stage (one stacked bar per "
                          "layer in the figure):\n\n"
                          + md_table(["reader layer", "stage", "readers", *(f"{b} %" for b in buckets)], rows))
    text = "\n\n".join(text_parts) + (f"\n\nPaper: {PAPER['finding']}. These shares have no intervals: each is "
                                       "an aggregate over readers (per reader, averaged over the queries that "
                                       "activate it, then renormalised), not a statistic of per-query values.\n")
    return Section(text, [path])


EXPERIMENT = Experiment(
    id="figure5", title="Who reads from whom", paper_ref="Sec. 5.3, Fig. 5", position=70,
    command="genir-jax neuron-reading / crattn-reading", paper=PAPER, render=render, config=Config(),
    runs={"neuron-reading": _run_reading("neuron-reading", "mlp"),
          "crattn-reading": _run_reading("crattn-reading", "cross_attn")},
    not_applicable=("neuron-reading", "crattn-reading"),
)
