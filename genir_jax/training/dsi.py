"""DSI fine-tuning: prepared data -> docid tokens -> indexing + retrieval training -> best model -> HF export.

Steps (as the reference's preprocess.py + train.py, in JAX):

1. Add one ``@DOC_ID_<id>@`` token per document of the corpus (removed documents too, as the reference
   adds every docid before dropping training examples) and resize the embeddings
   (`genir_jax.docids.tokens.add_docid_tokens`, seeded; transformers' mean resizing or random rows, see
   `with_docids`).
2. Build the examples with `genir_jax.data.dsi.build_dsi_examples` (ratio, ``--remove``) and tokenize the
   indexing examples to `index_max_length` and the queries to `query_max_length` tokens
   (`tokenize_examples`); the two kinds form two batch groups, each padded to its own maximum length
   (one compiled step per distinct length).
3. Train (`genir_jax.training.trainer.train_loop`): target = the docid token, one decoder step.
4. Validate on (at most `max_val_queries` of) the validation queries with `genir_jax.docids.retrieval`
   (Hits@1, Hits@10, ... from trec_eval), keep the parameters with the best Hits@1.
5. Export the best model with its tokenizer (docid tokens included) as a Hugging Face directory and
   score it on the full validation and test splits.

Naive and semantic docids (`genir_jax.docids.schemes`): step 1 adds no tokens (the docids are ordinary
tokens; each is checked to survive the tokenizer before anything is written); the targets are the docid
token sequences ending with EOS; validation ranks by trie-constrained beam search (10 beams,
`genir_jax.docids.retrieval.rank_docid_sequences`). The scheme and its docids are written to ``docids.json`` in
the export (atomic models get ``{"scheme": "atomic"}``), where ``evaluate`` and the analyses read it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import jax
import numpy as np

from genir_jax.data.corpus import Document, Query, qrels_from_queries
from genir_jax.data.dsi import (INDEX, RETRIEVAL, DSIExample, build_dsi_examples, examples_fingerprint,
                                tokenize_examples, tokenize_queries)
from genir_jax.docids.schemes import DOCIDS_FILE, DocidScheme, docid_trie, write_scheme
from genir_jax.docids.tokens import add_docid_tokens, docid_token_ids
from genir_jax.base.errors import ConfigError, DataError, SettingError
from genir_jax.checkpoints.hf import PretrainedModel, save_pretrained
from genir_jax.base.io import write_json
from genir_jax.base.progress import compiling_bar
from genir_jax.docids.retrieval import evaluate_run, rank_docid_sequences, rank_docids, run_from_ranking
from genir_jax.core.sites import is_decoder_only
from genir_jax.scale.partitioning import fetch
from genir_jax.training.batching import ArraySource
from genir_jax.training.decoder_dsi import check_model_type, encode_examples, encode_prompts, load_model_of_type
from genir_jax.training.presets import DSISettings
from genir_jax.training.trainer import RunSpec, train_loop

if TYPE_CHECKING:
    from genir_jax.training.options import RunOverrides

SUMMARY_FILE = "train.json"
BEST_METRIC = "Hits@1"


def with_docids(base: PretrainedModel, documents: Sequence[Document], *, seed: int,
                dropout_rate: float | None = None, docid_init: str = "mean") -> PretrainedModel:
    """`base` with a docid token per document (embeddings resized) and the fine-tuning dropout rate.

    ``docid_init="mean"`` initialises the new rows as transformers does (the mean of the old rows plus
    1e-9-scaled noise: all docids start almost equal); ``"random"`` draws them like fresh T5 embeddings
    (normal, std `initializer_factor`). With tied embeddings and nearly equal docid rows, the gradient into
    the network is nearly zero until those rows drift apart, so a model with weak pre-training sits on the
    uniform-docid plateau for epochs; random rows let it learn from the first step.
    """
    if docid_init not in ("mean", "random"):
        raise ConfigError(f"docid_init must be 'mean' or 'random', got {docid_init!r}")
    model = add_docid_tokens(base, [doc.id for doc in documents], seed=seed, mean_resizing=docid_init == "mean")
    if dropout_rate is not None and not is_decoder_only(model.config):  # decoder-only models have no dropout
        model = model.replace(config=model.config.replace(dropout_rate=dropout_rate))
    return model


def _group(tokenized, width: int) -> dict[str, np.ndarray]:
    """Batch arrays of one kind, padded to `width` columns (equal widths share one compiled step)."""
    labels = np.asarray(tokenized.labels, dtype=np.int32)
    pad = ((0, 0), (0, max(0, width - tokenized.input_ids.shape[1])))
    if labels.ndim == 2:  # docid token sequences (naive / semantic)
        targets, target_mask = labels, np.asarray(tokenized.label_mask, dtype=np.int32)
    else:
        targets, target_mask = labels[:, None], np.ones((len(labels), 1), dtype=np.int32)
    return {"input_ids": np.pad(np.asarray(tokenized.input_ids, dtype=np.int32), pad),
            "attention_mask": np.pad(np.asarray(tokenized.attention_mask, dtype=np.int32), pad),
            "targets": targets, "target_mask": target_mask}


class TokenizingSource:
    """DSI training examples tokenized on demand, row by row (a `DataSource`), for multi-process runs: each
    process tokenizes only the rows of the batches its devices hold, and keeps them for later epochs. Its
    rows equal those of `dsi_source`'s eagerly tokenized arrays; its fingerprint is a hash of the examples,
    the tokenizer and the lengths (the same in every process, computed without tokenizing)."""

    def __init__(self, groups: Sequence[tuple[Sequence[DSIExample], int]], tokenizer, docid_sequences=None):
        self.groups = [(list(examples), int(max_length)) for examples, max_length in groups]
        self.group_sizes = tuple(len(examples) for examples, _ in self.groups)
        self.tokenizer = tokenizer
        self.docid_sequences = docid_sequences
        self._rows: list[dict[int, dict[str, np.ndarray]]] = [{} for _ in self.groups]
        self._fingerprint: str | None = None

    def batch(self, group: int, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        examples, max_length = self.groups[group]
        known = self._rows[group]
        missing = [int(i) for i in dict.fromkeys(np.asarray(indices).tolist()) if int(i) not in known]
        if missing:
            tokenized = _group(tokenize_examples([examples[i] for i in missing], self.tokenizer, max_length,
                                                 progress=False, docid_sequences=self.docid_sequences), max_length)
            for position, index in enumerate(missing):
                known[index] = {name: array[position] for name, array in tokenized.items()}
        return {name: np.stack([known[int(i)][name] for i in indices]) for name in
                ("input_ids", "attention_mask", "targets", "target_mask")}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = examples_fingerprint(
                [(examples, max_length) for examples, max_length in self.groups], self.tokenizer,
                self.docid_sequences)
        return self._fingerprint


def dsi_source(documents: Sequence[Document], train_queries: Sequence[Query], tokenizer, settings: DSISettings,
               *, remove: Iterable[str] | str = (), cache_dir: str | None = None,
               progress: bool = True, docid_sequences=None, on_demand: bool | None = None, encode=None):
    """Training batches (group 0: indexing, group 1: retrieval) and their counts; `docid_sequences`
    (``{doc id: token ids ending with EOS}``) for naive / semantic docids; `encode(examples, tokenizer,
    max_length) -> batch group` instead of T5's tokenization (`genir_jax.training.decoder_dsi.encode_examples`,
    always up front).

    `on_demand` (default: when several processes train together): a `TokenizingSource` that tokenizes
    each batch's rows when asked for them (each process only its share), instead of an `ArraySource`
    tokenized up front (whose statistics include the longest example of each kind)."""
    examples = build_dsi_examples(documents, train_queries, ratio=settings.ratio, remove=remove)
    if on_demand is None:
        on_demand = jax.process_count() > 1 and encode is None
    groups, stats, lazy = [], {}, []
    for kind, max_length in ((INDEX, settings.index_max_length), (RETRIEVAL, settings.query_max_length)):
        selected = [e for e in examples if e.kind == kind]
        stats[f"{kind}_examples"] = len(selected)
        if selected and on_demand:
            lazy.append((selected, max_length))
        elif selected and encode is not None:
            groups.append(encode(selected, tokenizer, max_length))
            stats[f"{kind}_longest"] = int(groups[-1]["attention_mask"].sum(axis=1).max())
        elif selected:
            tokenized = tokenize_examples(selected, tokenizer, max_length, cache_dir=cache_dir, progress=progress,
                                          docid_sequences=docid_sequences)
            groups.append(_group(tokenized, max_length))
            stats[f"{kind}_longest"] = int(tokenized.attention_mask.sum(axis=1).max())
    if not groups and not lazy:
        raise DataError("no DSI training examples (every document removed?)")
    if on_demand:
        return TokenizingSource(lazy, tokenizer, docid_sequences), stats
    return ArraySource(groups), stats


def retrieval_evaluator(config, tokenizer, queries: Sequence[Query], doc_ids: Sequence[str], max_length: int,
                        *, batch_size: int = 256, progress: bool = False):
    """``params -> {"Hits@1", "Hits@10", "Recall@5", "MRR@10", "nDCG@10", "queries"}`` on `queries` (a
    decoder-only `config`: the queries as `genir_jax.training.decoder_dsi.encode_prompts` prompts)."""
    if is_decoder_only(config):
        input_ids, attention_mask = encode_prompts(queries, tokenizer, max_length)
    else:
        input_ids, attention_mask = tokenize_queries(queries, tokenizer, max_length)
    token_ids = docid_token_ids(tokenizer, doc_ids)
    qrels = qrels_from_queries(queries)
    query_ids = [q.id for q in queries]
    doc_ids = list(doc_ids)

    def evaluate(params) -> dict:
        indices, scores = rank_docids(config, params, input_ids, attention_mask, token_ids, k=min(100, len(doc_ids)),
                                      batch_size=batch_size, progress=progress)
        return evaluate_run(run_from_ranking(query_ids, doc_ids, indices, scores), qrels)

    return evaluate


def sequence_retrieval_evaluator(config, tokenizer, queries: Sequence[Query], doc_ids: Sequence[str], trie,
                                 max_length: int, *, num_beams: int = 10, batch_size: int = 32,
                                 progress: bool = False):
    """As `retrieval_evaluator` for naive / semantic docids: trie-constrained beam search (`num_beams`); a
    decoder-only `config` decodes after the queries' prompts (`encode_prompts`)."""
    if is_decoder_only(config):
        input_ids, attention_mask = encode_prompts(queries, tokenizer, max_length)
    else:
        input_ids, attention_mask = tokenize_queries(queries, tokenizer, max_length)
    qrels = qrels_from_queries(queries)
    query_ids = [q.id for q in queries]
    doc_ids = list(doc_ids)
    beams = min(num_beams, len(doc_ids))

    def evaluate(params) -> dict:
        indices, scores, _ = rank_docid_sequences(config, params, input_ids, attention_mask, trie, num_beams=beams,
                                                  batch_size=batch_size, progress=progress)
        return evaluate_run(run_from_ranking(query_ids, doc_ids, indices, scores), qrels)

    return evaluate


