"""`genir-jax sweep`: exact activation patching over a sweep given in the site grammar (`genir_jax.interp.site_grammar`).

The inputs, sites, mode and foil options are shared with `genir-jax attribute` (`add_sweep_inputs`,
`prepare`); the heatmaps come from `genir_jax.interp.sweep_plots`.
"""

from __future__ import annotations

from genir_jax.base.options import ROWS, SEED, bounded_float
import argparse
import csv
import hashlib
import json
import os
import shutil
import time

import numpy as np

from genir_jax.base.runs import claim_output
from genir_jax.cli.commands.common import add_analysis_inputs, add_overwrite
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.base.errors import GenIRError
from genir_jax.interp.metrics import METRIC_TABLE, METRICS as ALL_METRICS

ORDER = 90  # where `genir-jax --help` lists it
SUMMARY = "exact activation patching of any sites, heads, neurons or positions (resumable, tidy CSV, heatmaps)"
STORE_DIR = ".sweep-chunks"
# What a sweep writes into OUTPUT; another run's such files are refused, or removed with --overwrite.
OUTPUTS = ("sweep.json", "results.csv", "clean.json", "per_query.npz", "heatmap_*.png")

SITES_HELP = (
    "sites to patch, one config per matched site and unit: STACK.LAYERS.SITE[UNIT], e.g. "
    "'decoder.*.cross_attn.hook_z[head]', 'decoder.10-17.mlp.hook_post[neuron=0-99]', 'decoder.*.{attn,mlp}', "
    "'decoder.*.*' (layer x component grid), 'encoder.hook_out', 'encoder.*.hook_resid_post[position]'. "
    "LAYERS: '*', '7', '10-17', '1,3,5-7'; SITE: a TransformerLens local site name or attn|cross_attn|mlp (the "
    "component's output). [position] on a decoder site is the decoding step (naive / semantic checkpoints: "
    "each docid step; atomic: the one step). 'A x B' patches every combination; the option may be repeated "
    "(configs concatenated)")


# --------------------------------------------------------------------------------------------------
# Shared options
# --------------------------------------------------------------------------------------------------

