"""The evaluation steps of the pipeline as library calls: `evaluate_checkpoint` (a DSI model's retrieval metrics,
TREC run and correct_<name>.json) and `run_bm25` (the BM25 baseline on the same queries).

Both read queries, qrels and documents from a prepared directory (``prepared`` and ``split``) or from explicit
files, write their outputs into one directory at once (`genir_jax.base.io.atomic_directory`) and return an
`EvaluationResult`. Bad settings raise `SettingError` naming the setting (``k``, ``num_beams``, ...), so the
`genir-jax evaluate` / `bm25` commands can name their flags instead; bad files raise `GenIRError` naming the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

from genir_jax.base.errors import CheckpointError, SettingError
from genir_jax.base.io import check_output_dir, write_json


@dataclasses.dataclass(frozen=True)
class EvaluationResult:
    """What an evaluation step wrote into `output`: `report` is metrics.json, `files` the names written."""

    output: str
    report: dict[str, Any]
    files: tuple[str, ...]
    correct: list | None = None  # correct_<name>.json (DSI evaluation only)

    @property
    def metrics(self) -> dict[str, float]:
        return self.report["metrics"]

    def printed(self) -> dict[str, Any]:
        """The summary the commands print: the metrics (and beam search's decoding throughput)."""
        decoding = self.report.get("decoding")
        return {**self.metrics, "queries_per_s": decoding["queries_per_s"]} if decoding else dict(self.metrics)

    def lines(self, label: str) -> list[str]:
        """The summary for people: ``<label>: Hits@1 12.34 ... (n=86 queries)`` and where the outputs went."""
        from genir_jax.training.reporting import metrics_line

        return [metrics_line(label, self.printed()), f"outputs: {self.output}"]


def evaluation_inputs(*, prepared: str | os.PathLike | None = None, split: str = "test",
                      documents: str | os.PathLike | None = None, queries: str | os.PathLike | None = None,
                      qrels: str | os.PathLike | None = None, need_documents: bool = True
                      ) -> tuple[str | None, str, str | None]:
    """(documents, queries, qrels) paths: those of `split` in the prepared directory `prepared` (explicit
    `queries` / `qrels` win; no qrels file: None, the queries' relevant_docs judge), else the explicit files."""
    from genir_jax.data.prepare import DOCUMENTS_FILE, qrels_file, queries_file

    documents = None if documents is None else os.fspath(documents)
    queries = None if queries is None else os.fspath(queries)
    qrels = None if qrels is None else os.fspath(qrels)
    if prepared is not None:
        prepared = os.fspath(prepared)
        queries_path = queries or os.path.join(prepared, queries_file(split))
        qrels_path = qrels or os.path.join(prepared, qrels_file(split))
        if qrels is None and not os.path.isfile(qrels_path):
            qrels_path = None
        return os.path.join(prepared, DOCUMENTS_FILE), queries_path, qrels_path
    if not queries or (need_documents and not documents):
        if need_documents:
            raise SettingError("give {0} DIR (and {1}), or the input files explicitly ({2} and {3})",
                               "prepared", "split", "documents", "queries")
        raise SettingError("give {0} DIR (and {1}), or the input files explicitly ({2})", "prepared", "split",
                           "queries")
    return documents, queries, qrels


def _read_judged_queries(queries_path: str, qrels_path: str | None, documents=None):
    """Queries, their qrels (the file, else relevant_docs) and the qrels' source, checked to cover each other."""
    from genir_jax.data.corpus import qrels_from_queries, read_qrels, read_queries
    from genir_jax.docids.retrieval import check_run_covers

    queries = read_queries(queries_path, documents) if documents is not None else read_queries(queries_path)
    qrels = read_qrels(qrels_path) if qrels_path else qrels_from_queries(queries)
    source = qrels_path or queries_path
    check_run_covers([q.id for q in queries], qrels, source)
    return queries, qrels, source


def check_bm25_settings(k: int, k1: float, b: float) -> None:
    """k >= 1, k1 finite and >= 0, b finite in [0, 1] (`SettingError` naming the setting)."""
    if k < 1:
        raise SettingError("{0} must be >= 1, got %s" % k, "k")
    if not math.isfinite(k1) or k1 < 0:
        raise SettingError("{0} must be a finite number >= 0, got %s" % k1, "k1")
    if not math.isfinite(b) or not 0 <= b <= 1:
        raise SettingError("{0} must be a number in [0, 1], got %s" % b, "b")


def run_bm25(output: str | os.PathLike, *, prepared: str | os.PathLike | None = None, split: str = "test",
             documents: str | os.PathLike | None = None, queries: str | os.PathLike | None = None,
             qrels: str | os.PathLike | None = None, k: int = 100, k1: float = 1.5, b: float = 0.75
             ) -> EvaluationResult:
    """The bm25 step: index the documents with BM25 (bm25s), retrieve the top `k` for every query of `split`
    (or of the files given) and write metrics.json and run.trec into `output`."""
    from genir_jax.base.io import atomic_directory
    from genir_jax.data.corpus import read_documents
    from genir_jax.docids.bm25 import bm25_run
    from genir_jax.docids.retrieval import evaluate_run, write_trec_run

    output = os.fspath(output)
    check_output_dir(output, "output")
    check_bm25_settings(k, k1, b)
    documents_path, queries_path, qrels_path = evaluation_inputs(prepared=prepared, split=split,
                                                                 documents=documents, queries=queries, qrels=qrels)
    corpus = read_documents(documents_path)
    judged, qrels_, _ = _read_judged_queries(queries_path, qrels_path, corpus)
    ranking = bm25_run(corpus, judged, k=k, k1=k1, b=b, source=documents_path)
    metrics = evaluate_run(ranking, qrels_)
    report = {"system": "bm25", "metrics": metrics, "documents": documents_path, "queries": queries_path,
              "qrels": qrels_path, "k": k, "k1": k1, "b": b}
    with atomic_directory(output) as staging:
        write_json(os.path.join(staging, "metrics.json"), report, indent=2, allow_nan=False)
        write_trec_run(os.path.join(staging, "run.trec"), ranking, "bm25")
    return EvaluationResult(output, report, ("metrics.json", "run.trec"))


def check_name(name: str | None) -> None:
    """`name` becomes part of a file name (correct_<name>.json): no path separators, not empty, not . or .."""
    if name is None:
        return
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not name.strip() or name in (".", "..") or any(s in name for s in separators) or "\0" in name:
        raise SettingError("{0} must be a plain file-name part (no path separators, not empty), got %r" % (name,),
                           "name")


def evaluate_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *,
                        prepared: str | os.PathLike | None = None, split: str = "val",
                        queries: str | os.PathLike | None = None, qrels: str | os.PathLike | None = None,
                        name: str | None = None, max_length: int = 128, k: int = 100, batch_size: int | None = None,
                        dtype: str = "float32", reference_mode: bool = False, docids: str | None = None,
                        semantic_docid_mapping: str | None = None, documents: str | os.PathLike | None = None,
                        num_beams: int = 10, unconstrained: bool = False,
                        model_type: str = "encoder-decoder") -> EvaluationResult:
    """The evaluate step: rank docids with the DSI model in `checkpoint` for the queries of `split` of the
    prepared directory `prepared` (or the files `queries` / `qrels`) and write metrics.json, run.trec and
    correct_<name>.json (default name: ``valid`` for validation queries, else the split) into `output`.

    Atomic docids: the first decoder step's logits rank the docid tokens (top `k`; `reference_mode`: the
    reference eval.py's ranking over the full vocabulary without an attention mask). Naive / semantic docids
    (the checkpoint's docids.json, or `docids` with `documents` / `prepared` for a checkpoint without it):
    beam search with `num_beams` beams, constrained to the corpus's docids unless `unconstrained`.
    ``model_type="decoder"``: a decoder-only checkpoint (`genir-jax train --model-type decoder`), atomic docids
    ranked by the logits after each query's prompt, naive / semantic docids decoded after it by beam search
    (`genir_jax.training.decoder_dsi`)."""
    from genir_jax.training.decoder_dsi import check_model_type, load_model_of_type

    check_name(name)  # first: a bad name is refused before any file is looked at
    decoder = check_model_type(model_type)  # refused before anything is loaded
    if decoder and reference_mode:
        raise SettingError("{0} reproduces the reference's T5 evaluation; decoder-only models ({1} decoder) are "
                           "ranked as the reference does already (logits at the last prompt token)",
                           "reference_mode", "model_type")
    checkpoint, output = os.fspath(checkpoint), os.fspath(output)
    check_output_dir(output, "output")
    if k < 1 or (batch_size is not None and batch_size < 1) or num_beams < 1:
        raise SettingError("{0}, {1} and {2} must be >= 1", "k", "batch_size", "num_beams")
    if max_length < 1:
        raise SettingError("{0} must be >= 1, got %s" % max_length, "max_length")
    _, queries_path, qrels_path = evaluation_inputs(prepared=prepared, split=split, queries=queries, qrels=qrels,
                                                    need_documents=False)
    judged, qrels_, qrels_source = _read_judged_queries(queries_path, qrels_path)
    model = load_model_of_type(checkpoint, model_type, dtype=dtype)
    if model.tokenizer is None:
        raise CheckpointError(f"{checkpoint}: no tokenizer files; evaluation needs the tokenizer that holds the "
                              "docid tokens")
    scheme = checkpoint_docids(checkpoint, docids=docids, semantic_docid_mapping=semantic_docid_mapping,
                               prepared=prepared, documents=documents)
    if name is None:
        name = "valid" if prepared is None or split == "val" else split
    common = dict(checkpoint=checkpoint, output=output, queries=judged, qrels=qrels_, qrels_source=qrels_source,
                  queries_path=queries_path, qrels_path=qrels_path, max_length=max_length, name=name)
    if scheme.multi_token:
        if reference_mode:
            raise SettingError("{0} applies to atomic docids; naive / semantic docids are ranked by beam search "
                               "({1} for the reference's free beam search)", "reference_mode", "unconstrained")
        return _evaluate_sequences(model, scheme, batch_size=batch_size or 32, num_beams=num_beams,
                                   unconstrained=unconstrained, **common)
    if unconstrained:
        raise SettingError("{0} applies to beam search (naive / semantic docids), not atomic docids",
                           "unconstrained")
    return _evaluate_atomic(model, k=k, batch_size=batch_size or 256, reference_mode=reference_mode, **common)


