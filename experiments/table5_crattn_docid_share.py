"""Table 5: share of docid tokens among the top tokens of the cross-attention outputs' logit lens."""

from genir_jax.report import Experiment, Section, md_table, read_json

PAPER = {"top10": 0.00, "top100": 0.10, "top1000": 2.30}  # NQ10k, percent


def render(layout) -> Section:
    summary = read_json(layout.analysis("crattn-writes") / "crattn_writes_summary.json")
    cutoffs = [str(c) for c in summary["cutoffs"]]
    rows = [(f"stage {stage}", *(f"{100 * shares[c]:.2f}" for c in cutoffs))
            for stage, shares in summary["docid_share"].items()]
    rows.append(("paper (NQ10k)", *(f"{PAPER.get('top' + c, float('nan')):.2f}" for c in cutoffs)))
    text = md_table(["", *(f"% docids in top {c}" for c in cutoffs)], rows)
    text += (f"\n\n{summary['queries']} correct queries. A docid share near 0 means cross-attention writes word "
             "information, not document identities.\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="table5", title="What cross-attention writes: docid share", paper_ref="Sec. 5.4, Table 5",
    steps=("crattn-writes",), command="genir-jax crattn-writes", paper=PAPER, render=render,
)
