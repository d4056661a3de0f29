"""Which analyses need a T5's encoder and cross-attention, and why they are not applicable to decoder-only models.

A decoder-only GenIR model (GPT-2, Llama, Qwen2, `genir_jax.core.decoder_only`) reads the query through causal
self-attention in one stack: there is no encoder to swap, no cross-attention to read from or to write the docid's
logit, so the paper's analyses of those (Table 2's encoder swap, Fig. 5's cross-attention reading, Table 5's
cross-attention outputs and their docid share, the per-head token tables and the per-head logit lens of the
cross-attention heads) have nothing to measure there. Analyses that would transfer but are not implemented for
them are named apart (`NOT_YET_ON_DECODER_ONLY`), with a message that says so.
`NOT_APPLICABLE_TO_DECODER_ONLY` names each with its reason; `check_applicable` refuses such an analysis of a
decoder-only checkpoint (`NotApplicableError`, one line), the one place every command's checkpoint is checked
(`genir_jax.cli.main`). The keys are command names, plus analyses without a command of their own that
`genir-jax reproduce` runs (the paper's minimal circuit, stage robustness, attribution agreement): a decoder-only
reproduction reports every experiment it leaves out with the reason given here (`genir_jax.paper.report`)."""

from __future__ import annotations

import os

from genir_jax.base.errors import GenIRError

NO_CROSS_ATTENTION = ("a decoder-only model has no cross-attention: its single stack reads the query through causal "
                      "self-attention (blocks.*.attn)")
# analysis (as the command names it) -> why it does not transfer to decoder-only models
NOT_APPLICABLE_TO_DECODER_ONLY = {
    "swap-encoder": "a decoder-only model has no encoder to swap (the query and the docid prediction share one "
                    "stack)",
    "crattn-reading": NO_CROSS_ATTENTION,
    "crattn-writes": NO_CROSS_ATTENTION + ", so there are no cross-attention outputs or docid share to measure",
    "crattn-head-tokens": NO_CROSS_ATTENTION,
    "head-logit-lens": NO_CROSS_ATTENTION + ", whose heads this per-head logit lens reads",
    # `genir-jax circuit` without --circuit (`genir_jax.analysis.circuit.default_circuit`), Table 4 of reproduce
    "minimal-circuit": "it removes every self-attention layer, through which a decoder-only model reads the query "
                       "(and has cross-attention patches)",
}
# analysis -> why it does not run on decoder-only models yet although it would transfer
NOT_YET_ON_DECODER_ONLY = {
    "neuron-reading": "its readers are T5 decoder components (self-attention, cross-attention, MLP per head and "
                      "layer at the first decoding step); a decoder-only model's readers are not implemented",
    # analyses of `genir-jax reproduce` without a command of their own
    "stage-robustness": "its sweep ablates the T5 decoder's three component types (self-attention, cross-attention, "
                        "MLP) in every layer and stage; the decoder-only sweep is not implemented",
    "attribution-agreement": "its AtP / AtP* comparison is built over the T5 decoder's heads, neurons and "
                             "components; the decoder-only units are not implemented",
}


class NotApplicableError(GenIRError):
    """An analysis asked of a model it has nothing to measure in (e.g. cross-attention of a decoder-only model)."""


def check_applicable(analysis: str, checkpoint: str | os.PathLike | None) -> None:
    """Raise `NotApplicableError` when `analysis` (a command name) is in `NOT_APPLICABLE_TO_DECODER_ONLY` (or
    `NOT_YET_ON_DECODER_ONLY`) and `checkpoint` is a decoder-only checkpoint
    (`genir_jax.checkpoints.hf.checkpoint_is_decoder_only`)."""
    if checkpoint is None or (analysis not in NOT_APPLICABLE_TO_DECODER_ONLY and
                              analysis not in NOT_YET_ON_DECODER_ONLY):
        return
    from genir_jax.checkpoints.hf import checkpoint_is_decoder_only

    if not checkpoint_is_decoder_only(checkpoint):
        return
    if analysis in NOT_APPLICABLE_TO_DECODER_ONLY:
        raise NotApplicableError(f"{os.fspath(checkpoint)}: {analysis} is not applicable to decoder-only models: "
                                 f"{NOT_APPLICABLE_TO_DECODER_ONLY[analysis]}")
    raise NotApplicableError(f"{os.fspath(checkpoint)}: {analysis} does not run on decoder-only models yet: "
                             f"{NOT_YET_ON_DECODER_ONLY[analysis]}")
