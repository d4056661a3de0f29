"""Figure 5: what stage-III MLP neurons and cross-attention heads read from (share of each component type)."""

import numpy as np

from genir_jax.report import Experiment, Section, figure, md_table, read_json, stage_names

PAPER = {"finding": "stage-III MLP neurons read mostly from MLPs and cross-attention of the earlier stages; "
                    "cross-attention heads read mostly from the MLPs of stage I (priming)"}
READERS = (("neuron-reading", "neuron_reading_summary.json", "MLP neurons"),
           ("crattn-reading", "crattn_reading_summary.json", "cross-attention heads"))


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
    id="figure5", title="Who reads from whom", paper_ref="Sec. 5.3, Fig. 5",
    steps=("neuron-reading", "crattn-reading"), command="genir-jax neuron-reading / crattn-reading",
    paper=PAPER, render=render,
)
