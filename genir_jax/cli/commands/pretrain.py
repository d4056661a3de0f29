"""`genir-jax pretrain`: a "base T5" from scratch, by span corruption on a prepared corpus (or, with --model-type
decoder, a decoder-only base as a causal LM)."""

from __future__ import annotations

import argparse

from genir_jax.cli.commands.mesh_options import add_mesh_arguments


ORDER = 30  # where `genir-jax --help` lists it
SUMMARY = ("pre-train a T5 (span corruption) or a decoder-only model (causal LM) from scratch on a prepared corpus "
           "(a base for `train`)")


def add_parser(subparsers) -> None:
    from genir_jax.base.options import MODEL_TYPES
    from genir_jax.training.options import add_run_arguments

    parser = subparsers.add_parser(
        "pretrain",
        help=SUMMARY,
        description="Build a fresh T5 (shape from --preset) with the real T5 tokenizer, train it with T5's span "
                    "corruption (noise density 0.15, mean span 3) on the documents and training queries of a "
                    "prepared directory, and export the best model (validation loss on held-out text) as a "
                    "Hugging Face directory. Checkpoints, metrics.jsonl and pretrain.json go into OUTPUT too. "
                    "--model-type decoder: a fresh Llama-style decoder-only model (RoPE, RMSNorm, SwiGLU, untied "
                    "head; shape from --preset, which must have decoder-only settings: tiny, cpu) with the same "
                    "T5 vocabulary, trained with the next-token loss on the same texts and exported as a "
                    "transformers LlamaForCausalLM directory, a --base for `train --model-type decoder`.",
    )
    parser.add_argument("--data", required=True, help="prepared directory (genir-jax prepare-data)")
    parser.add_argument("-o", "--output", required=True, help="output directory (the base model)")
    parser.add_argument("--tokenizer", default=None,
                        help="T5 tokenizer directory (default: $GENIR_JAX_DATA/t5-tokenizer, else "
                             "../shared/data/t5-tokenizer)")
    parser.add_argument("--no-queries", action="store_true", help="pre-train on the documents only")
    parser.add_argument("--model-type", default="encoder-decoder", choices=MODEL_TYPES,
                        help="encoder-decoder (a T5, default) or decoder (a Llama-style decoder-only model)")
    add_run_arguments(parser)
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def run(args: argparse.Namespace) -> int:
    from genir_jax.base.errors import renaming_settings
    from genir_jax.training.metric_sinks import metric_sinks
    from genir_jax.training.options import FLAGS, RunOverrides, print_summary, resume_setting
    from genir_jax.training.pretrain import pretraining_summary, run_pretraining

    with renaming_settings({**FLAGS, "tokenizer": "--tokenizer", "include_queries": "--no-queries",
                             "model_type": "--model-type", "preset": "--preset"}):
        summary = run_pretraining(args.data, args.output, preset=args.preset, tokenizer=args.tokenizer,
                                  include_queries=not args.no_queries, overrides=RunOverrides.from_args(args),
                                  resume=resume_setting(args), devices=args.devices, progress=not args.no_progress,
                                  sinks=metric_sinks(args.output, json_lines=args.json, tensorboard=args.tensorboard),
                                  model_type=args.model_type)
    print_summary(pretraining_summary(summary), args)
    return 0
