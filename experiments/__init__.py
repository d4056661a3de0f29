"""One declarative entry per table and figure of the paper; `genir-jax reproduce` renders them in order.

Each module defines ``EXPERIMENT`` (a `genir_jax.report.Experiment`): the pipeline steps it reads, the
command that produces it, the paper's numbers, and how its section of ``report.md`` is rendered.
"""

from experiments import (
    figure3_residual_contributions, figure4_rank_development, figure5_reading, table1_retrieval, table2_encoder_swap,
    table3_stage_patching, table4_minimal_circuit, table5_crattn_docid_share, table6_crattn_head_tokens,
)

EXPERIMENTS = [
    table1_retrieval.EXPERIMENT,
    table2_encoder_swap.EXPERIMENT,
    figure3_residual_contributions.EXPERIMENT,
    table3_stage_patching.EXPERIMENT,
    table4_minimal_circuit.EXPERIMENT,
    figure4_rank_development.EXPERIMENT,
    figure5_reading.EXPERIMENT,
    table5_crattn_docid_share.EXPERIMENT,
    table6_crattn_head_tokens.EXPERIMENT,
]
