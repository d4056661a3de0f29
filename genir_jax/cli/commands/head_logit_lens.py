"""`genir-jax head-logit-lens`: which cross-attention heads write the relevant docid (per-head logit lens)."""

from __future__ import annotations

from genir_jax.base.options import LISTED
import argparse
import json

from genir_jax.cli.commands.common import add_analysis_inputs, add_run_controls
from genir_jax.cli.commands.mesh_options import add_mesh_arguments

ORDER = 175  # where `genir-jax --help` lists it
SUMMARY = "per-head logit lens: which cross-attention heads put the relevant docid among their top tokens"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "head-logit-lens", help=SUMMARY,
        description=("For every correct validation query and every decoder cross-attention head, the head's own "
                     "output z_h @ W_O[h] at the first decoding step through the final norm and the unembedding "
                     "(logit lens): the relevant docid's rank over the whole vocabulary and the docid tokens among "
                     "the head's top --top tokens. Writes head_logit_lens.json (per head: median rank, share of "
                     "queries with the docid in the top, docid share of the top) and head_logit_lens_ranks.npy "
                     "([queries, layers, heads] ranks)."),
    )
    add_analysis_inputs(parser)
    parser.add_argument("--top", type=LISTED, default=10, help="top tokens per head (default: 10)")
    add_run_controls(parser)
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def run(args: argparse.Namespace) -> int:
    from genir_jax.analysis.head_logit_lens import run_head_logit_lens, write_head_logit_lens
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.analysis.residual import docid_mask
    from genir_jax.base.errors import GenIRError, renaming_settings
    if args.batch_size < 1:
        raise GenIRError("--batch-size must be >= 1")
    inputs = load_analysis_inputs(args.checkpoint, args.val_queries, args.correct_valid,
                                  allow_incorrect=args.allow_incorrect)
    model = inputs.model
    with renaming_settings({"top": "--top"}):
        result = run_head_logit_lens(model.config, model.params, inputs.input_ids, inputs.attention_mask,
                                     inputs.targets, docid_mask(model.tokenizer, model.config.vocab_size),
                                     top=args.top, batch_size=args.batch_size, progress=not args.no_progress)
    write_head_logit_lens(args.output, result)
    best = sorted(result.summary()["heads"], key=lambda h: -h["target_in_top"])[:5]
    print(json.dumps({"queries": len(inputs.queries), "top": args.top, "best_heads": best}, indent=1))
    return 0
