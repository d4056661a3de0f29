"""`genir-jax neuron-reading`: what the MLP neurons of the last stage read from (paper Fig. 5, right).

The shared plumbing of both reading subcommands (`neuron-reading`, `crattn-reading`) lives here.
"""

from __future__ import annotations

from genir_jax.base.options import LISTED
import argparse
import json
import os
import sys

from genir_jax.cli.commands.common import add_analysis_inputs, add_reference, add_run_controls, add_stages
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.base.errors import GenIRError

DESCRIPTIONS = {
    "mlp": (
        "For every positively activated MLP neuron i of the chosen decoder layers (default: the last stage) and "
        "every correct validation query, the similarity (dot product or cosine) of the neuron's input weights "
        "W_in[:, i] with every earlier raw component output (embedding, attn / cross_attn / mlp outputs, per head "
        "for attention, and the residual sites), as the reference's eval_neuron_reading.py; then the proportions "
        "per component averaged over queries and neurons, as get_topk_neuron_readings.py. Writes "
        "all_queries_neuron_similarities_{sim}_{i}.json, neuron_ratio_of_top_k_layers-{sim}-{k}.json and "
        "neuron_reading_summary.json (proportions per component type and stage). --reference: as "
        "eval_neuron_reading.py + get_topk_neuron_readings.py: every decoder layer's neurons (the reference reads "
        "all layers), each query unpadded without attention mask, the per-entry files numbered as the reference "
        "numbers them (_0 empty, queries 0-49 in _50, ..., the last block in _{N-1}) and no summary or "
        "stages.json."
    ),
    "cross_attn": (
        "For every cross-attention head of the chosen decoder layers (default: all) and every correct validation "
        "query, with i_hat the encoder position of the head's highest attention score, the similarity of the "
        "key k_i_hat with W_Q applied to every earlier raw component output, as the reference's "
        "eval_cr_attn_reading.py; then the proportions per component averaged over queries and heads, as its "
        "notebook. Writes all_queries_crattn_similarities_{sim}_{i}.json, "
        "crattn_ratio_of_top_k_layers-{sim}-{k}.json and crattn_reading_summary.json. --reference: as "
        "eval_cr_attn_reading.py: every decoder layer, each query unpadded without attention mask, the per-entry "
        "files numbered as the reference numbers them (_0 empty, queries 0-49 in _50, ..., the last block in "
        "_{N-1}) and no summary or stages.json."
    ),
}


def add_reading_parser(subparsers, name: str, reader: str, help_text: str) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=DESCRIPTIONS[reader])
    add_analysis_inputs(parser)
    parser.add_argument("--sim-type", choices=("dot", "cosine"), default="dot",
                        help="similarity of a reader with a component (default: dot)")
    parser.add_argument("--topk", nargs="+", default=["all"],
                        help="top-k positive readings per reader and query kept for the proportions; one file "
                             "per value ('all' or an integer; default: all)")
    add_stages(parser)
    default_layers = "the last stage" if reader == "mlp" else "all"
    parser.add_argument("--layers", default=None,
                        help=f"decoder layers whose readers are analysed: 'all' or ranges like '18-23' "
                             f"(default: {default_layers})")
    add_reference(parser, {"mlp": "eval_neuron_reading.py + get_topk_neuron_readings.py",
                           "cross_attn": "eval_cr_attn_reading.py"}[reader],
                  "all decoder layers unless --layers, the per-entry files' numbering, no summary or stages.json",
                  "as the reference scripts: every query unpadded and without attention mask (queries are batched "
                  "by token length); default: padded batches with attention masks")
    add_run_controls(parser)
    parser.add_argument("--queries-per-file", type=LISTED, default=50,
                        help="queries per all_queries_* file (default: 50, as the reference)")
    parser.add_argument("--summary-only", action="store_true",
                        help="skip the (large) per-entry all_queries_* files")
    parser.set_defaults(handler=lambda args: run_reading_command(args, reader))
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


