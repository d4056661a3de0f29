"""`genir-jax inspect`: describe a checkpoint (architecture, parameters, tokenizer, docid tokens)."""

from __future__ import annotations

import argparse
import json


ORDER = 70  # where `genir-jax --help` lists it
SUMMARY = "describe a Hugging Face T5 checkpoint as genir-jax loads it"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help=SUMMARY,
        description="Load a T5/mT5 checkpoint directory (or a hub id in the local HF cache) through genir-jax "
                    "and print its architecture, parameter count, tokenizer size and number of docid tokens.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or locally cached hub id")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from genir_jax.docids.tokens import docid_vocabulary
    from genir_jax.checkpoints.hf import load_for_analysis  # read-only tokenizer, no transformers

    model = load_for_analysis(args.checkpoint)
    config = model.config
    count = int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(model.params)))
    summary = {
        "path": model.path,
        "model_type": config.model_type,
        "variant": "T5 v1.0 (ReLU, tied, rescaled)" if not config.is_gated_act and config.tie_word_embeddings
        else f"{config.feed_forward_proj}, {'tied' if config.tie_word_embeddings else 'untied lm_head'}",
        "encoder_layers": config.num_layers,
        "decoder_layers": config.num_decoder_layers,
        "d_model": config.d_model,
        "num_heads": config.num_heads,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "vocab_size": config.vocab_size,
        "parameters": count,
        "tokenizer_size": None if model.tokenizer is None else len(model.tokenizer),
        "docid_tokens": None if model.tokenizer is None else len(docid_vocabulary(model.tokenizer)),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for key, value in summary.items():
            print(f"{key:>15}: {value}")
    return 0
