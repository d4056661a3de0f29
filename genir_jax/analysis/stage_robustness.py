"""Do the decoder's stages hold up? Ablations that assume no partition, and the stage table under several.

The paper's stage claims (Table 3) rest on one partition of the decoder (layers 0-6, 7-17, 18-23 of
T5-large). This analysis checks them three ways in one sweep (`run_sweep`, so one compiled function):

- every layer of one component type at once (all self-attention, all cross-attention, all MLPs): is the
  component type needed at all?
- every single layer x component: the per-layer profile a partition should summarise;
- the stage table (each component in each stage) under several partitions side by side, e.g. the
  automatic segmentation (`genir_jax.analysis.auto_stages`), equal thirds and the paper's.

Modes: zero and mean ablation (means over the same queries, as the stage patching takes them). Every row
reports the fraction of queries whose target rank exceeds 0 / 5 / 10 / 100 (the reference's thresholds,
0-based ranks: ``>0`` means "no longer ranked first") and the mean rank.

`standard_partitions` gives the partitions compared by default (automatic stages, equal thirds, and the
paper's for a 24-layer decoder); `write_stage_robustness` / `read_stage_robustness` store a result (rows,
per-query ranks, partitions and how each partition was found) as ``stage_robustness.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from genir_jax.analysis.stage_patching import (
    PAPER_STAGES_24, REFERENCE_ROW_ORDER, THRESHOLDS, equal_stages, stage_configs,
)
from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError
from genir_jax.interp.interventions import ABLATION_MODES, mean_activations, mean_ablation, zero_ablation
from genir_jax.interp.patching import run_sweep
from genir_jax.core.sites import ALL_LAYERS, component_site
from genir_jax.interp.sweep import component_grid, concat, relabel, stack

ROBUSTNESS_MODES = ABLATION_MODES[:2]  # zero and mean ablation
KINDS = ("all_layers", "single_layer", "stage")
NOT_FIRST = THRESHOLDS[0][0]  # the reference's label of "rank > 0" ("!=0")
RESULTS_JSON = "stage_robustness.json"


@dataclasses.dataclass
class StageRobustnessResult:
    """One row per configuration: its labels (kind, component, mode, layer, partition, stage) and the
    rank statistics over the queries; `partitions` the stages each partition used."""

    rows: list[dict]
    ranks: np.ndarray  # [K, N] 0-based target ranks
    partitions: dict[str, list[list[int]]]

    def select(self, kind: str, **labels) -> list[dict]:
        """The rows of one kind whose labels equal `labels`."""
        if kind not in KINDS:
            raise GenIRError(f"unknown row kind {kind!r}; expected one of {', '.join(KINDS)}")
        return [r for r in self.rows if r["kind"] == kind and all(r.get(k) == v for k, v in labels.items())]

    def to_json(self) -> dict:
        return {"partitions": self.partitions, "thresholds_0_based": [t for _, t in THRESHOLDS], "rows": self.rows}

    @classmethod
    def from_json(cls, data: dict) -> "StageRobustnessResult":
        """The result `write_stage_robustness` stored (rows, partitions and the per-query ranks)."""
        rows = data["rows"]
        ranks = np.asarray(data.get("ranks", [[] for _ in rows]), dtype=np.int64).reshape(len(rows), -1)
        return cls(rows=rows, ranks=ranks,
                   partitions={name: [list(stage) for stage in stages] for name, stages in data["partitions"].items()})


def standard_partitions(config: T5Config, params, input_ids, attention_mask, target_ids, *, query_ids=None,
                        batch_size: int | None = None, progress: bool = True) -> tuple[dict, dict]:
    """The partitions compared by default and how each was found: ``auto`` (`genir_jax.analysis.stages.
    resolve_stages`: fitted to one half of these queries, k chosen; compare the partitions on the other half,
    ``Stages.from_record(records["auto"]).held_out_rows``), ``thirds`` (`equal_stages`) and, for a 24-layer
    decoder, ``paper`` (0-6, 7-17, 18-23). Returns ({name: stages}, {name: record}); the auto record is its
    stages.json record (fit, split, stability)."""
    from genir_jax.analysis.stages import resolve_stages

    found = resolve_stages("auto", config, params, input_ids, attention_mask, target_ids, query_ids=query_ids,
                           batch_size=batch_size, progress=progress)
    partitions = {"auto": found.as_lists(), "thirds": equal_stages(config.num_decoder_layers)}
    records = {"auto": found.record(), "thirds": {"method": "thirds", "stages": partitions["thirds"]}}
    if config.num_decoder_layers == 24:
        partitions["paper"] = [list(stage) for stage in PAPER_STAGES_24]
        records["paper"] = {"method": "paper", "stages": partitions["paper"]}
    return partitions, records


def write_stage_robustness(directory: str | os.PathLike, result: StageRobustnessResult, **extra) -> str:
    """``stage_robustness.json`` (rows, partitions, thresholds, the per-query ranks [K, N] and `extra`, e.g.
    how the partitions were found) into `directory`, atomically; returns its path."""
    from genir_jax.base.io import write_json

    path = os.path.join(os.fspath(directory), RESULTS_JSON)
    write_json(path, {**result.to_json(), "ranks": np.asarray(result.ranks).tolist(), **extra}, indent=1)
    return path


def read_stage_robustness(directory: str | os.PathLike) -> tuple[StageRobustnessResult, dict]:
    """The result in `directory` and the whole stored record (with its extra keys)."""
    with open(os.path.join(os.fspath(directory), RESULTS_JSON), encoding="utf-8") as handle:
        data = json.load(handle)
    return StageRobustnessResult.from_json(data), data


def _rank_statistics(ranks: np.ndarray) -> dict:
    out = {label: float(np.mean(ranks > threshold)) for label, threshold in THRESHOLDS}
    out["mean_rank"] = float(np.mean(ranks))
    return out


def _check_partitions(config: T5Config, partitions: Mapping[str, Sequence[Sequence[int]]]) -> dict:
    layers = config.num_decoder_layers
    checked = {}
    for name, stages in partitions.items():
        seen: list[int] = []
        for stage in stages:
            for layer in stage:
                if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer < layers:
                    raise GenIRError(f"partition {name!r}: layer {layer!r} is not a decoder layer 0-{layers - 1}")
                if layer in seen:
                    raise GenIRError(f"partition {name!r}: layer {layer} is in two stages")
                seen.append(int(layer))
        if not stages or any(not stage for stage in stages):
            raise GenIRError(f"partition {name!r}: every stage needs at least one layer")
        checked[name] = [[int(layer) for layer in stage] for stage in stages]
    return checked


def stage_robustness_sweep(config: T5Config, partitions: Mapping[str, Sequence[Sequence[int]]],
                           modes: Sequence[str] = ROBUSTNESS_MODES, means: dict | None = None):
    """The sweep of every row (labels: kind, component, mode, layer, partition, stage)."""
    unknown = sorted(set(modes) - set(ROBUSTNESS_MODES))
    if unknown or not modes:
        raise GenIRError(f"stage robustness: modes must be some of {', '.join(ROBUSTNESS_MODES)}, got {list(modes)}")
    if "mean" in modes and means is None:
        raise GenIRError("stage robustness: mean mode needs the means of the component outputs")
    partitions = _check_partitions(config, partitions)
    parts = []
    for mode in modes:
        configs, labels = [], []
        for component in REFERENCE_ROW_ORDER:
            sites = [component_site("decoder", component, ALL_LAYERS)]
            configs.append(zero_ablation(config, sites) if mode == "zero" else mean_ablation(config, means, sites=sites))
            labels.append({"component": component})
        parts.append(relabel(stack(configs, labels=labels), kind="all_layers", mode=mode))
        grid = component_grid(config, components=list(REFERENCE_ROW_ORDER),
                              **({} if mode == "zero" else {"value": means}))
        parts.append(relabel(grid, kind="single_layer", mode=mode))
    for name, stages in partitions.items():
        sweep, _ = stage_configs(config, stages, [m for m in ("mean", "zero") if m in modes], means)
        parts.append(relabel(sweep, kind="stage", partition=name))
    return concat(*parts), partitions


def run_stage_robustness(config: T5Config, params, input_ids, attention_mask, target_ids, *,
                         partitions: Mapping[str, Sequence[Sequence[int]]], modes: Sequence[str] = ROBUSTNESS_MODES,
                         query_chunk: int | None = None, progress: bool = True) -> StageRobustnessResult:
    """Run every row on the given (correct) queries; means come from the same queries."""
    means = None
    if "mean" in modes:
        sites = [component_site("decoder", c, ALL_LAYERS) for c in REFERENCE_ROW_ORDER]
        means = mean_activations(config, params, input_ids, attention_mask, sites, progress=progress)
    sweep, partitions = stage_robustness_sweep(config, partitions, modes, means)
    result = run_sweep(config, params, input_ids, attention_mask, target_ids, sweep, metrics=("rank",),
                       query_chunk=query_chunk, progress=progress, desc="stage robustness")
    rows = []
    for k in range(sweep.size):
        label = {key: value for key, value in sweep.label(k).items() if value is not None and key != "site"}
        rows.append({**label, **_rank_statistics(result.ranks[k])})
    return StageRobustnessResult(rows=rows, ranks=result.ranks, partitions=partitions)


def render_markdown(result: StageRobustnessResult, queries: int) -> str:
    """Three tables: component types ablated in every layer, the per-layer profile (fraction > 0), and the
    stage table under each partition side by side; every share and mean rank with its 95% bootstrap interval
    over the queries (`genir_jax.analysis.evidence`)."""
    from genir_jax.analysis.evidence import bootstrap, share

    def cell(row: dict, threshold: int | None) -> str:
        """The share of the row's queries beyond `threshold` (None: their mean rank) with its interval."""
        ranks = result.ranks[next(k for k, other in enumerate(result.rows) if other is row)]
        return bootstrap(ranks).format(1) if threshold is None else share(ranks > threshold).format(2)

    lines = [f"Shares (fractions) of the {queries} queries whose target is no longer at rank 1, and not in the top "
             "6, 11 and 101. Ranks count from 0 (rank 0 = first), as in the reference code, whose thresholds "
             "`>5`, `>10`, `>100` apply to the 0-based rank: \"not in top 6\" is rank > 5. Mean rank counted "
             "from 0. Each with its 95% bootstrap interval over the queries and n.", ""]
    lines += ["| component (every layer) | mode | not at rank 1 (rank > 0) | not in top 6 (rank > 5) | "
              "not in top 11 (rank > 10) | not in top 101 (rank > 100) | mean rank (0-based) |",
              "|---|---|---|---|---|---|---|"]
    for row in result.select("all_layers"):
        lines.append(f"| {row['component']} | {row['mode']} | " + " | ".join(
            cell(row, threshold) for _, threshold in THRESHOLDS) + f" | {cell(row, None)} |")
    modes = sorted({r["mode"] for r in result.rows})
    layers = sorted({r["layer"] for r in result.select("single_layer")})
    for mode in modes:
        lines += ["", f"Single layers, {mode} ablation, share of queries no longer at rank 1 (rank > 0):", "",
                  "| component | " + " | ".join(str(layer) for layer in layers) + " |",
                  "|---|" + "---|" * len(layers)]
        for component in REFERENCE_ROW_ORDER:
            cells = {r["layer"]: cell(r, 0) for r in result.select("single_layer", component=component, mode=mode)}
            lines.append(f"| {component} | " + " | ".join(cells[layer] for layer in layers) + " |")
    names = list(result.partitions)
    lines += ["", "Stages under each partition (share of queries no longer at rank 1, stage by stage):", ""]
    lines += ["| component | mode | " + " | ".join(
        f"{name}: " + ", ".join(f"{s[0]}-{s[-1]}" for s in result.partitions[name]) for name in names) + " |",
        "|---|---|" + "---|" * len(names)]
    for mode in modes:
        for component in REFERENCE_ROW_ORDER:
            cells = []
            for name in names:
                rows = sorted(result.select("stage", partition=name, component=component, mode=mode),
                              key=lambda r: r["stage"])
                cells.append(" / ".join(cell(r, 0) for r in rows))
            lines.append(f"| {component} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
