"""`genir-jax bm25`: the BM25 baseline (bm25s) on a prepared split: metrics and a TREC run file."""

from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bm25",
        help="rank documents with BM25 and evaluate like `evaluate` (baseline for a DSI model)",
        description="Index the documents with BM25 (bm25s, Lucene scoring, English stop words, no stemming), "
                    "retrieve the top k for every query and write metrics.json and run.trec into OUTPUT.",
    )
    parser.add_argument("--prepared", help="a prepared directory (genir-jax prepare-data); with --split")
    parser.add_argument("--split", default="test", help="split of --prepared to evaluate (default: test)")
    parser.add_argument("--documents", help="documents file (instead of --prepared)")
    parser.add_argument("--queries", help="queries file (instead of --prepared)")
    parser.add_argument("--qrels", help="qrels file (default: the queries' relevant_docs, rel = 4 - position)")
    parser.add_argument("-o", "--output", required=True, help="directory for metrics.json and run.trec")
    parser.add_argument("--k", type=int, default=100, help="documents retrieved per query (default 100)")
    parser.add_argument("--k1", type=float, default=1.5)
    parser.add_argument("--b", type=float, default=0.75)
    parser.set_defaults(handler=run)


def resolve_inputs(args: argparse.Namespace, need_documents: bool) -> tuple[str | None, str, str | None]:
    """(documents, queries, qrels) paths from --prepared/--split or the explicit flags."""
    from genir_jax.data.prepare import DOCUMENTS_FILE, qrels_file, queries_file
    from genir_jax.base.errors import GenIRError

    if args.prepared:
        documents = os.path.join(args.prepared, DOCUMENTS_FILE)
        queries = args.queries or os.path.join(args.prepared, queries_file(args.split))
        qrels = args.qrels or os.path.join(args.prepared, qrels_file(args.split))
        if args.qrels is None and not os.path.isfile(qrels):
            qrels = None
        return documents, queries, qrels
    if not args.queries or (need_documents and not getattr(args, "documents", None)):
        raise GenIRError("give --prepared DIR (and --split), or the input files explicitly"
                         + (" (--documents and --queries)" if need_documents else " (--queries)"))
    return getattr(args, "documents", None), args.queries, args.qrels


def check_bm25_options(args: argparse.Namespace) -> None:
    """--k >= 1, --k1 finite and >= 0, --b finite in [0, 1] (GenIRError naming the option)."""
    import math

    from genir_jax.base.errors import GenIRError

    if args.k < 1:
        raise GenIRError(f"--k must be >= 1, got {args.k}")
    if not math.isfinite(args.k1) or args.k1 < 0:
        raise GenIRError(f"--k1 must be a finite number >= 0, got {args.k1}")
    if not math.isfinite(args.b) or not 0 <= args.b <= 1:
        raise GenIRError(f"--b must be a number in [0, 1], got {args.b}")


def run(args: argparse.Namespace) -> int:
    from genir_jax.docids.bm25 import bm25_run
    from genir_jax.data.corpus import qrels_from_queries, read_documents, read_qrels, read_queries
    from genir_jax.base.io import atomic_directory, write_json
    from genir_jax.docids.retrieval import check_run_covers, evaluate_run, write_trec_run

    check_bm25_options(args)
    documents_path, queries_path, qrels_path = resolve_inputs(args, need_documents=True)
    documents = read_documents(documents_path)
    queries = read_queries(queries_path, documents)
    qrels = read_qrels(qrels_path) if qrels_path else qrels_from_queries(queries)
    check_run_covers([q.id for q in queries], qrels, qrels_path or queries_path)
    run_ = bm25_run(documents, queries, k=args.k, k1=args.k1, b=args.b, source=documents_path)
    metrics = evaluate_run(run_, qrels)
    report = {"system": "bm25", "metrics": metrics, "documents": documents_path, "queries": queries_path,
              "qrels": qrels_path, "k": args.k, "k1": args.k1, "b": args.b}
    with atomic_directory(args.output) as staging:
        write_json(os.path.join(staging, "metrics.json"), report, indent=2, allow_nan=False)
        write_trec_run(os.path.join(staging, "run.trec"), run_, "bm25")
    print(json.dumps(metrics, indent=2))
    return 0
