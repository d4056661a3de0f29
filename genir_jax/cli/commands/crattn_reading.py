"""`genir-jax crattn-reading`: what cross-attention heads read from (paper Fig. 5, cross-attention)."""

from __future__ import annotations

from genir_jax.cli.commands.neuron_reading import add_reading_parser


ORDER = 150  # where `genir-jax --help` lists it
SUMMARY = "what cross-attention heads read from earlier components (paper Fig. 5, cross-attention)"


def add_parser(subparsers) -> None:
    add_reading_parser(subparsers, "crattn-reading", "cross_attn",
                       SUMMARY)
