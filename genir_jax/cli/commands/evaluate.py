"""`genir-jax evaluate`: rank docids with a DSI checkpoint; metrics, a TREC run and correct_valid.json."""

from __future__ import annotations

import argparse
import json
import os

from genir_jax.cli.commands.mesh_options import add_mesh_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a DSI checkpoint: Hits@1/10, Recall@5, MRR@10, nDCG@10, run file, correct_valid.json",
        description="Atomic docids: rank the checkpoint's docid tokens (@DOC_ID_<id>@) for every query from the "
                    "first decoder step's logits. Naive / semantic docids (the scheme recorded in the checkpoint's "
                    "docids.json, or --docids): beam search (--num-beams 10, 10 returned), constrained to the "
                    "corpus's docids by a prefix trie unless --unconstrained (the reference's behaviour). Writes "
                    "metrics.json (with decoding throughput for beam search), run.trec and correct_<name>.json "
                    "(the reference's [[docid, query_id], ...] of queries whose relevant document is ranked first "
                    "and is also what the model's top tokens give: atomic, the top token of the whole vocabulary; "
                    "naive / semantic, greedy decoding) into OUTPUT.",
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
    parser.add_argument("--k", type=int, default=100, help="atomic docids: documents per query in the run (default 100); beam search lists --num-beams")
    parser.add_argument("--batch-size", type=int, default=None,
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
    schemes.add_argument("--num-beams", type=int, default=10, help="beams, and docids returned (default 10)")
    schemes.add_argument("--unconstrained", action="store_true",
                         help="free beam search as the reference (beams that are no docid count as non-relevant); "
                              "default: constrained to the corpus's docids by a prefix trie")
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def check_name(name: str | None) -> None:
    """--name becomes part of a file name (correct_<name>.json): no path separators, not empty, not . or .."""
    from genir_jax.base.errors import GenIRError

    if name is None:
        return
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not name.strip() or name in (".", "..") or any(s in name for s in separators) or "\0" in name:
        raise GenIRError(f"--name must be a plain file-name part (no path separators, not empty), got {name!r}")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from genir_jax.cli.commands.bm25 import resolve_inputs
    from genir_jax.data.corpus import qrels_from_queries, read_qrels, read_queries
    from genir_jax.data.dsi import tokenize_queries
    from genir_jax.docids.tokens import docid_vocabulary
    from genir_jax.base.errors import CheckpointError, GenIRError
    from genir_jax.checkpoints.hf import load_pretrained
    from genir_jax.base.io import atomic_directory, write_json
    from genir_jax.docids.retrieval import (check_run_covers, correct_valid, evaluate_run, rank_docids, run_from_ranking,
                                     write_trec_run)

    if args.k < 1 or (args.batch_size is not None and args.batch_size < 1) or args.num_beams < 1:
        raise GenIRError("--k, --batch-size and --num-beams must be >= 1")
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
    scheme = _scheme(args)
    if scheme.multi_token:
        return _run_sequences(args, model, scheme, queries, qrels, queries_path, qrels_path, qrels_source)
    if args.unconstrained:
        raise GenIRError("--unconstrained applies to beam search (naive / semantic docids), not atomic docids")
    args.batch_size = args.batch_size or 256
    vocabulary = docid_vocabulary(model.tokenizer)
    if not vocabulary:
        raise CheckpointError(f"{args.checkpoint}: the tokenizer has no docid tokens (@DOC_ID_<id>@); is this a "
                              "DSI checkpoint? (a naive / semantic model without docids.json needs --docids)")
    token_ids = sorted(vocabulary)
    doc_ids = [vocabulary[t] for t in token_ids]
    _check_qrels_known(qrels, qrels_source, doc_ids,
                       f"has no docid token in the checkpoint {args.checkpoint} ({len(doc_ids)} docid tokens): the "
                       "checkpoint was trained on another corpus / vocabulary")

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


def _check_qrels_known(qrels, qrels_source, doc_ids, why: str) -> None:
    """Every relevant document of the qrels must be one the model can rank; else exit 2 naming the record."""
    from genir_jax.base.errors import CheckpointError

    known = set(doc_ids)
    for query_id, docs in qrels.items():
        for doc_id in docs:
            if doc_id not in known:
                raise CheckpointError(f"{qrels_source}: query {query_id!r}: relevant document {doc_id!r} {why}")


def _scheme(args: argparse.Namespace):
    """The checkpoint's recorded scheme; --docids must agree with it, or name one for a checkpoint without it."""
    from genir_jax.data.corpus import read_documents
    from genir_jax.data.prepare import DOCUMENTS_FILE
    from genir_jax.docids.schemes import DOCIDS_FILE, check_scheme, checkpoint_scheme, resolve_scheme
    from genir_jax.base.errors import GenIRError

    if args.docids is not None:
        check_scheme(args.docids)
    recorded_file = os.path.isfile(os.path.join(args.checkpoint, DOCIDS_FILE))
    recorded = checkpoint_scheme(args.checkpoint)
    if recorded_file:
        if args.docids is not None and args.docids != recorded.name:
            raise GenIRError(f"--docids {args.docids}: the checkpoint {args.checkpoint} was trained with "
                             f"{recorded.name} docids ({os.path.join(args.checkpoint, DOCIDS_FILE)})")
        if args.semantic_docid_mapping is not None:
            raise GenIRError(f"--semantic-docid-mapping: the checkpoint records its docids in "
                             f"{os.path.join(args.checkpoint, DOCIDS_FILE)}; drop the option")
        return recorded
    if args.docids in (None, "atomic"):
        return resolve_scheme("atomic", [], mapping=args.semantic_docid_mapping)
    documents = args.documents or (os.path.join(args.prepared, DOCUMENTS_FILE) if args.prepared else None)
    if documents is None:
        raise GenIRError(f"--docids {args.docids}: the checkpoint has no {DOCIDS_FILE}; give the corpus with "
                         "--prepared DIR or --documents FILE")
    doc_ids = [doc.id for doc in read_documents(documents)]
    return resolve_scheme(args.docids, doc_ids, mapping=args.semantic_docid_mapping, prepared_dir=args.prepared)


def _run_sequences(args, model, scheme, queries, qrels, queries_path, qrels_path, qrels_source) -> int:
    """Beam search over naive / semantic docids -> metrics.json, run.trec, correct_<name>.json."""
    import time

    import numpy as np

    from genir_jax.data.dsi import tokenize_queries
    from genir_jax.docids.schemes import docid_trie
    from genir_jax.base.errors import CheckpointError, GenIRError
    from genir_jax.base.io import atomic_directory, write_json
    from genir_jax.docids.retrieval import (correct_valid, evaluate_run, rank_docid_sequences, run_from_ranking,
                                     write_trec_run)
    from genir_jax.docids.sequence_targets import greedy_consistent

    if args.reference_mode:
        raise GenIRError("--reference-mode applies to atomic docids; naive / semantic docids are ranked by beam "
                         "search (--unconstrained for the reference's free beam search)")
    doc_ids = list(scheme.docids)
    _check_qrels_known(qrels, qrels_source, doc_ids,
                       f"has no {scheme.name} docid in {scheme.source or args.checkpoint} ({len(doc_ids)} docids): "
                       "another corpus?")
    trie = docid_trie(scheme, model.tokenizer, doc_ids, scheme.source or args.checkpoint)
    if trie.max_token >= model.config.vocab_size:
        raise CheckpointError(f"{args.checkpoint}: docid token {trie.max_token} is outside the model's vocabulary")
    text_index = {scheme.text(d): i for i, d in enumerate(doc_ids)}
    separator = "_" if scheme.name == "semantic" else " "

    def lookup(tokens):  # the reference matches decoded strings (spaces become '_')
        text = model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return text_index.get(text.replace(" ", separator) if scheme.name == "semantic" else text, -1)

    input_ids, attention_mask = tokenize_queries(queries, model.tokenizer, args.max_length)
    batch_size = args.batch_size or 32
    # transformers' generate default max_length (20) for free decoding, the longest docid for the trie
    max_length = trie.max_docid_length + 1 if not args.unconstrained else max(20, trie.max_docid_length + 1)
    options = dict(num_beams=args.num_beams, constrained=not args.unconstrained, max_length=max_length,
                   lookup=lookup, batch_size=batch_size)
    warm = min(batch_size, len(queries))
    started = time.perf_counter()
    rank_docid_sequences(model.config, model.params, input_ids[:warm], attention_mask[:warm], trie, progress=False,
                         **options)  # compiles (same shapes as every batch)
    compile_and_first = time.perf_counter() - started
    started = time.perf_counter()
    indices, scores, _ = rank_docid_sequences(model.config, model.params, input_ids, attention_mask, trie,
                                              **options)
    seconds = time.perf_counter() - started
    ranking = run_from_ranking([q.id for q in queries], doc_ids, indices, scores)
    metrics = evaluate_run(ranking, qrels)
    first_relevant = [row for row, q in enumerate(queries)
                      if indices.shape[1] and indices[row, 0] >= 0 and doc_ids[indices[row, 0]] in qrels.get(q.id, {})]
    greedy = {q.id: False for q in queries}
    if first_relevant:
        rows = np.asarray(first_relevant)
        consistent = greedy_consistent(model.config, model.params, input_ids[rows], attention_mask[rows],
                                       [trie.docids[int(indices[row, 0])] for row in first_relevant])
        greedy.update({queries[row].id: bool(ok) for row, ok in zip(first_relevant, consistent)})
    correct = correct_valid(ranking, qrels, greedy, docid_text=scheme.text)
    name = args.name or ("valid" if (args.prepared and args.split == "val") or not args.prepared else args.split)
    report = {
        "metrics": metrics, "correct_first": len(correct), "checkpoint": os.path.abspath(args.checkpoint),
        "queries": queries_path, "qrels": qrels_path, "docids": scheme.name, "documents": len(doc_ids),
        "longest_docid_tokens": trie.max_docid_length, "max_length": args.max_length,
        "ranking": f"beam search, {args.num_beams} beams, "
                   + ("unconstrained (reference)" if args.unconstrained else "constrained to the docid trie"),
        "decoding": {"queries": len(queries), "seconds": round(seconds, 3),
                     "queries_per_s": round(len(queries) / seconds, 2) if seconds > 0 else None,
                     "first_batch_with_compile_seconds": round(compile_and_first, 3), "batch_size": batch_size,
                     "num_beams": args.num_beams, "max_length": max_length,
                     "beams_not_a_new_docid": int(((indices < 0) & np.isfinite(scores)).sum())},
    }
    with atomic_directory(args.output) as staging:
        write_json(os.path.join(staging, "metrics.json"), report, indent=2, allow_nan=False)
        write_trec_run(os.path.join(staging, "run.trec"), ranking, os.path.basename(os.path.normpath(args.checkpoint)))
        write_json(os.path.join(staging, f"correct_{name}.json"), correct)
    print(json.dumps({**metrics, "queries_per_s": report["decoding"]["queries_per_s"]}, indent=2))
    return 0
