"""Pre-train a "base T5" from scratch with span corruption on a corpus, and export it in HF format.

Offline there are no pretrained T5 weights, so this builds one: a fresh T5 (shape from a preset, the real
T5 vocabulary and tokenizer, vocab size padded to 32128 as T5's) trained with T5's objective on the
documents (and the training queries' text) of a prepared directory. The result is the starting point of
DSI fine-tuning, the "T5" of T5-mode patching and the pretrained encoder of encoder swaps.

Text is tokenized without EOS, concatenated and cut into chunks (`span_corruption.pack_tokens`); a
seeded set of `val_chunks` chunks is held out and scored with fixed noise (validation loss and token
accuracy), the rest is trained on with fresh noise every epoch. The parameters with the lowest validation
loss are exported.

Decoder-only models (``--model-type decoder``, a preset's `DecoderShape` and `CausalPretrainSettings`): a fresh
Llama-style model with the same T5 vocabulary (the only tokenizer available offline) trained as a causal LM,
next-token loss, on the same texts, each followed by EOS and packed into rows of `sequence_length` tokens; it is
exported as a transformers `LlamaForCausalLM` directory with the T5 tokenizer files, a `--base` for
``train --model-type decoder``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Sequence

import jax
import numpy as np

from genir_jax.data.corpus import Document, Query
from genir_jax.base.errors import CheckpointError
from genir_jax.checkpoints.decoder_hf import PretrainedDecoder, save_decoder_only
from genir_jax.checkpoints.hf import PretrainedModel, save_pretrained
from genir_jax.core import decoder_only
from genir_jax.base.io import write_json
from genir_jax.scale.partitioning import fetch
from genir_jax.core.model import init_params
from genir_jax.training.batching import fingerprint_arrays
from genir_jax.training.loop import make_eval_step
from genir_jax.training.presets import (
    T5_VOCAB_SIZE, CausalPretrainSettings, DecoderShape, ModelShape, PretrainSettings,
)
from genir_jax.training.span_corruption import SpanCorruption, pack_tokens, tokens_length_for_inputs
from genir_jax.training.trainer import RunSpec, train_loop

if TYPE_CHECKING:
    from genir_jax.training.options import RunOverrides

NUM_SENTINELS = 100
VALIDATION_NOISE_EPOCH = 2**31 - 1  # the noise seed of the held-out chunks (never a training epoch)
SUMMARY_FILE = "pretrain.json"


def sentinel_ids(tokenizer, source: str = "tokenizer") -> tuple[int, ...]:
    """Ids of ``<extra_id_0>`` ... ``<extra_id_99>`` (T5's sentinels, in the order spans use them)."""
    tokens = [f"<extra_id_{k}>" for k in range(NUM_SENTINELS)]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in zip(tokens, ids) if i is None or i == unk]
    if missing:
        raise CheckpointError(f"{source}: the tokenizer lacks T5's sentinel tokens ({', '.join(missing[:3])} ...); "
                              "span corruption needs a T5 tokenizer with 100 <extra_id_*> tokens")
    if tokenizer.pad_token_id != 0 or tokenizer.eos_token_id is None:
        raise CheckpointError(f"{source}: expected a T5 tokenizer with pad id 0 and an EOS token, got pad "
                              f"{tokenizer.pad_token_id} and eos {tokenizer.eos_token_id}")
    return tuple(int(i) for i in ids)


