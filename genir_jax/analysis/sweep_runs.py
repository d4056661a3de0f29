"""Patching sweeps with a resumable chunk store, put together once for `genir-jax sweep`, `genir-jax attribute`
and library users: the options checked and the model, queries, foils, replacement values and sweep loaded
(`prepare_sweep`), the sweep run into OUTPUT/.sweep-chunks (`run_with_store`), and results.csv, clean.json,
sweep.json, per_query.npz and the heatmaps written (`write_sweep_outputs`).

Errors about an option are `SettingError`s naming it by its `SweepOptions` / `prepare_sweep` name, which a
command renames to its flag (`genir_jax.base.errors.renaming_settings`)::

    prep = prepare_sweep(checkpoint, val_queries, correct_valid, "out", SweepOptions(["decoder.*.mlp"], ["rank"]))
    result, store = run_with_store(prep, hits=[1, 10], per_query=False)
    write_sweep_outputs(prep, result, [1, 10], per_query=False)
    store.clear()
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from genir_jax.base.errors import GenIRError, SettingError
from genir_jax.base.io import sha256_of
from genir_jax.base.runs import claim_output
from genir_jax.interp.metrics import METRIC_TABLE, METRICS as ALL_METRICS

if TYPE_CHECKING:  # loading it imports jax; the commands import this module before parsing their arguments
    from genir_jax.analysis.inputs import AnalysisInputs

STORE_DIR = ".sweep-chunks"
# What a sweep writes into OUTPUT; another run's such files are refused, or removed with overwrite.
SWEEP_OUTPUTS = ("sweep.json", "results.csv", "clean.json", "per_query.npz", "heatmap_*.png")
HASHED_UP_TO = 64 << 20  # larger files (model weights) are identified by size and mtime, not re-read


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """What a sweep patches and measures. `sites`: site-grammar specs (`genir_jax.interp.site_grammar`);
    `metrics` (`genir_jax.interp.metrics.METRICS`); `mode`: zero, mean, resample (`seed`'s derangement of
    the queries) or source (`source_model`, a checkpoint directory); `foil`: 'runner-up' or a document id /
    docid token for logit_diff; `receivers`: path patching's receivers (exact `method` only); chunk sizes
    and the compute `dtype`."""

    sites: Sequence[str]
    metrics: Sequence[str]
    mode: str = "zero"
    seed: int = 0
    source_model: str | None = None
    foil: str | None = None
    receivers: str | None = None
    method: str = "exact"
    query_chunk: int | None = None
    config_chunk: int | None = None
    dtype: str = "float32"


class PreparedSweep:
    """Everything a sweep or an attribution needs, loaded and validated (`prepare_sweep`)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def check_output(path: str) -> str:
    """Refuse (before any computation) an output path that is a file or lies in a folder we cannot write."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SettingError("{0} " + f"{path}: exists and is not a directory", "output")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise SettingError("{0} " + f"{path}: cannot write in {probe}", "output")
    return path


def _file_identity(path: str) -> str:
    """sha256 of a small file; size and modification time of a large one (hashing gigabytes of weights on
    every run would cost more than a resumed chunk saves)."""
    status = os.stat(path)
    if status.st_size > HASHED_UP_TO:
        return f"size={status.st_size},mtime_ns={status.st_mtime_ns}"
    return sha256_of(path)


def _fingerprint(path: str | None) -> dict | str | None:
    """Identity of a file, or of every file directly inside a directory (`_file_identity`)."""
    if path is None:
        return None
    if os.path.isdir(path):
        return {name: _file_identity(os.path.join(path, name)) for name in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, name))}
    return _file_identity(path) if os.path.isfile(path) else None


def _validate_common(options: SweepOptions) -> None:
    from genir_jax.interp.interventions import ABLATION_MODES

    mode = options.mode
    if mode not in ABLATION_MODES:
        raise SettingError("{0}: " + f"unknown mode '{mode}'; expected one of {', '.join(ABLATION_MODES)}", "mode")
    if mode == "source" and not options.source_model:
        raise SettingError("{0} source needs {1} CHECKPOINT_DIR (e.g. the pretrained T5)", "mode", "source_model")
    if options.source_model and mode != "source":
        raise SettingError("{0} is only used with {1} source (got {1} " + f"{mode})", "source_model", "mode")
    unknown = [m for m in options.metrics if m not in ALL_METRICS]
    if unknown:
        raise SettingError("{0}: " + f"unknown metric(s) {unknown}; expected some of {', '.join(ALL_METRICS)}",
                           "metrics")
    for metric in options.metrics:
        if "foils" in METRIC_TABLE[metric].needs and not options.foil:
            raise SettingError("{0} " + f"{metric} needs " + "{1} runner-up|DOCID (what the target's logit is "
                               "compared to)", "metrics", "foil")
    for name in ("query_chunk", "config_chunk"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise SettingError("{0} " + f"must be >= 1, got {value}", name)


def _validate_scheme(checkpoint: str, metrics: Sequence[str], scheme) -> None:
    """Multi-token (naive / semantic) docids: only the sequence metrics."""
    from genir_jax.interp.metrics import STEP_REDUCTIONS

    if not scheme.multi_token:
        return
    bad = [m for m in metrics if m not in STEP_REDUCTIONS]
    if bad:
        raise SettingError("{0} " + f"{bad[0]}: {checkpoint} has {scheme.name} docids (token sequences); over them "
                           f"the metrics are {' and '.join(STEP_REDUCTIONS)} (the worst step's rank and the sequence "
                           "log-probability, teacher-forced)", "metrics")


def _with_receivers(options: SweepOptions, config, sweep):
    """The sweep as senders x `options.receivers` (path patching), or unchanged."""
    if options.receivers is None:
        return sweep
    if options.method != "exact":
        raise SettingError("{0} (path patching) runs exactly; {1} " + f"{options.method} cannot estimate it",
                           "receivers", "method")
    from genir_jax.interp import sweep as sw
    from genir_jax.interp.site_grammar import parse_receivers

    return sw.product(sweep, parse_receivers(config, options.receivers))


def prepare_sweep(checkpoint: str, val_queries: str, correct_valid: str, output: str, options: SweepOptions, *,
                  allow_incorrect: bool = False, overwrite: bool = False, heatmap_vmax: float | None = None,
                  progress: bool = True, record: str = "sweep.json", outputs: Sequence[str] = SWEEP_OUTPUTS,
                  extra: dict | None = None, inputs: AnalysisInputs | None = None) -> PreparedSweep:
    """Validate the options, load model and queries (or take the loaded `inputs` of `checkpoint`), build
    foils, replacement values and the sweep.

    `record`, `outputs`, `extra`: the settings record, the names written into `output` and the settings beyond
    the sweep's, to refuse another run's outputs there (`genir_jax.base.runs.claim_output`; removed at commit
    with `overwrite`) before any loading. Raises `GenIRError` for any bad input before anything is computed
    or written."""
    from genir_jax.analysis.inputs import check_vocabulary_covers, load_analysis_inputs, load_model
    from genir_jax.docids.schemes import checkpoint_scheme
    from genir_jax.docids.tokens import docid_vocabulary
    from genir_jax.interp.interventions import FROM_SOURCE, mean_activations
    from genir_jax.interp.patching import Source, check_source_model
    from genir_jax.interp.site_grammar import parse_sweep, swept_sites

    metrics = list(options.metrics)
    _validate_common(options)
    scheme = checkpoint_scheme(checkpoint)
    _validate_scheme(checkpoint, metrics, scheme)
    output = check_output(output)
    started = time.perf_counter()
    dtype = options.dtype  # bfloat16: parameters and compute; metrics stay float32
    settings = {
        "checkpoint": os.path.abspath(checkpoint),
        "checkpoint_sha256": _fingerprint(checkpoint),
        "val_queries": os.path.abspath(val_queries),
        "val_queries_sha256": _fingerprint(val_queries),
        "correct_valid": os.path.abspath(correct_valid),
        "correct_valid_sha256": _fingerprint(correct_valid),
        "sites": list(options.sites),
        "mode": options.mode,
        "seed": options.seed if options.mode == "resample" else None,
        "source_model": os.path.abspath(options.source_model) if options.source_model else None,
        "source_model_sha256": _fingerprint(options.source_model) if options.source_model else None,
        "docids": scheme.name,
        "metrics": list(metrics),
        "foil": options.foil if any("foils" in METRIC_TABLE[m].needs for m in metrics) else None,
        "receivers": options.receivers,
        "query_chunk": options.query_chunk,
        "config_chunk": options.config_chunk,
        **({"dtype": dtype} if dtype != "float32" else {}),
    }
    record_settings = {**settings, **(extra or {})}
    stale = claim_output(output, record, record_settings, outputs, overwrite=overwrite)
    if inputs is None:
        model = load_model(checkpoint, dtype=dtype)
        inputs = load_analysis_inputs(checkpoint, val_queries, correct_valid, model=model,
                                      sequences=scheme.multi_token, scheme=scheme, allow_incorrect=allow_incorrect)
    model = inputs.model
    config, params, tokenizer = model.config, model.params, model.tokenizer
    queries, ids, mask, targets, target_mask = (inputs.queries, inputs.input_ids, inputs.attention_mask,
                                                inputs.targets, inputs.target_mask)
    decoder_inputs = None
    if scheme.multi_token:
        from genir_jax.docids.sequence_targets import teacher_forcing_inputs

        decoder_inputs = teacher_forcing_inputs(targets, config.decoder_start_token_id)
        candidates = None
    else:
        candidates = np.asarray(sorted(docid_vocabulary(tokenizer)), dtype=np.int32)
        if "docid_rank" in metrics and candidates.size == 0:
            raise SettingError("{0} " + f"docid_rank: {checkpoint}'s tokenizer has no @DOC_ID_...@ tokens", "metrics")
    lengths = dict(length=ids.shape[1], decoder_length=1 if target_mask is None else targets.shape[1])
    # Parse the sites first (cheap): bad specs fail before means or foils are computed.
    sweep = _with_receivers(options, config, parse_sweep(config, options.sites, value=0.0, **lengths))

    foils = None
    if any("foils" in METRIC_TABLE[m].needs for m in metrics):
        foils = _foils(options, correct_valid, config, params, ids, mask, targets, candidates, queries, tokenizer)

    source = None
    if options.mode == "mean":
        means = mean_activations(config, params, ids, mask, swept_sites(config, sweep), decoder_input_ids=decoder_inputs,
                                 progress=progress)
        sweep = _with_receivers(options, config, parse_sweep(config, options.sites, value=means, **lengths))
    elif options.mode == "resample":
        if len(queries) < 2:
            raise SettingError("{0} resample needs at least 2 correct queries (each is patched with another's)",
                               "mode")
        from genir_jax.interp.patching import derangement

        permutation = derangement(len(queries), options.seed)
        source = Source(config, params, ids[permutation], mask[permutation])
        sweep = _with_receivers(options, config, parse_sweep(config, options.sites, value=FROM_SOURCE, **lengths))
    elif options.mode == "source":
        source_model = options.source_model
        base = load_model(source_model, tokenizer=False, dtype=dtype)  # of the family its config.json names
        check_source_model(config, base.config, where=source_model)  # before anything is computed
        check_vocabulary_covers(source_model, base.config, ids, model="the source model")
        source = Source(base.config, base.params)
        sweep = _with_receivers(options, config, parse_sweep(config, options.sites, value=FROM_SOURCE, **lengths))

    return PreparedSweep(output=output, model=model, config=config, params=params, tokenizer=tokenizer,
                         queries=queries, ids=ids, mask=mask, targets=targets, target_mask=target_mask,
                         candidates=candidates, foils=foils, source=source, sweep=sweep, metrics=metrics,
                         settings=settings, progress=progress, query_chunk=options.query_chunk,
                         config_chunk=options.config_chunk, record_settings=record_settings, stale=stale,
                         overwrite=overwrite, heatmap_vmax=heatmap_vmax,
                         load_seconds=time.perf_counter() - started)


def _foils(options: SweepOptions, correct_valid: str, config, params, ids, mask, targets, candidates, queries,
           tokenizer) -> np.ndarray:
    foil_name = options.foil
    if foil_name == "runner-up":
        if candidates.size < 2:
            raise SettingError("{0} runner-up needs at least 2 docid tokens in the vocabulary", "foil")
        from genir_jax.interp.patching import runner_up_foils

        return runner_up_foils(config, params, ids, mask, targets, candidates, options.query_chunk)
    from genir_jax.docids.tokens import docid_token, is_docid_token

    token = foil_name if is_docid_token(foil_name) else docid_token(foil_name)
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise SettingError("{0} " + f"{foil_name}: docid token {token!r} is not in the model's vocabulary; expected "
                           "'runner-up' or a document id", "foil")
    foil = int(vocab[token])
    same = [i for i, t in enumerate(targets) if int(t) == foil]
    if same:
        q = queries[same[0]]
        raise SettingError("{0} " + f"{foil_name}: the foil equals the target of query {q.query_id!r} "
                           f"({correct_valid} record index {same[0]}); choose another docid or 'runner-up'", "foil")
    return np.full(len(targets), foil, dtype=np.int32)


def run_with_store(prep: PreparedSweep, hits: Sequence[int], *, per_query: bool, desc: str = "sweep"):
    """run_sweep of `prep`'s metrics with the chunk store in OUTPUT/.sweep-chunks (resumed after a kill,
    refused with other settings; with `prep.overwrite` another run's partial store is removed). Returns
    (result, store); the caller clears the store once its outputs are written."""
    from genir_jax.interp.patching import run_sweep
    from genir_jax.interp.sweep_store import DirectoryStore, StoreError

    existed = os.path.isdir(prep.output)
    try:
        store = DirectoryStore(os.path.join(prep.output, STORE_DIR), prep.settings)
    except StoreError:
        if not prep.overwrite:
            raise
        shutil.rmtree(os.path.join(prep.output, STORE_DIR))  # overwrite: another run's partial store too
        store = DirectoryStore(os.path.join(prep.output, STORE_DIR), prep.settings)
    try:
        result = run_sweep(prep.config, prep.params, prep.ids, prep.mask, prep.targets, prep.sweep,
                           source=prep.source, metrics=prep.metrics, candidates=prep.candidates, foil_ids=prep.foils,
                           top_k=0, hits=list(hits), query_chunk=prep.query_chunk, target_mask=prep.target_mask,
                           config_chunk=prep.config_chunk, per_query=per_query, store=store, progress=prep.progress,
                           desc=desc)
    except (GenIRError, KeyboardInterrupt):
        if len(store) == 0:  # bad input, or Ctrl-C, before anything was computed: leave nothing behind
            store.clear()
            if not existed:
                try:
                    os.rmdir(prep.output)
                except OSError:
                    pass
        raise
    return result, store


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def write_table(path: str, sweep, columns: dict[str, np.ndarray]) -> None:
    """A tidy CSV: one row per config, its label columns, then `columns`."""
    names = list(sweep.labels) + list(columns)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(names)
        for k, labels in enumerate(sweep.label_table()):
            writer.writerow([_cell(labels[n]) for n in sweep.labels] + [_cell(float(columns[c][k])) for c in columns])


def draw_heatmaps(directory: str, prep: PreparedSweep, sweep, effects: dict, *, what: str = "mean effect",
                  note: str | None = None) -> dict:
    """The heatmaps of `effects` (metric -> per-config values) titled with the sweep's mode and query count, on
    `prep.heatmap_vmax`'s colour scale; returns the JSON record's ``heatmaps`` (file names) and
    ``heatmap_vmax`` (metric -> the colour bound used: give it as heatmap_vmax to draw another map on the same
    scale)."""
    from genir_jax.interp.sweep_plots import colour_bound, write_heatmaps

    files = write_heatmaps(directory, sweep, effects, what=what, mode=prep.settings["mode"],
                           queries=len(prep.queries), vmax=prep.heatmap_vmax, note=note)
    return {"heatmaps": files,
            "heatmap_vmax": {m: colour_bound(v, prep.heatmap_vmax) for m, v in effects.items()} if files else {}}


def sweep_description(sweep) -> dict:
    """The sweep's axes, shape, config count, label names and heatmap layout, for a JSON record."""
    from genir_jax.interp.sweep_plots import heatmap_layout

    return {"axes": list(sweep.axes), "shape": list(sweep.shape), "configs": sweep.size,
            "labels": list(sweep.labels), "heatmap": heatmap_layout(sweep)}


