"""`genir-jax attribute`: attribution patching (AtP / AtP*) or exact effects over a sweep in the site grammar.

AtP estimates every config's effect on a differentiable metric from one clean and one corrupted forward
and a backward pass (`genir_jax.interp.attribution.attribute`); ``--method exact`` runs the sweep itself (the
`genir-jax sweep` code, resumable) and reports the mean effect, e.g. to check AtP's estimates.
"""

from __future__ import annotations

from genir_jax.base.options import LISTED, MAX_LISTED, ROWS, bounded_int
import argparse
import json
import os
import sys
import time

import numpy as np

from genir_jax.analysis.sweep_runs import draw_heatmaps, run_with_store, sweep_description, write_table
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.cli.commands.sweep_options import add_sweep_inputs, prepare
from genir_jax.base.errors import GenIRError
from genir_jax.interp.metrics import DIFFERENTIABLE_METRICS as DIFFERENTIABLE

CHECK_TOP = 20  # units re-run exactly after atp / atp* (`genir_jax.interp.attribution.CHECK_TOP`)
ORDER = 100  # where `genir-jax --help` lists it
SUMMARY = "attribution patching (AtP, AtP*) or exact effects of any sites, heads or neurons on a logit metric"
METHODS = ("atp", "atp*", "exact")
# What an attribution writes into OUTPUT; another run's such files are refused, or removed with --overwrite.
OUTPUTS = ("attribution.json", "attribution.csv", "per_query.npz", "heatmap_*.png")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "attribute", help=SUMMARY,
        description=(
            "Score every config of a sweep (given by --sites) by its effect (patched - clean, mean over the correct "
            "validation queries) on a differentiable metric of the relevant docid. --method atp: attribution "
            "patching (a first-order estimate from one forward and backward pass); atp*: AtP with the "
            "corrections of Kramar et al. 2024 (attention saturation, cancellation); exact: real patching (as "
            "`genir-jax sweep`, resumable). Writes attribution.csv (one row per config: its labels, then score; "
            "atp / atp* add abs_atp, the mean |estimate| over queries without GradDrop, and atp* magnitude, "
            "the GradDrop estimate), "
            "attribution.json (settings, sweep axes, timing), heatmap_<metric>.png (layer x head / neuron / "
            "component sweeps) and with --per-query per_query.npz; prints the --top units by |score|. atp / atp* "
            "then re-run their --check-exact top units (by |score|, GradDrop magnitude for atp*) with exact "
            "patching and print and record (attribution.json: exact_check) the Spearman correlation and the sign "
            "agreement of estimate and exact effect, with a warning where they disagree."),
    )
    add_sweep_inputs(parser)
    parser.add_argument("--method", default="atp", help="atp (default), atp* or exact")
    parser.add_argument("--metric", default="logit",
                        help="one of logit, logprob, logit_diff (needs --foil); default logit. Rank metrics and "
                             "hits@K are not differentiable (use `genir-jax sweep`). Naive / semantic checkpoints: "
                             "logprob (the docid sequence's, teacher-forced)")
    parser.add_argument("--top", type=LISTED, default=20, help="print the top N configs by |score| (default 20)")
    parser.add_argument("--per-query", action="store_true", help="also write per_query.npz ([configs, queries])")
    parser.add_argument("--config-chunk", type=ROWS, default=None, help="configs per step (exact method)")
    parser.add_argument("--check-exact", type=bounded_int(0, MAX_LISTED), default=CHECK_TOP, metavar="N",
                        help=f"atp / atp*: re-run the top N units exactly and compare (default {CHECK_TOP}; 0: skip)")
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser, dtype=True)  # --mesh, --mesh-rules, --dtype


