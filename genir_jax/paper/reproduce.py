"""`genir-jax reproduce`: the paper end to end on one dataset and preset, resumable, ending in a report.

Pipeline (each step a library function, the one its `genir-jax` subcommand calls, writing its own directory
under OUT; training shows its progress bars whatever --no-progress says, which is for the analyses):

    prepare          data/                   prepare-data (tiny: the first TINY_MAX_DOCUMENTS documents)
    pretrain         models/base/            pretrain: span corruption -> the "base T5" (skipped with --base:
                                             a pretrained T5 given by the user is the base instead)
    train-full       models/full/            train: the DSI model on every document
    evaluate-full    eval/full-{val,test}/   evaluate: metrics, run files, correct_valid.json
    bm25             eval/bm25-test/         bm25 on the same test queries (context for Table 1)
    patch-stages     analysis/patch-stages/  Table 3 (zero, mean, T5)
    circuit          analysis/circuit/       Table 4 (test queries)
    residual-rank    analysis/residual-rank/ Fig. 3 and Fig. 4
    neuron-reading   analysis/neuron-reading/ Fig. 5 (MLP neurons)
    crattn-reading   analysis/crattn-reading/ Fig. 5 (cross-attention heads)
    crattn-writes    analysis/crattn-writes/  Table 5
    head-tokens      analysis/head-tokens/    Table 6
    stage-robustness analysis/stage-robustness/ stage checks beyond the paper
    attribution-agreement analysis/attribution-agreement/ AtP / AtP* against exact patching (opt-in:
                                             --attribution-agreement)
    steps-logit-lens analysis/steps-logit-lens/ Fig. 3 / Fig. 4 per decoding step (naive / semantic docids only)
    choose-removed   removed_documents.json  4 x 10 documents to leave out (correct validation queries first)
    train-removed-K  models/removed-K/       train --remove: one model per document set, K = 0..3
    swap-encoder     analysis/swap-encoder/  Table 2 (+ the base T5's encoder)
    report           report.md, figures/      every table and figure, beside the paper's numbers

``--stages auto|thirds|paper|RANGES`` sets the decoder stages of every experiment that uses stages (default:
each experiment's, the paper's for a 24-layer decoder, else auto); automatic stages are fitted on half the
correct validation queries and the tables report the other half (`genir_jax.analysis.stages`).

``--docids naive|semantic`` trains every model on that scheme and runs only the experiments that handle
multi-token docids (each experiment says which schemes it handles; the removed-document models are trained
only when an experiment left needs them). ``--paper-regime`` prepares and trains in the paper's data regime.

``--model-type decoder`` runs the pipeline on decoder-only models (Llama-style, on the T5 vocabulary; the preset's
decoder-only settings): pretrain is a causal LM, train-full and evaluate-full are `train` / `evaluate
--model-type decoder`, and only the experiments that handle the family run (`Experiment.families`: Table 1,
stage patching over attn and mlp in zero and mean mode, residual contributions and the logit lens, the claims
they decide); the report lists every other one with its reason from `genir_jax.analysis.applicability`.
Atomic docids only (decoder-only analysis inputs refuse docid sequences).

``--seeds N`` (N > 1) trains N full models (and their removed-document models) from the DSI training seeds
``seed, seed+1, ..., seed+N-1`` (``--seed``, default the preset's): the seed sets the docid tokens' initial
embeddings, the batch order and dropout of every DSI model. ``prepare`` and ``pretrain`` (data/, models/base/)
do not depend on it and are shared; every other step runs per seed in ``seed-<s>/`` (its own models/, eval/,
analysis/, .steps/ and report.md), and ``report`` writes the pooled ``report.md`` / ``report.json``
(`genir_jax.paper.seeds`). A killed run resumes at the first unfinished step of the first unfinished seed.

A finished step leaves ``.steps/<step>.json``; re-running skips it (the report is always rewritten).
``--force STEP`` redoes that step (steps after it are not redone unless forced too). Analyses need correct
validation queries; when the full model has none, they are skipped and the report says so. A failing analysis
does not stop the pipeline (the training steps after it still run); the run then ends with an error naming it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import time
from typing import Callable

import numpy as np

from genir_jax.base.errors import GenIRError
from genir_jax.base.io import write_json
from genir_jax.paper.panels import FEW_QUERIES, base_model, step_record  # noqa: F401 (importable from here)

DATASETS = ("squad-dev", "nq-oracle")
REMOVED_MODELS = 4
REMOVED_DOCUMENTS = 10
# Documents kept by the tiny preset, per dataset, so that enough queries remain: squad-dev has about five
# questions per paragraph (64 paragraphs: ~300 queries), nq-oracle about one per passage (the first 64
# passages left 4 validation queries; the first 768 leave 57, squad-dev's first 64 paragraphs 86).
TINY_MAX_DOCUMENTS = {"squad-dev": 64, "nq-oracle": 768}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every step of a reproduction writes (all under `root`)."""

    root: pathlib.Path

    data = property(lambda self: self.root / "data")
    base = property(lambda self: self.root / "models" / "base")
    full = property(lambda self: self.root / "models" / "full")
    eval_val = property(lambda self: self.root / "eval" / "full-val")
    eval_test = property(lambda self: self.root / "eval" / "full-test")
    bm25_test = property(lambda self: self.root / "eval" / "bm25-test")
    removed_documents = property(lambda self: self.root / "removed_documents.json")
    missing_docs = property(lambda self: self.root / "analysis" / "missing_docs_for_model.json")
    figures = property(lambda self: self.root / "figures")
    report = property(lambda self: self.root / "report.md")
    steps = property(lambda self: self.root / ".steps")

    def seed_layout(self, seed: int) -> "SeedLayout":
        """The folder of training seed `seed` in a multi-seed run (``seed-<seed>/``)."""
        return SeedLayout(self.root / f"seed-{seed}", shared=self.root)

    def removed(self, index: int) -> pathlib.Path:
        return self.root / "models" / f"removed-{index}"

    def analysis(self, name: str) -> pathlib.Path:
        return self.root / "analysis" / name

    @property
    def correct_valid(self) -> pathlib.Path:
        return self.eval_val / "correct_valid.json"

    def queries(self, split: str) -> pathlib.Path:
        return self.data / f"{split}_queries.json"

    def qrels(self, split: str) -> pathlib.Path:
        return self.data / f"{split}_qrels.json"


