"""BM25 baseline (bm25s) on the same documents and queries as the DSI model, so its numbers have context.

Texts are lower-cased and split into word tokens of two or more characters (bm25s' default pattern),
English stop words removed, no stemming; scoring is bm25s' Lucene variant (k1 = 1.5, b = 0.75 by
default). Documents with score 0 (no query term in common) are not retrieved, as a search engine would
not return them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from genir_jax.base.errors import DataError
from genir_jax.docids.retrieval import Run

if TYPE_CHECKING:  # the reader's records; docids sits below the data layer
    from genir_jax.data.corpus import Document, Query


def bm25_run(documents: Sequence[Document], queries: Sequence[Query], k: int = 100, *, k1: float = 1.5,
             b: float = 0.75, progress: bool = True, source: str = "documents") -> Run:
    """The top-`k` documents of every query by BM25 (best first). `source`: the documents' file, for errors.
    `progress`: one bar, bm25s' retrieval (its tokenizing and indexing bars are quick, and each would be one
    more line)."""
    import bm25s

    if not documents:
        raise DataError(f"{source}: bm25: no documents to index")
    if k < 1:
        raise DataError(f"bm25: k must be >= 1, got {k}")
    corpus_tokens = bm25s.tokenize([doc.text for doc in documents], stopwords="en", return_ids=False,
                                   show_progress=False)
    if not any(len(tokens) for tokens in corpus_tokens):  # bm25s would fail on an empty vocabulary
        raise DataError(f"{source}: bm25: no document has an indexable term (every word is an English stop word "
                        f"or shorter than two characters) in {len(documents)} document(s)")
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(corpus_tokens, show_progress=False)
    query_tokens = bm25s.tokenize([query.text for query in queries], stopwords="en", return_ids=False,
                                  show_progress=False)
    k = min(int(k), len(documents))
    indices, scores = retriever.retrieve(query_tokens, k=k, show_progress=progress)
    run: Run = {}
    for query, row, row_scores in zip(queries, np.asarray(indices), np.asarray(scores)):
        run[query.id] = [(documents[int(i)].id, float(s)) for i, s in zip(row, row_scores) if s > 0]
    return run
