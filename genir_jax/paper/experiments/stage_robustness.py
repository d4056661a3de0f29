"""Stage robustness: every layer of a component type ablated, every single layer ablated, and the stage table
under the automatic stages and the equal thirds side by side (do Table 3's stage claims depend on the split?)."""

import dataclasses

from genir_jax.paper.panels import Experiment, Section, record_settings

from genir_jax.paper.experiments._common import correct_inputs

PAPER = {"stages_t5_large": "I = layers 0-6, II = 7-17, III = 18-23 (read off per-layer curves; one partition)",
         "claim": "stage-I and stage-III MLPs are needed (92.86% / 96.72% leave rank 1 when zeroed), stage-II "
                  "MLPs are not (7.83%); cross-attention matters most in stages II and III"}


@dataclasses.dataclass(frozen=True)
class Config:
    modes: tuple[str, ...] = ("zero", "mean")
    batch_size: int | None = None   # queries per device per step (None: from a logits budget)


def run_stage_robustness(layout, settings, config: Config) -> dict:
    """`genir_jax.analysis.stage_robustness` with the automatic stages (fitted on one half of the correct
    validation queries), the equal thirds (and the paper's, for a 24-layer decoder) as partitions, all compared
    on the other half."""
    from genir_jax.analysis import stage_robustness as robustness
    from genir_jax.analysis.stages import Stages, report_inputs

    inputs = correct_inputs(layout)
    model = inputs.model
    partitions, records = robustness.standard_partitions(
        model.config, model.params, inputs.input_ids, inputs.attention_mask, inputs.targets,
        query_ids=[q.query_id for q in inputs.queries], batch_size=config.batch_size, progress=settings.progress)
    inputs = report_inputs(Stages.from_record(records["auto"]), inputs)
    result = robustness.run_stage_robustness(
        model.config, model.params, inputs.input_ids, inputs.attention_mask, inputs.targets, partitions=partitions,
        modes=config.modes, query_chunk=config.batch_size, progress=settings.progress)
    output = layout.analysis("stage-robustness")
    robustness.write_stage_robustness(output, result, partition_records=records, queries=len(inputs.queries))
    return record_settings(output, "stage-robustness", config, checkpoint=layout.full, partitions=partitions,
                           queries=len(inputs.queries))


def render(layout) -> Section:
    from genir_jax.analysis.stage_robustness import read_stage_robustness, render_markdown
    from genir_jax.analysis.stages import Stages

    result, stored = read_stage_robustness(layout.analysis("stage-robustness"))
    records = stored["partition_records"]
    methods = ", ".join(f"{name} ({record['method']})" for name, record in records.items())
    text = render_markdown(result, stored["queries"])
    auto = f" {Stages.from_record(records['auto']).describe_fit()}" if "auto" in records else ""
    text += (f"\nPartitions: {methods}; the automatic stages are fitted to this model's per-layer curves "
             f"(genir_jax.analysis.auto_stages).{auto} Paper (T5-large, NQ10k): one partition, "
             f"{PAPER['stages_t5_large']}; {PAPER['claim']}.\n")
    return Section(text)


EXPERIMENT = Experiment(
    id="stage-robustness", title="Stage robustness", paper_ref="beyond the paper: checks Sec. 5.1's stages",
    position=95, command="genir_jax.analysis.stage_robustness", paper=PAPER, render=render, config=Config(),
    runs={"stage-robustness": run_stage_robustness}, not_applicable=("stage-robustness",),
)