def base_vocab_size(tokenizer) -> int:
    """T5's 32128, or the tokenizer's length rounded up to a multiple of 128 if that is larger."""
    return max(T5_VOCAB_SIZE, -(-len(tokenizer) // 128) * 128)


def corpus_texts(documents: Sequence[Document], train_queries: Sequence[Query] = (),
                 include_queries: bool = True) -> list[str]:
    """The text pre-training reads: every document, then (optionally) every training query."""
    texts = [doc.text for doc in documents]
    if include_queries:
        texts.extend(query.text for query in train_queries)
    return texts


class SpanCorruptionSource:
    """Packed chunks as a `DataSource`: the noise of chunk i in epoch e is seeded by (seed, e, i)."""

    def __init__(self, chunks: np.ndarray, lengths: np.ndarray, corruption: SpanCorruption, seed: int):
        self.chunks, self.lengths = chunks, lengths
        self.corruption = corruption
        self.seed = int(seed)
        self.group_sizes = (len(chunks),)
        self._fingerprint = fingerprint_arrays({"chunks": chunks, "lengths": lengths},
                                               dataclasses.asdict(corruption), self.seed)

    def batch(self, group: int, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        return self.corruption.batch(self.chunks, self.lengths, indices, (self.seed, epoch))

    def fingerprint(self) -> str:
        return self._fingerprint


def held_out_rows(count: int, val_chunks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation rows, training rows) of `count` chunks: a seeded choice of at most `val_chunks`, and at most
    a quarter of the data."""
    order = np.random.default_rng([int(seed), 7]).permutation(count)
    val_count = min(val_chunks, count // 4)
    return np.sort(order[:val_count]), np.sort(order[val_count:])


def causal_lm_batch(chunks: np.ndarray, lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token batch arrays (`genir_jax.training.loop.causal_lm_loss`) of packed rows: position i predicts
    token i + 1 wherever both are real tokens (the last chunk may be short; its padding is masked)."""
    chunks = np.asarray(chunks, np.int32)
    positions = np.arange(chunks.shape[1])[None, :]
    lengths = np.asarray(lengths)[:, None]
    targets = np.concatenate([chunks[:, 1:], np.zeros((len(chunks), 1), np.int32)], axis=1)
    return {"input_ids": chunks, "attention_mask": (positions < lengths).astype(np.int32), "targets": targets,
            "target_mask": (positions < lengths - 1).astype(np.int32)}


class CausalLMSource:
    """Packed rows as a `DataSource` for causal-LM pre-training (no noise: every epoch reads the same rows)."""

    def __init__(self, chunks: np.ndarray, lengths: np.ndarray):
        self.chunks, self.lengths = chunks, lengths
        self.group_sizes = (len(chunks),)
        self._fingerprint = fingerprint_arrays({"chunks": chunks, "lengths": lengths}, "causal-lm")

    def batch(self, group: int, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        return causal_lm_batch(self.chunks[indices], self.lengths[indices])

    def fingerprint(self) -> str:
        return self._fingerprint


def build_causal_lm_data(texts: Sequence[str], tokenizer, settings: CausalPretrainSettings, seed: int
                         ) -> tuple[CausalLMSource, dict[str, np.ndarray], dict]:
    """(training source, held-out validation batch arrays, statistics) of causal-LM pre-training: every text's
    tokens then EOS, concatenated and cut into `settings.sequence_length`-token rows."""
    eos = int(tokenizer.eos_token_id)
    token_lists = [list(t) + [eos] for t in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]
    chunks, lengths = pack_tokens(token_lists, settings.sequence_length)
    val_rows, train_rows = held_out_rows(len(chunks), settings.val_chunks, seed)
    source = CausalLMSource(chunks[train_rows], lengths[train_rows])
    val = causal_lm_batch(chunks[val_rows], lengths[val_rows]) if len(val_rows) else {}
    stats = {"texts": len(texts), "tokens": int(sum(len(t) for t in token_lists)),
             "sequence_length": settings.sequence_length, "train_chunks": int(len(train_rows)),
             "val_chunks": int(len(val_rows))}
    return source, val, stats


def build_span_corruption_data(texts: Sequence[str], tokenizer, settings: PretrainSettings, seed: int,
                               batch_size: int) -> tuple[SpanCorruptionSource, dict[str, np.ndarray], dict]:
    """(training source, held-out validation batch arrays, statistics) from raw texts."""
    sentinels = sentinel_ids(tokenizer)
    tokens_length = tokens_length_for_inputs(settings.inputs_length, settings.noise_density,
                                             settings.mean_noise_span_length)
    token_lists = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    chunks, lengths = pack_tokens(token_lists, tokens_length)
    corruption = SpanCorruption(sentinels, int(tokenizer.eos_token_id), tokens_length,
                                settings.noise_density, settings.mean_noise_span_length)
    val_rows, train_rows = held_out_rows(len(chunks), settings.val_chunks, seed)
    val_count = len(val_rows)
    source = SpanCorruptionSource(chunks[train_rows], lengths[train_rows], corruption, seed)
    val = corruption.batch(chunks, lengths, val_rows, (int(seed), VALIDATION_NOISE_EPOCH)) if val_count else {}
    stats = {"texts": len(texts), "tokens": int(sum(len(t) for t in token_lists)), "tokens_length": tokens_length,
             "inputs_length": corruption.inputs_length, "targets_length": corruption.targets_length,
             "train_chunks": int(len(train_rows)), "val_chunks": int(val_count)}
    return source, val, stats


def span_corruption_evaluator(config, val: dict[str, np.ndarray], batch_size: int):
    """``params -> {"val_loss", "val_accuracy"}`` over the held-out chunks (token-weighted means; for either
    model family: the batch arrays say which tokens are scored)."""
    eval_step = make_eval_step(config)
    count = len(val["input_ids"]) if val else 0
    size = max(1, min(batch_size, count))

    def evaluate(params) -> dict:
        total = correct = tokens = 0.0
        for start in range(0, count, size):
            batch = {k: v[start:start + size] for k, v in val.items()}
            short = size - len(batch["input_ids"])
            if short:  # pad the last batch with empty rows (no target tokens, so no weight): one shape
                batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
            loss, metrics = jax.device_get(eval_step(params, batch))
            total += float(loss) * float(metrics["tokens"])
            correct += float(metrics["accuracy"]) * float(metrics["tokens"])
            tokens += float(metrics["tokens"])
        return {"val_loss": total / max(tokens, 1.0), "val_accuracy": correct / max(tokens, 1.0)}

    return evaluate


def pretrain(texts: Sequence[str], tokenizer, shape: ModelShape | DecoderShape,
             settings: PretrainSettings | CausalPretrainSettings, run: RunSpec,
             out_dir: str, *, resume: bool = False, progress: bool = True, devices=None,
             extra_summary: dict | None = None, sinks: Sequence = ()) -> dict:
    """Pre-train a fresh model on `texts` and export the best one (by validation loss) to `out_dir`: a T5 by
    span corruption (a `ModelShape`), or a decoder-only model as a causal LM (a `DecoderShape`, with
    `CausalPretrainSettings`).

    `run` is ``settings.run`` possibly with command-line overrides; `sinks`: more receivers of the metrics
    records (`genir_jax.training.metric_sinks`). Returns the summary also written to ``out_dir/pretrain.json``.
    """
    started = time.perf_counter()
    if isinstance(shape, DecoderShape):
        config = shape.config(base_vocab_size(tokenizer), eos_token_id=int(tokenizer.eos_token_id),
                              pad_token_id=tokenizer.pad_token_id)
        source, val, stats = build_causal_lm_data(texts, tokenizer, settings, run.seed)
        params = decoder_only.init_params(config, run.seed)
        objective = {"objective": "causal language modelling", "model_type": "decoder"}
        export = lambda p: save_decoder_only(out_dir, PretrainedDecoder(config, p, tokenizer))  # noqa: E731
    else:
        sentinel_ids(tokenizer)
        config = shape.config(base_vocab_size(tokenizer))
        source, val, stats = build_span_corruption_data(texts, tokenizer, settings, run.seed, run.batch_size)
        params = init_params(config, run.seed)
        objective = {"objective": "span corruption", "noise_density": settings.noise_density,
                     "mean_noise_span_length": settings.mean_noise_span_length}
        export = lambda p: save_pretrained(out_dir, PretrainedModel(config, p, tokenizer))  # noqa: E731
    evaluate = span_corruption_evaluator(config, val, run.batch_size) if val else None
    result = train_loop(config, params, source, run, out_dir, evaluate=evaluate,
                        best_metric="val_loss" if val else None, best_mode="min", resume=resume,
                        progress=progress, devices=devices, description="pretrain", sinks=sinks)
    params = fetch(result.params)  # host copies (gathered from every process of a multi-process run)
    writer = jax.process_index() == 0  # every process computes the same; process 0 writes
    if writer:
        export(params)
    summary = {
        "stage": "pretrain", **objective,
        "data": stats, "model": dataclasses.asdict(shape), "run": run.to_dict(),
        "best": result.best, "evaluations": result.evaluations, "resumed_from": result.resumed_from,
        "train_seconds": round(result.train_seconds, 2),
        "examples_per_s": None if result.examples_per_s is None else round(result.examples_per_s, 2),
        "compile_seconds": round(result.compile_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "devices": jax.device_count() if devices is None else len(devices), "processes": jax.process_count(),
        **(extra_summary or {}),
    }
    if writer:
        write_json(os.path.join(out_dir, SUMMARY_FILE), summary, indent=2)
    return summary


def run_pretraining(data: str | os.PathLike, output: str | os.PathLike, *, preset: str = "cpu",
                    tokenizer: str | os.PathLike | None = None, include_queries: bool = True,
                    overrides: "RunOverrides | None" = None, resume: str = "never", devices: int | None = None,
                    progress: bool = True, sinks: Sequence = (), model_type: str = "encoder-decoder") -> dict:
    """The pretrain step: a fresh T5 (shape from `preset`) trained by span corruption on the documents (and,
    with `include_queries` and the preset's leave, the training queries) of the prepared directory `data`
    (`model_type` "decoder": a fresh decoder-only model of the preset's `Preset.decoder_model` shape trained as
    a causal LM with its `Preset.decoder_pretrain` settings),
    the best model exported to `output` with checkpoints/, metrics.jsonl and pretrain.json. `tokenizer`: a
    T5 tokenizer directory (default: the data directory's ``t5-tokenizer``); `resume`: one of `RESUME_MODES`;
    `devices`: train on the first N local devices (None: all); `sinks`: see `pretrain`. Returns the summary written to pretrain.json.
    Bad settings raise `SettingError` naming the setting, bad files `GenIRError` naming the file."""
    from genir_jax.base.errors import SettingError
    from genir_jax.base.io import check_output_dir as check_writable
    from genir_jax.checkpoints.hf import load_tokenizer_from
    from genir_jax.data.prepare import default_data_dir, load_prepared
    from genir_jax.training.options import RunOverrides, check_output_dir, resolve_run, resume_flags, select_devices
    from genir_jax.training.decoder_dsi import check_model_type
    from genir_jax.training.presets import PRESETS, get_preset

    output, data = os.fspath(output), os.fspath(data)
    decoder = check_model_type(model_type)
    check_writable(output, "output")
    chosen = get_preset(preset)
    shape, settings = chosen.model, chosen.pretrain
    if decoder:
        if chosen.decoder_model is None or chosen.decoder_pretrain is None:
            raise SettingError("{0} %s cannot pre-train a decoder-only model ({1} decoder); choose one of %s"
                               % (chosen.name, ", ".join(n for n, p in PRESETS.items() if p.decoder_model)),
                               "preset", "model_type")
        shape, settings = chosen.decoder_model, chosen.decoder_pretrain
    run_spec = resolve_run(overrides or RunOverrides(), settings.run, settings.adamw)
    selected = select_devices(devices)
    resuming, require_checkpoint = resume_flags(resume)
    check_output_dir(output, resuming, require_checkpoint)
    tokenizer_dir = os.fspath(tokenizer) if tokenizer is not None else os.fspath(default_data_dir() / "t5-tokenizer")
    if not os.path.isdir(tokenizer_dir):
        raise SettingError(f"{tokenizer_dir}: tokenizer directory not found (pass {{0}} or set GENIR_JAX_DATA)",
                           "tokenizer")
    loaded = load_tokenizer_from(tokenizer_dir)
    if loaded is None:
        raise CheckpointError(f"{tokenizer_dir}: no tokenizer files (tokenizer.json / spiece.model)")
    if decoder:
        if loaded.eos_token_id is None:
            raise CheckpointError(f"{tokenizer_dir}: the tokenizer has no EOS token (it ends every text)")
    else:
        sentinel_ids(loaded, tokenizer_dir)
    documents, splits = load_prepared(data)
    texts = corpus_texts(documents, splits.get("train", ()),
                         include_queries=include_queries and settings.include_train_queries)
    return pretrain(texts, loaded, shape, settings, run_spec, output, resume=resuming,
                    progress=progress, devices=selected, sinks=sinks,
                    extra_summary={"preset": chosen.name, "data_dir": os.path.abspath(data),
                                   "tokenizer": os.path.abspath(tokenizer_dir)})


def pretraining_summary(summary: dict) -> dict:
    """The part of a pretraining summary that `genir-jax pretrain` (and `reproduce`) print."""
    return {key: summary[key] for key in ("best", "examples_per_s", "train_seconds", "wall_seconds")}
