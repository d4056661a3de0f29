"""Figure 5: what stage-III MLP neurons and cross-attention heads read from (share of each component type)."""

import dataclasses
import json
import os

import numpy as np

from genir_jax.report import Experiment, Section, figure, md_table, read_json, record_settings, stage_names

from experiments._common import correct_inputs, resolve_stages

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
        from genir_jax.commands.common import write_stages
        from genir_jax.io import atomic_directory

        inputs = correct_inputs(layout)
        model = inputs.model
        stages, stages_record = resolve_stages(config.stages, inputs, settings.progress)
        layers = list(stages[-1]) if reader == "mlp" else list(range(model.config.num_decoder_layers))
        raw_ids = [entry[1] for entry in json.loads(layout.correct_valid.read_text())]
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


def render(layout) -> Section:
    plt, path = figure(layout, "figure5_reading")
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    text_parts = []
    for axis, (step, file, label) in zip(axes, READERS):
        summary = read_json(layout.analysis(step) / file)
        stages = len(summary["stages"])
        key = "all" if "all" in summary["results"] else sorted(summary["results"])[0]
        result = summary["results"][key]
        readers = [int(layer) for layer in result["per_layer"]]
        if step == "crattn-reading":  # as the paper's figure: heads after stage I
            readers = [layer for layer in readers if layer not in summary["stages"][0]] or readers
        buckets = _buckets(_mean_over(result["per_layer"], readers), stages)
        axis.bar(range(len(buckets)), [v for _, v in buckets], color="tab:blue")
        axis.set_xticks(range(len(buckets)), [n for n, _ in buckets], rotation=60, ha="right", fontsize=8)
        axis.set(ylabel="share of positive readings (dot)", title=f"{label}, layers {readers[0]}-{readers[-1]}")
        rows = [(name, f"{100 * value:.1f}%") for name, value in sorted(buckets, key=lambda kv: -kv[1])[:5]]
        text_parts.append(f"{label} (top {key} readings, {summary['queries']} queries), largest shares:\n\n"
                          + md_table(["reads from", "share"], rows))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    text = "\n\n".join(text_parts) + f"\n\nPaper: {PAPER['finding']}.\n"
    return Section(text, [path])


EXPERIMENT = Experiment(
    id="figure5", title="Who reads from whom", paper_ref="Sec. 5.3, Fig. 5", position=70,
    command="genir-jax neuron-reading / crattn-reading", paper=PAPER, render=render, config=Config(),
    runs={"neuron-reading": _run_reading("neuron-reading", "mlp"),
          "crattn-reading": _run_reading("crattn-reading", "cross_attn")},
)