def finetune(base: PretrainedModel, documents: Sequence[Document], splits: Mapping[str, Sequence[Query]],
             settings: DSISettings, run: RunSpec, out_dir: str, *, remove: Iterable[str] | str = (),
             resume: bool = False, progress: bool = True, devices=None, cache_dir: str | None = None,
             extra_summary: dict | None = None, scheme: DocidScheme | None = None, sinks: Sequence = ()) -> dict:
    """Fine-tune `base` into a DSI model on a prepared corpus and export the best one to `out_dir`.

    `splits` holds ``train`` and ``val`` queries (``test`` optional). Returns the summary also written to
    ``out_dir/train.json``: data counts, the validation curve, the best step, final val/test metrics and
    the training throughput. `scheme`: the docid scheme (default atomic; see the module docstring); `sinks`:
    more receivers of the metrics records (`genir_jax.training.metric_sinks`).
    """
    started = time.perf_counter()
    for name in ("train", "val"):
        if not splits.get(name):
            raise DataError(f"DSI training needs {name} queries (the prepared directory has none)")
    scheme = scheme or DocidScheme("atomic")
    doc_ids = [doc.id for doc in documents]
    decoder = is_decoder_only(base.config)
    if scheme.multi_token:
        trie = docid_trie(scheme, base.tokenizer, doc_ids, scheme.source or scheme.name, decoder_only=decoder)
        model = base if settings.dropout_rate is None or decoder else base.replace(
            config=base.config.replace(dropout_rate=settings.dropout_rate))
        sequences = dict(zip(doc_ids, (list(s) for s in trie.docids)))

        def make_evaluator(queries):
            return sequence_retrieval_evaluator(model.config, model.tokenizer, queries, doc_ids, trie,
                                                settings.query_max_length)
    else:
        model = with_docids(base, documents, seed=run.seed, dropout_rate=settings.dropout_rate,
                            docid_init=settings.docid_init)
        sequences = None

        def make_evaluator(queries):
            return retrieval_evaluator(model.config, model.tokenizer, queries, doc_ids, settings.query_max_length)
    source, stats = dsi_source(documents, splits["train"], model.tokenizer, settings, remove=remove,
                               cache_dir=cache_dir, progress=progress, docid_sequences=sequences,
                               encode=functools.partial(encode_examples, docid_sequences=sequences) if decoder
                               else None)
    val_queries = list(splits["val"])[:settings.max_val_queries]
    evaluate = make_evaluator(val_queries)
    result = train_loop(model.config, model.params, source, run, out_dir, evaluate=evaluate,
                        best_metric=BEST_METRIC, best_mode="max", resume=resume, progress=progress,
                        devices=devices, description="train", sinks=sinks)
    params = fetch(result.params)  # host copies (gathered from every process of a multi-process run)
    recorded = scheme if not scheme.multi_token else dataclasses.replace(
        scheme, docids={d: scheme.docids[d] for d in doc_ids})
    writer = jax.process_index() == 0  # every process computes the same; process 0 writes
    if writer:
        write_scheme(os.path.join(out_dir, DOCIDS_FILE), recorded)  # before the weights: no model without it
        if decoder:
            from genir_jax.checkpoints.decoder_hf import save_decoder_only

            save_decoder_only(out_dir, model.replace(params=params, path=None))
        else:
            save_pretrained(out_dir, model.replace(params=params, path=None))
    final = {}
    for name in compiling_bar([name for name in ("val", "test") if splits.get(name)], unit="split",
                              desc="evaluating the best model", disable=not progress):
        final[name] = make_evaluator(splits[name])(params)
    summary = {
        "stage": "dsi", "docids": scheme.name, "model_type": "decoder" if decoder else "encoder-decoder",
        "data": {**stats, "documents": len(documents), "docids": len(doc_ids),
                 "docid_tokens": len(doc_ids) if not scheme.multi_token else None,
                 "longest_docid_tokens": None if sequences is None else max(len(s) for s in sequences.values()),
                 "val_queries_for_selection": len(val_queries)},
        "removed": sorted(set(_removed_list(remove))), "settings": _settings_dict(settings), "run": run.to_dict(),
        "best": result.best, "evaluations": result.evaluations, "final": final,
        "resumed_from": result.resumed_from, "train_seconds": round(result.train_seconds, 2),
        "examples_per_s": None if result.examples_per_s is None else round(result.examples_per_s, 2),
        "compile_seconds": round(result.compile_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "devices": jax.device_count() if devices is None else len(devices), "processes": jax.process_count(),
        **(extra_summary or {}),
    }
    if writer:
        write_json(os.path.join(out_dir, SUMMARY_FILE), summary, indent=2)
    return summary


def _removed_list(remove) -> list[str]:
    from genir_jax.data.dsi import parse_doc_id_list

    return list(parse_doc_id_list(remove))


def _settings_dict(settings: DSISettings) -> dict:
    data = dataclasses.asdict(settings)
    data.pop("run")
    data.pop("adamw")
    return data


def train_dsi(data: str | os.PathLike, base: str | os.PathLike, output: str | os.PathLike, *, preset: str = "cpu",
              remove: Iterable[str] | str = (), ratio: int | None = None, paper_regime: bool = False,
              docids: str | None = None, semantic_docid_mapping: str | None = None,
              overrides: "RunOverrides | None" = None, resume: str = "never", devices: int | None = None,
              progress: bool = True, sinks: Sequence = (), model_type: str = "encoder-decoder") -> dict:
    """The train step: fine-tune the base T5 in directory `base` (with its tokenizer) into a DSI model on the
    prepared directory `data` and export it to `output` (see `finetune`). `remove`: documents whose training
    examples are dropped (ids or "D1,D2"); `ratio`: indexing:retrieval example ratio (None: the preset's, 0:
    both as they are); `paper_regime`: ratio 32 and 32-token inputs; `docids`: the scheme (None: the one
    `data` was prepared for, else atomic); `resume`: one of `RESUME_MODES`; `sinks`: see `finetune`; `model_type`:
    one of `MODEL_TYPES`, "decoder" for a decoder-only base (GPT-2 / Llama / Qwen2, any docid scheme, the
    preset's `Preset.decoder_dsi` settings; see `genir_jax.training.decoder_dsi`). Returns the summary written to
    train.json. Bad settings raise `SettingError` naming the setting, bad files `GenIRError` naming the file."""
    from genir_jax.base.errors import CheckpointError
    from genir_jax.base.io import check_output_dir as check_writable
    from genir_jax.data.dsi import parse_doc_id_list
    from genir_jax.data.prepare import load_prepared, prepared_scheme, prepared_split
    from genir_jax.training.options import RunOverrides, check_output_dir, resolve_run, resume_flags, select_devices
    from genir_jax.training.presets import PAPER_RATIO, PRESETS, get_preset, is_paper_regime
    from genir_jax.training.presets import paper_regime as in_paper_regime

    output, data, base = os.fspath(output), os.fspath(data), os.fspath(base)
    decoder = check_model_type(model_type)  # refused before anything is loaded
    check_writable(output, "output")
    chosen = get_preset(preset)
    settings = chosen.dsi
    if decoder:
        if chosen.decoder_dsi is None:
            raise SettingError("{0} %s has no settings for decoder-only models ({1} decoder); choose one of %s"
                               % (chosen.name, ", ".join(n for n, p in PRESETS.items() if p.decoder_dsi)),
                               "preset", "model_type")
        settings = chosen.decoder_dsi
    run_spec = resolve_run(overrides or RunOverrides(), settings.run, settings.adamw)
    if ratio is not None:
        if ratio < 0:
            raise SettingError("{0} must be >= 0, got %s" % ratio, "ratio")
        if paper_regime and ratio != PAPER_RATIO:
            raise SettingError("{0} trains at ratio %d; it cannot go with {1} %s" % (PAPER_RATIO, ratio),
                               "paper_regime", "ratio")
        settings = dataclasses.replace(settings, ratio=ratio or None)
    if paper_regime:
        settings = in_paper_regime(settings)
    selected = select_devices(devices)
    resuming, require_checkpoint = resume_flags(resume)
    check_output_dir(output, resuming, require_checkpoint)
    documents, splits = load_prepared(data)
    for name in ("train", "val"):
        if not splits.get(name):
            raise DataError(f"{data}: no {name} queries (DSI training needs train and val queries)")
    known = {doc.id for doc in documents}
    removed = parse_doc_id_list(remove)
    unknown = [d for d in removed if d not in known]
    if unknown:
        raise SettingError("{0}: documents %s are not in %s/documents.json" % (unknown[:5], data), "remove")
    scheme = prepared_scheme(data, [doc.id for doc in documents], docids=docids,
                             semantic_docid_mapping=semantic_docid_mapping)
    model = load_model_of_type(base, model_type)
    if model.tokenizer is None:
        raise CheckpointError(f"{base}: no tokenizer files; the base model must come with its tokenizer")
    if scheme.multi_token:  # every docid must survive the tokenizer before anything is written
        docid_trie(scheme, model.tokenizer, [doc.id for doc in documents], scheme.source or scheme.name,
                   decoder_only=decoder)
    return finetune(model, documents, splits, settings, run_spec, output, remove=removed, resume=resuming,
                    progress=progress, devices=selected, scheme=scheme, sinks=sinks,
                    extra_summary={"preset": chosen.name, "data_dir": os.path.abspath(data),
                                   "base": os.path.abspath(base),
                                   "regime": "paper" if is_paper_regime(settings) else "preset",
                                   "data_split": prepared_split(data)})


def training_summary(summary: dict) -> dict:
    """The part of a DSI training summary that `genir-jax train` (and `reproduce`) print."""
    return {key: summary[key] for key in ("docids", "best", "final", "examples_per_s", "train_seconds",
                                          "wall_seconds")}
