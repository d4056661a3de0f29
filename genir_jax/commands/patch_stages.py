"""`genir-jax patch-stages`: the stage-patching experiment (Table 3) on any HF-format GenIR checkpoint."""

from __future__ import annotations

import argparse
import json

import numpy as np

from genir_jax.commands.common import add_analysis_inputs, add_run_controls, add_stages
from genir_jax.errors import GenIRError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "patch-stages",
        help="zero / mean / T5 patching of each component type in each decoder stage (paper Table 3)",
        description=(
            "For each component type (attn, cross_attn, mlp), each stage of decoder layers and each mode, patch "
            "the component's output in every layer of the stage and record the rank of the relevant docid for "
            "every correct validation query. Modes: zero (replace by 0), mean (by the mean over the correct "
            "queries), t5 (by the pretrained T5's output on the same query; adds the encoder-output row for "
            "stage 0). Writes patching_results_single_combis.csv and "
            "ranks_correct_queries_patching_single_combis.json in the reference code's format. "
            "Default stages: 0-6,7-17,18-23 (the paper's) for a 24-layer decoder, otherwise found automatically "
            "(--stages auto); stages.json records them."
        ),
    )
    add_analysis_inputs(parser)
    add_stages(parser)
    parser.add_argument("--modes", default="zero,mean",
                        help="comma-separated modes among zero, mean, t5 (default: zero,mean)")
    parser.add_argument("--t5", default=None, help="pretrained (base) T5 checkpoint directory, needed for t5 mode")
    parser.add_argument("--reference-padding", action="store_true",
                        help="as the reference scripts: pad queries to the longest correct query + 1 and use no "
                             "attention mask (zero and mean modes, and the means); default: proper masks")
    add_run_controls(parser, "queries per device per step (default: from a 1 GiB logits budget)", None)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from genir_jax.analysis.inputs import load_correct_queries, tokenize_for_analysis
    from genir_jax.analysis.stage_patching import (
        StagePatchingResult, run_stage_patching, write_stage_patching,
    )
    from genir_jax.hf import load_for_analysis  # read-only tokenizer, no transformers
    from genir_jax.patching import Source

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"zero", "mean", "t5"})
    if unknown or not modes:
        raise GenIRError(f"--modes: unknown mode(s) {unknown or modes}; expected some of zero, mean, t5")
    if "t5" in modes and not args.t5:
        raise GenIRError("--modes t5 needs --t5 BASE_CHECKPOINT_DIR (the pretrained T5)")
    if args.batch_size is not None and args.batch_size < 1:
        raise GenIRError("--batch-size must be >= 1")

    model = load_for_analysis(args.checkpoint)
    if model.tokenizer is None:
        raise GenIRError(f"{args.checkpoint}: no tokenizer files; the checkpoint must include its tokenizer")
    config = model.config
    queries = load_correct_queries(args.val_queries, args.correct_valid, model.tokenizer)
    texts = [q.text for q in queries]
    targets = np.asarray([q.token_id for q in queries], dtype=np.int32)
    progress = not args.no_progress
    from genir_jax.commands.common import STAGES_JSON, resolve_stages
    stages, stages_record = resolve_stages(args, config, model.params, *tokenize_for_analysis(model.tokenizer, texts),
                                           targets)

    source = None
    if "t5" in modes:
        base = load_for_analysis(args.t5, load_tokenizer=False)
        source = Source(base.config, base.params)
    parts = []
    plain_modes = [m for m in ("mean", "zero") if m in modes]
    if plain_modes:
        ids, mask = tokenize_for_analysis(model.tokenizer, texts, reference_padding=args.reference_padding)
        parts.append(run_stage_patching(config, model.params, ids, mask, targets, stages=stages, modes=plain_modes,
                                        query_chunk=args.batch_size, progress=progress))
    if "t5" in modes:
        # The reference runs T5 mode on unpadded single queries: masks give the same result in a batch.
        ids, mask = tokenize_for_analysis(model.tokenizer, texts, reference_padding=False)
        if int(ids.max()) >= base.config.vocab_size:
            raise GenIRError(f"{args.t5}: the T5's vocabulary ({base.config.vocab_size}) does not cover the query "
                             "tokens; it must share the GenIR model's word vocabulary")
        parts.append(run_stage_patching(config, model.params, ids, mask, targets, stages=stages, modes=["t5"],
                                        source=source, query_chunk=args.batch_size, progress=progress))
    result = StagePatchingResult(
        rows=[row for part in parts for row in part.rows],
        ranks=np.concatenate([part.ranks for part in parts]),
        sweep=parts[0].sweep,
    )
    write_stage_patching(args.output, result, extra_json={STAGES_JSON: stages_record})
    summary = {row["component"] + f"/stage{row['stage']}/" + row["mode"]: row["!=0"] for row in result.fractions()}
    print(json.dumps({"queries": len(queries), "stages": stages, "stages_method": stages_record["method"],
                      "fraction_not_rank_0": summary}, indent=1))
    return 0
