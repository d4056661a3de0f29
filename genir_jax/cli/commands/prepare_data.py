"""`genir-jax prepare-data`: read a corpus, split its queries and write a prepared directory."""

from __future__ import annotations

from genir_jax.base.options import MAX_FACTOR, POSITIVE, SEED, bounded_float, bounded_int
import argparse
import json


ORDER = 20  # where `genir-jax --help` lists it
SUMMARY = "write documents, train/val/test queries and qrels of a corpus in the reference JSON format"


def add_parser(subparsers) -> None:
    from genir_jax.data.prepare import DATA_ENV, DATASETS, DEFAULT_SPLITS, PAPER_SPLIT, SPLIT_SCHEMES

    parser = subparsers.add_parser(
        "prepare-data",
        help=SUMMARY,
        description="Read squad-dev, nq-oracle or cranfield from the data directory (or validate existing "
                    "reference-format files) and write documents.json, {train,val,test}_queries.json, "
                    "{val,test}_qrels.json, {val,test}.qrels and prepare.json into OUTPUT with deterministic, "
                    "documented splits (see genir_jax.data.prepare); with --docids semantic also "
                    "semantic_docids.json, with --docids naive also naive_docids.json (shuffled ids). Nothing is "
                    "written when an input is bad.",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("-o", "--output", required=True, help="prepared directory to write")
    parser.add_argument("--data-dir", default=None,
                        help=f"where squad-v1.1-dev/, nq-open-oracle/, cranfield/ live (default: ${DATA_ENV}, "
                             "else ../shared/data)")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the split permutations (default 0)")
    parser.add_argument("--split", choices=SPLIT_SCHEMES, default=None,
                        help="nq10k: validation/test documents have no training query (indexed only, the paper's "
                             "NQ10k); per-document: every document keeps a training query; random: queries at "
                             "random (default: " + ", ".join(f"{d} {s}" for d, s in DEFAULT_SPLITS.items()) +
                             f"; {PAPER_SPLIT} with --paper-regime)")
    parser.add_argument("--paper-regime", action="store_true",
                        help=f"prepare for the paper's training regime: --split {PAPER_SPLIT} unless given, recorded "
                             "as regime 'paper' in prepare.json (train with --paper-regime too)")
    parser.add_argument("--val-fraction", type=bounded_float(0, 1, open_high=True), default=0.1)
    parser.add_argument("--test-fraction", type=bounded_float(0, 1, open_high=True), default=0.1)
    parser.add_argument("--download", action="store_true",
                        help="squad-dev: fetch dev-v1.1.json (SHA-256 checked) into the data directory if missing")
    parser.add_argument("--url", default=None, help="squad-dev download URL (default: the official one)")
    parser.add_argument("--max-documents", type=POSITIVE, default=None,
                        help="keep only the first N documents and their queries (small corpora for smoke runs)")
    from genir_jax.docids.schemes import add_scheme_arguments

    schemes = parser.add_argument_group("docids")
    add_scheme_arguments(schemes, default_help="recorded in prepare.json for `train` (default atomic); semantic "
                                               "writes semantic_docids.json, built by hierarchical k-means over "
                                               "TF-IDF/LSA document vectors unless a mapping file is given")
    from genir_jax.docids.schemes import NAIVE_ORDERS

    schemes.add_argument("--naive-order", choices=NAIVE_ORDERS, default=None,
                         help="naive docids: shuffled (default) numbers the documents in a random order seeded by "
                              "--seed and writes naive_docids.json, so neighbouring ids do not share an article "
                              "and with it a leading token; corpus keeps the document ids (article order)")
    schemes.add_argument("--semantic-k", type=bounded_int(2, MAX_FACTOR), default=None, help="clusters per level (default 10, as DSI)")
    schemes.add_argument("--semantic-c", type=POSITIVE, default=None,
                         help="largest leaf cluster; bigger ones are split again (default 100, as DSI)")
    group = parser.add_argument_group("reference-json inputs")
    group.add_argument("--documents", help="documents [{id, text}]")
    group.add_argument("--train-queries", help="training queries [{id, query, relevant_docs}]")
    group.add_argument("--val-queries", help="validation queries")
    group.add_argument("--test-queries", help="test queries (optional)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary (output, counts, split, regime, notes) as JSON instead of labelled "
                             "lines")
    parser.set_defaults(handler=run)


# Settings of `prepare_dataset` as this command spells them (errors name the flag).
FLAGS = {"val_fraction": "--val-fraction", "test_fraction": "--test-fraction", "max_documents": "--max-documents",
         "split": "--split", "paper_regime": "--paper-regime", "docids": "--docids",
         "semantic_mapping": "--semantic-docid-mapping", "semantic_docid_mapping": "--semantic-docid-mapping",
         "semantic_k": "--semantic-k", "semantic_c": "--semantic-c", "naive_order": "--naive-order",
         "download": "--download",
         "data_dir": "--data-dir"}


def run(args: argparse.Namespace) -> int:
    from genir_jax.base.errors import renaming_settings
    from genir_jax.data.prepare import check_prepare_settings, prepare_dataset, preparation_lines

    if args.dataset == "reference-json":
        options = dict(documents=args.documents, train_queries=args.train_queries, val_queries=args.val_queries,
                       test_queries=args.test_queries, split=args.split, paper_regime=args.paper_regime)
    else:
        options = dict(seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                       download=args.download, split=args.split, paper_regime=args.paper_regime)
        if args.url:
            options["url"] = args.url
        if args.max_documents is not None:
            options["max_documents"] = args.max_documents
    options.update(docids=args.docids or "atomic", semantic_mapping=args.semantic_docid_mapping,
                   semantic_k=args.semantic_k, semantic_c=args.semantic_c, naive_order=args.naive_order)
    with renaming_settings(FLAGS):
        check_prepare_settings(args.dataset, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                               max_documents=args.max_documents)  # also where reference-json ignores them
        manifest = prepare_dataset(args.dataset, args.output, args.data_dir, **options)
    if args.json:
        print(json.dumps({"output": args.output, "counts": manifest["counts"], "split": manifest["split"],
                          "regime": manifest["regime"], "notes": manifest["notes"]}, indent=2))
    else:
        print("\n".join(preparation_lines(manifest, args.output)))
    return 0
