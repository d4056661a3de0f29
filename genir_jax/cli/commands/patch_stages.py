"""`genir-jax patch-stages`: the stage-patching experiment (Table 3) on any HF-format GenIR checkpoint."""

from __future__ import annotations

import argparse
import json

import numpy as np

from genir_jax.cli.commands.common import (add_analysis_inputs, add_reference, add_run_controls, add_stages,
                                       reference_stages, resolve_paths)
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.base.errors import GenIRError


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
            "stages for a 24-layer decoder."
        ),
    )
    add_analysis_inputs(parser)
    add_stages(parser)
    parser.add_argument("--modes", default="zero,mean",
                        help="comma-separated modes among zero, mean, t5 (default: zero,mean)")
    parser.add_argument("--t5", default=None, help="pretrained (base) T5 checkpoint directory, needed for t5 mode")
    parser.add_argument("--allow-incorrect", action="store_true",
                        help="accept correct_valid.json pairs whose docid the model does not rank first (by default "
                             "the clean run's full-vocabulary ranks, computed anyway, are checked and such a pair is "
                             "refused, naming its record; not checked when only reference-padded runs are made)")
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
    from genir_jax.analysis.inputs import load_correct_queries, tokenize_for_analysis
    from genir_jax.analysis.stage_patching import (
        T5_ALL_AND_ATTN_JSON, StagePatchingResult, run_stage_patching, write_stage_patching,
    )
    from genir_jax.checkpoints.hf import load_for_analysis  # read-only tokenizer, no transformers
    from genir_jax.interp.patching import Source

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"zero", "mean", "t5"})
    if unknown or not modes:
        raise GenIRError(f"--modes: unknown mode(s) {unknown or modes}; expected some of zero, mean, t5")
    if "t5" in modes and not args.t5:
        raise GenIRError("--modes t5 needs --t5 BASE_CHECKPOINT_DIR (the pretrained T5)")
    if args.batch_size is not None and args.batch_size < 1:
        raise GenIRError("--batch-size must be >= 1")

    resolve_paths(args, args.checkpoint)
    args.reference_padding = args.reference_padding or args.reference
    qrels = None
    if args.qrels:
        from genir_jax.data.corpus import read_qrels

        qrels = read_qrels(args.qrels)
    model = load_for_analysis(args.checkpoint)
    if model.tokenizer is None:
        raise GenIRError(f"{args.checkpoint}: no tokenizer files; the checkpoint must include its tokenizer")
    config = model.config
    reference_stages(args, config.num_decoder_layers, "paper")
    queries = load_correct_queries(args.val_queries, args.correct_valid, model.tokenizer)
    texts = [q.text for q in queries]
    targets = np.asarray([q.token_id for q in queries], dtype=np.int32)
    progress = not args.no_progress
    from genir_jax.cli.commands.common import STAGES_JSON, resolve_stages
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
    if not args.allow_incorrect:  # the clean ranks of a masked run (the t5 part's, or the zero/mean part's)
        masked = parts[-1] if "t5" in modes or not args.reference_padding else None
        if masked is not None:
            _check_ranked_first(args.correct_valid, queries, masked.sweep.clean["rank"])
    result = StagePatchingResult(
        rows=[row for part in parts for row in part.rows],
        ranks=np.concatenate([part.ranks for part in parts]),
        sweep=parts[0].sweep,
    )
    if args.reference:
        extra = {}
        if "t5" in modes:
            extra[T5_ALL_AND_ATTN_JSON] = _t5_all_and_attn(args, model, base, stages, qrels, progress)
        write_stage_patching(args.output, result, extra_json=extra, reference=True, num_stages=len(stages))
    else:
        write_stage_patching(args.output, result, extra_json={STAGES_JSON: stages_record})
    summary = {row["component"] + f"/stage{row['stage']}/" + row["mode"]: row["!=0"] for row in result.fractions()}
    print(json.dumps({"queries": len(queries), "stages": stages, "stages_method": stages_record["method"],
                      "fraction_not_rank_0": summary}, indent=1))
    return 0


def _t5_all_and_attn(args: argparse.Namespace, model, base, stages, qrels, progress: bool) -> dict:
    """eval_patching_t5.py's patching_results_t5_all_and_attn.json: the T5's outputs in place of every component
    of every stage but the last and of the last stage's attn, on ALL validation queries (unpadded there, masks
    here), top 100 over the full vocabulary, its hits@1 / hits@10 / recall@5 and its config text."""
    from genir_jax.analysis.circuit import reference_retrieval_metrics
    from genir_jax.analysis.inputs import tokenize_for_analysis
    from genir_jax.analysis.stage_patching import PAPER_STAGES_24, T5_ALL_AND_ATTN_CONFIG, t5_all_and_attn_config
    from genir_jax.data.corpus import qrels_from_queries, read_queries
    from genir_jax.docids.tokens import docid_vocabulary
    from genir_jax.interp.patching import Source, run_sweep
    from genir_jax.interp.sweep import stack

    queries = read_queries(args.val_queries)
    if qrels is None:
        qrels = qrels_from_queries(queries)
    ids, mask = tokenize_for_analysis(model.tokenizer, [q.text for q in queries])
    if int(ids.max()) >= base.config.vocab_size:
        raise GenIRError(f"{args.t5}: the T5's vocabulary ({base.config.vocab_size}) does not cover the query tokens")
    sweep = stack([t5_all_and_attn_config(model.config, stages)], labels=[{"config": "t5_all_and_attn"}])
    result = run_sweep(model.config, model.params, ids, mask, np.zeros(len(queries), np.int32), sweep,
                       source=Source(base.config, base.params), metrics=("rank",),
                       top_k=min(100, model.config.vocab_size),
                       query_chunk=args.batch_size, progress=progress)
    report = reference_retrieval_metrics(np.asarray(result.top_ids[0]), [q.id for q in queries], qrels,
                                         docid_vocabulary(model.tokenizer))
    paper = [list(s) for s in stages] == [list(s) for s in PAPER_STAGES_24]
    report["config"] = T5_ALL_AND_ATTN_CONFIG if paper else (
        ", ".join(f"{s[0]}-{s[-1]} attn, cr, mlp = T5" for s in stages[:-1]) + f", {stages[-1][0]}-{stages[-1][-1]} "
        "only attn = t5")
    return report


def _check_ranked_first(path: str, queries, clean_ranks) -> None:
    """Refuse correct_valid.json records whose docid is not the clean model's top token (what `evaluate` writes
    there), naming the first such record; the reference checks nothing and silently counts them as patched."""
    from genir_jax.base.errors import DataError

    clean_ranks = np.asarray(clean_ranks)
    wrong = np.flatnonzero(clean_ranks != 0)
    if wrong.size:
        first = int(wrong[0])
        query = queries[first]
        raise DataError(f"{path}: record index {first}: field 0 (docid_token) {query.docid_token!r} is at rank "
                        f"{int(clean_ranks[first])}, not first, for query {query.query_id!r} ({wrong.size} of "
                        f"{clean_ranks.size} records are not ranked first; correct_valid.json must list the pairs "
                        "the model ranks first, as genir-jax evaluate writes it; --allow-incorrect accepts them)")