def run(args: argparse.Namespace) -> int:
    if args.method not in METHODS:
        raise GenIRError(f"--method {args.method}: expected one of {', '.join(METHODS)}")
    metric = args.metric.strip()
    if "," in metric:
        raise GenIRError(f"--metric {metric}: `genir-jax attribute` scores one metric; expected one of "
                         f"{', '.join(DIFFERENTIABLE)}")
    if metric not in DIFFERENTIABLE:
        kind = "is not differentiable" if metric in ("rank", "docid_rank") or metric.startswith("hits") else "is unknown"
        raise GenIRError(f"--metric {metric} {kind} for --method {args.method}; expected one of "
                         f"{', '.join(DIFFERENTIABLE)} (rank metrics and hits@K: `genir-jax sweep`)")
    if args.top < 0:
        raise GenIRError(f"--top must be >= 0, got {args.top}")
    attribution = None
    if args.method != "exact":
        try:
            from genir_jax.interp import attribution
        except ModuleNotFoundError as exc:
            if exc.name != "genir_jax.interp.attribution":
                raise
            raise GenIRError(f"--method {args.method} needs genir_jax.interp.attribution, which this installation lacks; "
                             "use --method exact") from None
    prep = prepare(args, [metric], "attribution.json", OUTPUTS, {"method": args.method, "per_query": args.per_query})
    settings = prep.record_settings
    started = time.perf_counter()
    store = None
    agreement = None
    magnitudes = None
    absolute = None
    if args.method == "exact":
        prep.settings["method"] = "exact"
        result, store = run_with_store(prep, [], per_query=args.per_query, desc="exact effects")
        sweep = result.sweep
        scores = np.asarray(result.aggregates[f"{metric}_effect"], np.float64)
        per_query = (result.values[metric].astype(np.float64) - result.clean[metric][None].astype(np.float64)) \
            if args.per_query else None
        stats = dict(result.stats)
    else:
        out = attribution.attribute(prep.config, prep.params, prep.ids, prep.mask, prep.targets, prep.sweep,
                                    method=args.method, metric=metric, foil_ids=prep.foils, source=prep.source,
                                    query_chunk=args.query_chunk, progress=prep.progress, per_query=args.per_query,
                                    target_mask=prep.target_mask)
        sweep = out.sweep
        scores = np.asarray(out.scores, np.float64).reshape(-1)
        per_query = None if out.per_query is None else np.asarray(out.per_query)
        if scores.shape != (sweep.size,):
            raise RuntimeError(f"attribution returned {scores.shape} scores for {sweep.size} configs")
        stats = dict(getattr(out, "stats", None) or {})
        magnitudes = getattr(out, "magnitudes", None)
        absolute = getattr(out, "absolute", None)
        if args.check_exact:
            agreement = attribution.check_against_exact(
                prep.config, prep.params, prep.ids, prep.mask, prep.targets, out, top=args.check_exact,
                foil_ids=prep.foils, source=prep.source, target_mask=prep.target_mask, query_chunk=args.query_chunk,
                progress=prep.progress)
    stats["seconds"] = time.perf_counter() - started
    stats["load_seconds"] = prep.load_seconds

    from genir_jax.base.io import atomic_directory

    with atomic_directory(prep.output, stale=prep.stale) as staging:
        columns = {"score": scores}
        if magnitudes is not None:  # AtP*'s GradDrop magnitude
            columns["magnitude"] = np.asarray(magnitudes, np.float64).reshape(-1)
        if absolute is not None:  # |AtP| (QK-fixed for atp*) without GradDrop: shows what GradDrop changes
            columns["abs_atp"] = np.asarray(absolute, np.float64).reshape(-1)
        write_table(os.path.join(staging, "attribution.csv"), sweep, columns)
        if args.per_query and per_query is not None:
            np.savez(os.path.join(staging, "per_query.npz"), score=per_query,
                     query_ids=np.asarray([q.query_id for q in prep.queries]), targets=prep.targets,
                     **({"foils": prep.foils} if prep.foils is not None else {}))
        what = "mean effect" if args.method == "exact" else f"{args.method} estimate"
        note = None
        if agreement is not None:
            note = (f"vs exact patching, top {len(agreement.configs)}: {agreement.describe()}"
                    + (": DISAGREES" if agreement.warning else ""))
        heatmaps = draw_heatmaps(staging, prep, sweep, {metric: scores}, what=what, note=note)
        with open(os.path.join(staging, "attribution.json"), "w", encoding="utf-8") as handle:
            json.dump({"settings": settings, "metric": metric, "method": args.method,
                       "sweep": sweep_description(sweep), "queries": len(prep.queries), **heatmaps,
                       **({"exact_check": agreement.as_dict(sweep)} if agreement is not None else {}),
                       "stats": stats}, handle, indent=1, default=str)
    if store is not None:
        store.clear()
    order = np.argsort(-np.abs(scores), kind="stable")[:args.top]
    if args.top:
        print(f"top {len(order)} of {sweep.size} configs by |score| ({args.method}, {metric}, patched - clean):")
        for place, k in enumerate(order, 1):
            labels = " ".join(f"{n}={v}" for n, v in sweep.label(int(k)).items() if v is not None and n != "stack")
            extra = "" if magnitudes is None else f"  |atp| {absolute[k]:.6g}  graddrop {magnitudes[k]:.6g}"
            print(f"{place:4d}  {scores[k]: .6g}{extra}  {labels}")
    if agreement is not None:
        by = "GradDrop magnitude" if magnitudes is not None else "|score|"
        print(f"exact patching of the top {len(agreement.configs)} by {by}: {agreement.describe()}")
        if agreement.warning:
            print(f"genir-jax: warning: {agreement.warning}", file=sys.stderr)
    return 0
