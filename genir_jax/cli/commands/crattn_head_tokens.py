"""`genir-jax crattn-head-tokens`: the word tokens single cross-attention heads promote (paper Table 6)."""

from __future__ import annotations

from genir_jax.base.options import LISTED
import argparse

from genir_jax.cli.commands.common import add_run_controls
from genir_jax.cli.commands.mesh_options import add_mesh_arguments
from genir_jax.base.errors import GenIRError


ORDER = 170  # where `genir-jax --help` lists it
SUMMARY = "top word tokens of single cross-attention heads' outputs for given queries (paper Table 6)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "crattn-head-tokens",
        help=SUMMARY,
        description=(
            "For each query and each head LAYER.HEAD, the logit lens (final norm, unembedding) of the head's own "
            "output z_h @ W_O[h] at the decoder's single position, and its top word tokens (docid tokens "
            "excluded). Writes crattn_head_tokens.json and prints a table."
        ),
    )
    parser.add_argument("-c", "--checkpoint", required=True,
                        help="HF-format GenIR checkpoint directory (with its tokenizer)")
    parser.add_argument("--queries", nargs="+", required=True,
                        help="query texts, e.g. \"who wrote the harry potter books\"")
    parser.add_argument("--heads", required=True, help="comma-separated LAYER.HEAD, e.g. '16.1,17.3'")
    parser.add_argument("--top", type=LISTED, default=5, help="tokens per head (default: 5)")
    parser.add_argument("-o", "--output", "--output-path", dest="output", required=True, help="output directory")
    parser.add_argument("--reference", "--reference-padding", dest="reference_padding", action="store_true",
                        help="every query unpadded and without attention mask (as the reference scripts run "
                             "queries); default: padded batches with attention masks. The reference has no script "
                             "for Table 6, so reference mode is this padding only; both spellings are accepted")
    add_run_controls(parser)
    parser.set_defaults(handler=run)
    add_mesh_arguments(parser)  # --mesh, --mesh-rules


def run(args: argparse.Namespace) -> int:
    from genir_jax.analysis.cross_attention_writes import head_top_tokens, parse_heads, write_head_tokens
    from genir_jax.analysis.inputs import load_model
    from genir_jax.base.io import atomic_directory

    queries = [q.strip() for q in args.queries]
    if not all(queries):
        raise GenIRError("--queries: empty query text")
    model = load_model(args.checkpoint)
    heads = parse_heads(args.heads, model.config)
    entries = head_top_tokens(model.config, model.params, model.tokenizer, queries, heads, top=args.top,
                              batch_size=args.batch_size, reference_padding=args.reference_padding,
                              progress=not args.no_progress)
    with atomic_directory(args.output) as staging:
        write_head_tokens(staging, entries)
    for entry in entries:
        print(f"{entry['query']}\t{entry['layer']}.{entry['head']}\t{', '.join(entry['words'])}")
    return 0