def clean_summary(result, metrics: Sequence[str], hits: Sequence[int]) -> dict:
    """The clean model's mean of each metric and, with a rank metric, its hits@k."""
    clean = {m: float(np.mean(result.clean[m])) for m in metrics}
    rank_metric = "docid_rank" if "docid_rank" in metrics else ("rank" if "rank" in metrics else None)
    if rank_metric is not None:
        for k in hits:
            clean[f"hits@{k}"] = float(np.mean(result.clean[rank_metric] < k))
    return clean


def write_sweep_outputs(prep: PreparedSweep, result, hits: Sequence[int], *, per_query: bool) -> None:
    """results.csv, clean.json, sweep.json, the heatmaps and with `per_query` per_query.npz, into
    `prep.output` at once (`genir_jax.base.io.atomic_directory`, replacing another run's stale outputs)."""
    from genir_jax.base.io import atomic_directory

    metrics, settings = prep.metrics, prep.record_settings
    with atomic_directory(prep.output, stale=prep.stale) as staging:
        write_table(os.path.join(staging, "results.csv"), result.sweep, result.aggregates)
        with open(os.path.join(staging, "clean.json"), "w", encoding="utf-8") as handle:
            json.dump({"queries": len(prep.queries), "clean": clean_summary(result, metrics, hits),
                       "settings": settings}, handle, indent=1)
        if per_query:
            np.savez(os.path.join(staging, "per_query.npz"),
                     **{m: result.values[m] for m in metrics},
                     **{f"clean_{m}": result.clean[m] for m in metrics},
                     query_ids=np.asarray([q.query_id for q in prep.queries]), targets=prep.targets,
                     **({"foils": prep.foils} if prep.foils is not None else {}))
        effects = {m: result.aggregates[f"{m}_effect"] for m in metrics}
        heatmaps = draw_heatmaps(staging, prep, result.sweep, effects)
        with open(os.path.join(staging, "sweep.json"), "w", encoding="utf-8") as handle:
            json.dump({"settings": settings, "sweep": sweep_description(result.sweep), "queries": len(prep.queries),
                       **heatmaps, "stats": {**result.stats, "load_seconds": prep.load_seconds}},
                      handle, indent=1, default=str)
