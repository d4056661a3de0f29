"""Table 2: the full model's decoder on encoders of models trained without some documents, and of the base T5."""

from genir_jax.report import Experiment, Section, md_table, percent, read_json

PAPER = {"t5_encoder_mean_rank_previously_correct": 21.66}


def render(layout) -> Section:
    results = read_json(layout.analysis("swap-encoder") / "swapped_encoder.json")
    removed = read_json(layout.removed_documents)
    rows = []
    for key, values in results.items():
        name = next((label for label in removed if key.rstrip("/").endswith(label)), "base T5 (pretrained only)")
        missing = values.get("missing_ranks")
        rows.append((name, values.get("MRR:"), percent(values.get("Hits@1 (missing)")),
                     len(missing) if missing is not None else None, values["Mean Rank of prev. correct"],
                     values["Median:"], values["Number of non 0 ranks"]))
    text = md_table(["encoder from", "MRR (removed docs)", "Hits@1 (removed docs)", "removed docs' queries",
                     "mean rank (all correct)", "median rank", "non-zero ranks"], rows)
    text += (f"\n\nPaper (NQ10k): swapping in the pretrained T5's encoder gives a mean rank of "
             f"{PAPER['t5_encoder_mean_rank_previously_correct']} for previously correct documents; encoders of "
             "models that never saw a document still let the full model's decoder retrieve it.\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="table2", title="Encoder swap", paper_ref="Sec. 4, Table 2",
    steps=("swap-encoder",) + tuple(f"train-removed-{k}" for k in range(4)),
    command="genir-jax swap-encoder", paper=PAPER, render=render,
)
