"""The options `genir-jax sweep` and `genir-jax attribute` share (inputs, --sites, --mode, --foil, chunking),
and their translation into a prepared sweep (`genir_jax.analysis.sweep_runs.prepare_sweep`) whose errors
name these flags."""

from __future__ import annotations

import argparse

from genir_jax.base.options import ROWS, SEED, bounded_float
from genir_jax.cli.commands.common import add_analysis_inputs, add_overwrite

SITES_HELP = (
    "sites to patch, one config per matched site and unit: STACK.LAYERS.SITE[UNIT], e.g. "
    "'decoder.*.cross_attn.hook_z[head]', 'decoder.10-17.mlp.hook_post[neuron=0-99]', 'decoder.*.{attn,mlp}', "
    "'decoder.*.*' (layer x component grid), 'encoder.hook_out', 'encoder.*.hook_resid_post[position]'. "
    "LAYERS: '*', '7', '10-17', '1,3,5-7'; SITE: a TransformerLens local site name or attn|cross_attn|mlp (the "
    "component's output). [position] on a decoder site is the decoding step (naive / semantic checkpoints: "
    "each docid step; atomic: the one step). 'A x B' patches every combination; the option may be repeated "
    "(configs concatenated). Decoder-only checkpoints (GPT-2, Llama, Qwen2): TransformerLens names in one stack, "
    "e.g. 'blocks.*.attn.hook_z[head]', 'blocks.*.mlp.hook_post[neuron]', 'blocks.*.*', patched at every prompt "
    "position")
# The settings of `SweepOptions` / `prepare_sweep` as these commands spell them (errors name the flag).
FLAGS = {"output": "-o/--output", "mode": "--mode", "source_model": "--source-model", "metrics": "--metric",
         "foil": "--foil", "receivers": "--receivers", "method": "--method", "query_chunk": "--query-chunk",
         "config_chunk": "--config-chunk", "seed": "--seed"}


def add_sweep_inputs(parser: argparse.ArgumentParser) -> None:
    """Inputs, --sites, --mode (+ --seed, --source-model), --foil, chunking and progress options."""
    add_analysis_inputs(parser)
    parser.add_argument("--sites", action="append", required=True, metavar="SPEC", help=SITES_HELP)
    parser.add_argument("--mode", default="zero",
                        help="replacement value: zero; mean (mean over the same queries of each swept site); "
                             "resample (the same site on another query: a seeded derangement of the queries, "
                             "--seed); source (the same site of --source-model on the same query, e.g. the "
                             "pretrained T5). Default: zero")
    parser.add_argument("--seed", type=SEED, default=0, help="seed of the resample derangement (default 0)")
    parser.add_argument("--receivers", default=None,
                        help="path patching: the patched sites are senders whose effect reaches only these "
                             "receivers, e.g. 'mlp[12-23]+logits' (component inputs in decoder layers, and/or the "
                             "logits), 'all' (ordinary patching) or 'none' (the clean run); exact method only")
    parser.add_argument("--source-model", default=None,
                        help="checkpoint directory of the source model for --mode source (same architecture and "
                             "word vocabulary, e.g. the pretrained T5)")
    parser.add_argument("--foil", default=None,
                        help="foil docid for logit_diff: 'runner-up' (per query the clean model's best-scoring "
                             "docid other than the target) or a document id / docid token (one foil for all)")
    parser.add_argument("--query-chunk", type=ROWS, default=None,
                        help="queries per device per step (default: the queries per device in as few steps of at "
                             "most 64 as possible, balanced)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_overwrite(parser)
    parser.add_argument("--heatmap-vmax", type=bounded_float(0, open_low=True), default=None, metavar="V",
                        help="colour scale of the heatmaps: -V..V around 0 (default: each map's largest |value|); "
                             "give an exact sweep and an attribution of the same sites the same V to compare "
                             "their maps by eye")


def prepare(args: argparse.Namespace, metrics: list[str], record: str, outputs: tuple[str, ...], extra: dict):
    """`prepare_sweep` of the command's options; errors name the flags (`FLAGS`)."""
    from genir_jax.analysis.sweep_runs import SweepOptions, prepare_sweep
    from genir_jax.base.errors import renaming_settings

    options = SweepOptions(
        sites=list(args.sites), metrics=list(metrics), mode=args.mode, seed=args.seed, source_model=args.source_model,
        foil=args.foil, receivers=getattr(args, "receivers", None), method=getattr(args, "method", "exact"),
        query_chunk=args.query_chunk, config_chunk=getattr(args, "config_chunk", None),
        dtype=getattr(args, "dtype", "float32"))
    with renaming_settings(FLAGS):
        return prepare_sweep(args.checkpoint, args.val_queries, args.correct_valid, args.output, options,
                             allow_incorrect=args.allow_incorrect, overwrite=args.overwrite,
                             heatmap_vmax=args.heatmap_vmax, progress=not args.no_progress, record=record,
                             outputs=outputs, extra=extra)
