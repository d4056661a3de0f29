"""Table 1: retrieval effectiveness of the DSI model on the test queries, with BM25 for context."""

from genir_jax.paper.panels import Experiment, Section, md_table, percent, read_json

PAPER = {"NQ10k (T5-large)": {"Hits@1": 40.4, "Recall@5": 58.1, "Hits@10": 63.9}}


def render(layout) -> Section:
    ours = read_json(layout.eval_test / "metrics.json")["metrics"]
    bm25 = read_json(layout.bm25_test / "metrics.json")
    bm25 = bm25.get("metrics", bm25)
    val = read_json(layout.eval_val / "metrics.json")
    rows = [("DSI (ours, test)", *(percent(ours[m]) for m in ("Hits@1", "Recall@5", "Hits@10", "MRR@10")),
             ours["queries"]),
            ("BM25 (same test queries)", *(percent(bm25[m]) for m in ("Hits@1", "Recall@5", "Hits@10", "MRR@10")),
             bm25.get("queries"))]
    rows += [(f"paper: {name}", values["Hits@1"], values["Recall@5"], values["Hits@10"], None, None)
             for name, values in PAPER.items()]
    text = md_table(["model", "Hits@1", "R@5", "Hits@10", "MRR@10", "queries"], rows)
    scheme = val.get("docids", "atomic")
    correct = ("relevant docid the top token of the whole vocabulary" if scheme == "atomic" else
               f"the first of the 10 beams is the relevant {scheme} docid and greedy decoding gives it exactly")
    text += (f"\n\nValidation: Hits@1 {percent(val['metrics']['Hits@1']):.2f}, "
             f"{val['correct_first']} of {val['metrics']['queries']} queries correct ({correct}): the queries every "
             "analysis below uses.\n")
    if scheme != "atomic":
        text += (f"\n{scheme.capitalize()} docids, ranked by {val.get('ranking', 'beam search')}; the paper's row is "
                 "an atomic-docid model.\n")
    train = read_json(layout.full / "train.json")
    curve = [(e["step"], percent(e["Hits@1"]), percent(e["Hits@10"])) for e in train.get("evaluations", [])]
    if curve:
        text += "\nLearning curve of the full model (validation subset used for model selection):\n\n"
        text += md_table(["step", "Hits@1", "Hits@10"], curve)
        text += (f"\n\nTraining: {train.get('wall_seconds', 0) / 60:.1f} min wall clock, "
                 f"{train.get('examples_per_s', 0):.0f} examples/s.\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="table1", title="Retrieval effectiveness", paper_ref="Table 1", position=10,
    reads=("evaluate-full", "bm25", "train-full"),
    command="genir-jax evaluate / genir-jax bm25", paper=PAPER, render=render,
    docids=("atomic", "naive", "semantic"),
)
