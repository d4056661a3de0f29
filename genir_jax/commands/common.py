"""Command-line options the analysis subcommands share, spelled as the reference scripts spell them."""

from __future__ import annotations

import argparse

STAGES_HELP = ("decoder layer ranges, e.g. '0-6,7-17,18-23' (default: the paper's for a 24-layer decoder, "
               "otherwise three near-equal consecutive blocks)")


def add_analysis_inputs(parser: argparse.ArgumentParser) -> None:
    """-c/--checkpoint, --val-queries, --correct-valid and -o/--output (alias --output-path)."""
    parser.add_argument("-c", "--checkpoint", required=True,
                        help="HF-format GenIR checkpoint directory (with its tokenizer)")
    parser.add_argument("--val-queries", required=True, help="validation queries, reference JSON format")
    parser.add_argument("--correct-valid", required=True,
                        help="correct_valid.json: [docid_token, query_id] pairs (from genir-jax evaluate)")
    parser.add_argument("-o", "--output", "--output-path", dest="output", required=True, help="output directory")


def add_stages(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--stages", default=None, help=STAGES_HELP + note)


def add_run_controls(parser: argparse.ArgumentParser, batch_help: str = "queries per step (default: 16)",
                     batch_default: int | None = 16) -> None:
    """--batch-size and --no-progress."""
    parser.add_argument("--batch-size", type=int, default=batch_default, help=batch_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