ORDER = 140  # where `genir-jax --help` lists it
SUMMARY = "what MLP neurons read from earlier components (paper Fig. 5, MLPs)"


def add_parser(subparsers) -> None:
    add_reading_parser(subparsers, "neuron-reading", "mlp",
                       SUMMARY)


def load_inputs(args: argparse.Namespace):
    """(model, the correct queries to report on and their raw query ids as in correct_valid.json: all, or the
    held-out half of automatic stages; stages, the stages' record for stages.json: see
    `genir_jax.cli.commands.common.stages_for_inputs`)."""
    from genir_jax.analysis.inputs import load_analysis_inputs
    from genir_jax.data.corpus import read_json

    if args.batch_size < 1:
        raise GenIRError("--batch-size must be >= 1")
    args.reference_padding = args.reference_padding or args.reference
    inputs = load_analysis_inputs(args.checkpoint, args.val_queries, args.correct_valid,
                                  allow_incorrect=args.allow_incorrect)
    model = inputs.model
    from genir_jax.cli.commands.common import reference_stages, stages_for_inputs
    if getattr(args, "reference_stages", None):
        reference_stages(args, model.config.num_decoder_layers, args.reference_stages)
    found, held_out = stages_for_inputs(args, inputs)  # automatic stages: the held-out half only
    raw_ids = [entry[1] for entry in read_json(args.correct_valid)]  # the reference writes them as given
    raw_ids = [raw_ids[row] for row in found.held_out_rows(len(raw_ids))]
    return model, held_out.queries, raw_ids, found.as_lists(), found.record()


def run_reading_command(args: argparse.Namespace, reader: str) -> int:
    from genir_jax.analysis.reading import (
        RawEntryWriter, parse_layers, parse_topk, run_reading, stale_raw_files, write_reading_outputs,
    )
    from genir_jax.base.io import atomic_directory

    topks = parse_topk(args.topk)
    if args.queries_per_file < 1:
        raise GenIRError("--queries-per-file must be >= 1")
    model, queries, raw_ids, stages, stages_record = load_inputs(args)
    config = model.config
    if args.layers:
        layers = parse_layers(args.layers, config.num_decoder_layers)
    else:  # the reference reads every layer
        layers = list(stages[-1]) if reader == "mlp" and not args.reference else list(range(config.num_decoder_layers))

    with atomic_directory(args.output) as staging:
        writer = None if args.summary_only else RawEntryWriter(staging, reader, args.sim_type, raw_ids,
                                                               args.queries_per_file,
                                                               reference_numbering=args.reference)
        result = run_reading(
            config, model.params, model.tokenizer, [q.text for q in queries], reader=reader, layers=layers,
            stages=stages, sim_type=args.sim_type, topks=topks, batch_size=args.batch_size,
            reference_padding=args.reference_padding, block=args.queries_per_file, sink=writer,
            progress=not args.no_progress,
        )
        if writer is not None:
            writer.close()
        write_reading_outputs(staging, result, summary=not args.reference)
        if not args.reference:
            from genir_jax.cli.commands.common import write_stages
            write_stages(staging, stages_record)
        if writer is not None and writer.overwritten:
            print(f"genir-jax: warning: as the reference, {', '.join(writer.overwritten)} was overwritten by the "
                  "last block (its earlier queries are lost from the per-entry files)", file=sys.stderr)
    if writer is not None:  # chunks of an earlier, longer run would be globbed with ours
        for path in stale_raw_files(args.output, reader, args.sim_type, keep=writer.files):
            os.remove(path)
    summary = result.summary()
    brief = {k: v["mean"] for k, v in summary["results"].items()}
    print(json.dumps({"queries": len(queries), "reader_layers": layers, "stages": stages,
                      "stages_method": stages_record["method"], "mean_proportions": brief}, indent=1))
    return 0