def add_sweep_inputs(parser: argparse.ArgumentParser) -> None:
    """Inputs, --sites, --mode (+ --seed, --source-model), --foil, chunking and progress options."""
    add_analysis_inputs(parser)
    parser.add_argument("--sites", action="append", required=True, metavar="SPEC", help=SITES_HELP)
    parser.add_argument("--mode", default="zero",
                        help="replacement value: zero; mean (mean over the same queries of each swept site); "
                             "resample (the same site on another query: a seeded derangement of the queries, "
                             "--seed); source (the same site of --source-model on the same query, e.g. the "
                             "pretrained T5). Default: zero")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the resample derangement (default 0)")
    parser.add_argument("--receivers", default=None,
                        help="path patching: the patched sites are senders whose effect reaches only these "
                             "receivers, e.g. 'mlp[12-23]+logits' (component inputs in decoder layers, and/or the "
                             "logits), 'all' (ordinary patching) or 'none' (the clean run); exact method only")
    parser.add_argument("--source-model", default=None,
                        help="checkpoint directory of the source model for --mode source (same architecture and "
                             "word vocabulary, e.g. the pretrained T5)")
    parser.add_argument("--foil", default=None,
                        help="foil docid for logit_diff: 'runner-up' (per query the clean model's best-scoring "
                             "docid other than the target) or a document id / docid token (one foil for all)")
    parser.add_argument("--query-chunk", type=ROWS, default=None,
                        help="queries per device per step (default: the queries per device in as few steps of at "
                             "most 64 as possible, balanced)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_overwrite(parser)
    parser.add_argument("--heatmap-vmax", type=bounded_float(0, open_low=True), default=None, metavar="V",
                        help="colour scale of the heatmaps: -V..V around 0 (default: each map's largest |value|); "
                             "give an exact sweep and an attribution of the same sites the same V to compare "
                             "their maps by eye")


def _metrics(values: list[str] | None, default: str) -> list[str]:
    metrics: list[str] = []
    for entry in values or [default]:
        for name in entry.split(","):
            name = name.strip()
            if name in metrics:
                raise GenIRError(f"--metric: {name!r} is listed twice")
            if name:
                metrics.append(name)
    if not metrics:
        raise GenIRError("--metric: no metric given")
    return metrics


def _hits(text: str) -> list[int]:
    try:
        hits = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise GenIRError(f"--hits: expected comma-separated positive integers, got '{text}'") from None
    if not hits or min(hits) < 1:
        raise GenIRError(f"--hits: expected comma-separated positive integers, got '{text}'")
    return sorted(set(hits))


def check_output(path: str) -> str:
    """Refuse (before any computation) an output path that is a file or lies in a folder we cannot write."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise GenIRError(f"-o/--output {path}: exists and is not a directory")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise GenIRError(f"-o/--output {path}: cannot write in {probe}")
    return path


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


HASHED_UP_TO = 64 << 20  # larger files (model weights) are identified by size and mtime, not re-read


def _file_identity(path: str) -> str:
    """sha256 of a small file; size and modification time of a large one (hashing gigabytes of weights on
    every run would cost more than a resumed chunk saves)."""
    status = os.stat(path)
    if status.st_size > HASHED_UP_TO:
        return f"size={status.st_size},mtime_ns={status.st_mtime_ns}"
    return _sha256(path)


def _fingerprint(path: str | None) -> dict | str | None:
    """Identity of a file, or of every file directly inside a directory (`_file_identity`)."""
    if path is None:
        return None
    if os.path.isdir(path):
        return {name: _file_identity(os.path.join(path, name)) for name in sorted(os.listdir(path))
                if os.path.isfile(os.path.join(path, name))}
    return _file_identity(path) if os.path.isfile(path) else None


def _validate_common(args, metrics: list[str]) -> None:
    from genir_jax.interp.interventions import ABLATION_MODES

    if args.mode not in ABLATION_MODES:
        raise GenIRError(f"--mode: unknown mode '{args.mode}'; expected one of {', '.join(ABLATION_MODES)}")
    if args.mode == "source" and not args.source_model:
        raise GenIRError("--mode source needs --source-model CHECKPOINT_DIR (e.g. the pretrained T5)")
    if args.source_model and args.mode != "source":
        raise GenIRError(f"--source-model is only used with --mode source (got --mode {args.mode})")
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise GenIRError(f"--metric: unknown metric(s) {unknown}; expected some of {', '.join(ALL_METRICS)}")
    for metric in metrics:
        if "foils" in METRIC_TABLE[metric].needs and not args.foil:
            raise GenIRError(f"--metric {metric} needs --foil runner-up|DOCID (what the target's logit is compared to)")
    for name in ("query_chunk", "config_chunk"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise GenIRError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def default_metrics(args, atomic: str, sequences: str) -> str:
    """The default --metric: `atomic` for single-token docids, `sequences` for a naive / semantic checkpoint."""
    from genir_jax.docids.schemes import checkpoint_scheme

    try:
        multi_token = checkpoint_scheme(args.checkpoint).multi_token
    except GenIRError:
        multi_token = False  # prepare() reports the bad checkpoint
    return sequences if multi_token else atomic


def _validate_scheme(args, metrics: list[str], scheme) -> None:
    """Multi-token (naive / semantic) docids: only the sequence metrics."""
    from genir_jax.interp.metrics import STEP_REDUCTIONS

    if not scheme.multi_token:
        return
    bad = [m for m in metrics if m not in STEP_REDUCTIONS]
    if bad:
        raise GenIRError(f"--metric {bad[0]}: {args.checkpoint} has {scheme.name} docids (token sequences); over them "
                         f"the metrics are {' and '.join(STEP_REDUCTIONS)} (the worst step's rank and the sequence "
                         "log-probability, teacher-forced)")


def _with_receivers(args, config, sweep):
    """The sweep as senders x --receivers (path patching), or unchanged."""
    spec = getattr(args, "receivers", None)
    if spec is None:
        return sweep
    if getattr(args, "method", "exact") != "exact":
        raise GenIRError(f"--receivers (path patching) runs exactly; --method {args.method} cannot estimate it")
    from genir_jax.interp import sweep as sw
    from genir_jax.interp.site_grammar import parse_receivers

    return sw.product(sweep, parse_receivers(config, spec))


class Prepared:
    """Everything a sweep or an attribution needs, loaded and validated."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def prepare(args, metrics: list[str], record: str, outputs: tuple[str, ...], extra: dict) -> Prepared:
    """Validate the options, load model and queries, build foils, replacement values and the sweep.

    `record`, `outputs`, `extra`: the command's settings record, the names it writes and its settings beyond
    the sweep's, to refuse another run's outputs in OUTPUT (`genir_jax.base.runs.claim_output`) before any
    loading. Raises `GenIRError` for any bad input before anything is computed or written."""
    from genir_jax.analysis.inputs import load_analysis_inputs, load_model
    from genir_jax.docids.schemes import checkpoint_scheme
    from genir_jax.docids.tokens import docid_vocabulary
    from genir_jax.checkpoints.hf import load_for_analysis
    from genir_jax.interp.interventions import FROM_SOURCE, mean_activations
    from genir_jax.interp.patching import Source
    from genir_jax.interp.site_grammar import parse_sweep, swept_sites

    _validate_common(args, metrics)
    scheme = checkpoint_scheme(args.checkpoint)
    _validate_scheme(args, metrics, scheme)
    output = check_output(args.output)
    started = time.perf_counter()
    dtype = getattr(args, "dtype", "float32")  # bfloat16: parameters and compute; metrics stay float32
    settings = {
        "checkpoint": os.path.abspath(args.checkpoint),
        "checkpoint_sha256": _fingerprint(args.checkpoint),
        "val_queries": os.path.abspath(args.val_queries),
        "val_queries_sha256": _fingerprint(args.val_queries),
        "correct_valid": os.path.abspath(args.correct_valid),
        "correct_valid_sha256": _fingerprint(args.correct_valid),
        "sites": list(args.sites),
        "mode": args.mode,
        "seed": args.seed if args.mode == "resample" else None,
        "source_model": os.path.abspath(args.source_model) if args.source_model else None,
        "source_model_sha256": _fingerprint(args.source_model) if args.source_model else None,
        "docids": scheme.name,
        "metrics": list(metrics),
        "foil": args.foil if any("foils" in METRIC_TABLE[m].needs for m in metrics) else None,
        "receivers": getattr(args, "receivers", None),
        "query_chunk": args.query_chunk,
        "config_chunk": getattr(args, "config_chunk", None),
        **({"dtype": dtype} if dtype != "float32" else {}),
    }
    record_settings = {**settings, **extra}
    stale = claim_output(output, record, record_settings, outputs, overwrite=args.overwrite)
    model = load_model(args.checkpoint, dtype=dtype)
    config, params, tokenizer = model.config, model.params, model.tokenizer
    inputs = load_analysis_inputs(args.checkpoint, args.val_queries, args.correct_valid, model=model,
                                  sequences=scheme.multi_token, scheme=scheme, allow_incorrect=args.allow_incorrect)
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
            raise GenIRError(f"--metric docid_rank: {args.checkpoint}'s tokenizer has no @DOC_ID_...@ tokens")
    lengths = dict(length=ids.shape[1], decoder_length=1 if target_mask is None else targets.shape[1])
    # Parse the sites first (cheap): bad specs fail before means or foils are computed.
    sweep = _with_receivers(args, config, parse_sweep(config, args.sites, value=0.0, **lengths))

    foils = None
    if any("foils" in METRIC_TABLE[m].needs for m in metrics):
        foils = _foils(args, config, params, ids, mask, targets, candidates, queries, tokenizer)

    progress = not args.no_progress
    source = None
    if args.mode == "mean":
        means = mean_activations(config, params, ids, mask, swept_sites(config, sweep), decoder_input_ids=decoder_inputs,
                                 progress=progress)
        sweep = _with_receivers(args, config, parse_sweep(config, args.sites, value=means, **lengths))
    elif args.mode == "resample":
        if len(queries) < 2:
            raise GenIRError("--mode resample needs at least 2 correct queries (each is patched with another's)")
        from genir_jax.interp.patching import derangement

        permutation = derangement(len(queries), args.seed)
        source = Source(config, params, ids[permutation], mask[permutation])
        sweep = _with_receivers(args, config, parse_sweep(config, args.sites, value=FROM_SOURCE, **lengths))
    elif args.mode == "source":
        base = load_for_analysis(args.source_model, load_tokenizer=False, dtype=dtype)
        if int(ids.max()) >= base.config.vocab_size:
            raise GenIRError(f"{args.source_model}: the source model's vocabulary ({base.config.vocab_size}) does not "
                             "cover the query tokens; it must share the GenIR model's word vocabulary")
        for field in ("d_model", "num_heads", "d_kv", "d_ff", "num_layers", "num_decoder_layers"):
            if getattr(base.config, field) != getattr(config, field):
                raise GenIRError(f"{args.source_model}: the source model's {field}={getattr(base.config, field)} "
                                 f"differs from {args.checkpoint}'s {getattr(config, field)}")
        source = Source(base.config, base.params)
        sweep = _with_receivers(args, config, parse_sweep(config, args.sites, value=FROM_SOURCE, **lengths))

    return Prepared(output=output, model=model, config=config, params=params, tokenizer=tokenizer, queries=queries,
                    ids=ids, mask=mask, targets=targets, target_mask=target_mask, candidates=candidates, foils=foils,
                    source=source,
                    sweep=sweep, settings=settings, progress=progress, query_chunk=args.query_chunk,
                    record_settings=record_settings, stale=stale, overwrite=args.overwrite,
                    heatmap_vmax=args.heatmap_vmax, load_seconds=time.perf_counter() - started)


def _foils(args, config, params, ids, mask, targets, candidates, queries, tokenizer) -> np.ndarray:
    if args.foil == "runner-up":
        if candidates.size < 2:
            raise GenIRError("--foil runner-up needs at least 2 docid tokens in the vocabulary")
        from genir_jax.interp.patching import runner_up_foils

        return runner_up_foils(config, params, ids, mask, targets, candidates, args.query_chunk)
    from genir_jax.docids.tokens import docid_token, is_docid_token

    token = args.foil if is_docid_token(args.foil) else docid_token(args.foil)
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise GenIRError(f"--foil {args.foil}: docid token {token!r} is not in the model's vocabulary; expected "
                         "'runner-up' or a document id")
    foil = int(vocab[token])
    same = [i for i, t in enumerate(targets) if int(t) == foil]
    if same:
        q = queries[same[0]]
        raise GenIRError(f"--foil {args.foil}: the foil equals the target of query {q.query_id!r} "
                         f"({args.correct_valid} record index {same[0]}); choose another docid or 'runner-up'")
    return np.full(len(targets), foil, dtype=np.int32)


# --------------------------------------------------------------------------------------------------
# Running with a resumable store
# --------------------------------------------------------------------------------------------------

def run_with_store(prep: Prepared, metrics: list[str], hits: list[int], *, per_query: bool, config_chunk=None,
                   desc: str = "sweep"):
    """run_sweep with the chunk store in OUTPUT/.sweep-chunks (resumed after a kill, refused with other
    settings). Returns (result, store); the caller clears the store once its outputs are written."""
    from genir_jax.interp.patching import run_sweep
    from genir_jax.interp.sweep_store import DirectoryStore, StoreError

    existed = os.path.isdir(prep.output)
    try:
        store = DirectoryStore(os.path.join(prep.output, STORE_DIR), prep.settings)
    except StoreError:
        if not prep.overwrite:
            raise
        shutil.rmtree(os.path.join(prep.output, STORE_DIR))  # --overwrite: another run's partial store too
        store = DirectoryStore(os.path.join(prep.output, STORE_DIR), prep.settings)
    try:
        result = run_sweep(prep.config, prep.params, prep.ids, prep.mask, prep.targets, prep.sweep,
                           source=prep.source, metrics=metrics, candidates=prep.candidates, foil_ids=prep.foils,
                           top_k=0, hits=hits, query_chunk=prep.query_chunk, target_mask=prep.target_mask,
                           config_chunk=config_chunk, per_query=per_query, store=store, progress=prep.progress,
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


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------

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


def draw_heatmaps(directory: str, prep: Prepared, sweep, effects: dict, *, what: str = "mean effect",
                  note: str | None = None) -> dict:
    """The heatmaps of `effects` (metric -> per-config values) titled with the sweep's mode and query count, on
    --heatmap-vmax's colour scale; returns the JSON record's ``heatmaps`` (file names) and ``heatmap_vmax``
    (metric -> the colour bound used: pass it as --heatmap-vmax to draw another map on the same scale)."""
    from genir_jax.interp.sweep_plots import colour_bound, write_heatmaps

    files = write_heatmaps(directory, sweep, effects, what=what, mode=prep.settings["mode"],
                           queries=len(prep.queries), vmax=prep.heatmap_vmax, note=note)
    return {"heatmaps": files,
            "heatmap_vmax": {m: colour_bound(v, prep.heatmap_vmax) for m, v in effects.items()} if files else {}}


def sweep_description(sweep) -> dict:
    from genir_jax.interp.sweep_plots import heatmap_layout

    return {"axes": list(sweep.axes), "shape": list(sweep.shape), "configs": sweep.size,
            "labels": list(sweep.labels), "heatmap": heatmap_layout(sweep)}


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep", help=SUMMARY,
        description=(
            "Patch every config of a sweep (given by --sites) on every correct validation query and record the "
            "metrics of the relevant docid. Writes results.csv (one row per config: its labels, then the mean of "
            "each metric, its mean effect (patched - clean), rank>t fractions and hits@k), clean.json (the clean "
            "model's aggregates, settings, number of queries), sweep.json (settings, axes, shape, timing), "
            "heatmap_<metric>.png (layer x head / neuron / component sweeps) and with --per-query per_query.npz "
            "([configs, queries] values per metric and the clean values). Resumable: finished chunks are kept "
            f"in OUTPUT/{STORE_DIR} until the outputs are written; rerunning the same command after a kill "
            "resumes, rerunning with other settings is refused."),
    )
    add_sweep_inputs(parser)
    parser.add_argument("--metric", action="append", default=None,
                        help="metrics (repeat or comma list) among rank (0-based, full vocabulary), docid_rank "
                             "(among the @DOC_ID_...@ tokens), logit, logprob, logit_diff (needs --foil); hits@K "
                             "is reported with a rank metric. Default: rank,logit. Naive / semantic checkpoints (docid "
                             "token sequences, teacher-forced, every decoder position patched): rank (the worst "
                             "step's) and logprob (the sequence's), default both")
    parser.add_argument("--hits", default="1,10", help="K of the hits@K columns (default 1,10)")
    parser.add_argument("--method", default="exact",
                        help="exact (the only method here; atp and atp* belong to `genir-jax attribute`)")
    parser.add_argument("--per-query", action="store_true", help="also write per_query.npz")
    parser.add_argument("--config-chunk", type=ROWS, default=None,
                        help="configs per step (default: from a 1 GiB logits budget); also the resume granularity")
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser, dtype=True)  # --mesh, --mesh-rules, --dtype


