"""`genir-jax train`: fine-tune a base T5 (or, with --model-type decoder, a decoder-only model) into a DSI model on a
prepared corpus."""

from __future__ import annotations

from genir_jax.base.options import MODEL_TYPES, MAX_FACTOR, bounded_int
import argparse

from genir_jax.cli.commands.mesh_options import add_mesh_arguments


ORDER = 40  # where `genir-jax --help` lists it
SUMMARY = "fine-tune a base T5 into a DSI model (indexing + retrieval; atomic, naive or semantic docids)"


def add_parser(subparsers) -> None:
    from genir_jax.training.options import add_run_arguments

    parser = subparsers.add_parser(
        "train",
        help=SUMMARY,
        description="With atomic docids add a @DOC_ID_<id>@ token per document to BASE (naive / semantic docids "
                    "are sequences of ordinary tokens ending with EOS, validated against the tokenizer), train "
                    "indexing (document -> docid) and "
                    "retrieval (query -> docid) examples of a prepared directory, validate Hits@1/Hits@10 "
                    "periodically keeping the best parameters, and export them with the tokenizer as a Hugging "
                    "Face directory in OUTPUT (with checkpoints/, metrics.jsonl and train.json: the curve and the "
                    "final val/test metrics, docids.json: the docid scheme). Naive / semantic models are "
                    "validated by trie-constrained beam search (10 beams). --model-type decoder: a GPT-2 / Llama / "
                    "Qwen2 base trained on 'TEXT Document: DOCID' sequences, the loss on the docid's token(s) "
                    "(atomic: @DOC_ID_<id>@; naive / semantic: the docid's tokens and EOS, validated by beam "
                    "search after the prompt).",
    )
    parser.add_argument("--data", required=True, help="prepared directory (genir-jax prepare-data)")
    parser.add_argument("--base", required=True,
                        help="base model directory (genir-jax pretrain output, or any HF T5 with its tokenizer; with "
                             "--model-type decoder an HF GPT-2 / Llama / Qwen2 with its tokenizer)")
    parser.add_argument("-o", "--output", required=True, help="output directory (the DSI model)")
    parser.add_argument("--model-type", default="encoder-decoder", choices=MODEL_TYPES,
                        help="encoder-decoder (T5, default) or decoder (a GPT-2 / Llama / Qwen2 base: the text, the "
                             "prompt ' Document:' and the docid (token, or naive / semantic tokens + EOS) as one "
                             "sequence)")
    parser.add_argument("--remove", default="",
                        help="documents whose training examples are dropped, 'D1,D2,...' (the reference's --remove)")
    parser.add_argument("--ratio", type=bounded_int(0, MAX_FACTOR), default=None,
                        help="indexing:retrieval example ratio (default: the preset's); 0 keeps both as they are")
    parser.add_argument("--paper-regime", action="store_true",
                        help="the paper's data regime on any preset: ratio 32 and 32-token documents and queries "
                             "(prepare --data with prepare-data --paper-regime for the NQ10k split)")
    from genir_jax.docids.schemes import add_scheme_arguments

    add_scheme_arguments(parser, default_help="default: the one --data was prepared for, else atomic")
    add_run_arguments(parser)
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def run(args: argparse.Namespace) -> int:
    from genir_jax.base.errors import renaming_settings
    from genir_jax.training.dsi import train_dsi, training_summary
    from genir_jax.training.metric_sinks import metric_sinks
    from genir_jax.training.options import FLAGS, RunOverrides, print_summary, resume_setting

    flags = {**FLAGS, "model_type": "--model-type", "preset": "--preset", "remove": "--remove", "ratio": "--ratio", "paper_regime": "--paper-regime",
             "docids": "--docids", "semantic_docid_mapping": "--semantic-docid-mapping"}
    with renaming_settings(flags):
        summary = train_dsi(args.data, args.base, args.output, preset=args.preset, remove=args.remove,
                            ratio=args.ratio, paper_regime=args.paper_regime, docids=args.docids,
                            semantic_docid_mapping=args.semantic_docid_mapping,
                            overrides=RunOverrides.from_args(args), resume=resume_setting(args),
                            devices=args.devices, progress=not args.no_progress, model_type=args.model_type,
                            sinks=metric_sinks(args.output, json_lines=args.json, tensorboard=args.tensorboard))
    print_summary(training_summary(summary), args)
    return 0