def checkpoint_docids(checkpoint: str, *, docids: str | None = None, semantic_docid_mapping: str | None = None,
                      prepared: str | os.PathLike | None = None, documents: str | os.PathLike | None = None):
    """The checkpoint's recorded docid scheme; `docids` must agree with it, or name one for a checkpoint
    without it (naive / semantic then need the corpus: `prepared` or `documents`)."""
    from genir_jax.data.corpus import read_documents
    from genir_jax.data.prepare import DOCUMENTS_FILE, prepared_scheme
    from genir_jax.docids.schemes import DOCIDS_FILE, check_scheme, checkpoint_scheme, resolve_scheme

    if docids is not None:
        check_scheme(docids)
    recorded_file = os.path.join(checkpoint, DOCIDS_FILE)
    recorded = checkpoint_scheme(checkpoint)
    if os.path.isfile(recorded_file):
        if docids is not None and docids != recorded.name:
            raise SettingError("{0} %s: the checkpoint %s was trained with %s docids (%s)"
                               % (docids, checkpoint, recorded.name, recorded_file), "docids")
        if semantic_docid_mapping is not None:
            raise SettingError("{0}: the checkpoint records its docids in %s; drop the option" % recorded_file,
                               "semantic_docid_mapping")
        return recorded
    if docids in (None, "atomic"):
        return resolve_scheme("atomic", [], mapping=semantic_docid_mapping)
    corpus = documents or (os.path.join(prepared, DOCUMENTS_FILE) if prepared is not None else None)
    if corpus is None:
        raise SettingError("{0} %s: the checkpoint has no %s; give the corpus with {1} DIR or {2} FILE"
                           % (docids, DOCIDS_FILE), "docids", "prepared", "documents")
    doc_ids = [doc.id for doc in read_documents(corpus)]
    return prepared_scheme(prepared, doc_ids, docids=docids, semantic_docid_mapping=semantic_docid_mapping)


