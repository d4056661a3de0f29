"""`genir-jax evaluate`: rank docids with a DSI checkpoint; metrics, a TREC run and correct_valid.json."""

from __future__ import annotations

from genir_jax.base.options import MODEL_TYPES, BEAMS, LISTED, ROWS, TOKENS
import argparse

from genir_jax.cli.commands.common import add_json_output, print_evaluation
from genir_jax.cli.commands.mesh_options import add_mesh_arguments


ORDER = 50  # where `genir-jax --help` lists it
SUMMARY = "evaluate a DSI checkpoint: Hits@1/10, Recall@5, MRR@10, nDCG@10, run file, correct_valid.json"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help=SUMMARY,
        description="Atomic docids: rank the checkpoint's docid tokens (@DOC_ID_<id>@) for every query from the "
                    "first decoder step's logits. Naive / semantic docids (the scheme recorded in the checkpoint's "
                    "docids.json, or --docids): beam search (--num-beams 10, 10 returned), constrained to the "
                    "corpus's docids by a prefix trie unless --unconstrained (the reference's behaviour). Writes "
                    "metrics.json (with decoding throughput for beam search), run.trec and correct_<name>.json "
                    "(the reference's [[docid, query_id], ...] of queries whose relevant document is ranked first "
                    "and is also what the model's top tokens give: atomic, the top token of the whole vocabulary; "
                    "naive / semantic, greedy decoding) into OUTPUT. --model-type decoder: a decoder-only "
                    "checkpoint: atomic docids ranked by the logits after 'QUERY Document:', naive / semantic docids "
                    "decoded after it by the same beam search.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory with its tokenizer")
    parser.add_argument("--model-type", default="encoder-decoder", choices=MODEL_TYPES,
                        help="encoder-decoder (T5, default) or decoder (decoder-only: docids ranked / decoded "
                             "after the query's prompt ' Document:')")
    parser.add_argument("--queries", help="queries file [{id, query, relevant_docs}]")
    parser.add_argument("--qrels", help="qrels file (default: the queries' relevant_docs, rel = 4 - position)")
    parser.add_argument("--prepared", help="a prepared directory (instead of --queries/--qrels); with --split")
    parser.add_argument("--split", default="val", help="split of --prepared (default: val)")
    parser.add_argument("-o", "--output", required=True, help="directory for the outputs")
    parser.add_argument("--name", default=None,
                        help="suffix of correct_<name>.json (default: 'valid' for val queries, else the split)")
    parser.add_argument("--max-length", type=TOKENS, default=128,
                        help="query truncation in tokens, as in training (default 128, the reference's)")
    parser.add_argument("--k", type=LISTED, default=100, help="atomic docids: documents per query in the run (default 100); beam search lists --num-beams")
    parser.add_argument("--batch-size", type=ROWS, default=None,
                        help="queries per jitted call (default 256 atomic, 32 beam search)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    parser.add_argument("--reference-mode", action="store_true",
                        help="reproduce the reference eval.py: top k over the full vocabulary (word tokens take "
                             "ranks as non-relevant entries) and queries padded to --max-length without an "
                             "attention mask")
    from genir_jax.docids.schemes import add_scheme_arguments

    schemes = parser.add_argument_group("naive / semantic docids")
    add_scheme_arguments(schemes, default_help="default: the checkpoint's docids.json, else atomic; a checkpoint "
                                               "without docids.json (e.g. the reference's) needs --docids and the "
                                               "documents (--prepared or --documents)")
    schemes.add_argument("--documents", help="documents file [{id, text}] whose ids are the naive docids")
    schemes.add_argument("--num-beams", type=BEAMS, default=10, help="beams, and docids returned (default 10)")
    schemes.add_argument("--unconstrained", action="store_true",
                         help="free beam search as the reference (beams that are no docid count as non-relevant); "
                              "default: constrained to the corpus's docids by a prefix trie")
    add_json_output(parser)
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


# Settings of `evaluate_checkpoint` as this command spells them (errors name the flag).
FLAGS = {"model_type": "--model-type", "prepared": "--prepared", "split": "--split", "queries": "--queries", "qrels": "--qrels", "name": "--name",
         "max_length": "--max-length", "k": "--k", "batch_size": "--batch-size", "dtype": "--dtype",
         "reference_mode": "--reference-mode", "docids": "--docids",
         "semantic_docid_mapping": "--semantic-docid-mapping", "documents": "--documents",
         "num_beams": "--num-beams", "unconstrained": "--unconstrained", "output": "-o/--output"}


def run(args: argparse.Namespace) -> int:
    from genir_jax.base.errors import renaming_settings
    from genir_jax.training.evaluation import evaluate_checkpoint

    with renaming_settings(FLAGS):
        result = evaluate_checkpoint(args.checkpoint, args.output, prepared=args.prepared, split=args.split,
                                     queries=args.queries, qrels=args.qrels, name=args.name,
                                     max_length=args.max_length, k=args.k, batch_size=args.batch_size,
                                     dtype=args.dtype, reference_mode=args.reference_mode, docids=args.docids,
                                     semantic_docid_mapping=args.semantic_docid_mapping, documents=args.documents,
                                     num_beams=args.num_beams, unconstrained=args.unconstrained,
                                     model_type=args.model_type)
    print_evaluation(result, args)
    return 0
