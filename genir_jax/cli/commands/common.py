"""Command-line options the analysis subcommands share, spelled as the reference scripts spell them."""

from __future__ import annotations

from genir_jax.base.options import ROWS
import argparse

STAGES_HELP = ("decoder stages: 'auto' (fitted to the model's per-layer curves on a seeded half of the correct "
               "queries, k in 2-5 chosen by a penalised cost, see genir_jax.analysis.auto_stages; the results are "
               "then reported on the other, held-out half only), 'thirds' (three near-equal consecutive blocks), "
               "'paper' (0-6,7-17,18-23; 24-layer decoders) or layer ranges, e.g. '0-6,7-17,18-23' (default: "
               "the paper's for a 24-layer decoder, otherwise auto). The stages used are written to stages.json")
from genir_jax.cli.paths import CHECKPOINT  # placeholder in path options (resolved by `resolve_placeholders`)


def add_analysis_inputs(parser: argparse.ArgumentParser) -> None:
    """-c/--checkpoint, --val-queries, --correct-valid and -o/--output (alias --output-path), with the
    reference's defaults ``[checkpoint]/correct_valid.json`` and ``[checkpoint]`` (resolved by `genir_jax.cli.paths.resolve_placeholders`)."""
    parser.add_argument("-c", "--checkpoint", required=True,
                        help="HF-format GenIR checkpoint directory (with its tokenizer)")
    parser.add_argument("--val-queries", required=True, help="validation queries, reference JSON format")
    add_checkpoint_paths(parser)


def add_checkpoint_paths(parser: argparse.ArgumentParser, output_flags=("-o", "--output", "--output-path")) -> None:
    """--correct-valid (and --allow-incorrect) and the output option with the reference's ``[checkpoint]``
    placeholders."""
    parser.add_argument("--correct-valid", default=f"{CHECKPOINT}/correct_valid.json",
                        help="correct_valid.json: [docid_token, query_id] pairs (from genir-jax evaluate); "
                             f"'{CHECKPOINT}' stands for the checkpoint directory (default: %(default)s)")
    parser.add_argument(*output_flags, dest="output", default=CHECKPOINT,
                        help=f"output directory; '{CHECKPOINT}' stands for the checkpoint directory (default: "
                             "%(default)s, the reference's)")
    add_allow_incorrect(parser)


def add_allow_incorrect(parser: argparse.ArgumentParser) -> None:
    """--allow-incorrect, for every command that reads correct_valid.json pairs (checked by
    `genir_jax.analysis.inputs.check_correct_pairs`; pass ``allow_incorrect=args.allow_incorrect`` to
    `load_analysis_inputs`)."""
    parser.add_argument("--allow-incorrect", action="store_true",
                        help="accept correct_valid.json pairs that are not correct: a docid that is not one of the "
                             "query's relevant documents (--val-queries), or that the model does not rank first "
                             "(the top token of the whole vocabulary; naive / semantic docids: at every step, as "
                             "genir-jax evaluate decides it). By default such a pair is refused (exit 2, naming it); "
                             "with this option they are kept and a warning counts them")


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """--overwrite: replace another run's outputs in the output folder (refused without it)."""
    parser.add_argument("--overwrite", action="store_true",
                        help="the output folder may hold another run's outputs (other settings, or another command): "
                             "replace them, removing every file of that run (default: refuse)")


REFERENCE_HELP = ("reference mode: behave as the reference's {script} in every output file, key, row order and "
                  "number: {what}. Implies --reference-padding")


def add_reference(parser: argparse.ArgumentParser, script: str, what: str, padding_help: str) -> None:
    """--reference (the whole reference behaviour of one script) and --reference-padding (its padding only)."""
    parser.add_argument("--reference", action="store_true", help=REFERENCE_HELP.format(script=script, what=what))
    parser.add_argument("--reference-padding", action="store_true",
                        help=padding_help + " (the padding part of --reference only)")


def reference_stages(args: argparse.Namespace, layers: int, stages_24) -> None:
    """In reference mode, the reference's hard-coded stages `stages_24` ("0-6,7-17,18-23" style text) for a
    24-layer decoder unless --stages is given (the reference scripts cannot run other depths: there the usual
    default applies)."""
    if getattr(args, "reference", False) and not getattr(args, "stages", None) and layers == 24:
        args.stages = stages_24


def add_stages(parser: argparse.ArgumentParser, note: str = "") -> None:
    parser.add_argument("--stages", default=None, help=STAGES_HELP + note)


def add_run_controls(parser: argparse.ArgumentParser, batch_help: str = "queries per step (default: 16)",
                     batch_default: int | None = 16) -> None:
    """--batch-size and --no-progress."""
    parser.add_argument("--batch-size", type=ROWS, default=batch_default, help=batch_help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_json_output(parser: argparse.ArgumentParser) -> None:
    """--json: the summary as one JSON line instead of labelled lines (`print_evaluation`)."""
    parser.add_argument("--json", action="store_true",
                        help="print the metrics as one JSON line (default: a labelled line, e.g. 'validation: "
                             "Hits@1 12.34 ... (n=86 queries)')")


def print_evaluation(result, args: argparse.Namespace) -> None:
    """An `EvaluationResult` on stdout as --json asks: one JSON line, or labelled lines named after the
    split (or the --queries file)."""
    from genir_jax.training.reporting import evaluation_label, json_line

    if args.json:
        print(json_line(result.printed()))
    else:
        print("\n".join(result.lines(evaluation_label(args.split, args.queries))))


def stages_option(args: argparse.Namespace, config, params, input_ids, attention_mask, target_ids, query_ids=None):
    """The `genir_jax.analysis.stages.Stages` `--stages` asks for (with the command's --batch-size and
    --no-progress; automatic stages are fitted on half the queries, `query_ids` recorded); a bad
    specification is refused as an error of --stages, before any computation."""
    from genir_jax.analysis.stages import fixed_stages, resolve_stages as resolve
    from genir_jax.base.errors import GenIRError

    try:
        fixed_stages(getattr(args, "stages", None), config.num_decoder_layers)  # a bad spec, before any computation
    except GenIRError as error:
        message = str(error)
        raise GenIRError(message if message.startswith("--stages") else f"--stages: {message}") from None
    stages = resolve(getattr(args, "stages", None), config, params, input_ids, attention_mask, target_ids,
                     query_ids=query_ids, batch_size=getattr(args, "batch_size", None),
                     progress=not getattr(args, "no_progress", True))
    return stages


def stages_for_inputs(args: argparse.Namespace, inputs):
    """`stages_option` on analysis inputs (`genir_jax.analysis.inputs.AnalysisInputs`), and the inputs the
    command reports on: the held-out half of the correct queries for automatic stages, else all of them."""
    from genir_jax.analysis.stages import report_inputs

    model = inputs.model
    stages = stages_option(args, model.config, model.params, inputs.input_ids, inputs.attention_mask, inputs.targets,
                           query_ids=[q.query_id for q in inputs.queries])
    return stages, report_inputs(stages, inputs)


def resolve_stages(args: argparse.Namespace, config, params, input_ids, attention_mask, target_ids
                   ) -> tuple[list[list[int]], dict]:
    """The decoder stages `--stages` asks for (`stages_option`) and their stages.json record."""
    stages = stages_option(args, config, params, input_ids, attention_mask, target_ids)
    return stages.as_lists(), stages.record()


def write_stages(directory: str, record: dict) -> None:
    """stages.json (the record of `resolve_stages`) in an output directory."""
    from genir_jax.analysis.stages import write_stages as write

    write(directory, record)