@dataclasses.dataclass(frozen=True)
class SeedLayout(Layout):
    """One training seed's folder of a multi-seed run: its own models, evaluations, analyses, step records and
    report, on the prepared data and the pretrained base of the run (`shared`, the run's root)."""

    shared: pathlib.Path

    data = property(lambda self: self.shared / "data")
    base = property(lambda self: self.shared / "models" / "base")


SHARED_STEPS = ("prepare", "pretrain")  # seed-independent: a multi-seed run does them once, in the run's root


@dataclasses.dataclass
class Settings:
    dataset: str
    preset: str
    data_dir: str | None = None
    removed_models: int = REMOVED_MODELS
    removed_documents: int = REMOVED_DOCUMENTS
    progress: bool = True
    base: str | None = None  # a pretrained T5 (directory, resolved) instead of the pretrain step's model
    docids: str = "atomic"   # docid scheme of every DSI model: atomic | naive | semantic (prepare-data --docids)
    paper_regime: bool = False  # the paper's data regime: NQ10k split, ratio 32, 32-token inputs
    stages: str | None = None   # decoder stages of every experiment that uses them (None: each one's default)
    tensorboard: bool = False  # training also writes TensorBoard event files (<model>/tensorboard/)
    naive_order: str = "shuffled"  # naive docids: shuffled or corpus order (prepare-data --naive-order)
    attribution_agreement: bool = False  # opt-in: AtP / AtP* against exact patching (not in `record`: an addition)
    seeds: int = 1              # DSI models trained per role, one per training seed (see `training_seeds`)
    seed: int | None = None     # the first DSI training seed (None: the preset's)
    model_type: str = "encoder-decoder"  # the models' family: encoder-decoder (T5) or decoder (decoder-only)

    @property
    def record(self) -> dict:
        """What a reproduction directory is bound to (settings.json): another value needs another --out; naive
        runs also record the order of their ids (folders from before it existed hold corpus-order ids)."""
        record = {"dataset": self.dataset, "preset": self.preset, "removed_models": self.removed_models,
                  "removed_documents": self.removed_documents, "base": self.base, "docids": self.docids,
                  "paper_regime": self.paper_regime, "stages": self.stages, "model_type": self.model_type}
        record |= {"naive_order": self.naive_order} if self.docids == "naive" else {}
        return record | {name: getattr(self, name) for name, default in SEED_DEFAULTS.items()
                         if getattr(self, name) != default}


