"""Corpora and DSI examples: reference-format JSON (`corpus`), raw sources (`sources`), deterministic splits
(`splits`), prepared directories (`prepare`) and indexing / retrieval training examples (`dsi`)."""

from genir_jax.data.corpus import (Document, Query, read_documents, read_qrels, read_queries, write_documents,
                                   write_qrels, write_queries)
from genir_jax.data.dsi import DSIExample, TokenizedExamples, build_dsi_examples, tokenize_examples, tokenize_queries
from genir_jax.data.prepare import DATASETS, default_data_dir, load_prepared, prepare_dataset

__all__ = [
    "DATASETS", "DSIExample", "Document", "Query", "TokenizedExamples", "build_dsi_examples", "default_data_dir",
    "load_prepared", "prepare_dataset", "read_documents", "read_qrels", "read_queries", "tokenize_examples",
    "tokenize_queries", "write_documents", "write_qrels", "write_queries",
]
