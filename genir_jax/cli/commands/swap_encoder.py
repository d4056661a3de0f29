"""`genir-jax swap-encoder`: the encoder-swap experiment (paper Table 2)."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from genir_jax.cli.commands.common import add_checkpoint_paths, add_run_controls
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.base.errors import DataError, GenIRError


ORDER = 110  # where `genir-jax --help` lists it
SUMMARY = "run the full model's decoder on encoders of models trained without some documents (Table 2)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "swap-encoder",
        help=SUMMARY,
        description=(
            "For each model in --missing-docs-for-model (trained without the listed documents) and optionally "
            "the pretrained T5 (--t5), replace the full model's encoder output before its final norm "
            "(encoder.{L-1}.hook_resid_post) by that model's, and record the rank of the relevant docid of every "
            "correct query. Writes swapped_encoder.json with the reference's keys: 'Mean Rank of prev. correct' (a "
            "true mean) and 'Median:' over all correct queries, the non-zero ranks, and for the removed documents "
            "'missing_ranks', 'Mean of Missing document ranks' (a true mean), 'MRR:' and 'median' (torch.median: the "
            "lower middle value); plus ours: 'Hits@1 (missing)', 'missing_documents', "
            "'missing_without_correct_query'. Default: every correct query of a removed document counts (a "
            "document with two correct queries has two entries in missing_ranks). --reference: as the reference's "
            "swap_encoder.py, only the FIRST correct query (correct_valid order) of each removed document counts, "
            "a removed document without one is refused, and only the reference's keys are written."
        ),
    )
    parser.add_argument("--complete-model-path", required=True, help="the model trained on all documents")
    parser.add_argument("--missing-docs-for-model", default=None,
                        help="JSON object: model path -> removed document ids ('D1, D2' or a list; ids or docid "
                             "tokens); relative paths are resolved from the current directory, then the file's")
    parser.add_argument("--val-queries", required=True, help="validation queries, reference JSON format")
    add_checkpoint_paths(parser, ("-o", "--output-path", "--output"))  # [checkpoint]: the complete model
    parser.add_argument("--reference", action="store_true",
                        help="reference mode (swap_encoder.py): first correct query per removed document, only the "
                             "reference's keys. The reference runs each query unpadded, which masked batches "
                             "reproduce, so the tokenisation is the same in both modes")
    parser.add_argument("--t5", default=None, help="also swap in this pretrained T5's encoder")
    add_run_controls(parser, "queries per device per step (default: from a 1 GiB logits budget)", None)
    parser.set_defaults(handler=run, checkpoint_option="complete_model_path")  # [checkpoint]: the complete model
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def _missing_map(path: str) -> dict[str, object]:
    from genir_jax.data.corpus import read_json

    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a JSON object mapping model paths to removed document ids")
    resolved = {}
    for model_path, documents in data.items():
        if not isinstance(documents, (str, list)):
            raise DataError(f"{path}: key {model_path!r}: expected 'D1, D2' or a list of ids, got {documents!r}")
        candidate = model_path if os.path.isdir(model_path) else os.path.join(os.path.dirname(path), model_path)
        resolved[model_path] = (candidate, documents)
    return resolved


def run(args: argparse.Namespace) -> int:
    from genir_jax.analysis.encoder_swap import summarize
    from genir_jax.analysis.encoder_swap_runs import check_missing_documents, swap_encoders, write_swap_results
    from genir_jax.analysis.inputs import load_analysis_inputs

    if not args.missing_docs_for_model and not args.t5:
        raise GenIRError("nothing to swap in: give --missing-docs-for-model and/or --t5")
    others = _missing_map(args.missing_docs_for_model) if args.missing_docs_for_model else {}
    inputs = load_analysis_inputs(args.complete_model_path, args.val_queries, args.correct_valid,
                                  allow_incorrect=args.allow_incorrect)
    check_missing_documents(inputs, others, args.missing_docs_for_model)
    if args.reference:  # refused before any computation (summarize would refuse it afterwards)
        for key, (_, documents) in others.items():
            summarize(np.zeros(len(inputs.queries), np.int64), inputs.queries, documents, reference=True,
                      source=f"{args.missing_docs_for_model}: key {key!r}")
    results = swap_encoders(inputs, others, base=args.t5, base_key=args.t5, source=args.missing_docs_for_model,
                            reference=args.reference, batch_size=args.batch_size, progress=not args.no_progress)
    write_swap_results(args.output, results)
    print(json.dumps({k: {m: v for m, v in r.items() if not isinstance(v, list)} for k, r in results.items()},
                     indent=1))
    return 0
