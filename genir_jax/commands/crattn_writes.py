"""`genir-jax crattn-writes`: share of docid tokens promoted by cross-attention outputs (paper Table 5)."""

from __future__ import annotations

import argparse
import json

from genir_jax.commands.common import add_analysis_inputs, add_run_controls, add_stages
from genir_jax.errors import GenIRError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "crattn-writes",
        help="share of docid tokens among the top tokens of cross-attention outputs (paper Table 5)",
        description=(
            "For every correct validation query and every decoder layer of the analysed stages (all stages but the "
            "first), the logit lens of the layer's cross-attention output (final norm, unembedding) and the "
            "fraction of docid tokens among its top 10 / 100 / 1000 tokens, as the reference's "
            "cross-attention-outputs.py. Writes per_q_averages_s{II,III}.json, cr_attn_ratios.json and "
            "crattn_writes_summary.json. Note: the reference script counts layer 17 into stage III "
            "(layer < 17 is stage II); pass --stages 0-6,7-16,17-23 to reproduce its numbers."
        ),
    )
    add_analysis_inputs(parser)
    add_stages(parser, "; the first stage is not analysed")
    parser.add_argument("--cutoffs", default="10,100,1000", help="top-k cutoffs (default: 10,100,1000)")
    parser.add_argument("--reference-padding", action="store_true",
                        help="as the reference script: every query unpadded and without attention mask (queries "
                             "are batched by token length); default: padded batches with attention masks")
    add_run_controls(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from genir_jax.analysis.cross_attention_writes import docid_shares, write_docid_shares
    from genir_jax.commands.neuron_reading import load_inputs
    from genir_jax.io import atomic_directory

    try:
        cutoffs = [int(k) for k in args.cutoffs.split(",")]
    except ValueError:
        raise GenIRError(f"--cutoffs: expected comma-separated integers, got {args.cutoffs!r}") from None
    model, queries, _, stages, stages_record = load_inputs(args)
    result = docid_shares(model.config, model.params, model.tokenizer, [q.text for q in queries], stages=stages,
                          cutoffs=cutoffs, batch_size=args.batch_size, reference_padding=args.reference_padding,
                          progress=not args.no_progress)
    with atomic_directory(args.output) as staging:
        write_docid_shares(staging, result)
        from genir_jax.commands.common import write_stages
        write_stages(staging, stages_record)
    print(json.dumps({"queries": len(queries), "stages": stages, "stages_method": stages_record["method"],
                      "docid_share": result.summary()["docid_share"]}, indent=1))
    return 0
