"""Attribution against exact patching: how far AtP and AtP* (the estimates `genir-jax attribute` ranks units by)
agree with exact patching on this model, per unit family and ablation mode, with intervals over the queries
(`genir_jax.analysis.attribution_agreement`). Opt-in (`reproduce --attribution-agreement`): it patches every
decoder head, neuron and component exactly, zero and mean, and compiles a sweep and two attributions for each
family: 375 s on a random model of the tiny preset's shape with 64 queries (shared 2-core machine, load average
about 11), far over the 30 s a default step may add."""

import dataclasses

from genir_jax.paper.panels import Experiment, Section, md_table, record_settings

from genir_jax.paper.experiments._common import correct_inputs

STEP = "attribution-agreement"
PAPER = {"source": "Kramár et al. 2024 (AtP*) report AtP's estimates tracking exact patching; the paper (Reusch & "
                   "Belinkov) patches exactly and reports no attribution estimates"}
MAGNITUDE = {"atp": "abs(AtP)", "atp*": "GradDrop"}  # no "|": it would split a table cell
METHOD = {"atp": "AtP", "atp*": "AtP*"}


@dataclasses.dataclass(frozen=True)
class Config:
    modes: tuple[str, ...] = ("zero", "mean")
    batch_size: int | None = None   # queries per step (None: the sweep's and attribution's defaults)


def run_attribution_agreement(layout, settings, config: Config) -> dict:
    """`genir_jax.analysis.attribution_agreement` on the full model and its correct validation queries."""
    from genir_jax.analysis import attribution_agreement as agreement

    inputs = correct_inputs(layout)
    model = inputs.model
    result = agreement.run_attribution_agreement(
        model.config, model.params, inputs.input_ids, inputs.attention_mask, inputs.targets, modes=config.modes,
        query_chunk=config.batch_size, progress=settings.progress)
    output = layout.analysis(STEP)
    agreement.write_attribution_agreement(output, result)
    return record_settings(output, STEP, config, checkpoint=layout.full, queries=result.queries)


def render(layout) -> Section:
    from genir_jax.analysis import attribution_agreement as agreement
    from genir_jax.interp.attribution import MIN_SPEARMAN

    result = agreement.read_attribution_agreement(layout.analysis(STEP))
    rows = [(row.family, row.mode, METHOD[row.method], row.items, row.top_k, row.signed.format(2),
             f"{MAGNITUDE[row.method]}: {row.magnitude.format(2)}", row.overlap.format(2), row.verdict)
            for row in result.rows]
    table = md_table(["units", "ablation", "method", "items", "k", "Spearman: exact vs signed estimate",
                      "Spearman: abs(exact) vs magnitude", "top-k overlap", f"order agrees (rho > {MIN_SPEARMAN})"],
                     rows)
    text = (f"Exact patching against attribution patching on the {result.queries} correct validation queries, "
            f"metric: the target docid's logit (patched minus clean). Per unit family (decoder heads at `hook_z`, "
            "the MLP neurons of every decoder layer, decoder layer x component) and ablation (zero; mean: each "
            "unit's mean over these queries, the same values in both methods, AtP estimating a mean patch as "
            "(mean - activation) . gradient): `items` units; the Spearman correlation of the exact mean effects "
            "with the signed estimates, of their absolute values with what the method ranks units by (abs(AtP), "
            "AtP*'s GradDrop magnitude), and the share of the exact top k (by absolute effect) in the method's "
            "top k (k: 10% of the units, at least 3, at most 100). AtP*'s QK fix does not touch head outputs, "
            "neurons or component outputs, so its signed estimate (and that column) is AtP's. Intervals: 95% "
            "percentile bootstrap over the queries (n queries), both means and the statistic recomputed per "
            f"resample. The last column is computed from the signed Spearman's interval: {agreement.ORDER_RULE}.\n\n")
    return Section(text + table + "\n")


EXPERIMENT = Experiment(
    id="attribution-agreement", title="Attribution against exact patching",
    paper_ref="beyond the paper: AtP and AtP* checked against exact patching", position=96,
    command="genir_jax.analysis.attribution_agreement", paper=PAPER, render=render, config=Config(),
    runs={STEP: run_attribution_agreement}, opt_in="attribution_agreement",
    not_applicable=("attribution-agreement",),
)
