"""What the experiment modules share: the analysed model and its correct queries, loaded once per run through
the library (`genir_jax.checkpoints.hf`, `genir_jax.analysis.inputs`), the stages a run uses, and reading them back."""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np

from genir_jax.analysis.stage_patching import default_stages
from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError


def full_config(layout) -> T5Config:
    return T5Config.from_json_file(layout.full / "config.json")


REPORT_STAGES_STEP = "patch-stages"  # the run whose stages (Table 3's) every panel of a report shares


def stages_of(layout, step: str = REPORT_STAGES_STEP) -> list[list[int]]:
    """The stages a step's run used (its stages.json; by default Table 3's, which every panel shares), else
    the default split of the full model's decoder."""
    path = layout.analysis(step) / "stages.json"
    if path.is_file():
        return [list(stage) for stage in json.loads(path.read_text())["stages"]]
    return default_stages(full_config(layout).num_decoder_layers)


def load_model(path, *, tokenizer: bool = True):
    """A checkpoint for analysis (`genir_jax.checkpoints.hf.load_for_analysis`); with `tokenizer`, refuses one without."""
    from genir_jax.checkpoints.hf import load_for_analysis

    model = load_for_analysis(str(path), load_tokenizer=tokenizer)
    if tokenizer and model.tokenizer is None:
        raise GenIRError(f"{path}: no tokenizer files; the checkpoint must include its tokenizer")
    return model


@dataclasses.dataclass
class CorrectInputs:
    """The full model and the validation queries it ranks correctly, tokenised (masked padding)."""

    model: object
    queries: list
    input_ids: np.ndarray
    attention_mask: np.ndarray
    targets: np.ndarray

    @property
    def texts(self) -> list[str]:
        return [q.text for q in self.queries]


def correct_inputs(layout) -> CorrectInputs:
    """The full model of a reproduction and its correct validation queries (``correct_valid.json``)."""
    from genir_jax.analysis.inputs import load_correct_queries, tokenize_for_analysis

    model = load_model(layout.full)
    queries = load_correct_queries(layout.queries("val"), layout.correct_valid, model.tokenizer)
    ids, mask = tokenize_for_analysis(model.tokenizer, [q.text for q in queries])
    targets = np.asarray([q.token_id for q in queries], dtype=np.int32)
    return CorrectInputs(model, queries, ids, mask, targets)


def full_scheme(layout):
    """The docid scheme the full model was trained with (its docids.json; atomic when absent)."""
    from genir_jax.docids.schemes import checkpoint_scheme

    return checkpoint_scheme(layout.full)


@dataclasses.dataclass
class CorrectSequenceInputs(CorrectInputs):
    """`CorrectInputs` of a naive / semantic model: `targets` [N, T] are the docid token sequences (ending
    with EOS, right-padded with 0) and `target_mask` [N, T] marks their real tokens."""

    target_mask: np.ndarray = None
    scheme: object = None


def correct_sequence_inputs(layout) -> CorrectSequenceInputs:
    """The full (naive / semantic) model of a reproduction, its correct validation queries and their docid
    token sequences."""
    from genir_jax.analysis.inputs import load_correct_sequence_queries, tokenize_for_analysis
    from genir_jax.docids.sequence_targets import pad_targets

    model = load_model(layout.full)
    scheme = full_scheme(layout)
    queries = load_correct_sequence_queries(layout.queries("val"), layout.correct_valid, scheme, model.tokenizer)
    ids, mask = tokenize_for_analysis(model.tokenizer, [q.text for q in queries])
    targets, target_mask = pad_targets([q.tokens for q in queries])
    return CorrectSequenceInputs(model, queries, ids, mask, targets, target_mask=target_mask, scheme=scheme)


def resolve_stages(spec: str | None, inputs: CorrectInputs, progress: bool) -> tuple[list[list[int]], dict]:
    """The stages `spec` names ('auto', 'thirds', 'paper', ranges; None: the analysis commands' default, the
    paper's for 24 decoder layers, else auto) and their stages.json record, as every analysis command
    resolves its --stages. With multi-token docids, automatic stages are fitted on the first decoding step
    (the first docid token given the start token; recorded as ``auto_target``)."""
    from genir_jax.cli.commands.common import resolve_stages as resolve

    options = types.SimpleNamespace(stages=spec, batch_size=None, no_progress=not progress)
    targets = inputs.targets if inputs.targets.ndim == 1 else inputs.targets[:, 0]
    stages, record = resolve(options, inputs.model.config, inputs.model.params, inputs.input_ids,
                             inputs.attention_mask, targets)
    if inputs.targets.ndim == 2 and record["method"] == "auto":
        record["auto_target"] = "the first docid token (first decoding step)"
    return stages, record
