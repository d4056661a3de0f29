"""Table 2: the full model's decoder on encoders of models trained without some documents, and of the base T5."""

import dataclasses
import json

import numpy as np

from genir_jax.paper.panels import EXPERIMENT_JSON, Experiment, Section, md_table, read_json, record_settings

from genir_jax.paper.experiments._common import correct_inputs, load_model

PAPER = {"t5_encoder_mean_rank_previously_correct": 21.66,
         # The removed documents' MRR and Hits@1 per removed-documents model: the paper's Table 2 reports them, but
         # our digest of the paper (PAPER.md) does not hold the values, so the report names them without numbers.
         "removed_docs_mrr": None, "removed_docs_hits_at_1": None}


@dataclasses.dataclass(frozen=True)
class Config:
    base_encoder: bool = True      # also swap in the base T5's encoder (reproduce's base_model)
    batch_size: int | None = None  # queries per device per step


def run_swap_encoder(layout, settings, config: Config) -> dict:
    """The full model's decoder on the encoder of each model trained without some documents, and of the base
    T5 (`genir_jax.analysis.encoder_swap`), on the correct validation queries; writes swapped_encoder.json as
    `genir-jax swap-encoder` does (keys: the removed models' directories, then the base T5's)."""
    from genir_jax.analysis.encoder_swap_runs import check_missing_documents, swap_encoders, write_swap_results
    from genir_jax.paper.panels import base_model

    base_path = base_model(layout, settings) if config.base_encoder else None
    base = load_model(base_path, tokenizer=False) if base_path else None  # a bad base fails before the analysis
    missing = json.loads(layout.missing_docs.read_text())
    others = {key: (key, documents) for key, documents in missing.items()}
    inputs = correct_inputs(layout)
    check_missing_documents(inputs, others, str(layout.missing_docs))
    results = swap_encoders(inputs, others, base=base, base_key=str(base_path), source=str(layout.missing_docs),
                            batch_size=config.batch_size, progress=settings.progress)
    output = layout.analysis("swap-encoder")
    write_swap_results(output, results)
    return record_settings(output, "table2", config, checkpoint=layout.full, t5=base_path,
                           removed_models=list(missing), queries=len(inputs.queries))


HEADERS = ["encoder from", "removed docs' correct queries", "MRR (removed docs: mean of 1/(rank+1)) [95% CI]",
           "Hits@1 (removed docs: % at rank 1) [95% CI]", "mean rank (all correct queries, 0-based) [95% CI]",
           "median rank (all correct queries, 0-based) [95% CI]", "not at rank 1 (all correct queries)"]
NOT_IN_DIGEST = "paper value not in PAPER.md"


def lower_median(values, axis=-1):
    """The lower of the two middle values (torch.median's, the reference's median), along `axis`."""
    ordered = np.sort(values, axis=axis)
    return np.take(ordered, (ordered.shape[axis] - 1) // 2, axis=axis)


def render(layout) -> Section:
    from genir_jax.analysis.evidence import bootstrap, share
    from genir_jax.paper.experiments.claims import swap_ranks

    results = read_json(layout.analysis("swap-encoder") / "swapped_encoder.json")
    removed = read_json(layout.removed_documents)
    record = layout.analysis("swap-encoder") / EXPERIMENT_JSON
    queries = read_json(record).get("queries") if record.is_file() else None
    rows = []
    for key, values in results.items():
        name = next((label for label in removed if key.rstrip("/").endswith(label)), "base T5 (pretrained only)")
        missing = values.get("missing_ranks")
        removed_cells = (None, None)
        if missing:
            missing = np.asarray(missing, dtype=np.float64)
            removed_cells = (bootstrap(1 / (missing + 1)).format(3), share(missing == 0).scaled(100).format(2))
        if queries:
            ranks = swap_ranks(values, queries)
            rank_cells = (bootstrap(ranks).format(2), bootstrap(ranks, lower_median).format(1))
        else:  # an older run without the query count: the reference's values alone
            rank_cells = (values["Mean Rank of prev. correct"], values["Median:"])
        rows.append((f"{name}, ours", len(missing) if missing is not None else None, *removed_cells, *rank_cells,
                     values["Number of non 0 ranks"]))
    rows.append(("a model without the documents, paper (NQ10k)", "", NOT_IN_DIGEST, NOT_IN_DIGEST, "", "", ""))
    rows.append(("pretrained T5, paper (NQ10k)", "", "", "", PAPER["t5_encoder_mean_rank_previously_correct"], "",
                 ""))
    headers = HEADERS[:-1] + [HEADERS[-1] + (f", of {queries}" if queries else "")]
    text = md_table(headers, rows)
    text += ("\n\nMRR and Hits@1 are over the correct validation queries of the documents the encoder's model never "
             "saw (each of their correct queries; the reference takes the first only, the same when a document has "
             "one); mean and median rank (the lower median, as the reference's torch.median) over all correct "
             "queries. Ranks count from 0 (rank 0 = first), as in the reference code: MRR is the mean of "
             "1/(rank+1), Hits@1 the share at rank 0. Intervals: 95% percentile bootstrap over those queries, n "
             "queries.\n\n"
             "Paper (NQ10k): its Table 2 reports MRR and Hits@1 of the removed documents for each removed-documents "
             "model (our digest of the paper does not hold those values); encoders of models that never saw a "
             "document still let the full model's decoder retrieve it. Swapping in the pretrained T5's encoder "
             f"gives a mean rank of {PAPER['t5_encoder_mean_rank_previously_correct']} for previously correct "
             "documents (mean over all correct queries).\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="table2", title="Encoder swap", paper_ref="Sec. 4, Table 2", position=20,
    command="genir-jax swap-encoder", paper=PAPER, render=render, config=Config(),
    runs={"swap-encoder": run_swap_encoder}, reads=("choose-removed",), after_removed_models=True,
    not_applicable=("swap-encoder",),
)
