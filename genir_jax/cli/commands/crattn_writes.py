"""`genir-jax crattn-writes`: share of docid tokens promoted by cross-attention outputs (paper Table 5)."""

from __future__ import annotations

import argparse
import json

from genir_jax.cli.commands.common import add_analysis_inputs, add_reference, add_run_controls, add_stages
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.base.errors import GenIRError


ORDER = 160  # where `genir-jax --help` lists it
SUMMARY = "share of docid tokens among the top tokens of cross-attention outputs (paper Table 5)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "crattn-writes",
        help=SUMMARY,
        description=(
            "For every correct validation query and every decoder layer of the analysed stages (all stages but the "
            "first), the logit lens of the layer's cross-attention output (final norm, unembedding) and the "
            "fraction of docid tokens among its top 10 / 100 / 1000 tokens, as the reference's "
            "cross-attention-outputs.py. Writes per_q_averages_s{II,III}.json, cr_attn_ratios.json and "
            "crattn_writes_summary.json and stages.json. Note: the reference script counts layer 17 into "
            "stage III (layer < 17 is stage II), which --reference does. --reference: as the reference's "
            "cross-attention-outputs.py: stages 0-6,7-16,17-23 for a 24-layer decoder, each query unpadded without "
            "attention mask, every id from the first docid token on counts as a docid (its 'id >= len(T5 "
            "tokenizer)'), averages summed in its order, and only its files (no summary or stages.json)."
        ),
    )
    add_analysis_inputs(parser)
    add_stages(parser, "; the first stage is not analysed")
    parser.add_argument("--cutoffs", default="10,100,1000", help="top-k cutoffs (default: 10,100,1000)")
    add_reference(parser, "cross-attention-outputs.py",
                  "stages 0-6,7-16,17-23, its docid test, only per_q_averages_s{II,III}.json and cr_attn_ratios.json",
                  "as the reference script: every query unpadded and without attention mask (queries are batched by "
                  "token length); default: padded batches with attention masks")
    add_run_controls(parser)
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def run(args: argparse.Namespace) -> int:
    from genir_jax.analysis.cross_attention_writes import docid_shares, write_docid_shares
    from genir_jax.cli.commands.neuron_reading import load_inputs
    from genir_jax.base.io import atomic_directory

    try:
        cutoffs = [int(k) for k in args.cutoffs.split(",")]
    except ValueError:
        raise GenIRError(f"--cutoffs: expected comma-separated integers, got {args.cutoffs!r}") from None
    args.reference_stages = "0-6,7-16,17-23"  # cross-attention-outputs.py's layer < 17 test (reference mode only)
    model, queries, _, stages, stages_record = load_inputs(args)
    result = docid_shares(model.config, model.params, model.tokenizer, [q.text for q in queries], stages=stages,
                          cutoffs=cutoffs, batch_size=args.batch_size, reference_padding=args.reference_padding,
                          reference_docids=args.reference, progress=not args.no_progress)
    with atomic_directory(args.output) as staging:
        write_docid_shares(staging, result, summary=not args.reference)
        if not args.reference:
            from genir_jax.cli.commands.common import write_stages
            write_stages(staging, stages_record)
    print(json.dumps({"queries": len(queries), "stages": stages, "stages_method": stages_record["method"],
                      "docid_share": result.summary()["docid_share"]}, indent=1))
    return 0