SEED_DEFAULTS = {"seeds": 1, "seed": None}  # recorded only when not these (one-seed folders are as before)


def training_seeds(settings: Settings) -> list[int]:
    """The DSI training seeds of a run: ``seed, seed+1, ..., seed+seeds-1`` (`seed` None: the preset's)."""
    from genir_jax.base.options import MAX_SEED
    from genir_jax.training.presets import get_preset

    first = settings.seed if settings.seed is not None else get_preset(settings.preset).dsi.run.seed
    last = first + settings.seeds - 1
    if last > MAX_SEED:
        raise GenIRError(f"--seed {first} --seeds {settings.seeds}: the last seed {last} exceeds {MAX_SEED}")
    return list(range(first, last + 1))


def resolve_base(path_or_hub_id: str) -> str:
    """`--base`: a T5 directory, or a hub id in the local Hugging Face cache (never downloaded), with its
    tokenizer (the DSI models are trained with it)."""
    from genir_jax.checkpoints.hf import resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(path_or_hub_id)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise GenIRError(f"--base {path_or_hub_id}: {directory} has no config.json")
    if not any(os.path.isfile(os.path.join(directory, name)) for name in ("tokenizer.json", "spiece.model")):
        raise GenIRError(f"--base {path_or_hub_id}: {directory} has no tokenizer (tokenizer.json or spiece.model); "
                         "save the model with its tokenizer")
    return os.path.abspath(directory)


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Layout, Settings], dict | None]
    analysis: bool = False  # needs correct validation queries
    always: bool = False    # cheap and depends on everything before it: never skipped


# --------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------

def _print_lines(lines: list[str]) -> None:
    """A step's labelled lines, as its `genir-jax` command prints them."""
    print("\n".join(lines))


def _sinks(settings: Settings, output) -> list:
    """The metric sinks of a training step: TensorBoard event files with ``--tensorboard``."""
    from genir_jax.training.metric_sinks import metric_sinks

    return metric_sinks(output, tensorboard=settings.tensorboard)


def _prepare(layout: Layout, settings: Settings):
    from genir_jax.data.prepare import prepare_dataset, preparation_lines

    options = {"max_documents": TINY_MAX_DOCUMENTS[settings.dataset]} if settings.preset == "tiny" else {}
    if settings.docids == "naive":
        options["naive_order"] = settings.naive_order
    manifest = prepare_dataset(settings.dataset, layout.data, settings.data_dir, docids=settings.docids,
                               paper_regime=settings.paper_regime, **options)
    _print_lines(preparation_lines(manifest, layout.data))


def _pretrain(layout: Layout, settings: Settings):
    from genir_jax.training.pretrain import pretraining_summary, run_pretraining
    from genir_jax.training.reporting import training_lines

    if settings.base:
        return {"skipped_for_base": settings.base}
    tokenizer = pathlib.Path(settings.data_dir) / "t5-tokenizer" if settings.data_dir else None
    summary = run_pretraining(layout.data, layout.base, preset=settings.preset, tokenizer=tokenizer,
                              resume="if-any", sinks=_sinks(settings, layout.base), model_type=settings.model_type)
    _print_lines(training_lines(pretraining_summary(summary), layout.base))


