"""Table 3: % of correct queries whose relevant docid leaves rank 1 when a component type is patched in a stage."""

import csv

from genir_jax.report import Experiment, Section, describe_stages, md_table, percent, stage_names

from experiments._common import stages_of

PAPER = {  # NQ10k, % of correct queries no longer at rank 1, stages I / II / III
    ("zero", "mlp"): (92.86, 7.83, 96.72), ("zero", "cross_attn"): (4.29, 21.72, 39.65),
    ("zero", "attn"): (1.52, 2.27, 6.57), ("mean", "mlp"): (0.76, 5.56, 48.23),
    ("mean", "cross_attn"): (4.55, 20.45, 42.93), ("t5", "mlp"): (5.30, 7.07, 74.49),
    ("t5", "cross_attn"): (7.58, 17.93, 34.09),
}


def render(layout) -> Section:
    with open(layout.analysis("patch-stages") / "patching_results_single_combis.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    stages = stages_of(layout)
    names = stage_names(len(stages))
    table, encoder = [], None
    for mode in ("zero", "mean", "t5"):
        for component in ("mlp", "cross_attn", "attn"):
            cells = {int(r["stage"]): percent(float(r["!=0"])) for r in rows
                     if r["mode"] == mode and r["component"] == component}
            if not cells:
                continue
            paper = PAPER.get((mode, component))
            table.append((mode, component, *(f"{cells[i]:.2f}" + (f" ({paper[i]:.2f})" if paper and i < 3 else "")
                                             for i in range(len(stages)))))
        for r in rows:
            if r["mode"] == mode and r["component"].startswith("encoder"):
                encoder = (r["component"], percent(float(r["!=0"])), percent(float(r[">100"])))
    text = md_table(["mode", "component", *(f"stage {n}" for n in names)], table)
    text += f"\n\nOurs (paper NQ10k in parentheses). Stages: {describe_stages(stages)}.\n"
    if encoder:
        text += (f"\nT5 mode, encoder output (`{encoder[0]}`) replaced by the base T5's: {encoder[1]:.2f}% leave rank "
                 f"1, {encoder[2]:.2f}% fall beyond rank 100.\n")
    beyond = [(r["mode"], r["component"], names[int(r["stage"])] if int(r["stage"]) < len(names) else r["stage"],
               percent(float(r[">5"])), percent(float(r[">10"])), percent(float(r[">100"]))) for r in rows
              if not r["component"].startswith("encoder")]
    text += "\nDeeper drops (% of correct queries beyond rank 5 / 10 / 100):\n\n"
    text += md_table(["mode", "component", "stage", ">5", ">10", ">100"], beyond)
    return Section(text)


EXPERIMENT = Experiment(
    id="table3", title="Stage patching", paper_ref="Sec. 5.1, Table 3", steps=("patch-stages",),
    command="genir-jax patch-stages --modes zero,mean,t5", paper=PAPER, render=render,
)
