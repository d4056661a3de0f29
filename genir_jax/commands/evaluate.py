"""`genir-jax evaluate`: rank docids with a DSI checkpoint; metrics, a TREC run and correct_valid.json."""

from __future__ import annotations

import argparse
import json
import os


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a DSI checkpoint: Hits@1/10, Recall@5, MRR@10, nDCG@10, run file, correct_valid.json",
        description="Rank the checkpoint's docid tokens (@DOC_ID_<id>@) for every query from the first decoder "
                    "step's logits and write metrics.json, run.trec and correct_<name>.json (the reference's "
                    "[[docid_token, query_id], ...] of queries whose relevant document is ranked first, its docid "
                    "token being the top token of the whole vocabulary) into OUTPUT.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory with its tokenizer")
    parser.add_argument("--queries", help="queries file [{id, query, relevant_docs}]")
    parser.add_argument("--qrels", help="qrels file (default: the queries' relevant_docs, rel = 4 - position)")
    parser.add_argument("--prepared", help="a prepared directory (instead of --queries/--qrels); with --split")
    parser.add_argument("--split", default="val", help="split of --prepared (default: val)")
    parser.add_argument("-o", "--output", required=True, help="directory for the outputs")
    parser.add_argument("--name", default=None,
                        help="suffix of correct_<name>.json (default: 'valid' for val queries, else the split)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="query truncation in tokens, as in training (default 128, the reference's)")
    parser.add_argument("--k", type=int, default=100, help="documents per query in the run (default 100)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    parser.add_argument("--reference-mode", action="store_true",
                        help="reproduce the reference eval.py: top k over the full vocabulary (word tokens take "
                             "ranks as non-relevant entries) and queries padded to --max-length without an "
                             "attention mask")
    parser.set_defaults(handler=run)


def check_name(name: str | None) -> None:
    """--name becomes part of a file name (correct_<name>.json): no path separators, not empty, not . or .."""
    from genir_jax.errors import GenIRError

    if name is None:
        return
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not name.strip() or name in (".", "..") or any(s in name for s in separators) or "\0" in name:
        raise GenIRError(f"--name must be a plain file-name part (no path separators, not empty), got {name!r}")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from genir_jax.commands.bm25 import resolve_inputs
    from genir_jax.data.corpus import qrels_from_queries, read_qrels, read_queries
    from genir_jax.data.dsi import tokenize_queries
    from genir_jax.docids import docid_vocabulary
    from genir_jax.errors import CheckpointError, GenIRError
    from genir_jax.hf import load_pretrained
    from genir_jax.io import atomic_directory, write_json
    from genir_jax.retrieval import (check_run_covers, correct_valid, evaluate_run, rank_docids, run_from_ranking,
                                     write_trec_run)

    if args.k < 1 or args.batch_size < 1:
        raise GenIRError("--k and --batch-size must be >= 1")
    if args.max_length < 1:
        raise GenIRError(f"--max-length must be >= 1, got {args.max_length}")
    check_name(args.name)
    _, queries_path, qrels_path = resolve_inputs(args, need_documents=False)
    queries = read_queries(queries_path)
    qrels = read_qrels(qrels_path) if qrels_path else qrels_from_queries(queries)
    qrels_source = qrels_path or queries_path
    check_run_covers([q.id for q in queries], qrels, qrels_source)

    model = load_pretrained(args.checkpoint, dtype=args.dtype)
    if model.tokenizer is None:
        raise CheckpointError(f"{args.checkpoint}: no tokenizer files; evaluation needs the tokenizer that holds "
                              "the docid tokens")
    vocabulary = docid_vocabulary(model.tokenizer)
    if not vocabulary:
        raise CheckpointError(f"{args.checkpoint}: the tokenizer has no docid tokens (@DOC_ID_<id>@); is this a "
                              "DSI checkpoint?")
    token_ids = sorted(vocabulary)
    doc_ids = [vocabulary[t] for t in token_ids]
    known = set(doc_ids)
    for query_id, docs in qrels.items():
        for doc_id in docs:
            if doc_id not in known:
                raise CheckpointError(
                    f"{qrels_source}: query {query_id!r}: relevant document {doc_id!r} has no docid token in the "
                    f"checkpoint {args.checkpoint} ({len(known)} docid tokens): the checkpoint was trained on "
                    "another corpus / vocabulary")

    input_ids, attention_mask = tokenize_queries(queries, model.tokenizer, args.max_length,
                                                 pad_to_max_length=args.reference_mode)
    if args.reference_mode:
        attention_mask = np.ones_like(attention_mask)
    indices, scores, top_token = rank_docids(model.config, model.params, input_ids, attention_mask, token_ids,
                                             k=args.k, batch_size=args.batch_size,
                                             full_vocabulary=args.reference_mode, return_top_token=True)
    ranking = run_from_ranking([q.id for q in queries], doc_ids, indices, scores)
    metrics = evaluate_run(ranking, qrels)
    # correct = first docid relevant AND that docid the top token of the whole vocabulary (the analyses'
    # definition: rank 0 in the full-vocabulary ranking)
    top_is_docid = {q.id: indices.shape[1] > 0 and indices[row, 0] >= 0 and int(top_token[row]) ==
                    token_ids[int(indices[row, 0])] for row, q in enumerate(queries)}
    correct = correct_valid(ranking, qrels, top_is_docid)
    name = args.name or ("valid" if (args.prepared and args.split == "val") or not args.prepared else args.split)
    report = {
        "metrics": metrics, "correct_first": len(correct), "checkpoint": os.path.abspath(args.checkpoint),
        "queries": queries_path, "qrels": qrels_path, "docid_tokens": len(token_ids), "k": args.k,
        "max_length": args.max_length, "ranking": "full vocabulary, no attention mask (reference)"
        if args.reference_mode else "docid tokens only, masked padding",
    }
    with atomic_directory(args.output) as staging:
        write_json(os.path.join(staging, "metrics.json"), report, indent=2, allow_nan=False)
        write_trec_run(os.path.join(staging, "run.trec"), ranking, os.path.basename(os.path.normpath(args.checkpoint)))
        write_json(os.path.join(staging, f"correct_{name}.json"), correct)
    print(json.dumps(metrics, indent=2))
    return 0
