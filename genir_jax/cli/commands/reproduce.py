"""`genir-jax reproduce`: every experiment of the paper on one dataset and preset, with a report."""

from __future__ import annotations

import argparse

from genir_jax.base.options import FACTOR, MODEL_TYPES, SEED
from genir_jax.cli.commands.common import STAGES_HELP, add_overwrite


ORDER = 10  # where `genir-jax --help` lists it
SUMMARY = "prepare data, pretrain a base T5, train the DSI models, run every analysis, write report.md"


def add_parser(subparsers) -> None:
    from genir_jax.paper.reproduce import DATASETS, REMOVED_DOCUMENTS, REMOVED_MODELS, TINY_MAX_DOCUMENTS

    parser = subparsers.add_parser(
        "reproduce",
        help=SUMMARY,
        description=(
            "The whole paper on one dataset: prepare the data, pretrain a base T5 (span corruption), train the "
            f"full DSI model and {REMOVED_MODELS} models each without {REMOVED_DOCUMENTS} documents, evaluate, run "
            "every analysis (Tables 2-6, Figures 3-5) and write OUT/report.md with PNG figures and the paper's "
            "numbers side by side. Re-running skips finished steps; --force STEP redoes one. Presets: tiny (a "
            "smoke run on the first " + " / ".join(f"{n} ({d})" for d, n in TINY_MAX_DOCUMENTS.items()) + " documents, minutes on a CPU), cpu (the full corpus, "
            "2-core CPU scale), t5-large (the paper's model shape, for GPU/TPU). --model-type decoder: the same "
            "pipeline on decoder-only DSI models (Llama-style, presets tiny and cpu), running the experiments that "
            "apply to them (Table 1, stage patching of attn and mlp, residual contributions and logit lens, their "
            "claims); the report lists the others with the reason each does not apply."
        ),
    )
    parser.add_argument("--dataset", default="squad-dev", choices=DATASETS, help="default: squad-dev")
    parser.add_argument("--preset", default="tiny", choices=("tiny", "cpu", "t5-large"), help="default: tiny")
    parser.add_argument("--model-type", default="encoder-decoder", choices=MODEL_TYPES,
                        help="encoder-decoder (T5, the paper's; default) or decoder (decoder-only models: a "
                             "Llama-style base pre-trained as a causal LM, fine-tuned and evaluated as `train` / "
                             "`evaluate --model-type decoder`; atomic docids; the experiments without an encoder or "
                             "cross-attention); recorded in the run's settings")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<dataset>-<preset>, then -<docids> unless atomic, "
                             "-decoder for --model-type decoder and -paper-regime in the paper's regime)")
    parser.add_argument("--data-dir", default=None,
                        help="where the raw datasets and t5-tokenizer/ live (default: $GENIR_JAX_DATA, else "
                             "../shared/data)")
    parser.add_argument("--base", default=None, metavar="PATH_OR_HUB_ID",
                        help="fine-tune from this pretrained T5 (a directory with its tokenizer, or a hub id in the "
                             "local Hugging Face cache, e.g. google-t5/t5-large) instead of pretraining our own "
                             "corpus-only base; it is also the T5 of T5-mode patching and of the base encoder swap, "
                             "so those rows become comparable with the paper's (with --model-type decoder: a "
                             "decoder-only base, GPT-2 / Llama / Qwen2, to fine-tune)")
    parser.add_argument("--docids", "--doc-ids", default="atomic", choices=("atomic", "naive", "semantic"),
                        help="docid scheme of the DSI models (default: atomic, the paper's). naive / semantic run "
                             "the analyses that handle multi-token docids (Table 1, Table 3 stage patching over the "
                             "teacher-forced docid) and say in the report which they skip")
    from genir_jax.docids.schemes import NAIVE_ORDERS

    parser.add_argument("--naive-order", choices=NAIVE_ORDERS, default=NAIVE_ORDERS[0],
                        help="naive docids: shuffled (default: the documents numbered in a seeded random order) or "
                             "corpus (the document ids, in article order); see prepare-data --naive-order")
    parser.add_argument("--paper-regime", action="store_true",
                        help="the paper's data regime: the NQ10k-style split (validation/test documents indexed "
                             "only), indexing:retrieval ratio 32, 32-token documents and queries")
    parser.add_argument("--stages", default=None,
                        help=STAGES_HELP.replace("decoder stages:", "decoder stages of every experiment that uses "
                                                 "them:", 1) + " under analysis/; recorded in the run's settings")
    parser.add_argument("--removed-models", type=FACTOR, default=REMOVED_MODELS,
                        help=f"models trained without {REMOVED_DOCUMENTS} documents each, for the encoder swap "
                             f"(default: {REMOVED_MODELS}, as in the paper; fewer makes a quicker run)")
    parser.add_argument("--attribution-agreement", action="store_true",
                        help="also compare AtP / AtP* with exact patching over every decoder head, neuron and "
                             "component, zero and mean ablation (a report section with intervals; opt-in: it "
                             "patches every unit exactly, minutes even on the tiny preset)")
    parser.add_argument("--seeds", type=FACTOR, default=1, metavar="N",
                        help="train N full models (and their removed-document models) from the DSI training seeds "
                             "SEED, SEED+1, ..., each seed's models, evaluations and analyses in OUT/seed-<s>/ (the "
                             "prepared data and the pretrained base are shared), and write a pooled OUT/report.md and "
                             "report.json: every statistic per seed and pooled over (seed, query) pairs (default: 1, "
                             "one run in OUT itself)")
    parser.add_argument("--seed", type=SEED, default=None,
                        help="the (first) DSI training seed: docid-token initialisation, batch order, dropout "
                             "(default: the preset's, 0)")
    parser.add_argument("--force", nargs="+", default=(), metavar="STEP",
                        help="redo these steps (with --seeds: in every seed's folder)")
    parser.add_argument("--list-steps", action="store_true",
                        help="print the steps and their state (with --seeds: each seed's as seed-<s>/STEP), then exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars in the analyses")
    parser.add_argument("--tensorboard", action="store_true",
                        help="training also writes its metrics as TensorBoard event files (<model>/tensorboard/)")
    add_overwrite(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from genir_jax.base.errors import GenIRError
    from genir_jax.paper.reproduce import (Layout, Settings, check_same_settings, default_out, reproduce, run_steps,
                                           step_record)

    if args.removed_models < 1:
        raise GenIRError(f"--removed-models {args.removed_models}: need at least 1 (the encoder swap needs one)")
    if args.stages is not None:
        from genir_jax.analysis.stages import check_spec

        args.stages = check_spec(args.stages)
    base = None
    if args.base is not None:
        from genir_jax.paper.reproduce import resolve_base

        base = resolve_base(args.base)
    settings = Settings(dataset=args.dataset, preset=args.preset, data_dir=args.data_dir,
                        removed_models=args.removed_models, progress=not args.no_progress, base=base,
                        docids=args.docids, paper_regime=args.paper_regime, stages=args.stages,
                        tensorboard=args.tensorboard, naive_order=args.naive_order, seeds=args.seeds, seed=args.seed,
                        attribution_agreement=args.attribution_agreement, model_type=args.model_type)
    from genir_jax.paper.reproduce import check_model_type

    check_model_type(settings)  # refused before any folder is made (and a refused run has no steps to list)
    out = args.out or default_out(settings)
    if args.list_steps:
        layout = Layout(__import__("pathlib").Path(out))
        check_same_settings(layout, settings)  # another run's steps are not this run's
        listed = run_steps(settings)
        width = max([16, *(len(f"{folder}/{step.name}") for folder, step in listed if folder)])
        for folder, step in listed:
            record = step_record(Layout(layout.root / folder), step.name)
            state = "not run" if record is None else record.get("skipped") or f"done in {record['seconds']:.0f} s"
            print(f"{folder + '/' if folder else ''}{step.name:<{width - len(folder) - bool(folder)}} {state}")
        return 0
    from genir_jax.base.errors import renaming_settings
    from genir_jax.base.runs import output_lock

    with output_lock(out, "--out"), \
            renaming_settings({"download": "`genir-jax prepare-data --download`", "data_dir": "--data-dir"}):
        layout = reproduce(out, settings, force=tuple(args.force), overwrite=args.overwrite)
    print(f"report: {layout.report}")
    return 0
