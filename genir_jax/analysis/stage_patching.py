"""Stage patching (paper Sec. 5.1, Table 3): knock out or replace one component type in one stage.

For each component type (attn, cross_attn, mlp), each stage (a list of decoder layers) and each mode the
component's output is patched in every layer of the stage at the decoder's single position (decoder-only
models: attn and mlp at every prompt position, zero and mean modes; `stage_components`):
- zero: replaced by 0;
- mean: replaced by its mean over the correct queries;
- t5: replaced by the output of the same component of the pretrained T5 on the same query (and one more
  configuration: the encoder output before its final norm, ``encoder.{L-1}.hook_resid_post``, replaced by
  the T5 encoder's, listed under stage 0 as in the reference).
The result per configuration is the fraction of correct queries whose relevant docid is no longer at
rank 0 (and the fractions beyond rank 5, 10 and 100), plus every rank.

Every configuration is made by a builder of `genir_jax.interp.interventions`; `genir_jax.interp.sweep.stack` labels them
(component, stage, mode) and they run as one vmapped, jitted sweep (`genir_jax.interp.patching.run_sweep`).
Output files and their layout are the reference's (`eval_patching_single_combis.py` /
`eval_patching_t5.py`): ``patching_results_single_combis.csv`` with columns
``,component,stage,mode,!=0,>5,>10,>100`` (a pandas-style index column first; fractions) and
``ranks_correct_queries_patching_single_combis.json`` keyed ``"{stage}-{component}-{mode}"``.
Rows are ordered as the reference orders them: modes mean, zero, t5; within a mode components mlp,
cross_attn, attn (then the encoder row for t5); within a component the stages. Multi-token docids
(`genir_jax.analysis.sequence_stage_patching`) add ``step_ranks.json`` (ours): per row key, per query, the rank of
each docid token at its step, for the first-step, per-step and every-step shares of Table 3.

Reference file layout (``reference=True`` in `write_stage_patching`): the zero / mean rows go to the files
above (eval_patching_single_combis.py) and the t5 rows to eval_patching_t5.py's own files
``patching_results_t5_single_combis.csv`` / ``ranks_correct_queries_patching_t5_single_combis.json``, with
the reference's empty encoder rows for stages 1 and 2 (fractions 0, no ranks); `t5_all_and_attn_config`
is its ``patching_results_t5_all_and_attn.json`` configuration (every component of every stage but the
last and the last stage's self-attention replaced by the T5's).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError
from genir_jax.analysis.encoder_swap import swap_site
from genir_jax.interp.interventions import (FROM_SOURCE, encoder_swap, mean_activations, mean_ablation, replacement,
                                     zero_ablation)
from genir_jax.base.io import atomic_directory
from genir_jax.interp.patching import Source, SweepResult, run_sweep
from genir_jax.core.sites import ALL_LAYERS, COMPONENTS, component_site, components, is_decoder_only, stacks
from genir_jax.interp.sweep import Sweep, stack

# Table 3's row order in the reference: components last to first (mlp, cross_attn, attn), and the modes as its
# two scripts, concatenated, write them ("t5": the pretrained T5's activations, i.e. source patching).
REFERENCE_ROW_ORDER = tuple(reversed(COMPONENTS))
REFERENCE_MODE_ORDER = ("mean", "zero", "t5")
PAPER_STAGES_24 = ([0, 1, 2, 3, 4, 5, 6], list(range(7, 18)), list(range(18, 24)))
RESULTS_CSV = "patching_results_single_combis.csv"
RANKS_JSON = "ranks_correct_queries_patching_single_combis.json"
STEP_RANKS_JSON = "step_ranks.json"  # ours, multi-token docids: {row key: per query, each step's rank}
THRESHOLDS = (("!=0", 0), (">5", 5), (">10", 10), (">100", 100))
T5_RESULTS_CSV = "patching_results_t5_single_combis.csv"            # eval_patching_t5.py (reference mode)
T5_RANKS_JSON = "ranks_correct_queries_patching_t5_single_combis.json"
T5_ALL_AND_ATTN_JSON = "patching_results_t5_all_and_attn.json"
T5_ALL_AND_ATTN_CONFIG = "0-6 attn, cr, mlp = T5, 7 - 17 attn, cr, mlp = T5, 18 - 23 only attn = t5"  # its text


def default_stages(num_decoder_layers: int) -> list[list[int]]:
    """The paper's stages for a 24-layer decoder (0-6, 7-17, 18-23); otherwise three near-equal
    consecutive blocks (the first blocks one layer longer when the count does not divide by 3)."""
    if num_decoder_layers == 24:
        return [list(s) for s in PAPER_STAGES_24]
    return equal_stages(num_decoder_layers)


def equal_stages(num_decoder_layers: int) -> list[list[int]]:
    """Three near-equal consecutive blocks of layers (the first blocks one layer longer when the count does
    not divide by 3): ``--stages thirds``."""
    if num_decoder_layers < 3:
        raise GenIRError(f"default stages need at least 3 decoder layers, the model has {num_decoder_layers}; "
                         "pass --stages")
    sizes = [num_decoder_layers // 3 + (1 if i < num_decoder_layers % 3 else 0) for i in range(3)]
    starts = np.cumsum([0] + sizes[:-1])
    return [list(range(int(start), int(start) + size)) for start, size in zip(starts, sizes)]


def parse_stages(text: str, num_decoder_layers: int) -> list[list[int]]:
    """``"0-6,7-17,18-23"`` (ranges or single layers, comma separated) -> layer lists, validated."""
    stages = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                first, last = (int(x) for x in part.split("-"))
            else:
                first = last = int(part)
        except ValueError:
            raise GenIRError(f"--stages: cannot parse {part!r}; expected e.g. '0-6,7-17,18-23'") from None
        if last < first:  # the wording of the sweep grammar (`genir_jax.interp.site_grammar.parse_indices`)
            raise GenIRError(f"--stages: range {part!r} is reversed (the end is below the start); write "
                             f"'{last}-{first}'")
        if not 0 <= first <= last < num_decoder_layers:
            raise GenIRError(f"--stages: {part!r} is outside the decoder's layers 0-{num_decoder_layers - 1}")
        overlap = sorted(set(range(first, last + 1)) & {layer for stage in stages for layer in stage})
        if overlap:
            raise GenIRError(f"--stages: {part!r} overlaps an earlier stage (layer(s) {overlap}); stages must be "
                             "disjoint")
        stages.append(list(range(first, last + 1)))
    if not stages:
        raise GenIRError("--stages: no stages given")
    return stages


def describe_stages(stages: Sequence[Sequence[int]], *, named: bool = False) -> str:
    """Stages as ``"0-6,7-17,18-23"`` (single-layer stages as ``"5"``), the syntax `parse_stages` reads; with
    `named`, for reports: ``"I = layers 0-6, II = layers 7-17, ..."``."""
    if named:
        return ", ".join(f"{name} = layers {s[0]}-{s[-1]}" for name, s in zip(stage_names(len(stages)), stages))
    parts = []
    for stage in stages:
        layers = [int(layer) for layer in stage]
        if not layers:
            raise GenIRError("cannot describe an empty stage")
        if layers != list(range(layers[0], layers[0] + len(layers))):
            raise GenIRError(f"stage {layers} is not a run of consecutive layers")
        parts.append(str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}")
    if not parts:
        raise GenIRError("no stages to describe")
    return ",".join(parts)


def stage_names(count: int) -> list[str]:
    """"I", "II", ... as the analyses' files name the stages."""
    from genir_jax.analysis.cross_attention_writes import roman

    return [roman(index) for index in range(1, count + 1)]


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """One row of the results: which component, stage index and mode."""

    component: str  # attn | cross_attn | mlp | encoder.{L-1}.hook_resid_post
    stage: int
    mode: str

    @property
    def key(self) -> str:
        return f"{self.stage}-{self.component}-{self.mode}"


