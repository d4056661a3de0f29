"""What the experiment modules share: the analysed model and its correct queries, loaded once per run through
the library (`genir_jax.checkpoints.hf`, `genir_jax.analysis.inputs`), the stages a run uses, and reading them back."""

from __future__ import annotations

from genir_jax.analysis.inputs import AnalysisInputs as CorrectInputs  # noqa: F401 (the experiments' name)
from genir_jax.analysis.inputs import load_model  # noqa: F401 (re-exported for the experiment modules)
from genir_jax.analysis.stage_patching import default_stages
from genir_jax.analysis.stages import STAGES_JSON, Stages
from genir_jax.core.config import T5Config
from genir_jax.paper.panels import REPORT_STAGES_STEP  # noqa: F401 (re-exported for the experiment modules)


def full_config(layout):
    """The full model's configuration, of the family its config.json names: a `T5Config`, or a decoder-only
    model's `DecoderConfig` (whose ``num_decoder_layers`` is its number of layers)."""
    from genir_jax.checkpoints.hf import checkpoint_is_decoder_only

    if checkpoint_is_decoder_only(layout.full):
        from genir_jax.core.decoder_config import DecoderConfig

        return DecoderConfig.from_json_file(layout.full / "config.json")
    return T5Config.from_json_file(layout.full / "config.json")


def model_description(layout) -> str:
    """The analysed model in a few words, for figure titles: e.g. 'DSI T5, 24+24 layers, d_model 1024', or
    'DSI decoder-only (llama), 2 layers, d_model 64'."""
    config = full_config(layout)
    if not isinstance(config, T5Config):
        return f"DSI decoder-only ({config.model_type}), {config.num_layers} layers, d_model {config.d_model}"
    return f"DSI T5, {config.num_layers}+{config.num_decoder_layers} layers, d_model {config.d_model}"



def stages_of(layout, step: str = REPORT_STAGES_STEP) -> list[list[int]]:
    """The stages a step's run used (its stages.json; by default Table 3's, which every panel shares), else
    the default split of the full model's decoder."""
    if (layout.analysis(step) / STAGES_JSON).is_file():
        return Stages.read(layout.analysis(step)).as_lists()
    return default_stages(full_config(layout).num_decoder_layers)


CorrectSequenceInputs = CorrectInputs  # with target_mask and scheme set


def correct_inputs(layout) -> CorrectInputs:
    """The full model of a reproduction and its correct validation queries (``correct_valid.json``)."""
    from genir_jax.analysis.inputs import load_analysis_inputs

    return load_analysis_inputs(layout.full, layout.queries("val"), layout.correct_valid)


def full_scheme(layout):
    """The docid scheme the full model was trained with (its docids.json; atomic when absent)."""
    from genir_jax.docids.schemes import checkpoint_scheme

    return checkpoint_scheme(layout.full)


def correct_sequence_inputs(layout) -> CorrectInputs:
    """The full (naive / semantic) model of a reproduction, its correct validation queries and their docid
    token sequences."""
    from genir_jax.analysis.inputs import load_analysis_inputs

    return load_analysis_inputs(layout.full, layout.queries("val"), layout.correct_valid, sequences=True,
                                scheme=full_scheme(layout))


def resolve_stages(spec: str | None, inputs: CorrectInputs, progress: bool
                   ) -> tuple[list[list[int]], dict, CorrectInputs]:
    """The stages `spec` names, their stages.json record and the inputs to report on: the held-out half of the
    correct queries for automatic stages, else all (`genir_jax.analysis.stages.resolve_for_inputs`, as every
    analysis command resolves its --stages)."""
    from genir_jax.analysis.stages import resolve_for_inputs

    stages, held_out = resolve_for_inputs(spec, inputs, progress=progress)
    return stages.as_lists(), stages.record(), held_out
