"""`genir-jax circuit`: evaluate a minimal circuit on the test queries (paper Table 4)."""

from __future__ import annotations

from genir_jax.base.options import LISTED
import argparse
import json
import os

from genir_jax.cli.commands.common import (add_checkpoint_paths, add_reference, add_run_controls, reference_stages)
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.base.errors import GenIRError


ORDER = 120  # where `genir-jax --help` lists it
SUMMARY = "evaluate the model with only a minimal circuit of components left (Table 4)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "circuit",
        help=SUMMARY,
        description=(
            "Knock out components as a circuit file says (default: the paper's circuit - remove self-attention "
            "in all layers and cross-attention in stage I, replace MLP outputs of stages I and II by their mean "
            "over the correct validation queries) and evaluate on the test queries: Hits@1, Recall@5, Hits@10, "
            "MRR@10, nDCG@10 (ir-measures), absolute and relative to the unpatched model, ranked two ways: over the "
            "full vocabulary (as the reference: word tokens count as non-relevant entries) and over the docid "
            "tokens only (the top-level metrics and the runs). Writes "
            "minimal_circuit.json, the two TREC runs and stages.json. Default stages: the paper's for a 24-layer "
            "decoder, otherwise found automatically (--stages auto). --reference: as the reference's "
            "eval_patching_all_stages.py, writes only patching_results_best_circuit.json with its keys hits@1, "
            "hits@10, recall@5 (top 100 over the full vocabulary, its own counting: every qrels entry is relevant, "
            "recall@5 = relevant in the top 5 / the query's qrels entries) and config; reference padding; the "
            "paper's stages for a 24-layer decoder."
        ),
    )
    parser.add_argument("-c", "--checkpoint", required=True, help="HF-format GenIR checkpoint (with tokenizer)")
    parser.add_argument("--test-queries", required=True, help="queries to evaluate, reference JSON format")
    parser.add_argument("--qrels", default=None, help="their qrels (default: from the queries' relevant_docs)")
    parser.add_argument("--val-queries", required=True, help="validation queries (for the means)")
    add_checkpoint_paths(parser, ("-o", "--output-path", "--output"))
    parser.add_argument("--circuit", default=None,
                        help="circuit JSON file (default: the paper's circuit; decoder-only checkpoints need one)")
    parser.add_argument("--stages", default=None,
                        help="decoder stages: 'auto' (fitted on a seeded half of the correct queries; the means "
                             "then come from the other half), 'thirds', 'paper' or layer ranges, e.g. "
                             "'0-6,7-17,18-23' (default: the paper's for a 24-layer decoder, otherwise auto); see "
                             "stages.json")
    add_reference(parser, "eval_patching_all_stages.py",
                  "patching_results_best_circuit.json only, its metrics and config text, the paper's stages",
                  "as the reference: pad to the longest correct validation query + 1 without attention mask (means "
                  "and test queries), rank over the full vocabulary (word tokens count as non-relevant entries); "
                  "both rankings are still written")
    parser.add_argument("--k", type=LISTED, default=100, help="documents per query in the runs (default 100)")
    add_run_controls(parser, "queries per device per step (default: from a 1 GiB logits budget)", None)
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def run(args: argparse.Namespace) -> int:
    from genir_jax.analysis.circuit import (DOCID_TOKENS, FULL_VOCABULARY, PAPER_CIRCUIT, REFERENCE_CONFIG,
                                            REFERENCE_RESULTS_JSON, circuit_from_json, circuit_report, default_circuit,
                                            docid_targets, reference_retrieval_metrics)
    from genir_jax.analysis.circuit_runs import rank_test_queries, write_circuit
    from genir_jax.analysis.inputs import load_analysis_inputs, load_model
    from genir_jax.data.corpus import qrels_from_queries, read_json, read_qrels, read_queries
    from genir_jax.base.io import atomic_directory, write_json
    from genir_jax.docids.retrieval import check_run_covers

    if args.k < 1:
        raise GenIRError("--k must be >= 1")
    args.reference_padding = args.reference_padding or args.reference
    model = load_model(args.checkpoint)
    config, tokenizer = model.config, model.tokenizer
    test_queries = read_queries(args.test_queries)
    qrels = read_qrels(args.qrels) if args.qrels else qrels_from_queries(test_queries)
    check_run_covers([q.id for q in test_queries], qrels, args.qrels or args.test_queries)
    inputs = load_analysis_inputs(args.checkpoint, args.val_queries, args.correct_valid, model=model,
                                  allow_incorrect=args.allow_incorrect)
    from genir_jax.cli.commands.common import stages_for_inputs
    reference_stages(args, config.num_decoder_layers, "paper")
    found, inputs = stages_for_inputs(args, inputs)  # automatic stages: means over the held-out half
    stages, stages_record, correct = found.as_lists(), found.record(), inputs.queries
    circuit = circuit_from_json(read_json(args.circuit), args.circuit, len(stages)) if args.circuit else \
        default_circuit(config)
    docids = docid_targets(tokenizer, test_queries, args.test_queries, args.checkpoint)
    progress = not args.no_progress

    rankings = rank_test_queries(inputs, test_queries, circuit, stages, docids, k=args.k,
                                 reference_padding=args.reference_padding, batch_size=args.batch_size,
                                 progress=progress, rankings=(FULL_VOCABULARY,) if args.reference else
                                 (FULL_VOCABULARY, DOCID_TOKENS))

    query_ids = [q.id for q in test_queries]
    if args.reference:
        full_top_ids = rankings[FULL_VOCABULARY][2]
        report = reference_retrieval_metrics(full_top_ids[1], query_ids, qrels, docids.vocabulary)
        paper = circuit is PAPER_CIRCUIT and [list(x) for x in stages] == [list(range(7)), list(range(7, 18)),
                                                                            list(range(18, 24))]
        report["config"] = REFERENCE_CONFIG if paper else circuit.describe(stages)
        with atomic_directory(args.output) as staging:
            write_json(os.path.join(staging, REFERENCE_RESULTS_JSON), report)
        print(json.dumps({"stages": stages, **report}, indent=1))
        return 0
    report, runs = circuit_report(
        circuit, stages, query_ids, docids.doc_ids, rankings, qrels, correct_queries=len(correct),
        padding="reference padding, no attention mask" if args.reference_padding else "masked padding")
    write_circuit(args.output, report, runs, stages_record, os.path.basename(os.path.normpath(args.checkpoint)))
    print(json.dumps({"config": report["config"], "stages": stages, "stages_method": stages_record["method"],
                      **{ranking: {key: measured[key] for key in ("unpatched", "patched", "relative")}
                         for ranking, measured in report["rankings"].items()}}, indent=1))
    return 0
