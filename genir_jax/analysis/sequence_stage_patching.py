"""Stage patching for multi-token (naive / semantic) docids: the same configurations as
`genir_jax.analysis.stage_patching`, measured on the teacher-forced docid sequence.

Each configuration (component x stage x mode, built by the same `genir_jax.interp.interventions` builders) patches
the component's output in every layer of the stage at EVERY decoder position of the teacher-forced run
(decoder inputs ``[start, y_1, .., y_{T-1}]``, `genir_jax.docids.sequence_targets`). Modes: ``zero``; ``mean`` (per
position over the given queries, on the same teacher-forced inputs; padding positions averaged too, as the
reference's mean cache); ``t5`` (the pretrained T5's output of the same component on the same query and
decoder inputs, plus the encoder swap row). The metric is selectable: ``step_rank`` (each docid token's
full-vocabulary rank at its step given the gold prefix, reduced per query by ``max`` / ``mean`` /
``first``) or ``seq_logprob`` (the docid's log-probability). Fractions beyond the stage-patching thresholds
are reported for ranks. Unlike the single-step sweep engine this runs one jitted forward per configuration
and batch (no prefix sharing): fine for the few dozen stage configurations.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from genir_jax.base.progress import compiling_bar

from genir_jax.analysis.encoder_swap import swap_site
from genir_jax.analysis.stage_patching import (
    REFERENCE_MODE_ORDER, REFERENCE_ROW_ORDER, THRESHOLDS, StageConfig, StagePatchingResult,
)
from genir_jax.base.batching import batches
from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError
from genir_jax.interp.interventions import encoder_swap, mean_activations, mean_ablation, replacement, zero_ablation
from genir_jax.docids.sequence_targets import (RANK_REDUCTIONS, TEACHER_FORCED_METRICS, reduce_step_ranks,
                                               sequence_metric, step_ranks, teacher_forced_logits,
                                               teacher_forcing_inputs)
from genir_jax.core.sites import ALL_LAYERS, component_site


@dataclasses.dataclass
class SequenceStagePatchingResult:
    rows: list[StageConfig]
    values: np.ndarray  # [K, N]: the metric per configuration and query
    clean: np.ndarray   # [N]: the metric without patching
    metric: str
    reduction: str
    step_ranks: np.ndarray | None = None  # [K, N, T] each docid token's rank at its step (-1 on padding)

    def fractions(self) -> list[dict]:
        """Per row: component, stage, mode and, for ranks, the fractions beyond each threshold; for
        log-probabilities the mean value and its mean change from the clean run."""
        out = []
        for row, values in zip(self.rows, self.values):
            entry = {"component": row.component, "stage": row.stage, "mode": row.mode}
            if self.metric == "step_rank":
                for label, threshold in THRESHOLDS:
                    entry[label] = float(np.mean(values > threshold)) if values.size else 0.0
            else:
                entry["mean"] = float(np.mean(values))
                entry["mean_effect"] = float(np.mean(values - self.clean))
            out.append(entry)
        return out

    def as_rank_result(self) -> StagePatchingResult:
        """The same rows as a `StagePatchingResult` of integer ranks (``step_rank`` reduced by ``max`` or
        ``first``), so `write_stage_patching` writes the single-token analysis's files: a rank of 0 means
        greedy decoding still gives the docid (``max``) or its first token is still on top (``first``)."""
        if self.metric != "step_rank" or self.reduction == "mean":
            raise GenIRError(f"rank files need integer ranks (metric step_rank, reduction max or first), not "
                             f"{self.metric} / {self.reduction}")
        return StagePatchingResult(rows=list(self.rows), ranks=np.asarray(self.values, dtype=np.int64), sweep=None,
                                   step_ranks=self.step_ranks)


def _configs(config: T5Config, stages, modes, means, source_cache):
    """(row, interventions) per configuration, in `stage_patching`'s row order."""
    out = []
    for mode in (m for m in REFERENCE_MODE_ORDER if m in modes):
        for component in REFERENCE_ROW_ORDER:
            for index, stage in enumerate(stages):
                sites = [component_site("decoder", component, layer) for layer in stage]
                if mode == "zero":
                    iv = zero_ablation(config, sites)
                elif mode == "mean":
                    iv = mean_ablation(config, means, sites=sites)
                else:
                    iv = replacement(config, {site: source_cache[site] for site in sites})
                out.append((StageConfig(component, index, mode), iv))
    if "t5" in modes:
        site = swap_site(config)
        out.append((StageConfig(site, 0, "t5"), encoder_swap(config, source_cache[site], site=site)))
    return out


