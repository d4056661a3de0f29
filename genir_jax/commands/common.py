"""Command-line options the analysis subcommands share, spelled as the reference scripts spell them."""

from __future__ import annotations

import argparse

STAGES_HELP = ("decoder stages: 'auto' (three stages fitted to the model's per-layer curves on the correct "
               "queries, see genir_jax.analysis.auto_stages), 'thirds' (three near-equal consecutive blocks), "
               "'paper' (0-6,7-17,18-23; 24-layer decoders) or layer ranges, e.g. '0-6,7-17,18-23' (default: "
               "the paper's for a 24-layer decoder, otherwise auto). The stages used are written to stages.json")
STAGES_JSON = "stages.json"


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


def resolve_stages(args: argparse.Namespace, config, params, input_ids, attention_mask, target_ids
                   ) -> tuple[list[list[int]], dict]:
    """The decoder stages `--stages` asks for and their record (what `write_stages` puts in stages.json).

    ``auto``: `genir_jax.analysis.auto_stages.auto_stages` (3 stages) on the given queries [N, S] and their
    target token ids [N]; ``thirds``: three near-equal blocks (`equal_stages`); ``paper``: 0-6,7-17,18-23
    (24-layer decoders); otherwise explicit ranges (`parse_stages`). Default: paper for 24 decoder layers,
    else auto.
    The record is ``{"method": "paper"|"auto"|"thirds"|"explicit", "stages": [[...]], "stages_text": ...}``
    plus, for auto, its fit (k, per-layer features, cost).
    """
    from genir_jax.analysis.auto_stages import auto_stages, describe_stages
    from genir_jax.analysis.stage_patching import PAPER_STAGES_24, equal_stages, parse_stages
    from genir_jax.errors import GenIRError

    layers = config.num_decoder_layers
    spec = (getattr(args, "stages", None) or "").strip()
    method = spec.lower() if spec.lower() in ("auto", "thirds", "paper") else ("explicit" if spec else
                                                                              "paper" if layers == 24 else "auto")
    if method == "auto":
        found = auto_stages(config, params, input_ids, attention_mask, target_ids, k=3,
                            batch_size=getattr(args, "batch_size", None),
                            progress=not getattr(args, "no_progress", True))
        record = found.as_json()
        stages = [list(stage) for stage in found.stages]
    else:
        if method == "paper":
            if layers != 24:
                raise GenIRError(f"--stages paper: the paper's stages need a 24-layer decoder, the model has {layers}")
            stages = [list(stage) for stage in PAPER_STAGES_24]
        elif method == "thirds":
            stages = equal_stages(layers)
        else:
            stages = parse_stages(spec, layers)
        record = {"method": method, "stages": stages}
        try:
            record["stages_text"] = describe_stages(stages)
        except GenIRError:
            pass  # explicit stages need not be runs of consecutive layers
        if method == "explicit":
            record["spec"] = spec
    record["num_decoder_layers"] = layers
    return stages, record


def write_stages(directory: str, record: dict) -> None:
    """stages.json (the record of `resolve_stages`) in an output directory."""
    import os

    from genir_jax.io import write_json

    write_json(os.path.join(directory, STAGES_JSON), record, indent=2)