def stage_components(config) -> tuple[str, ...]:
    """The component types of a model's stage rows, in the reference's row order: mlp, cross_attn, attn (T5);
    mlp, attn (a decoder-only model, whose layers have no cross-attention)."""
    return tuple(c for c in REFERENCE_ROW_ORDER if c in components(config))


def stage_configs(config: T5Config, stages: Sequence[Sequence[int]], modes: Sequence[str],
                  means: dict | None = None) -> tuple[Sweep, list[StageConfig]]:
    """The sweep (one builder-made configuration per row, labelled component / stage / mode) and its rows.

    Each configuration patches one component's output in every layer of one stage: `zero_ablation`,
    `mean_ablation` (with `means`, as `mean_activations` returns them) or `replacement` by `FROM_SOURCE`
    (the T5 run); with t5 the encoder swap (`encoder_swap` at ``encoder.{L-1}.hook_resid_post``) is last.
    """
    unknown = set(modes) - set(REFERENCE_MODE_ORDER)
    if unknown:
        raise GenIRError(f"unknown patching mode(s) {sorted(unknown)}; expected some of "
                         f"{', '.join(REFERENCE_MODE_ORDER)}")
    if "mean" in modes and means is None:
        raise GenIRError("mean mode needs the means of the component outputs (`mean_activations`)")
    if "t5" in modes and is_decoder_only(config):
        raise GenIRError("t5 mode is not applicable to decoder-only models: it patches in a pretrained T5's "
                         "component outputs and encoder; use zero or mean")
    configs, labels = [], []
    stack_name = stacks(config)[-1]
    for mode in (m for m in REFERENCE_MODE_ORDER if m in modes):
        for component in stage_components(config):
            for index, stage in enumerate(stages):
                sites = [component_site(stack_name, component, layer) for layer in stage]
                if mode == "zero":
                    configs.append(zero_ablation(config, sites))
                elif mode == "mean":
                    configs.append(mean_ablation(config, means, sites=sites))
                else:
                    configs.append(replacement(config, {site: FROM_SOURCE for site in sites}))
                labels.append({"component": component, "stage": index, "mode": mode})
    if "t5" in modes:
        encoder_site = swap_site(config)
        configs.append(encoder_swap(config, FROM_SOURCE, site=encoder_site))
        labels.append({"component": encoder_site, "stage": 0, "mode": "t5"})
    sweep = stack(configs, labels=labels)
    return sweep, stage_rows(sweep)


