"""`genir-jax residual-rank`: residual contributions (Fig. 3) and logit-lens rank development (Fig. 4)."""

from __future__ import annotations

from genir_jax.base.options import ROWS
import argparse
import json
import os

from genir_jax.cli.commands.common import add_allow_incorrect
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.base.errors import GenIRError

from genir_jax.cli.paths import CHECKPOINT as _CHECKPOINT  # resolved by `resolve_placeholders`


ORDER = 130  # where `genir-jax --help` lists it
SUMMARY = "residual contributions per decoder layer and logit-lens ranks (paper Fig. 3 and Fig. 4)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "residual-rank",
        help=SUMMARY,
        description=(
            "For every correct validation query and decoder layer: norms of the attn, cross_attn and mlp outputs "
            "relative to the layer's residual change, their norms and cosine with the layer's output residual; "
            "the logit-lens rank of the relevant docid in several residuals and component outputs; rank "
            "statistics of all docid and non-docid tokens; and the rank of the relevant docid in the logit lens "
            "of the summed MLP outputs and of the summed cross-attention outputs. Writes the reference's "
            "all_dec_resid_results.csv and all_ranks_correct_doc.csv (eval_residual_rank.py), plus "
            "ranks_component_sums.csv and residual_rank_summary.json (not in --reference mode)."
        ),
    )
    parser.add_argument("-c", "--checkpoint", required=True,
                        help="HF-format GenIR checkpoint directory (with tokenizer)")
    parser.add_argument("--val-queries", required=True, help="validation queries, reference JSON format")
    parser.add_argument("--correct-valid", default=f"{_CHECKPOINT}/correct_valid.json",
                        help="correct_valid.json: [docid_token, query_id] pairs (default: %(default)s)")
    add_allow_incorrect(parser)
    parser.add_argument("-o", "--output", "--output-path", dest="output", default=_CHECKPOINT,
                        help="output directory (default: the checkpoint directory, as the reference)")
    parser.add_argument("--reference", "--reference-padding", "--reference-mode", dest="reference", action="store_true",
                        help="reference mode (all three spellings are the same flag): reproduce eval_residual_rank.py "
                             "exactly: 'Mean Non-Doc-IDs' is the median (as the "
                             "reference computes it), 'Mean Doc-IDs' is divided in float32, every id from the "
                             "first docid token on counts as a docid. The reference runs each query unpadded, "
                             "which masked batches reproduce, so the tokenisation is the same in both modes. Only the "
                             "reference's two CSV files are written (not ranks_component_sums.csv and the summary)")
    parser.add_argument("--batch-size", type=ROWS, default=None, help="queries per step (default: from a 1 GiB "
                                                                      "budget for one layer's lens logits)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def run(args: argparse.Namespace) -> int:
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.analysis.residual import docid_mask, run_residual_rank, summary, write_residual_rank

    if args.batch_size is not None and args.batch_size < 1:
        raise GenIRError("--batch-size must be >= 1")
    checkpoint = os.fspath(args.checkpoint)
    correct_valid, output = args.correct_valid, args.output

    inputs = load_analysis_inputs(checkpoint, args.val_queries, correct_valid, allow_incorrect=args.allow_incorrect)
    model, queries, ids, mask, targets = inputs.model, inputs.queries, inputs.input_ids, inputs.attention_mask, \
        inputs.targets
    is_docid = docid_mask(model.tokenizer, model.config.vocab_size, reference=args.reference)
    result = run_residual_rank(model.config, model.params, ids, mask, targets, is_docid,
                               query_ids=[q.query_id for q in queries], reference=args.reference,
                               batch_size=args.batch_size, progress=not args.no_progress)
    write_residual_rank(output, result, reference_only=args.reference)
    info = summary(result)
    print(json.dumps({
        "queries": info["num_queries"], "output": output, "queries_not_at_rank_0": info["queries_not_at_rank_0"],
        "relevant_rank_resid_post_mean": info["relevant_rank"]["resid_post"]["mean"],
        "component_sums": info["component_sums"],
    }, indent=1))
    return 0