def run_sequence_stage_patching(config: T5Config, params, input_ids, attention_mask, targets, target_mask, *,
                                stages: Sequence[Sequence[int]], modes: Sequence[str] = ("mean", "zero"),
                                source_params=None, metric: str = "step_rank", reduction: str = "max",
                                batch_size: int = 32, progress: bool = True) -> SequenceStagePatchingResult:
    """Stage patching on queries (input_ids / attention_mask [N, S]) with docid targets [N, T] (ending with
    EOS, `target_mask` 1 on real tokens). `source_params`: the pretrained T5 (same shape) for ``t5`` mode."""
    if metric not in TEACHER_FORCED_METRICS:
        raise GenIRError(f"unknown sequence metric {metric!r}; choose one of {', '.join(TEACHER_FORCED_METRICS)}")
    if reduction not in RANK_REDUCTIONS:
        raise GenIRError(f"unknown rank reduction {reduction!r}; choose one of {', '.join(RANK_REDUCTIONS)}")
    unknown = set(modes) - set(REFERENCE_MODE_ORDER)
    if unknown:
        raise GenIRError(f"unknown patching mode(s) {sorted(unknown)}; expected some of "
                         f"{', '.join(REFERENCE_MODE_ORDER)}")
    if "t5" in modes and source_params is None:
        raise GenIRError("t5 mode needs the pretrained T5's parameters (source_params)")
    input_ids, attention_mask = np.asarray(input_ids, np.int32), np.asarray(attention_mask, np.int32)
    targets, target_mask = np.asarray(targets, np.int32), np.asarray(target_mask, np.int32)
    count = input_ids.shape[0]
    if count == 0:
        raise GenIRError("sequence stage patching: no queries given")
    decoder_inputs = teacher_forcing_inputs(targets, config.decoder_start_token_id)
    means = None
    if "mean" in modes:
        sites = [component_site("decoder", c, ALL_LAYERS) for c in REFERENCE_ROW_ORDER]
        means = mean_activations(config, params, input_ids, attention_mask, sites, decoder_input_ids=decoder_inputs,
                                 progress=progress)
    rows_out: list[StageConfig] | None = None
    values, steps, clean = [], [], np.zeros(count, np.float64)
    rows = max(1, min(batch_size, count))
    for batch in compiling_bar(list(batches((input_ids, attention_mask, targets, target_mask, decoder_inputs), rows)),
                               desc="sequence stage patching", unit="batch", disable=not progress):
        ids, mask, tgt, tmask, dec = batch.arrays
        source_cache = None
        if "t5" in modes:
            from genir_jax.core.model import forward_with_cache

            names = [component_site("decoder", c, layer)
                     for c in REFERENCE_ROW_ORDER for stage in stages for layer in stage]
            names.append(swap_site(config))
            _, source_cache = forward_with_cache(config, source_params, ids, mask, dec, cache_sites=names)
        configs = _configs(config, stages, modes, means, source_cache)
        rows_out = [row for row, _ in configs]
        logits = teacher_forced_logits(config, params, ids, mask, tgt)
        clean[batch.rows] = np.asarray(sequence_metric(logits, tgt, tmask, metric, reduction))[:batch.size]
        batch_values = np.zeros((len(configs), batch.size))
        batch_steps = np.zeros((len(configs), batch.size, tgt.shape[1]), np.int64)
        for k, (_, iv) in enumerate(configs):
            logits = teacher_forced_logits(config, params, ids, mask, tgt, interventions=iv)
            if metric == "step_rank":
                ranks = step_ranks(logits, tgt, tmask)
                batch_steps[k] = np.asarray(ranks)[:batch.size]
                batch_values[k] = np.asarray(reduce_step_ranks(ranks, tmask, reduction))[:batch.size]
            else:
                batch_values[k] = np.asarray(sequence_metric(logits, tgt, tmask, metric, reduction))[:batch.size]
        values.append(batch_values)
        steps.append(batch_steps)
    return SequenceStagePatchingResult(rows_out, np.concatenate(values, axis=1), clean, metric, reduction,
                                       np.concatenate(steps, axis=1) if metric == "step_rank" else None)