def stage_rows(sweep: Sweep) -> list[StageConfig]:
    """The result rows of a stage sweep, from its labels."""
    return [StageConfig(**sweep.label(k)) for k in range(sweep.size)]


@dataclasses.dataclass
class StagePatchingResult:
    rows: list[StageConfig]
    ranks: np.ndarray  # [K, N]
    sweep: SweepResult | None  # None when built from another engine (`SequenceStagePatchingResult.as_rank_result`)
    step_ranks: np.ndarray | None = None  # [K, N, T] multi-token docids: each token's rank at its step (-1: none)

    def fractions(self) -> list[dict]:
        """One dict per row: component, stage, mode and the fractions of queries beyond each threshold."""
        out = []
        for row, ranks in zip(self.rows, self.ranks):
            entry = {"component": row.component, "stage": row.stage, "mode": row.mode}
            for label, threshold in THRESHOLDS:
                entry[label] = float(np.mean(ranks > threshold)) if ranks.size else 0.0
            out.append(entry)
        return out

    def ranks_by_key(self) -> dict[str, list[int]]:
        return {row.key: [int(r) for r in ranks] for row, ranks in zip(self.rows, self.ranks)}


def run_stage_patching(config: T5Config, params, input_ids, attention_mask, target_ids, *,
                       stages: Sequence[Sequence[int]], modes: Sequence[str] = ("mean", "zero"),
                       source: Source | None = None, query_chunk: int | None = None, progress: bool = True
                       ) -> StagePatchingResult:
    """Run the stage-patching sweep on the given (correct) queries; means come from the same queries."""
    means = None
    if "mean" in modes:
        sites = [component_site(stacks(config)[-1], c, ALL_LAYERS) for c in stage_components(config)]
        means = mean_activations(config, params, input_ids, attention_mask, sites, progress=progress)
    sweep, rows = stage_configs(config, stages, modes, means)
    if "t5" in modes and source is None:
        raise GenIRError("t5 mode needs the pretrained T5 (--t5 BASE_CHECKPOINT_DIR)")
    result = run_sweep(config, params, input_ids, attention_mask, target_ids, sweep,
                       source=source if "t5" in modes else None, query_chunk=query_chunk, progress=progress)
    return StagePatchingResult(rows=rows, ranks=result.ranks, sweep=result)


