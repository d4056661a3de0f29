"""Table 1: retrieval effectiveness of the DSI model on the test queries, with BM25 for context."""

from genir_jax.paper.panels import BOTH_FAMILIES, Experiment, Section, md_table, percent, read_json

PAPER = {"NQ10k (T5-large)": {"Hits@1": 40.4, "Recall@5": 58.1, "Hits@10": 63.9}}


METRICS = ("Hits@1", "Recall@5", "Hits@10", "MRR@10")


def render(layout) -> Section:
    from genir_jax.analysis.evidence import run_intervals

    val = read_json(layout.eval_val / "metrics.json")
    rows = []
    for name, directory in (("DSI (ours, test)", layout.eval_test), ("BM25 (same test queries)", layout.bm25_test)):
        intervals = run_intervals(directory / "run.trec", layout.qrels("test"))
        rows.append((name, *(intervals[m].scaled(100).format(2) for m in METRICS), intervals["Hits@1"].queries))
    rows += [(f"paper: {name}", values["Hits@1"], values["Recall@5"], values["Hits@10"], None, None)
             for name, values in PAPER.items()]
    text = md_table(["model", *(f"{m} [95% CI] (n)" for m in ("Hits@1", "R@5", "Hits@10", "MRR@10")), "queries"],
                    rows)
    validation = run_intervals(layout.eval_val / "run.trec", layout.qrels("val"))["Hits@1"]
    scheme = val.get("docids", "atomic")
    correct = ("relevant docid the top token of the whole vocabulary" if scheme == "atomic" else
               f"the first of the 10 beams is the relevant {scheme} docid and greedy decoding gives it exactly")
    text += (f"\n\nValidation: Hits@1 {validation.scaled(100).format(2)}, "
             f"{val['correct_first']} of {val['metrics']['queries']} queries correct ({correct}): the queries every "
             "analysis below uses.\n")
    if scheme != "atomic":
        text += (f"\n{scheme.capitalize()} docids, ranked by {val.get('ranking', 'beam search')}; the paper's row is "
                 "an atomic-docid model.\n")
    train = read_json(layout.full / "train.json")
    curve = [(e["step"], percent(e["Hits@1"]), percent(e["Hits@10"])) for e in train.get("evaluations", [])]
    if curve:
        text += ("\nLearning curve of the full model (validation subset used for model selection; the training log "
                 "keeps its means only, so no intervals):\n\n")
        text += md_table(["step", "Hits@1", "Hits@10"], curve)
        text += (f"\n\nTraining: {train.get('wall_seconds', 0) / 60:.1f} min wall clock, "
                 f"{train.get('examples_per_s', 0):.0f} examples/s.\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="table1", title="Retrieval effectiveness", paper_ref="Table 1", position=10,
    reads=("evaluate-full", "bm25", "train-full"),
    command="genir-jax evaluate / genir-jax bm25", paper=PAPER, render=render,
    docids=("atomic", "naive", "semantic"), families=BOTH_FAMILIES,
)
