"""`genir-jax pretrain`: a "base T5" from scratch, by span corruption on a prepared corpus."""

from __future__ import annotations

import argparse
import json
import os

from genir_jax.cli.commands.mesh_options import add_mesh_arguments


def add_parser(subparsers) -> None:
    from genir_jax.training.options import add_run_arguments

    parser = subparsers.add_parser(
        "pretrain",
        help="pre-train a T5 from scratch with span corruption on a prepared corpus (a base for `train`)",
        description="Build a fresh T5 (shape from --preset) with the real T5 tokenizer, train it with T5's span "
                    "corruption (noise density 0.15, mean span 3) on the documents and training queries of a "
                    "prepared directory, and export the best model (validation loss on held-out text) as a "
                    "Hugging Face directory. Checkpoints, metrics.jsonl and pretrain.json go into OUTPUT too.",
    )
    parser.add_argument("--data", required=True, help="prepared directory (genir-jax prepare-data)")
    parser.add_argument("-o", "--output", required=True, help="output directory (the base model)")
    parser.add_argument("--tokenizer", default=None,
                        help="T5 tokenizer directory (default: $GENIR_JAX_DATA/t5-tokenizer, else "
                             "../shared/data/t5-tokenizer)")
    parser.add_argument("--no-queries", action="store_true", help="pre-train on the documents only")
    add_run_arguments(parser)
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def run(args: argparse.Namespace) -> int:
    from genir_jax.data.prepare import default_data_dir, load_prepared
    from genir_jax.base.errors import CheckpointError
    from genir_jax.checkpoints.hf import load_tokenizer_from
    from genir_jax.training.options import check_output_dir, resolve_run, resume_mode, select_devices
    from genir_jax.training.presets import get_preset
    from genir_jax.training.pretrain import corpus_texts, pretrain, sentinel_ids

    preset = get_preset(args.preset)
    run_spec = resolve_run(args, preset.pretrain.run, preset.pretrain.adamw)
    devices = select_devices(args.devices)
    resume, require_checkpoint = resume_mode(args)
    check_output_dir(args.output, resume, require_checkpoint)
    tokenizer_dir = args.tokenizer or os.fspath(default_data_dir() / "t5-tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise CheckpointError(f"{tokenizer_dir}: tokenizer directory not found (pass --tokenizer or set "
                              "GENIR_JAX_DATA)")
    tokenizer = load_tokenizer_from(tokenizer_dir)
    if tokenizer is None:
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files (tokenizer.json / spiece.model)")
    sentinel_ids(tokenizer, tokenizer_dir)
    documents, splits = load_prepared(args.data)
    texts = corpus_texts(documents, splits.get("train", ()), include_queries=not args.no_queries
                         and preset.pretrain.include_train_queries)
    summary = pretrain(texts, tokenizer, preset.model, preset.pretrain, run_spec, args.output, resume=resume,
                       progress=not args.no_progress, devices=devices,
                       extra_summary={"preset": preset.name, "data_dir": os.path.abspath(args.data),
                                      "tokenizer": os.path.abspath(tokenizer_dir)})
    print(json.dumps({key: summary[key] for key in ("best", "examples_per_s", "train_seconds", "wall_seconds")},
                     indent=2))
    return 0