def run(args: argparse.Namespace) -> int:
    metrics = _metrics(args.metric, default_metrics(args, "rank,logit", "rank,logprob"))
    if args.method != "exact":
        hint = " (use `genir-jax attribute --method ...`)" if args.method in ("atp", "atp*") else ""
        raise GenIRError(f"--method {args.method}: `genir-jax sweep` computes exact patching only{hint}")
    hits = _hits(args.hits)
    prep = prepare(args, metrics, "sweep.json", OUTPUTS, {"hits": hits, "per_query": args.per_query, "method": "exact"})
    result, store = run_with_store(prep, metrics, hits, per_query=args.per_query, config_chunk=args.config_chunk)
    write_sweep_outputs(prep, result, metrics, hits, per_query=args.per_query)
    store.clear()
    main = metrics[0]
    best = np.argsort(-np.abs(result.aggregates[f"{main}_effect"]), kind="stable")[:5]
    print(json.dumps({"queries": len(prep.queries), "configs": result.sweep.size, "output": prep.output,
                      "seconds": round(result.stats.get("seconds", 0.0), 3),
                      f"largest |{main}_effect|": [{**result.sweep.label(int(k)),
                                                     f"{main}_effect": float(result.aggregates[f'{main}_effect'][k])}
                                                    for k in best]}, indent=1, default=str))
    return 0


def clean_summary(prep: Prepared, result, metrics, hits) -> dict:
    clean = {m: float(np.mean(result.clean[m])) for m in metrics}
    rank_metric = "docid_rank" if "docid_rank" in metrics else ("rank" if "rank" in metrics else None)
    if rank_metric is not None:
        for k in hits:
            clean[f"hits@{k}"] = float(np.mean(result.clean[rank_metric] < k))
    return clean


def write_sweep_outputs(prep: Prepared, result, metrics, hits, *, per_query: bool) -> None:
    from genir_jax.base.io import atomic_directory

    settings = prep.record_settings
    with atomic_directory(prep.output, stale=prep.stale) as staging:
        write_table(os.path.join(staging, "results.csv"), result.sweep, result.aggregates)
        with open(os.path.join(staging, "clean.json"), "w", encoding="utf-8") as handle:
            json.dump({"queries": len(prep.queries), "clean": clean_summary(prep, result, metrics, hits),
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
