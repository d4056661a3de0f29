"""`genir-jax patch-stages`: the stage-patching experiment (Table 3) on any HF-format GenIR checkpoint."""

from __future__ import annotations

import argparse
import json

from genir_jax.cli.commands.common import (add_analysis_inputs, add_reference, add_run_controls, add_stages,
                                       reference_stages)
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.base.errors import GenIRError


ORDER = 80  # where `genir-jax --help` lists it
SUMMARY = "zero / mean / T5 patching of each component type in each decoder stage (paper Table 3)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "patch-stages",
        help=SUMMARY,
        description=(
            "For each component type (attn, cross_attn, mlp), each stage of decoder layers and each mode, patch "
            "the component's output in every layer of the stage and record the rank of the relevant docid for "
            "every correct validation query. Modes: zero (replace by 0), mean (by the mean over the correct "
            "queries), t5 (by the pretrained T5's output on the same query; adds the encoder-output row for "
            "stage 0). Writes patching_results_single_combis.csv and "
            "ranks_correct_queries_patching_single_combis.json in the reference code's format (all modes' rows "
            "in them) and stages.json. Default stages: 0-6,7-17,18-23 (the paper's) for a 24-layer decoder, "
            "otherwise found automatically (--stages auto). --reference: as the reference's two scripts, "
            "eval_patching_single_combis.py (zero, mean; reference padding) and eval_patching_t5.py (t5): the "
            "zero/mean rows in the files above, the t5 rows in patching_results_t5_single_combis.csv and "
            "ranks_correct_queries_patching_t5_single_combis.json with the reference's empty encoder rows for "
            "stages 1 and 2, and patching_results_t5_all_and_attn.json (T5 outputs in place of every component "
            "of stages I-II and of stage-III self-attention, evaluated on all --val-queries: hits@1, hits@10, "
            "recall@5 counted as the reference counts them, top 100 over the full vocabulary, and config; the "
            "reference's trec_eval numbers, which need the HF hub, are not written); no stages.json; the paper's "
            "stages for a 24-layer decoder. Decoder-only checkpoints: attn and mlp rows over all layers (no "
            "cross_attn), zero and mean modes."
        ),
    )
    add_analysis_inputs(parser)
    add_stages(parser)
    parser.add_argument("--modes", default="zero,mean",
                        help="comma-separated modes among zero, mean, t5 (default: zero,mean)")
    parser.add_argument("--t5", default=None, help="pretrained (base) T5 checkpoint directory, needed for t5 mode")
    parser.add_argument("--qrels", default=None,
                        help="qrels of --val-queries (reference JSON or TREC), as the reference's eval_patching_t5.py "
                             "takes them: used by --reference with t5 mode for patching_results_t5_all_and_attn.json "
                             "(default: from the queries' relevant_docs); checked, otherwise unused")
    add_reference(parser, "eval_patching_single_combis.py / eval_patching_t5.py",
                  "their file names, rows and the t5 all-and-attn evaluation, the paper's stages",
                  "as the reference scripts: pad queries to the longest correct query + 1 and use no attention mask "
                  "(zero and mean modes, and the means; t5 mode is unpadded there, which masks reproduce); default: "
                  "proper masks")
    add_run_controls(parser, "queries per device per step (default: from a 1 GiB logits budget)", None)
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def run(args: argparse.Namespace) -> int:
    from genir_jax.analysis.inputs import load_analysis_inputs, load_model
    from genir_jax.analysis.patch_stages import T5_ALL_AND_ATTN_JSON, check_modes, patch_stages, t5_all_and_attn
    from genir_jax.analysis.patch_stages import write_patch_stages
    from genir_jax.cli.commands.common import stages_for_inputs

    modes = check_modes(args.modes.split(","), args.t5 or None)
    if args.batch_size is not None and args.batch_size < 1:
        raise GenIRError("--batch-size must be >= 1")
    args.reference_padding = args.reference_padding or args.reference
    qrels = None
    if args.qrels:
        from genir_jax.data.corpus import read_qrels

        qrels = read_qrels(args.qrels)
    inputs = load_analysis_inputs(args.checkpoint, args.val_queries, args.correct_valid,
                                  allow_incorrect=args.allow_incorrect)
    model = inputs.model
    reference_stages(args, model.config.num_decoder_layers, "paper")
    progress = not args.no_progress
    stages, inputs = stages_for_inputs(args, inputs)
    base = load_model(args.t5, tokenizer=False) if "t5" in modes else None
    result = patch_stages(inputs, stages, modes, base=base, base_name=args.t5, batch_size=args.batch_size,
                          reference_padding=args.reference_padding, progress=progress)
    extra = {}
    if args.reference and "t5" in modes:
        extra[T5_ALL_AND_ATTN_JSON] = t5_all_and_attn(model, base, args.val_queries, stages, qrels=qrels,
                                                      base_name=args.t5, batch_size=args.batch_size,
                                                      progress=progress)
    write_patch_stages(args.output, result, stages, reference=args.reference, extra_json=extra)
    summary = {row["component"] + f"/stage{row['stage']}/" + row["mode"]: row["!=0"] for row in result.fractions()}
    print(json.dumps({"queries": len(inputs.queries), "stages": stages.as_lists(), "stages_method": stages.method,
                      "fraction_not_rank_0": summary}, indent=1))
    return 0