def _train(layout: Layout, settings: Settings, output: pathlib.Path, remove: list[str] = ()) -> None:
    """One DSI model of the run (the docid scheme comes from the prepared data)."""
    from genir_jax.training.dsi import train_dsi, training_summary
    from genir_jax.training.options import RunOverrides
    from genir_jax.training.reporting import training_lines

    overrides = None if settings.seed is None else RunOverrides(seed=settings.seed)
    summary = train_dsi(layout.data, base_model(layout, settings), output, preset=settings.preset, remove=remove,
                        paper_regime=settings.paper_regime, resume="if-any", sinks=_sinks(settings, output),
                        overrides=overrides, model_type=settings.model_type)
    _print_lines(training_lines(training_summary(summary), output))


def _train_full(layout: Layout, settings: Settings):
    _train(layout, settings, layout.full)


def _evaluate_full(layout: Layout, settings: Settings):
    from genir_jax.training.evaluation import evaluate_checkpoint
    from genir_jax.training.reporting import split_label

    for split, output in (("val", layout.eval_val), ("test", layout.eval_test)):
        _print_lines(evaluate_checkpoint(layout.full, output, prepared=layout.data, split=split,
                                         model_type=settings.model_type).lines(split_label(split)))
    correct = json.loads(layout.correct_valid.read_text())
    return {"correct_validation_queries": len(correct)}


def _bm25(layout: Layout, settings: Settings):
    from genir_jax.training.evaluation import run_bm25

    _print_lines(run_bm25(layout.bm25_test, prepared=layout.data, split="test").lines("bm25, test"))