def _csv_number(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _csv_text(entries: list[dict]) -> str:
    header = ["", "component", "stage", "mode"] + [label for label, _ in THRESHOLDS]
    lines = [",".join(header)]
    for index, entry in enumerate(entries):
        cells = [str(index), entry["component"], str(entry["stage"]), entry["mode"]]
        cells += [_csv_number(entry[label]) for label, _ in THRESHOLDS]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"


def stage_patching_files(result: StagePatchingResult, *, reference: bool = False, num_stages: int | None = None
                         ) -> dict[str, str]:
    """{file name: text} of the results. Default: every row in RESULTS_CSV / RANKS_JSON. `reference`: the
    reference's two scripts' files (see the module docstring); `num_stages` gives the empty encoder rows."""
    import json

    entries, ranks = result.fractions(), result.ranks_by_key()
    if not reference:
        files = {RESULTS_CSV: _csv_text(entries), RANKS_JSON: json.dumps(ranks)}
        if result.step_ranks is not None:
            files[STEP_RANKS_JSON] = json.dumps({row.key: [[int(r) for r in query if r >= 0] for query in steps]
                                                 for row, steps in zip(result.rows, result.step_ranks)})
        return files
    files = {}
    plain = [e for e in entries if e["mode"] != "t5"]
    if plain:
        keys = [f"{e['stage']}-{e['component']}-{e['mode']}" for e in plain]
        files[RESULTS_CSV] = _csv_text(plain)
        files[RANKS_JSON] = json.dumps({k: ranks[k] for k in keys})
    t5 = [e for e in entries if e["mode"] == "t5"]
    if t5:
        encoder = [e for e in t5 if e["component"].startswith("encoder.")]
        for stage in range(1, num_stages or 1):  # the reference's encoder rows for later stages: no queries
            empty = {"component": encoder[0]["component"], "stage": stage, "mode": "t5"}
            empty.update({label: 0.0 for label, _ in THRESHOLDS})
            t5.append(empty)
        keys = [f"{e['stage']}-{e['component']}-{e['mode']}" for e in t5]
        files[T5_RESULTS_CSV] = _csv_text(t5)
        files[T5_RANKS_JSON] = json.dumps({k: ranks.get(k, []) for k in keys})
    return files


def t5_all_and_attn_config(config: T5Config, stages: Sequence[Sequence[int]]):
    """eval_patching_t5.py's last configuration: attn, cross_attn and mlp outputs of every stage but the last
    and the last stage's attn output replaced by the T5's (`replacement` by `FROM_SOURCE`)."""
    sites = [component_site("decoder", c, layer) for stage in stages[:-1] for layer in stage
             for c in ("attn", "cross_attn", "mlp")]
    sites += [component_site("decoder", "attn", layer) for layer in stages[-1]]
    return replacement(config, {site: FROM_SOURCE for site in sites})


def write_stage_patching(out_dir: str | os.PathLike, result: StagePatchingResult,
                         extra_json: dict | None = None, *, reference: bool = False,
                         num_stages: int | None = None) -> None:
    """The result files (`stage_patching_files`) and `extra_json` ({file name: JSON data}), atomically."""
    import json

    with atomic_directory(out_dir) as staging:
        for name, text in stage_patching_files(result, reference=reference, num_stages=num_stages).items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as handle:
                handle.write(text)
        for name, data in (extra_json or {}).items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2)
                handle.write("\n")
