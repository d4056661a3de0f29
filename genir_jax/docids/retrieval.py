"""Ranking documents with a DSI model, retrieval metrics, TREC run files and ``correct_valid.json``.

Ranking. The decoder runs one step from the start token (id 0); the docids are ranked by that step's
logits. The reference (``eval.py``) takes ``topk(100)`` over the FULL vocabulary and decodes each token:
word tokens can be in that list (a random or under-trained model puts them first; a trained one still
mixes them in further down), and they then take ranks as non-relevant entries. Our default ranks the
docid tokens only (a run lists documents); ``full_vocabulary=True`` reproduces the reference, with
non-docid tokens marked ``-1`` (they become ``NON_DOCID@<rank>`` placeholder entries in a run). The
reference's evaluation also feeds queries padded to `max_length` WITHOUT an attention mask; pass an all-ones
mask over such padding to reproduce that (``genir-jax evaluate --reference-mode`` does both).

Metrics. Hits@1, Hits@10 (trec_eval ``success``), Recall@5, MRR@10 and nDCG@10 come from trec_eval
through ir-measures' pytrec_eval provider, averaged over every query in the qrels (a query without a
result scores 0, like ``trec_eval -c``). trec_eval orders a run by score and breaks ties by docid; we
evaluate the order we ranked in (scores handed to trec_eval are made strictly decreasing along our ranks),
so Hits@1 agrees with ``correct_valid.json``. As in trec_eval, a document is relevant when its grade is
>= 1: with the reference's ``rel = 4 - position`` a query's 5th and later documents are not (the
reference's own Hits@k / Recall@5 and ``correct_valid.json`` count every listed document).

Multi-token docids (naive / semantic, `genir_jax.docids.schemes`): `rank_docid_sequences` runs
`genir_jax.docids.decoding.beam_search` (10 beams, 10 returned, the reference's settings) constrained by the trie of
the corpus's docids by default, or unconstrained as the reference's ``pipeline(..., num_beams=10)``; beams
that are no docid of the corpus become ``NON_DOCID@<rank>`` entries, as do repeats of a document.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from genir_jax.base.progress import compiling_bar

from genir_jax.base.batching import batches, num_batches
from genir_jax.core.config import T5Config
from genir_jax.docids.tokens import docid_token
from genir_jax.base.errors import CheckpointError, DataError
from genir_jax.base.io import atomic_path
from genir_jax.core import decoder_only
from genir_jax.core.model import forward
from genir_jax.core.sites import is_decoder_only, site_name

Run = dict[str, list[tuple[str, float]]]   # query id -> [(doc id, score), ...], best first
METRICS = ("Hits@1", "Hits@10", "Recall@5", "MRR@10", "nDCG@10")
MAX_CUTOFF = 10  # the largest cutoff of METRICS: runs are evaluated on their top 10 (see per_query_metrics)
NON_DOCID = "NON_DOCID@"  # run entries standing for word tokens in the reference's full-vocabulary ranking


# --------------------------------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------------------------------

def docid_step_logits(config, params, input_ids, attention_mask) -> jnp.ndarray:
    """Logits [N, V] of the step that predicts an atomic docid: T5's first decoder step (from the start token);
    a decoder-only model's (`genir_jax.core.decoder_only`) position of each row's last real token (the prompt's
    end, `decoder_only.last_positions`; rows are right- or left-padded). Only that position is unembedded (no
    [N, T, V] array: under jit the full forward's unused logits are dropped)."""
    if is_decoder_only(config):
        top = site_name("blocks", "hook_resid_post", config.num_layers - 1)  # the residual after the last layer
        _, sites = decoder_only.forward_with_cache(config, params, input_ids, attention_mask, cache_sites=[top])
        last = decoder_only.last_positions(attention_mask)
        resid = jnp.take_along_axis(sites[top], last[:, None, None], axis=1)  # [N, 1, D]
        hidden = decoder_only.forward_from_layer(config, params, resid, config.num_layers)  # the final norm only
        return decoder_only.unembed(config, params, hidden[:, 0, :])
    start = jnp.full((input_ids.shape[0], 1), config.decoder_start_token_id, dtype=jnp.int32)
    return forward(config, params, input_ids, attention_mask, start)[:, 0, :]


@functools.partial(jax.jit, static_argnames=("config", "k", "full_vocabulary"))
def _top_k_first_step(config: T5Config, params, input_ids, attention_mask, columns, k: int,
                      full_vocabulary: bool):
    logits = docid_step_logits(config, params, input_ids, attention_mask)
    top_token = jnp.argmax(logits, axis=-1)  # over the whole vocabulary (lowest id on ties)
    if not full_vocabulary:
        logits = jnp.take(logits, columns, axis=1)
    top_scores, top = jax.lax.top_k(logits, k)
    return top_scores, top, top_token


def rank_docids(config: T5Config, params, input_ids, attention_mask, docid_token_ids, k: int = 100,
                batch_size: int = 256, *, full_vocabulary: bool = False,
                progress: bool = True, return_top_token: bool = False):
    """Top-`k` docids of every query from the first decoder step's logits (a decoder-only model: the logits
    after the prompt, `docid_step_logits`).

    Returns ``(indices [N, k] into docid_token_ids, scores [N, k])``, best first (ties: lower index
    first). With ``full_vocabulary=True`` the top `k` of the whole vocabulary are returned, as the
    reference does, and entries that are not docid tokens have index -1. One jitted forward per chunk of
    `batch_size` queries (the last chunk is padded, so it compiles once). With ``return_top_token=True``
    a third array [N] holds each query's highest-scoring token over the whole vocabulary.
    """
    input_ids = np.asarray(input_ids, dtype=np.int32)
    attention_mask = np.asarray(attention_mask, dtype=np.int32)
    columns = np.asarray(docid_token_ids, dtype=np.int32).reshape(-1)
    if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be equal [N, L]")
    if columns.size == 0:
        raise CheckpointError("no docid tokens to rank")
    if columns.min() < 0 or columns.max() >= config.vocab_size:
        raise CheckpointError(f"docid token ids must lie in [0, {config.vocab_size}) (the model's vocab_size), "
                              f"got {int(columns.min())}..{int(columns.max())}")
    if len(np.unique(columns)) != columns.size:
        raise ValueError("docid_token_ids contains a token id twice")
    count = input_ids.shape[0]
    k = int(min(k, config.vocab_size if full_vocabulary else columns.size))
    if count == 0:
        empty = (np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
        return empty + (np.zeros(0, np.int64),) if return_top_token else empty
    batch_rows = max(1, min(int(batch_size), count))
    chunks = num_batches(count, batch_rows)
    indices, scores, top_tokens = [], [], []
    for batch in compiling_bar(batches((input_ids, attention_mask), batch_rows), desc="ranking", unit="batch",
                               total=chunks, disable=not progress or chunks < 2):
        ids, mask = batch.arrays  # the last batch padded with copies of its first row: one compilation
        real = batch.size
        top_scores, top, top_token = _top_k_first_step(config, params, ids, mask, columns, k, full_vocabulary)
        indices.append(np.asarray(top)[:real])
        top_tokens.append(np.asarray(top_token)[:real])
        scores.append(np.asarray(top_scores, dtype=np.float32)[:real])
    indices_all = np.concatenate(indices).astype(np.int64)
    if full_vocabulary:
        lookup = np.full(config.vocab_size, -1, dtype=np.int64)
        lookup[columns] = np.arange(columns.size)
        indices_all = lookup[indices_all]
    if return_top_token:
        return indices_all, np.concatenate(scores), np.concatenate(top_tokens).astype(np.int64)
    return indices_all, np.concatenate(scores)


def rank_docid_sequences(config: T5Config, params, input_ids, attention_mask, trie, *, num_beams: int = 10,
                         num_return: int | None = None, batch_size: int = 32, constrained: bool = True,
                         max_length: int | None = None, lookup=None, progress: bool = True, interventions=None):
    """Top docids of every query by beam search over docid token sequences.

    `trie`: a `genir_jax.docids.decoding.DocidTrie` whose docid i is document i. ``constrained=False`` decodes
    freely (up to `max_length` positions counting the start token; default: the longest docid + 1) and maps
    each beam to a document by its exact tokens, else by ``lookup(token_ids) -> index or -1`` (e.g. the
    decoded text, as the reference matches strings). Returns ``(indices [N, R] (-1: no docid of the corpus,
    or a document already ranked higher), scores [N, R] float32 (beam scores: summed log-probabilities /
    length), sequences [N, R, T])``. `batch_size` queries per jitted call (x `num_beams` decoder rows); the
    last batch is padded, so it compiles once. `interventions`: patches of any site, applied at every
    decoding step as in a forward (`genir_jax.docids.decoding.beam_search`), e.g. a circuit.
    """
    from genir_jax.docids.decoding import beam_search

    input_ids = np.asarray(input_ids, dtype=np.int32)
    attention_mask = np.asarray(attention_mask, dtype=np.int32)
    num_return = num_beams if num_return is None else int(num_return)
    if max_length is None:
        max_length = trie.max_docid_length + 1
    count = input_ids.shape[0]
    if count == 0:
        return (np.zeros((0, num_return), np.int64), np.zeros((0, num_return), np.float32),
                np.zeros((0, num_return, max_length), np.int32))
    rows = max(1, min(int(batch_size), count))
    chunks = num_batches(count, rows)
    seqs, scores = [], []
    for batch in compiling_bar(batches((input_ids, attention_mask), rows), desc="beam search", unit="batch",
                               total=chunks, disable=not progress or chunks < 2):
        ids, mask = batch.arrays
        out = beam_search(config, params, ids, mask, num_beams=num_beams, num_return=num_return,
                          max_length=max_length, trie=trie if constrained else None, interventions=interventions)
        seqs.append(np.asarray(out.sequences)[:batch.size])
        scores.append(np.asarray(out.scores, dtype=np.float32)[:batch.size])
    sequences, score_array = np.concatenate(seqs), np.concatenate(scores)
    indices = trie.index_of(sequences)
    for q in range(count):
        seen = set()
        for r in range(num_return):
            index = int(indices[q, r])
            if index < 0 and lookup is not None and np.isfinite(score_array[q, r]):
                tokens = [int(t) for t in sequences[q, r, 1:]]
                if trie.eos_id in tokens:
                    tokens = tokens[:tokens.index(trie.eos_id)]
                index = int(lookup(tokens))
            if index in seen or not np.isfinite(score_array[q, r]):
                index = -1
            if index >= 0:
                seen.add(index)
            indices[q, r] = index
    return indices.astype(np.int64), score_array, sequences


def run_from_ranking(query_ids: Sequence[str], doc_ids: Sequence[str], indices: np.ndarray,
                     scores: np.ndarray) -> Run:
    """A run from `rank_docids` output; index -1 (a word token) becomes a ``NON_DOCID@<rank>`` entry."""
    if len(query_ids) != indices.shape[0]:
        raise ValueError(f"{len(query_ids)} query ids for {indices.shape[0]} ranked rows")
    run: Run = {}
    for query_id, row, row_scores in zip(query_ids, indices, scores):  # non-finite: beam search found nothing
        run[str(query_id)] = [(doc_ids[i] if i >= 0 else f"{NON_DOCID}{rank}", float(score))
                              for rank, (i, score) in enumerate(zip(row.tolist(), row_scores.tolist()))
                              if math.isfinite(score)]
    return run


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def _measures():
    import ir_measures
    from ir_measures import R, RR, Success, nDCG

    return ir_measures, {Success @ 1: "Hits@1", Success @ 10: "Hits@10", R @ 5: "Recall@5",
                         RR @ 10: "MRR@10", nDCG @ 10: "nDCG@10"}


def per_query_metrics(run: Mapping[str, Sequence[tuple[str, float]]],
                      qrels: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, float]]:
    """Every metric of every query in `qrels` (0 where the run has no result for it)."""
    ir_measures, names = _measures()
    trec_qrels = {str(q): {str(d): int(rel) for d, rel in docs.items()} for q, docs in qrels.items()}
    trec_run = {}
    for query_id, ranked in run.items():
        if str(query_id) not in trec_qrels or not ranked:
            continue
        entries: dict[str, float] = {}
        for rank, (doc_id, _) in enumerate(ranked):
            if doc_id in entries:
                raise DataError(f"run: query {query_id!r} lists document {doc_id!r} twice")
            entries[str(doc_id)] = float(len(ranked) - rank)  # our order, whatever the ties in the scores
        # every metric looks at the top 10 only; pytrec_eval's recip_rank has no cutoff (RR@10 would count a
        # relevant document at rank 11 as 1/11), so the run is cut at the largest cutoff before evaluation
        trec_run[str(query_id)] = dict(list(entries.items())[:MAX_CUTOFF])
    values = {query_id: {name: 0.0 for name in METRICS} for query_id in trec_qrels}
    if trec_run:
        for metric in ir_measures.pytrec_eval.iter_calc(list(names), trec_qrels, trec_run):
            values[metric.query_id][names[metric.measure]] = float(metric.value)
    return values


def evaluate_run(run: Mapping[str, Sequence[tuple[str, float]]],
                 qrels: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """Hits@1, Hits@10, Recall@5, MRR@10, nDCG@10 averaged over the queries of `qrels`, and their count."""
    if not qrels:
        raise DataError("qrels: no queries to evaluate")
    values = per_query_metrics(run, qrels)
    result: dict[str, float] = {name: float(np.mean([v[name] for v in values.values()])) for name in METRICS}
    result["queries"] = len(values)
    return result


# --------------------------------------------------------------------------------------------------
# Run files and correct_valid.json
# --------------------------------------------------------------------------------------------------

def write_trec_run(path: str | os.PathLike, run: Mapping[str, Sequence[tuple[str, float]]], system: str) -> None:
    """Atomically write a TREC run file: ``query Q0 docid rank score system`` (rank from 1, best first)."""
    system = "_".join(str(system).split()) or "genir-jax"
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            for query_id, ranked in run.items():
                for rank, (doc_id, score) in enumerate(ranked, start=1):
                    handle.write(f"{query_id} Q0 {doc_id} {rank} {score:.6g} {system}\n")


def read_trec_run(path: str | os.PathLike) -> Run:
    """A TREC run file as a `Run`, each query's documents ordered by score (ties: by the rank column)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    rows: dict[str, list[tuple[float, float, str]]] = {}
    seen: dict[tuple[str, str], int] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise DataError(f"{path}: line {number}: expected 6 fields 'query Q0 docid rank score system', "
                                f"got {len(parts)}")
            query_id, _, doc_id, rank, score, _ = parts
            try:
                rank_value, score_value = float(rank), float(score)
            except ValueError:
                raise DataError(f"{path}: line {number}: rank {rank!r} and score {score!r} must be numbers") from None
            if not math.isfinite(score_value):
                raise DataError(f"{path}: line {number}: score {score!r} is not finite")
            if (query_id, doc_id) in seen:
                raise DataError(f"{path}: line {number}: document {doc_id!r} repeats for query {query_id!r} "
                                f"(first on line {seen[(query_id, doc_id)]})")
            seen[(query_id, doc_id)] = number
            rows.setdefault(query_id, []).append((-score_value, rank_value, doc_id))
    return {query_id: [(doc_id, -neg) for neg, _, doc_id in sorted(entries)] for query_id, entries in rows.items()}


def correct_valid(run: Mapping[str, Sequence[tuple[str, float]]],
                  qrels: Mapping[str, Mapping[str, int]], top_is_docid: Mapping[str, bool] | None = None,
                  docid_text=docid_token) -> list[list[str]]:
    """``[[docid_token, query_id], ...]`` for queries whose first-ranked document is relevant: the reference's
    ``correct_valid.json`` (relevant = listed in the qrels for the query, whatever its grade), in run order.

    `top_is_docid` (query id -> bool), when given, also requires the first-ranked docid token to be the
    model's top token over the whole vocabulary, so that every correct query has rank 0 in the analyses'
    full-vocabulary ranking (a docid-only ranking can put a docid first below a word token).
    `docid_text` spells the docid (default: the atomic token; naive / semantic: the scheme's docid string,
    as the reference writes them)."""
    correct = []
    for query_id, ranked in run.items():
        if top_is_docid is not None and not top_is_docid.get(query_id, False):
            continue
        if ranked and ranked[0][0] in qrels.get(query_id, {}):
            correct.append([docid_text(ranked[0][0]), query_id])
    return correct


def check_run_covers(query_ids: Iterable[str], qrels: Mapping[str, Mapping[str, int]], source: str) -> None:
    """Queries and qrels must describe the same queries (a mismatch means a wrong file was passed)."""
    query_ids = list(query_ids)
    missing = [q for q in query_ids if q not in qrels]
    extra = [q for q in qrels if q not in set(query_ids)]
    if missing or extra:
        raise DataError(f"{source}: the queries and the qrels do not match: {len(missing)} queries without "
                        f"judgements (e.g. {missing[:3]}), {len(extra)} judged queries not in the queries file "
                        f"(e.g. {extra[:3]})")
