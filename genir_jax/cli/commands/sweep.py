"""`genir-jax sweep`: exact activation patching over a sweep given in the site grammar (`genir_jax.interp.site_grammar`).

The inputs, sites, mode and foil options are shared with `genir-jax attribute`
(`genir_jax.cli.commands.sweep_options`); the sweep is prepared, run with its resumable store and written by
`genir_jax.analysis.sweep_runs`.
"""

from __future__ import annotations

from genir_jax.base.options import ROWS
import argparse
import json

import numpy as np

from genir_jax.analysis.sweep_runs import STORE_DIR, SWEEP_OUTPUTS as OUTPUTS, run_with_store, write_sweep_outputs
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.cli.commands.sweep_options import add_sweep_inputs, prepare
from genir_jax.base.errors import GenIRError

ORDER = 90  # where `genir-jax --help` lists it
SUMMARY = "exact activation patching of any sites, heads, neurons or positions (resumable, tidy CSV, heatmaps)"


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


def default_metrics(args, atomic: str, sequences: str) -> str:
    """The default --metric: `atomic` for single-token docids, `sequences` for a naive / semantic checkpoint."""
    from genir_jax.docids.schemes import checkpoint_scheme

    try:
        multi_token = checkpoint_scheme(args.checkpoint).multi_token
    except GenIRError:
        multi_token = False  # prepare() reports the bad checkpoint
    return sequences if multi_token else atomic


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
    result, store = run_with_store(prep, hits, per_query=args.per_query)
    write_sweep_outputs(prep, result, hits, per_query=args.per_query)
    store.clear()
    main = metrics[0]
    best = np.argsort(-np.abs(result.aggregates[f"{main}_effect"]), kind="stable")[:5]
    print(json.dumps({"queries": len(prep.queries), "configs": result.sweep.size, "output": prep.output,
                      "seconds": round(result.stats.get("seconds", 0.0), 3),
                      f"largest |{main}_effect|": [{**result.sweep.label(int(k)),
                                                     f"{main}_effect": float(result.aggregates[f'{main}_effect'][k])}
                                                    for k in best]}, indent=1, default=str))
    return 0
