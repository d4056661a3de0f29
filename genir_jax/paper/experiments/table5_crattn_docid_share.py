"""Table 5: share of docid tokens among the top tokens of the cross-attention outputs' logit lens."""

import dataclasses

import numpy as np

from genir_jax.analysis.stages import stage_names
from genir_jax.paper.panels import Experiment, Section, md_table, read_json, record_settings

from genir_jax.paper.experiments._common import correct_inputs, resolve_stages

PAPER = {"top10": 0.00, "top100": 0.10, "top1000": 2.30}  # NQ10k, percent


@dataclasses.dataclass(frozen=True)
class Config:
    cutoffs: tuple[int, ...] = (10, 100, 1000)  # top-k cutoffs of the logit lens
    stages: str | None = None                   # None: the paper's for 24 decoder layers, else auto
    batch_size: int = 16


def run_crattn_writes(layout, settings, config: Config) -> dict:
    """Docid shares among the top tokens of cross-attention outputs of every stage but the first
    (`genir_jax.analysis.cross_attention_writes`), as `genir-jax crattn-writes` writes them."""
    from genir_jax.analysis.cross_attention_writes import docid_shares, write_docid_shares
    from genir_jax.analysis.stages import write_stages
    from genir_jax.base.io import atomic_directory

    stages, stages_record, inputs = resolve_stages(config.stages, correct_inputs(layout), settings.progress)
    model = inputs.model
    result = docid_shares(model.config, model.params, model.tokenizer, inputs.texts, stages=stages,
                          cutoffs=list(config.cutoffs), batch_size=config.batch_size, progress=settings.progress)
    output = layout.analysis("crattn-writes")
    with atomic_directory(output) as staging:
        write_docid_shares(staging, result)
        write_stages(staging, stages_record)
    return record_settings(output, "table5", config, checkpoint=layout.full, stages=stages,
                           stages_method=stages_record["method"], queries=len(inputs.queries))


PAPER_STAGE = "II"  # the paper's Table 5 is for the stage-II cross-attention outputs only


def per_query_shares(layout, stage: str, cutoff: str) -> np.ndarray:
    """[N] per correct query, the docid share among the top `cutoff` tokens averaged over the stage's layers
    (the reference's per_q_averages_s<stage>.json, query-major)."""
    directory = layout.analysis("crattn-writes")
    queries = read_json(directory / "crattn_writes_summary.json")["queries"]
    values = read_json(directory / f"per_q_averages_s{stage}.json")[str(cutoff)]
    return np.reshape(values, (queries, -1)).mean(axis=1)


def render(layout) -> Section:
    from genir_jax.analysis.evidence import bootstrap

    directory = layout.analysis("crattn-writes")
    summary = read_json(directory / "crattn_writes_summary.json")
    cutoffs = [str(c) for c in summary["cutoffs"]]
    stages = summary.get("stages", [])
    rows = []
    for stage in summary["docid_share"]:
        index = stage_names(len(stages)).index(stage) if stage in stage_names(len(stages)) else None
        layers = f" (layers {stages[index][0]}-{stages[index][-1]})" if index is not None else ""
        rows.append((f"stage {stage}{layers}, ours",
                     *(bootstrap(per_query_shares(layout, stage, c)).scaled(100).format(2) for c in cutoffs)))
        if stage == PAPER_STAGE:
            rows.append((f"stage {stage}, paper (NQ10k)",
                         *(f"{PAPER['top' + c]:.2f}" if "top" + c in PAPER else "no paper value" for c in cutoffs)))
        else:
            rows.append((f"stage {stage}, paper", *("no paper value" for _ in cutoffs)))
    text = md_table(["", *(f"% docids in top {c} (mean over queries and layers) [95% CI]" for c in cutoffs)],
                    rows)
    text += (f"\n\n{summary['queries']} correct queries; each share is the fraction of docid tokens among the top-k "
             "tokens of a layer's cross-attention output (logit lens), averaged over queries and the stage's layers "
             "(intervals: 95% bootstrap over the queries of their mean over the stage's layers, n queries). "
             f"The paper reports stage {PAPER_STAGE} only, so only our stage {PAPER_STAGE} has a paper row beside "
             "it. A docid share near 0 means cross-attention writes word information, not document identities.\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="table5", title="What cross-attention writes: docid share", paper_ref="Sec. 5.4, Table 5",
    position=80, command="genir-jax crattn-writes", paper=PAPER, render=render, config=Config(),
    runs={"crattn-writes": run_crattn_writes}, not_applicable=("crattn-writes",),
)
