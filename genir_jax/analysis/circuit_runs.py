"""Table 4 put together once: the minimal circuit ranked on the test queries (means over the correct
validation queries) and its output files, for `genir-jax circuit` and the reproduction's Table 4 alike."""

from __future__ import annotations

import os

import numpy as np

from genir_jax.analysis.circuit import (DOCID_TOKENS, FULL_VOCABULARY, RESULTS_JSON, circuit_interventions,
                                        rank_with_circuit)
from genir_jax.analysis.inputs import (AnalysisInputs, encode_for_model, reference_padded_groups,
                                       reference_padding_length, tokenize_for_analysis)


def rank_test_queries(inputs: AnalysisInputs, test_queries, circuit, stages, docids, *, k: int,
                      reference_padding: bool = False, batch_size: int | None = None, progress: bool = True,
                      rankings=(FULL_VOCABULARY, DOCID_TOKENS)) -> dict:
    """{ranking: (top_ids, top_logits, full_top_ids) [2, N, k]} of the unpatched model and of `circuit` on
    `test_queries`, the circuit's means over the correct queries of `inputs`, for each of `rankings`, from one
    set of means. `FULL_VOCABULARY`: as the reference ranks (a circuit that removes the priming MLPs may let
    word tokens rise above the docid); `top_ids` then maps the token ids (`full_top_ids`) to docid indices,
    -1 for other tokens. `DOCID_TOKENS`: the docid tokens only (`docids`,
    `genir_jax.analysis.circuit.docid_targets`; as `genir-jax evaluate`), `full_top_ids` None. Padding: masked,
    or `reference_padding` (the reference's, without masks)."""
    from genir_jax.base.errors import GenIRError
    from genir_jax.core.sites import ALL_LAYERS, component_site, components, is_decoder_only, stacks
    from genir_jax.interp.interventions import mean_activations

    model, tokenizer = inputs.model, inputs.model.tokenizer
    config = model.config
    texts, test_texts = inputs.texts, [q.text for q in test_queries]
    candidates, targets = docids.candidates, docids.targets
    needs_means = any(p.mode == "mean" for p in circuit.patches)
    sites = [component_site(stacks(config)[-1], c, ALL_LAYERS) for c in components(config)]
    if reference_padding and is_decoder_only(config):
        raise GenIRError("reference padding reproduces the reference's T5 scripts; it is not applicable to "
                         "decoder-only models")
    if reference_padding:
        length = reference_padding_length(tokenizer, texts)
        val_ids, val_mask = tokenize_for_analysis(tokenizer, texts, reference_padding=True)
        groups = reference_padded_groups(tokenizer, test_texts, length)
        groups = [(rows, ids, np.ones_like(ids)) for rows, ids in groups]
    else:
        val_ids, val_mask = inputs.input_ids, inputs.attention_mask
        ids, mask = encode_for_model(model, test_texts)
        groups = [(np.arange(len(test_texts)), ids, mask)]
    means = mean_activations(config, model.params, val_ids, val_mask, sites, progress=progress) if needs_means else None
    interventions = circuit_interventions(config, circuit, stages, means)
    lookup = np.full(config.vocab_size, -1, dtype=np.int64)  # full-vocabulary ids -> docid indices
    lookup[candidates] = np.arange(len(candidates))
    out = {}
    for ranking in rankings:
        full = ranking == FULL_VOCABULARY
        top_k = min(k, config.vocab_size if full else len(candidates))
        top_ids = np.zeros((2, len(test_queries), top_k), np.int64)
        top_logits = np.zeros(top_ids.shape, np.float32)
        for rows, ids, mask in groups:
            ids_top, logits_top = rank_with_circuit(config, model.params, interventions, ids, mask, targets[rows],
                                                    None if full else candidates, top_k=top_k,
                                                    query_chunk=batch_size, progress=progress)
            top_ids[:, rows], top_logits[:, rows] = ids_top, logits_top
        out[ranking] = (lookup[top_ids], top_logits, top_ids) if full else (top_ids, top_logits, None)
    return out


def write_circuit(output: str | os.PathLike, report: dict, runs, stages, system: str) -> None:
    """minimal_circuit.json, stages.json (a `genir_jax.analysis.stages.Stages` or its record) and the two TREC
    runs (`system`, `system`-circuit), atomically."""
    from genir_jax.analysis.stages import write_stages
    from genir_jax.base.io import atomic_directory, write_json
    from genir_jax.docids.retrieval import write_trec_run

    with atomic_directory(output) as staging:
        write_json(os.path.join(staging, RESULTS_JSON), report, indent=2)
        write_stages(staging, stages)
        write_trec_run(os.path.join(staging, "run_unpatched.trec"), runs[0], system)
        write_trec_run(os.path.join(staging, "run_circuit.trec"), runs[1], system + "-circuit")
