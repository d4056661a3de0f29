"""Table 3 put together once: every requested patching mode on a model's correct queries (checked by
`genir_jax.analysis.inputs.check_correct_pairs`) and the output files, for `genir-jax patch-stages` and the
reproduction's Table 3 alike.

Atomic docids run the single-step sweep (`genir_jax.analysis.stage_patching`): zero and mean modes on the
queries as given (masked, or the reference's padding), ``t5`` mode with the base T5's outputs on masked
queries. Naive / semantic docids run the teacher-forced variant (`genir_jax.analysis.sequence_stage_patching`)
and are written as the same files.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from genir_jax.analysis import stage_patching  # looked up at call time, so the one runner can be replaced
from genir_jax.analysis.inputs import AnalysisInputs, check_vocabulary_covers, tokenize_for_analysis
from genir_jax.analysis.stage_patching import (REFERENCE_MODE_ORDER, T5_ALL_AND_ATTN_JSON,  # noqa: F401
                                              StagePatchingResult,
                                              write_stage_patching)
from genir_jax.analysis.stages import STAGES_JSON, Stages
from genir_jax.base.errors import GenIRError


def check_modes(modes: Sequence[str], base) -> list[str]:
    """The modes, validated: some of zero, mean, t5; t5 needs the base T5."""
    modes = [m.strip() for m in modes if m.strip()]
    unknown = sorted(set(modes) - set(REFERENCE_MODE_ORDER))
    if unknown or not modes:
        raise GenIRError(f"--modes: unknown mode(s) {unknown or modes}; expected some of zero, mean, t5")
    if "t5" in modes and base is None:
        raise GenIRError("--modes t5 needs --t5 BASE_CHECKPOINT_DIR (the pretrained T5)")
    return modes


def patch_stages(inputs: AnalysisInputs, stages: Stages, modes: Sequence[str], *, base=None, base_name: str = "",
                 batch_size: int | None = None, reference_padding: bool = False, rank_reduction: str = "max",
                 progress: bool = True) -> StagePatchingResult:
    """Each component type patched in each stage, in every mode of `modes` (``t5``: `base`, the pretrained
    T5 loaded for analysis, named `base_name` in errors), on `inputs` (`load_analysis_inputs`, which checked
    that the model ranks each query's relevant docid first). `batch_size`: queries per device per step
    (atomic; None: from a logits budget) or per step (sequences; None: 32)."""
    modes = check_modes(modes, base)
    model = inputs.model
    if inputs.target_mask is not None:
        return _sequence_patch_stages(inputs, stages, modes, base, base_name, batch_size, rank_reduction, progress)
    from genir_jax.interp.patching import Source

    layers = stages.as_lists()
    parts = []
    plain = [m for m in ("mean", "zero") if m in modes]
    if plain:
        ids, mask = inputs.input_ids, inputs.attention_mask
        if reference_padding:
            ids, mask = tokenize_for_analysis(model.tokenizer, inputs.texts, reference_padding=True)
        parts.append(stage_patching.run_stage_patching(model.config, model.params, ids, mask, inputs.targets,
                                                       stages=layers, modes=plain, query_chunk=batch_size,
                                                       progress=progress))
    if "t5" in modes:
        # The reference runs T5 mode on unpadded single queries: masks give the same result in a batch.
        check_vocabulary_covers(base_name, base.config, inputs.input_ids)
        parts.append(stage_patching.run_stage_patching(model.config, model.params, inputs.input_ids,
                                                       inputs.attention_mask, inputs.targets, stages=layers,
                                                       modes=["t5"], source=Source(base.config, base.params),
                                                       query_chunk=batch_size, progress=progress))
    return StagePatchingResult(rows=[row for part in parts for row in part.rows],
                               ranks=np.concatenate([part.ranks for part in parts]), sweep=parts[0].sweep)


def _sequence_patch_stages(inputs, stages, modes, base, base_name, batch_size, rank_reduction,
                           progress) -> StagePatchingResult:
    """Table 3 for naive / semantic docids: the same configurations at every decoder position of the
    teacher-forced docid, ranks reduced per query by `rank_reduction`."""
    from genir_jax.analysis.sequence_stage_patching import run_sequence_stage_patching

    model = inputs.model
    if base is not None:
        check_vocabulary_covers(base_name, base.config, inputs.input_ids, inputs.targets, tokens="query and docid")
    result = run_sequence_stage_patching(
        model.config, model.params, inputs.input_ids, inputs.attention_mask, inputs.targets, inputs.target_mask,
        stages=stages.as_lists(), modes=modes, source_params=base.params if base is not None else None,
        metric="step_rank", reduction=rank_reduction, batch_size=batch_size or 32, progress=progress)
    return result.as_rank_result()


def t5_all_and_attn(model, base, val_queries: str | os.PathLike, stages: Stages, *, qrels=None,
                    base_name: str = "", batch_size: int | None = None, progress: bool = True) -> dict:
    """eval_patching_t5.py's patching_results_t5_all_and_attn.json: the T5's outputs in place of every component
    of every stage but the last and of the last stage's attn, on ALL validation queries (unpadded there, masks
    here), top 100 over the full vocabulary, its hits@1 / hits@10 / recall@5 and its config text."""
    from genir_jax.analysis.circuit import reference_retrieval_metrics
    from genir_jax.analysis.stage_patching import PAPER_STAGES_24, T5_ALL_AND_ATTN_CONFIG, t5_all_and_attn_config
    from genir_jax.data.corpus import qrels_from_queries, read_queries
    from genir_jax.docids.tokens import docid_vocabulary
    from genir_jax.interp.patching import Source, run_sweep
    from genir_jax.interp.sweep import stack

    layers = stages.as_lists()
    queries = read_queries(val_queries)
    if qrels is None:
        qrels = qrels_from_queries(queries)
    ids, mask = tokenize_for_analysis(model.tokenizer, [q.text for q in queries])
    check_vocabulary_covers(base_name, base.config, ids)
    sweep = stack([t5_all_and_attn_config(model.config, layers)], labels=[{"config": "t5_all_and_attn"}])
    result = run_sweep(model.config, model.params, ids, mask, np.zeros(len(queries), np.int32), sweep,
                       source=Source(base.config, base.params), metrics=("rank",),
                       top_k=min(100, model.config.vocab_size), query_chunk=batch_size, progress=progress)
    report = reference_retrieval_metrics(np.asarray(result.top_ids[0]), [q.id for q in queries], qrels,
                                         docid_vocabulary(model.tokenizer))
    paper = layers == [list(s) for s in PAPER_STAGES_24]
    report["config"] = T5_ALL_AND_ATTN_CONFIG if paper else (
        ", ".join(f"{s[0]}-{s[-1]} attn, cr, mlp = T5" for s in layers[:-1]) + f", {layers[-1][0]}-{layers[-1][-1]} "
        "only attn = t5")
    return report


def write_patch_stages(output: str | os.PathLike, result: StagePatchingResult, stages: Stages, *,
                       reference: bool = False, extra_json: dict | None = None) -> None:
    """The result files and stages.json; `reference`: the reference scripts' files (with `extra_json`, e.g.
    the t5 all-and-attn evaluation), no stages.json."""
    if reference:
        write_stage_patching(output, result, extra_json=extra_json or {}, reference=True, num_stages=len(stages))
    else:
        write_stage_patching(output, result, extra_json={**(extra_json or {}), STAGES_JSON: stages.record()})
