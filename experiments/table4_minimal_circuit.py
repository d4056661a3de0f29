"""Table 4: the minimal circuit on the test queries, absolute and relative to the unpatched model."""

from genir_jax.report import Experiment, Section, md_table, percent, read_json

PAPER = {"Hits@1": (38.0, 94), "Recall@5": (56.9, 98), "Hits@10": (62.0, 97)}


def render(layout) -> Section:
    report = read_json(layout.analysis("circuit") / "minimal_circuit.json")
    rows = []
    for metric in ("Hits@1", "Recall@5", "Hits@10", "MRR@10"):
        relative = report["relative"].get(metric)
        paper = PAPER.get(metric)
        rows.append((metric, percent(report["unpatched"][metric]), percent(report["patched"][metric]),
                     None if relative is None else f"{100 * relative:.0f}%",
                     None if paper is None else f"{paper[0]:.1f} ({paper[1]}%)"))
    text = md_table(["metric", "unpatched", "circuit", "circuit / unpatched", "paper: circuit (relative)"], rows)
    text += f"\n\nCircuit: {report['config']} (means over {report['mean_over_correct_queries']} correct validation " \
            f"queries; {report['queries']} test queries).\n"
    return Section(text)


EXPERIMENT = Experiment(
    id="table4", title="Minimal circuit", paper_ref="Table 4", steps=("circuit",),
    command="genir-jax circuit", paper=PAPER, render=render,
)