def _check_qrels_known(qrels, qrels_source, doc_ids, why: str) -> None:
    """Every relevant document of the qrels must be one the model can rank (CheckpointError naming the record)."""
    known = set(doc_ids)
    for query_id, docs in qrels.items():
        for doc_id in docs:
            if doc_id not in known:
                raise CheckpointError(f"{qrels_source}: query {query_id!r}: relevant document {doc_id!r} {why}")


def _write_outputs(output: str, checkpoint: str, report: dict, ranking, correct: list, name: str) -> tuple[str, ...]:
    from genir_jax.base.io import atomic_directory
    from genir_jax.docids.retrieval import write_trec_run

    files = ("metrics.json", "run.trec", f"correct_{name}.json")
    with atomic_directory(output) as staging:
        write_json(os.path.join(staging, files[0]), report, indent=2, allow_nan=False)
        write_trec_run(os.path.join(staging, files[1]), ranking, os.path.basename(os.path.normpath(checkpoint)))
        write_json(os.path.join(staging, files[2]), correct)
    return files


def _evaluate_atomic(model, *, checkpoint, output, queries, qrels, qrels_source, queries_path, qrels_path,
                     max_length, name, k, batch_size, reference_mode) -> EvaluationResult:
    """Rank the docid tokens from the first decoder step -> metrics.json, run.trec, correct_<name>.json."""
    import numpy as np

    from genir_jax.core.sites import is_decoder_only
    from genir_jax.data.dsi import tokenize_queries
    from genir_jax.docids.retrieval import correct_valid, evaluate_run, rank_docids, run_from_ranking
    from genir_jax.docids.tokens import docid_vocabulary

    vocabulary = docid_vocabulary(model.tokenizer)
    if not vocabulary:
        raise SettingError("%s: the tokenizer has no docid tokens (@DOC_ID_<id>@); is this a DSI checkpoint? (a "
                           "naive / semantic model without docids.json needs {0})" % checkpoint, "docids")
    token_ids = sorted(vocabulary)
    doc_ids = [vocabulary[t] for t in token_ids]
    _check_qrels_known(qrels, qrels_source, doc_ids,
                       f"has no docid token in the checkpoint {checkpoint} ({len(doc_ids)} docid tokens): the "
                       "checkpoint was trained on another corpus / vocabulary")
    if is_decoder_only(model.config):
        from genir_jax.training.decoder_dsi import encode_prompts

        input_ids, attention_mask = encode_prompts(queries, model.tokenizer, max_length)
    else:
        input_ids, attention_mask = tokenize_queries(queries, model.tokenizer, max_length,
                                                     pad_to_max_length=reference_mode)
    if reference_mode:
        attention_mask = np.ones_like(attention_mask)
    indices, scores, top_token = rank_docids(model.config, model.params, input_ids, attention_mask, token_ids,
                                             k=k, batch_size=batch_size, full_vocabulary=reference_mode,
                                             return_top_token=True)
    ranking = run_from_ranking([q.id for q in queries], doc_ids, indices, scores)
    metrics = evaluate_run(ranking, qrels)
    # correct = first docid relevant AND that docid the top token of the whole vocabulary (the analyses'
    # definition: rank 0 in the full-vocabulary ranking)
    top_is_docid = {q.id: indices.shape[1] > 0 and indices[row, 0] >= 0 and int(top_token[row]) ==
                    token_ids[int(indices[row, 0])] for row, q in enumerate(queries)}
    correct = correct_valid(ranking, qrels, top_is_docid)
    report = {
        "metrics": metrics, "correct_first": len(correct), "checkpoint": os.path.abspath(checkpoint),
        "queries": queries_path, "qrels": qrels_path, "docid_tokens": len(token_ids), "k": k,
        "max_length": max_length, "ranking": "full vocabulary, no attention mask (reference)"
        if reference_mode else "docid tokens only, masked padding"
        + (", after the prompt (decoder-only)" if is_decoder_only(model.config) else ""),
    }
    files = _write_outputs(output, checkpoint, report, ranking, correct, name)
    return EvaluationResult(output, report, files, correct)


