"""Semantic docids as DSI builds them: hierarchical k-means over document embeddings (Tay et al. 2022).

The documents are clustered into `k` (10) clusters (always, however few: DSI's Algorithm 1 clusters its
input before it looks at sizes, so every id has at least two parts); every cluster with more than `c`
documents is clustered again into `k`, recursively; a document's id is the path of cluster numbers down to its leaf
cluster followed by its position in that leaf (0 .. size-1), written with ``_`` between the parts, e.g.
``"3_0_17"`` (the reference's mapping-file spelling: ``{"<doc id>": "3_0_17", ...}``). A cluster is either
split or a leaf, never both, so the ids (as tuples of parts) are unique and prefix-free; the decoder's EOS
after the last part also terminates every id.

Embedding (offline, no model download): TF-IDF vectors of the document texts (scikit-learn
``TfidfVectorizer``, sublinear term frequency, English-agnostic unigrams) reduced by LSA (``TruncatedSVD``
to at most 128 dimensions) and L2-normalised, so k-means on them clusters by cosine similarity of topics.
Clustering is scikit-learn's ``KMeans`` (k-means++, ``n_init=4``) with ``random_state`` derived from `seed`;
the result is deterministic for a seed. A cluster whose points k-means cannot separate (identical
vectors) is split into `k` consecutive chunks instead so the recursion always ends.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from genir_jax.base.errors import GenIRError

DEFAULT_K = 10
DEFAULT_C = 100
LSA_DIMENSIONS = 128
EMBEDDING = "tfidf-lsa"


def lsa_embeddings(texts: Sequence[str], *, dimensions: int = LSA_DIMENSIONS, seed: int = 0) -> np.ndarray:
    """L2-normalised LSA vectors [N, d] (TF-IDF then truncated SVD) of `texts`."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    if not texts:
        raise GenIRError("semantic docids: no documents to embed")
    tfidf = TfidfVectorizer(sublinear_tf=True, min_df=1, dtype=np.float64).fit_transform(list(texts))
    components = min(dimensions, tfidf.shape[0] - 1, tfidf.shape[1] - 1)
    if components < 1:
        return normalize(tfidf.toarray())
    vectors = TruncatedSVD(n_components=components, algorithm="randomized", n_iter=7,
                           random_state=seed).fit_transform(tfidf)
    return normalize(vectors)


def hierarchical_ids(embeddings: np.ndarray, *, k: int = DEFAULT_K, c: int = DEFAULT_C, seed: int = 0,
                     progress: bool = True) -> list[tuple[int, ...]]:
    """The id (tuple of cluster numbers then the position in the leaf) of every row of `embeddings`."""
    from sklearn.cluster import KMeans

    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise GenIRError(f"semantic docids: k (clusters per level) must be an integer >= 2, got {k!r}")
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise GenIRError(f"semantic docids: c (largest leaf cluster) must be an integer >= 1, got {c!r}")
    embeddings = np.asarray(embeddings, dtype=np.float64)
    ids: list[tuple[int, ...] | None] = [None] * embeddings.shape[0]
    pending = [((), np.arange(embeddings.shape[0]))]
    bar = tqdm(total=embeddings.shape[0], desc="semantic docids", unit="doc", disable=not progress)
    while pending:
        prefix, members = pending.pop()
        if members.size <= c and prefix:  # DSI's Algorithm 1 always clusters the whole corpus first
            for position, row in enumerate(members):
                ids[row] = prefix + (position,)
            bar.update(members.size)
            continue
        points = embeddings[members]
        labels = None
        if np.unique(points, axis=0).shape[0] >= k:
            labels = KMeans(n_clusters=k, n_init=4, random_state=seed + len(prefix)).fit_predict(points)
            if np.unique(labels).size < 2:
                labels = None
        if labels is None:  # inseparable points: consecutive chunks
            labels = np.arange(members.size) * k // members.size
        for cluster in range(k - 1, -1, -1):  # stack: cluster 0 first
            chosen = members[labels == cluster]
            if chosen.size:
                pending.append((prefix + (cluster,), chosen))
    bar.close()
    return [tuple(int(part) for part in ident) for ident in ids]


def build_semantic_mapping(doc_ids: Sequence[str], texts: Sequence[str], *, k: int = DEFAULT_K, c: int = DEFAULT_C,
                           seed: int = 0, progress: bool = True) -> dict[str, str]:
    """``{doc id: "a_b_..._p"}`` for every document (the reference's mapping-file format)."""
    if len(doc_ids) != len(texts):
        raise ValueError(f"{len(doc_ids)} document ids for {len(texts)} texts")
    ids = hierarchical_ids(lsa_embeddings(texts, seed=seed), k=k, c=c, seed=seed, progress=progress)
    return {doc_id: "_".join(str(part) for part in ident) for doc_id, ident in zip(doc_ids, ids)}
