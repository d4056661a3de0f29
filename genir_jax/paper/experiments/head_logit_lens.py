"""Beyond the paper: which cross-attention heads write the relevant docid (per-head logit lens)."""

import dataclasses

import numpy as np

from genir_jax.paper.experiments._common import correct_inputs
from genir_jax.paper.panels import Experiment, Section, md_table, read_json, record_settings

SHOWN = 8  # heads in the report's table


@dataclasses.dataclass(frozen=True)
class Config:
    top: int = 10          # a head "writes the docid" when the docid is among its top `top` logit-lens tokens
    batch_size: int = 16


def run_head_logit_lens(layout, settings, config: Config) -> dict:
    """The per-head logit lens of every decoder cross-attention head on the correct validation queries
    (`genir_jax.analysis.head_logit_lens`), as `genir-jax head-logit-lens` writes it."""
    from genir_jax.analysis.head_logit_lens import run_head_logit_lens as run, write_head_logit_lens
    from genir_jax.analysis.residual import docid_mask
    from genir_jax.base.io import atomic_directory

    inputs = correct_inputs(layout)
    model = inputs.model
    result = run(model.config, model.params, inputs.input_ids, inputs.attention_mask, inputs.targets,
                 docid_mask(model.tokenizer, model.config.vocab_size), top=config.top,
                 batch_size=config.batch_size, progress=settings.progress)
    output = layout.analysis("head-logit-lens")
    with atomic_directory(output) as staging:
        write_head_logit_lens(staging, result)
    return record_settings(output, "head-logit-lens", config, checkpoint=layout.full, queries=len(inputs.queries))


def render(layout) -> Section:
    from genir_jax.analysis.evidence import bootstrap, share
    from genir_jax.analysis.head_logit_lens import RANKS_FILE, RESULT_FILE

    directory = layout.analysis("head-logit-lens")
    summary = read_json(directory / RESULT_FILE)
    ranks = np.load(directory / RANKS_FILE)                                  # [N, L, H]
    top = summary["top"]
    heads = sorted(summary["heads"], key=lambda h: (-h["target_in_top"], h["median_target_rank"]))[:SHOWN]
    rows = []
    for head in heads:
        interval = share(ranks[:, head["layer"], head["head"]] < top).scaled(100)
        rows.append((f"{head['layer']}.{head['head']}", interval.format(1, "%"),
                     bootstrap(ranks[:, head["layer"], head["head"]], np.median).format(1),
                     f"{100 * head['docid_share_in_top']:.1f}"))
    text = md_table(["head (layer.head)", f"% queries with the docid in its top {top} [95% CI]",
                     "median docid rank [95% CI]", f"% docid tokens in its top {top} (mean over queries)"], rows)
    text += (f"\n\n{summary['queries']} correct queries, first decoding step. Each head's own output z_h @ W_O[h] is "
             "read through the decoder's final norm and the unembedding (logit lens); ranks are 0-based over the "
             f"whole vocabulary. The {SHOWN} heads whose logit lens most often puts the query's relevant docid in "
             "its top tokens are shown; intervals are 95% bootstraps over queries, n queries (the docid-token share "
             "has none: the analysis keeps its mean only). The paper has no per-head numbers.\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="head-logit-lens", title="Which cross-attention heads write the docid (per-head logit lens)",
    paper_ref="beyond the paper: Table 5 per head", position=92, command="genir-jax head-logit-lens", paper={},
    render=render, config=Config(), runs={"head-logit-lens": run_head_logit_lens},
    not_applicable=("head-logit-lens",),
)