def _evaluate_sequences(model, scheme, *, checkpoint, output, queries, qrels, qrels_source, queries_path,
                        qrels_path, max_length, name, batch_size, num_beams, unconstrained) -> EvaluationResult:
    """Beam search over naive / semantic docids -> metrics.json, run.trec, correct_<name>.json."""
    import numpy as np

    from genir_jax.core.sites import is_decoder_only
    from genir_jax.data.dsi import tokenize_queries
    from genir_jax.docids.retrieval import correct_valid, evaluate_run, rank_docid_sequences, run_from_ranking
    from genir_jax.docids.schemes import docid_trie
    from genir_jax.docids.sequence_targets import greedy_consistent

    doc_ids = list(scheme.docids)
    _check_qrels_known(qrels, qrels_source, doc_ids,
                       f"has no {scheme.name} docid in {scheme.source or checkpoint} ({len(doc_ids)} docids): "
                       "another corpus?")
    decoder = is_decoder_only(model.config)
    trie = docid_trie(scheme, model.tokenizer, doc_ids, scheme.source or checkpoint, decoder_only=decoder)
    if trie.max_token >= model.config.vocab_size:
        raise CheckpointError(f"{checkpoint}: docid token {trie.max_token} is outside the model's vocabulary")
    text_index = {scheme.text(d): i for i, d in enumerate(doc_ids)}
    separator = "_" if scheme.name == "semantic" else " "

    def lookup(tokens):  # the reference matches decoded strings (spaces become '_')
        text = model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return text_index.get(text.replace(" ", separator) if scheme.name == "semantic" else text, -1)

    if decoder:  # the reference's prompt, the docid decoded after it
        from genir_jax.training.decoder_dsi import encode_prompts

        input_ids, attention_mask = encode_prompts(queries, model.tokenizer, max_length)
    else:
        input_ids, attention_mask = tokenize_queries(queries, model.tokenizer, max_length)
    # transformers' generate default max_length (20) for free decoding, the longest docid for the trie
    decode_length = trie.max_docid_length + 1 if not unconstrained else max(20, trie.max_docid_length + 1)
    options = dict(num_beams=num_beams, constrained=not unconstrained, max_length=decode_length, lookup=lookup,
                   batch_size=batch_size)
    warm = min(batch_size, len(queries))
    started = time.perf_counter()
    rank_docid_sequences(model.config, model.params, input_ids[:warm], attention_mask[:warm], trie, progress=False,
                         **options)  # compiles (same shapes as every batch)
    compile_and_first = time.perf_counter() - started
    started = time.perf_counter()
    indices, scores, _ = rank_docid_sequences(model.config, model.params, input_ids, attention_mask, trie,
                                              **options)
    seconds = time.perf_counter() - started
    ranking = run_from_ranking([q.id for q in queries], doc_ids, indices, scores)
    metrics = evaluate_run(ranking, qrels)
    first_relevant = [row for row, q in enumerate(queries)
                      if indices.shape[1] and indices[row, 0] >= 0 and doc_ids[indices[row, 0]] in qrels.get(q.id, {})]
    greedy = {q.id: False for q in queries}
    if first_relevant:
        rows = np.asarray(first_relevant)
        consistent = greedy_consistent(model.config, model.params, input_ids[rows], attention_mask[rows],
                                       [trie.docids[int(indices[row, 0])] for row in first_relevant])
        greedy.update({queries[row].id: bool(ok) for row, ok in zip(first_relevant, consistent)})
    correct = correct_valid(ranking, qrels, greedy, docid_text=scheme.text)
    report = {
        "metrics": metrics, "correct_first": len(correct), "checkpoint": os.path.abspath(checkpoint),
        "queries": queries_path, "qrels": qrels_path, "docids": scheme.name, "documents": len(doc_ids),
        "longest_docid_tokens": trie.max_docid_length, "max_length": max_length,
        "ranking": f"beam search, {num_beams} beams, "
                   + ("unconstrained (reference)" if unconstrained else "constrained to the docid trie")
                   + (", after the prompt (decoder-only)" if decoder else ""),
        "decoding": {"queries": len(queries), "seconds": round(seconds, 3),
                     "queries_per_s": round(len(queries) / seconds, 2) if seconds > 0 else None,
                     "first_batch_with_compile_seconds": round(compile_and_first, 3), "batch_size": batch_size,
                     "num_beams": num_beams, "max_length": decode_length,
                     "beams_not_a_new_docid": int(((indices < 0) & np.isfinite(scores)).sum())},
    }
    files = _write_outputs(output, checkpoint, report, ranking, correct, name)
    return EvaluationResult(output, report, files, correct)
