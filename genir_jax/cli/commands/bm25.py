"""`genir-jax bm25`: the BM25 baseline (bm25s) on a prepared split: metrics and a TREC run file."""

from __future__ import annotations

from genir_jax.base.options import LISTED, bounded_float
import argparse

from genir_jax.cli.commands.common import add_json_output, print_evaluation

ORDER = 60  # where `genir-jax --help` lists it
SUMMARY = "rank documents with BM25 and evaluate like `evaluate` (baseline for a DSI model)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "bm25",
        help=SUMMARY,
        description="Index the documents with BM25 (bm25s, Lucene scoring, English stop words, no stemming), "
                    "retrieve the top k for every query and write metrics.json and run.trec into OUTPUT.",
    )
    parser.add_argument("--prepared", help="a prepared directory (genir-jax prepare-data); with --split")
    parser.add_argument("--split", default="test", help="split of --prepared to evaluate (default: test)")
    parser.add_argument("--documents", help="documents file (instead of --prepared)")
    parser.add_argument("--queries", help="queries file (instead of --prepared)")
    parser.add_argument("--qrels", help="qrels file (default: the queries' relevant_docs, rel = 4 - position)")
    parser.add_argument("-o", "--output", required=True, help="directory for metrics.json and run.trec")
    parser.add_argument("--k", type=LISTED, default=100, help="documents retrieved per query (default 100)")
    parser.add_argument("--k1", type=bounded_float(0), default=1.5)
    parser.add_argument("--b", type=bounded_float(0, 1), default=0.75)
    add_json_output(parser)
    parser.set_defaults(handler=run)


# Settings of `run_bm25` / `evaluation_inputs` as this command spells them (errors name the flag).
FLAGS = {"prepared": "--prepared", "split": "--split", "documents": "--documents", "queries": "--queries",
         "qrels": "--qrels", "k": "--k", "k1": "--k1", "b": "--b", "output": "-o/--output"}


def run(args: argparse.Namespace) -> int:
    from genir_jax.base.errors import renaming_settings
    from genir_jax.training.evaluation import run_bm25

    with renaming_settings(FLAGS):
        result = run_bm25(args.output, prepared=args.prepared, split=args.split, documents=args.documents,
                          queries=args.queries, qrels=args.qrels, k=args.k, k1=args.k1, b=args.b)
    print_evaluation(result, args)
    return 0
