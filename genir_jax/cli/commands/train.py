"""`genir-jax train`: fine-tune a base T5 into a DSI (atomic docid) model on a prepared corpus."""

from __future__ import annotations

import argparse
import json
import os

from genir_jax.cli.commands.mesh_options import add_mesh_arguments


def add_parser(subparsers) -> None:
    from genir_jax.training.options import add_run_arguments

    parser = subparsers.add_parser(
        "train",
        help="fine-tune a base T5 into a DSI model (indexing + retrieval; atomic, naive or semantic docids)",
        description="With atomic docids add a @DOC_ID_<id>@ token per document to BASE (naive / semantic docids "
                    "are sequences of ordinary tokens ending with EOS, validated against the tokenizer), train "
                    "indexing (document -> docid) and "
                    "retrieval (query -> docid) examples of a prepared directory, validate Hits@1/Hits@10 "
                    "periodically keeping the best parameters, and export them with the tokenizer as a Hugging "
                    "Face directory in OUTPUT (with checkpoints/, metrics.jsonl and train.json: the curve and the "
                    "final val/test metrics, docids.json: the docid scheme). Naive / semantic models are "
                    "validated by trie-constrained beam search (10 beams).",
    )
    parser.add_argument("--data", required=True, help="prepared directory (genir-jax prepare-data)")
    parser.add_argument("--base", required=True,
                        help="base model directory (genir-jax pretrain output, or any HF T5 with its tokenizer)")
    parser.add_argument("-o", "--output", required=True, help="output directory (the DSI model)")
    parser.add_argument("--remove", default="",
                        help="documents whose training examples are dropped, 'D1,D2,...' (the reference's --remove)")
    parser.add_argument("--ratio", type=int, default=None,
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
    import dataclasses

    from genir_jax.data.dsi import parse_doc_id_list
    from genir_jax.data.prepare import load_prepared
    from genir_jax.docids.schemes import docid_trie, resolve_scheme
    from genir_jax.base.errors import CheckpointError, DataError, GenIRError
    from genir_jax.checkpoints.hf import load_pretrained
    from genir_jax.training.dsi import finetune
    from genir_jax.training.options import check_output_dir, resolve_run, resume_mode, select_devices
    from genir_jax.training.presets import PAPER_RATIO, get_preset, is_paper_regime, paper_regime

    preset = get_preset(args.preset)
    run_spec = resolve_run(args, preset.dsi.run, preset.dsi.adamw)
    settings = preset.dsi
    if args.ratio is not None:
        if args.ratio < 0:
            raise GenIRError(f"--ratio must be >= 0, got {args.ratio}")
        if args.paper_regime and args.ratio != PAPER_RATIO:
            raise GenIRError(f"--paper-regime trains at ratio {PAPER_RATIO}; it cannot go with --ratio {args.ratio}")
        settings = dataclasses.replace(settings, ratio=args.ratio or None)
    if args.paper_regime:
        settings = paper_regime(settings)
    devices = select_devices(args.devices)
    resume, require_checkpoint = resume_mode(args)
    check_output_dir(args.output, resume, require_checkpoint)
    documents, splits = load_prepared(args.data)
    for name in ("train", "val"):
        if not splits.get(name):
            raise DataError(f"{args.data}: no {name} queries (DSI training needs train and val queries)")
    known = {doc.id for doc in documents}
    removed = parse_doc_id_list(args.remove)
    unknown = [d for d in removed if d not in known]
    if unknown:
        raise DataError(f"--remove: documents {unknown[:5]} are not in {args.data}/documents.json")
    scheme = resolve_scheme(args.docids, [doc.id for doc in documents], mapping=args.semantic_docid_mapping,
                            prepared_dir=args.data)
    base = load_pretrained(args.base)
    if base.tokenizer is None:
        raise CheckpointError(f"{args.base}: no tokenizer files; the base model must come with its tokenizer")
    if scheme.multi_token:  # every docid must survive the tokenizer before anything is written
        docid_trie(scheme, base.tokenizer, [doc.id for doc in documents], scheme.source or scheme.name)
    summary = finetune(base, documents, splits, settings, run_spec, args.output, remove=removed,
                       resume=resume, progress=not args.no_progress, devices=devices, scheme=scheme,
                       extra_summary={"preset": preset.name, "data_dir": os.path.abspath(args.data),
                                      "base": os.path.abspath(args.base),
                                      "regime": "paper" if is_paper_regime(settings) else "preset",
                                      "data_split": prepared_split(args.data)})
    print(json.dumps({key: summary[key] for key in ("docids", "best", "final", "examples_per_s", "train_seconds",
                                                    "wall_seconds")}, indent=2))
    return 0


def prepared_split(directory: str) -> dict | None:
    """The split record of a prepared directory's prepare.json (scheme, indexed-only validation documents),
    or None for directories prepared before it was recorded."""
    from genir_jax.data.prepare import read_manifest

    split = (read_manifest(directory) or {}).get("split")
    return split if isinstance(split, dict) else None