def choose_removed_documents(correct: list, val_queries: list, count: int, per_model: int, seed: int = 0
                             ) -> list[list[str]]:
    """`count` disjoint sets of `per_model` document ids: documents of correct validation queries first (their
    queries measure the encoder swap), then other validation documents if there are too few; seeded."""
    from genir_jax.docids.tokens import doc_id_of_token

    rng = np.random.default_rng(seed)
    preferred = sorted({doc_id_of_token(token) for token, _ in correct})
    others = sorted({d for q in val_queries for d in q["relevant_docs"]} - set(preferred))
    pool = [preferred[i] for i in rng.permutation(len(preferred))] + [others[i] for i in rng.permutation(len(others))]
    if len(pool) < count * per_model:
        per_model = max(1, len(pool) // count)
    return [pool[k * per_model:(k + 1) * per_model] for k in range(count)]


def _choose_removed(layout: Layout, settings: Settings):
    correct = json.loads(layout.correct_valid.read_text())
    val = json.loads(layout.queries("val").read_text())
    sets = choose_removed_documents(correct, val, settings.removed_models, settings.removed_documents)
    if not all(sets):
        raise GenIRError(f"{layout.queries('val')}: too few validation documents to remove {settings.removed_models} "
                         "sets")
    write_json(layout.removed_documents, {f"removed-{k}": docs for k, docs in enumerate(sets)}, indent=2)
    write_json(layout.missing_docs, {str(layout.removed(k)): ", ".join(docs) for k, docs in enumerate(sets)},
               indent=2)
    correct_docs = {token for token, _ in correct}
    from genir_jax.docids.tokens import docid_token
    return {"sets": len(sets), "documents_per_set": len(sets[0]),
            "with_correct_queries": [sum(docid_token(d) in correct_docs for d in docs) for docs in sets]}


def _train_removed(index: int):
    def run(layout: Layout, settings: Settings):
        sets = json.loads(layout.removed_documents.read_text())
        _train(layout, settings, layout.removed(index), remove=sets[f"removed-{index}"])
    return run


def _report(layout, settings):
    from genir_jax.paper.report import write_report

    write_report(layout, settings, seed_steps(settings) if isinstance(layout, SeedLayout) else steps(settings))


def _pooled_report(layout: Layout, settings: Settings):
    from genir_jax.paper.seeds import write_pooled_report

    write_pooled_report(layout, settings, {seed: layout.seed_layout(seed) for seed in training_seeds(settings)},
                        seed_steps(settings))


def experiment_steps(experiment, after_removed_models: bool, docids: str = "atomic",
                     model_type: str = "encoder-decoder") -> list[Step]:
    """The steps an experiment runs (its `runs`, bound to its configuration), if they belong to that phase and
    the experiment handles the run's docid scheme and model family."""
    if (experiment.after_removed_models != after_removed_models or not experiment.handles(docids)
            or not experiment.handles_family(model_type)):
        return []
    return [Step(name, functools.partial(_run_experiment, run, experiment.config), analysis=True)
            for name, run in experiment.runs.items()]


def _run_experiment(run, config, layout: Layout, settings: Settings):
    return run(layout, settings, experiment_config(config, settings))


def experiment_config(config, settings: Settings):
    """An experiment's configuration under the run's settings: reproduce's ``--stages`` replaces the stages of
    every experiment that has them."""
    if settings.stages is not None and any(field.name == "stages" for field in dataclasses.fields(config)):
        return dataclasses.replace(config, stages=settings.stages)
    return config


def steps(settings: Settings) -> list[Step]:
    """The pipeline in order: data and training, every experiment's analyses (the `experiments` registry, in
    its order), the models without some documents, the experiments that need them, the report. Experiments
    that do not handle the run's docid scheme or model family (`--model-type decoder`: no encoder, no
    cross-attention) are left out, and so are the models without some documents when no remaining experiment
    needs them."""
    from genir_jax.paper.experiments import registry

    chosen = [experiment for experiment in registry() if experiment.chosen(settings)]

    out = [
        Step("prepare", _prepare),
        Step("pretrain", _pretrain),
        Step("train-full", _train_full),
        Step("evaluate-full", _evaluate_full),
        Step("bm25", _bm25),
    ]
    out += [step for experiment in chosen
            for step in experiment_steps(experiment, False, settings.docids, settings.model_type)]
    if any(experiment.after_removed_models for experiment in chosen):
        out.append(Step("choose-removed", _choose_removed, analysis=True))
        out += [Step(f"train-removed-{k}", _train_removed(k), analysis=True) for k in range(settings.removed_models)]
    out += [step for experiment in chosen
            for step in experiment_steps(experiment, True, settings.docids, settings.model_type)]
    out.append(Step("report", _report, always=True))
    return out


def seed_steps(settings: Settings) -> list[Step]:
    """The steps every seed of a multi-seed run runs in its folder: all but `SHARED_STEPS` (its report
    included)."""
    return [step for step in steps(settings) if step.name not in SHARED_STEPS]


def run_steps(settings: Settings) -> list[tuple[str, Step]]:
    """Every step of the run in order, each with the folder (relative to the run's root; "" for the root) whose
    ``.steps/`` records it: one seed, the pipeline (`steps`); several, the shared steps, each seed's steps in
    ``seed-<s>``, then the pooled report."""
    if settings.seeds == 1:
        return [("", step) for step in steps(settings)]
    shared = [("", step) for step in steps(settings) if step.name in SHARED_STEPS]
    seeded = [(f"seed-{seed}", step) for seed in training_seeds(settings) for step in seed_steps(settings)]
    return shared + seeded + [("", Step("report", _pooled_report, always=True))]


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------

def reproduce(out: str | os.PathLike, settings: Settings, force: tuple[str, ...] = (), log=print, *,
              overwrite: bool = False) -> Layout:
    """Run every unfinished (or forced) step; returns the layout of `out`. A reproduction with other settings
    in `out` is refused, or with `overwrite` removed first (all of it: no file of it stays beside this one)."""
    if settings.dataset not in DATASETS:
        raise GenIRError(f"unknown dataset {settings.dataset!r}; choose one of {', '.join(DATASETS)}")
    check_model_type(settings)
    layout = Layout(pathlib.Path(out))
    seeds = training_seeds(settings)
    pipeline = steps(settings)
    known = {step.name for step in pipeline}
    unknown = sorted(set(force) - known)
    if unknown:
        raise GenIRError(f"--force: unknown step(s) {unknown}; steps are: {', '.join(s.name for s in pipeline)}")
    if settings.seeds > 1:
        pipeline = [step for folder, step in run_steps(settings) if not folder]  # the root's: shared, report
    if overwrite and settings_differences(layout, settings):
        from genir_jax.base.io import remove_path

        for entry in layout.root.iterdir():
            remove_path(entry)
    check_same_settings(layout, settings)
    fresh = step_record(layout, "settings") is None
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json(layout.steps / "settings.json", settings.record, indent=2)
    try:
        if settings.seeds == 1:
            return _run_steps(layout, settings, pipeline, force, log)
        return _run_seeds(layout, settings, seeds, force, log)
    except BaseException:
        if fresh and not any(step_record(layout, step.name) for step in pipeline):
            (layout.steps / "settings.json").unlink(missing_ok=True)  # nothing done: the folder is not bound
        raise


def default_out(settings: Settings) -> str:
    """The default output folder: ``runs/<dataset>-<preset>``, plus the docid scheme when it is not atomic,
    ``-decoder`` for decoder-only models and ``-paper-regime`` in the paper's data regime, so runs with other
    settings never share a folder."""
    name = f"runs/{settings.dataset}-{settings.preset}"
    if settings.docids != "atomic":
        name += f"-{settings.docids}"
    if settings.model_type == "decoder":
        name += "-decoder"
    return name + ("-paper-regime" if settings.paper_regime else "")


def check_model_type(settings: Settings) -> None:
    """Refuse, in one line, a model family the run cannot take: an unknown one; decoder-only models with a
    preset that has no decoder-only settings (`Preset.decoder_model`, `decoder_pretrain`, `decoder_dsi`; none
    needed for the model with `--base`), with naive / semantic docids (the analyses take atomic docids only on
    decoder-only models: their inputs refuse docid sequences), or with an opt-in experiment that does not run on
    them (its reason from `genir_jax.analysis.applicability`)."""
    from genir_jax.base.options import MODEL_TYPES

    if settings.model_type not in MODEL_TYPES:
        raise GenIRError(f"--model-type {settings.model_type!r}: choose one of {', '.join(MODEL_TYPES)}")
    if settings.base is not None:
        from genir_jax.checkpoints.hf import checkpoint_is_decoder_only

        if checkpoint_is_decoder_only(settings.base) != (settings.model_type == "decoder"):
            family = "a decoder-only model" if settings.model_type == "encoder-decoder" else "not decoder-only (a T5)"
            raise GenIRError(f"--base {settings.base} is {family}; --model-type {settings.model_type} needs "
                             + ("a T5" if settings.model_type == "encoder-decoder" else "a GPT-2 / Llama / Qwen2 base"))
    if settings.model_type != "decoder":
        return
    from genir_jax.training.presets import PRESETS, get_preset

    preset = get_preset(settings.preset)
    if preset.decoder_dsi is None or (settings.base is None and preset.decoder_model is None):
        usable = ", ".join(name for name, p in PRESETS.items() if p.decoder_dsi and p.decoder_model)
        raise GenIRError(f"--preset {settings.preset} has no settings for decoder-only models (--model-type "
                         f"decoder); choose one of {usable}")
    if settings.docids != "atomic":
        raise GenIRError(f"--docids {settings.docids} with --model-type decoder: the analyses of decoder-only models "
                         "take atomic docids only (their inputs refuse docid sequences); use --docids atomic")
    from genir_jax.paper.experiments import registry

    for experiment in registry():
        if experiment.opt_in and getattr(settings, experiment.opt_in, False) and \
                not experiment.handles_family(settings.model_type):
            reasons = "; ".join(f"{name}: {reason}" for name, reason in experiment.family_reasons())
            raise GenIRError(f"{experiment.opt_in_flag} with --model-type decoder: {reasons or 'not applicable'}")


def settings_differences(layout: Layout, settings: Settings) -> list[str]:
    """``name: there -> here`` for each setting in which the reproduction in `layout` differs from `settings`
    (empty when the folder holds no reproduction yet, or the same one)."""
    started = step_record(layout, "settings")
    if started is None:
        return []
    # directories from before these settings existed (naive ids were numbered in corpus order then)
    defaults = {"docids": "atomic", "paper_regime": False, "stages": None, "naive_order": "corpus",
                "model_type": "encoder-decoder", **SEED_DEFAULTS}
    here = settings.record | {name: getattr(settings, name) for name in SEED_DEFAULTS}  # the seeds: either way
    return [f"{name}: {started.get(name, defaults.get(name))!r} there, {value!r} here"
            for name, value in here.items() if started.get(name, defaults.get(name)) != value]


def check_same_settings(layout: Layout, settings: Settings) -> None:
    """Refuse a folder that holds a reproduction with other settings, naming each difference."""
    differences = settings_differences(layout, settings)
    if differences:
        raise GenIRError(f"{layout.root} holds a reproduction with other settings ({'; '.join(differences)}); "
                         "choose another --out (the default folder names the dataset, preset, docid scheme, "
                         "model family and regime), or pass --overwrite to replace it")


def _run_steps(layout: Layout, settings: Settings, pipeline: list[Step], force: tuple[str, ...], log) -> Layout:
    _raise_failed(_run_pipeline(layout, settings, pipeline, force, log))
    return layout


def _raise_failed(failed: list[str]) -> None:
    if failed:
        raise GenIRError(f"analysis step(s) failed: {', '.join(failed)}; fix the cause and re-run (finished steps "
                         "are skipped)")


def _run_seeds(layout: Layout, settings: Settings, seeds: list[int], force: tuple[str, ...], log) -> Layout:
    """A multi-seed run: the shared steps in the root, every seed's steps in its folder (bound to the run's
    settings and its seed), then the pooled report; failed analyses of every seed are named at the end."""
    root = [step for folder, step in run_steps(settings) if not folder]
    failed = _run_pipeline(layout, settings, [step for step in root if step.name in SHARED_STEPS], force, log)
    for seed in seeds:
        seeded, seed_settings = layout.seed_layout(seed), dataclasses.replace(settings, seed=seed)
        seeded.root.mkdir(parents=True, exist_ok=True)
        write_json(seeded.steps / "settings.json", seed_settings.record, indent=2)
        seed_log = functools.partial(_prefixed, log, f"seed-{seed} ")
        failed += [f"seed-{seed}/{name}"
                   for name in _run_pipeline(seeded, seed_settings, seed_steps(settings), force, seed_log)]
    failed += _run_pipeline(layout, settings, [step for step in root if step.name not in SHARED_STEPS], force, log)
    _raise_failed(failed)
    return layout


def _prefixed(log, prefix: str, message: str) -> None:
    log(prefix + message)


def _run_pipeline(layout: Layout, settings: Settings, pipeline: list[Step], force: tuple[str, ...], log
                  ) -> list[str]:
    """Run the unfinished (or forced) steps of `pipeline` in `layout`; returns the analyses that failed."""
    failed: list[str] = []
    for index, step in enumerate(pipeline, start=1):
        record = step_record(layout, step.name)
        if record and step.name not in force and not step.always:
            log(f"[{index}/{len(pipeline)}] {step.name}: done ({record.get('seconds', 0):.0f} s), skipped")
            continue
        if step.analysis and _no_correct_queries(layout):
            write_json(layout.steps / f"{step.name}.json",
                       {"skipped": "the full model ranks no validation query correctly", "seconds": 0}, indent=2)
            log(f"[{index}/{len(pipeline)}] {step.name}: skipped (no correct validation queries)")
            continue
        log(f"[{index}/{len(pipeline)}] {step.name} ...")
        start = time.time()
        try:
            details = step.run(layout, settings) or {}
        except Exception as error:  # noqa: BLE001 - analyses only; everything else is re-raised
            if not step.analysis or step.name.startswith(("choose-", "train-")):
                raise
            # One failed analysis must not cost the hours of training after it: note it, go on, fail at the end.
            failed.append(step.name)
            log(f"[{index}/{len(pipeline)}] {step.name}: FAILED ({error}); continuing")
            continue
        finally:
            release_compiled_programs()
        seconds = time.time() - start
        _record_step(layout, step, seconds, details)
        log(f"[{index}/{len(pipeline)}] {step.name}: finished in {seconds:.0f} s")
    return failed


def _record_step(layout: Layout, step: Step, seconds: float, details: dict) -> None:
    """``.steps/<step>.json``: how long a finished step took, when it finished, and what it returned."""
    write_json(layout.steps / f"{step.name}.json",
               {"seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **details}, indent=2)


def release_compiled_programs() -> None:
    """Drop JAX's compiled programs between steps: no step reuses another's programs, and on the CPU every
    compiled kernel holds about three memory mappings until its program is dropped, so a long pipeline in one
    process would otherwise creep towards Linux's limit of 65,530 mappings (vm.max_map_count), where the
    compiler's next mmap fails with a segmentation fault."""
    import gc

    import jax

    from genir_jax.base.program_cache import forget_loaded_programs

    jax.clear_caches()
    forget_loaded_programs()  # the program cache's executables of this process (their files stay)
    gc.collect()


def _no_correct_queries(layout: Layout) -> bool:
    return layout.correct_valid.is_file() and not json.loads(layout.correct_valid.read_text())


def run_experiment(out: str | os.PathLike, experiment_id: str, *, progress: bool = True, log=print) -> Layout:
    """Run one experiment's steps (`genir_jax.paper.experiments`) again on a finished reproduction `out`, with
    the settings it was made with (``.steps/settings.json``), recording each step as the pipeline does (in every
    seed's folder of a multi-seed run)."""
    from genir_jax.paper.experiments import registry

    layout = Layout(pathlib.Path(out))
    record = step_record(layout, "settings")
    if record is None:
        raise GenIRError(f"{layout.root}: not a reproduction directory (no .steps/settings.json); run genir-jax "
                         "reproduce first")
    known = {field.name for field in dataclasses.fields(Settings)}
    settings = Settings(**{key: value for key, value in record.items() if key in known}, progress=progress)
    found = {experiment.id: experiment for experiment in registry()}
    if experiment_id not in found:
        raise GenIRError(f"unknown experiment {experiment_id!r}; experiments are: {', '.join(found)}")
    experiment = found[experiment_id]
    if not experiment.handles(settings.docids):
        raise GenIRError(f"experiment {experiment_id!r} handles {' and '.join(experiment.docids)} docids; "
                         f"{layout.root} trains {settings.docids} docids")
    if not experiment.handles_family(settings.model_type):
        reasons = "; ".join(f"{name}: {reason}" for name, reason in experiment.family_reasons())
        raise GenIRError(f"experiment {experiment_id!r} does not run on the {settings.model_type} models of "
                         f"{layout.root}" + (f" ({reasons})" if reasons else ""))
    targets = [(layout, settings, "")] if settings.seeds == 1 else [  # a multi-seed run: in every seed's folder
        (layout.seed_layout(seed), dataclasses.replace(settings, seed=seed), f"seed-{seed} ")
        for seed in training_seeds(settings)]
    for target, target_settings, prefix in targets:
        for step in (experiment_steps(experiment, False, settings.docids, settings.model_type)
                     + experiment_steps(experiment, True, settings.docids, settings.model_type)):
            log(f"{prefix}{step.name} ...")
            start = time.time()
            try:
                details = step.run(target, target_settings) or {}
            finally:
                release_compiled_programs()
            seconds = time.time() - start
            _record_step(target, step, seconds, details)
            log(f"{prefix}{step.name}: finished in {seconds:.0f} s")
    return layout
