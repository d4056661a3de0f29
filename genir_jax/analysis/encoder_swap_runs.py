"""Table 2 put together once: the full model's decoder on the encoder of each model trained without some
documents and of the base T5, summarised per model, and swapped_encoder.json, for `genir-jax swap-encoder`
and the reproduction's Table 2 alike (`genir_jax.analysis.encoder_swap`)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from genir_jax.analysis.encoder_swap import RESULTS_JSON, encoder_swap_ranks, normalize_missing, summarize
from genir_jax.analysis.inputs import AnalysisInputs, check_vocabulary_covers, load_model
from genir_jax.base.errors import DataError


def check_missing_documents(inputs: AnalysisInputs, others: Mapping[str, tuple[str, Sequence[str]]],
                            source: str) -> None:
    """Refuse removed documents without a docid token in the full model's vocabulary (`others`: key ->
    (checkpoint, removed documents); `source` names the file in errors)."""
    vocab = inputs.model.tokenizer.get_vocab()
    for key, (_, documents) in others.items():
        unknown = [d for d in normalize_missing(documents) if d not in vocab]
        if unknown:
            raise DataError(f"{source}: key {key!r}: document(s) {unknown[:5]} have no docid token in the complete "
                            "model's vocabulary")


def swap_encoders(inputs: AnalysisInputs, others: Mapping[str, tuple[str, Sequence[str]]], *, base=None,
                  base_key: str | None = None, source: str = "", reference: bool = False,
                  batch_size: int | None = None, progress: bool = True) -> dict:
    """{key: the reference's dict of `summarize`} for every other model (`others`: key -> (checkpoint,
    removed documents), loaded one at a time) and, under `base_key`, for `base` (the pretrained T5: a loaded
    model or its checkpoint), on the correct queries of `inputs`."""
    from genir_jax.interp.patching import Source

    full = inputs.model

    def ranks_with(other):
        return encoder_swap_ranks(full.config, full.params, Source(other.config, other.params), inputs.input_ids,
                                  inputs.attention_mask, inputs.targets, query_chunk=batch_size, progress=progress)

    results = {}
    for key, (path, documents) in others.items():
        results[key] = summarize(ranks_with(load_model(path, tokenizer=False)), inputs.queries, documents,
                                 reference=reference, source=source).as_reference_dict(reference=reference)
    if base is not None:
        if isinstance(base, (str, os.PathLike)):
            base = load_model(base, tokenizer=False)
        check_vocabulary_covers(base_key, base.config, inputs.input_ids)
        results[base_key] = summarize(ranks_with(base), inputs.queries, []).as_reference_dict(reference=reference)
    return results


def write_swap_results(output: str | os.PathLike, results: dict) -> None:
    """swapped_encoder.json, atomically."""
    from genir_jax.base.io import atomic_directory, write_json

    with atomic_directory(output) as staging:
        write_json(os.path.join(staging, RESULTS_JSON), results)
