"""Inputs shared by the analyses: the correct queries, and their tokenisation as the reference does it.

`correct_valid.json` (written by `genir-jax evaluate`, as the reference's eval script) lists
``[docid_token, query_id]`` for the validation queries whose relevant document the model ranks first.
Analyses run on those queries, in that order.

Tokenisation, two modes:
- default: each query tokenised with its ``</s>``, right-padded to the longest, with an attention mask;
- reference padding (``reference_padding=True``): as the reference patching scripts, every query is
  padded to (longest query in sub-word tokens without ``</s>``) + 1 tokens and NO attention mask is used,
  so the encoder and the cross-attention also attend to the padding.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from genir_jax.data.corpus import normalize_id, read_json, read_queries
from genir_jax.docids import is_docid_token
from genir_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class CorrectQuery:
    """A validation query the model ranks correctly, with its relevant docid token and that token's id."""

    query_id: str
    text: str
    docid_token: str
    token_id: int


def read_correct_valid(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``[(docid_token, query_id)]`` from a reference `correct_valid.json`, validated."""
    path = os.fspath(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of [docid_token, query_id] pairs, got {type(data).__name__}")
    pairs = []
    for index, entry in enumerate(data):
        if not (isinstance(entry, list) and len(entry) == 2):
            raise DataError(f"{path}: record index {index}: expected [docid_token, query_id], got {entry!r}")
        token, query_id = entry
        if not isinstance(token, str) or not is_docid_token(token):
            raise DataError(f"{path}: record index {index}: field 0 (docid_token) must be a docid token like "
                            f"'@DOC_ID_7@', got {token!r}")
        pairs.append((token, normalize_id(query_id)))
    if not pairs:
        raise DataError(f"{path}: no correct queries")
    return pairs


def load_correct_queries(val_queries_path: str | os.PathLike, correct_valid_path: str | os.PathLike,
                         tokenizer) -> list[CorrectQuery]:
    """The correct queries (order of correct_valid.json) with their text and target token id.

    Errors name the file and record: unknown query ids, docid tokens the tokenizer does not know.
    """
    queries = {q.id: q for q in read_queries(val_queries_path)}
    vocab = tokenizer.get_vocab()
    out = []
    for index, (token, query_id) in enumerate(read_correct_valid(correct_valid_path)):
        if query_id not in queries:
            raise DataError(f"{os.fspath(correct_valid_path)}: record index {index}: query id {query_id!r} is not in "
                            f"{os.fspath(val_queries_path)}")
        if token not in vocab:
            raise DataError(f"{os.fspath(correct_valid_path)}: record index {index}: docid token {token!r} is not in "
                            "the model's vocabulary (was correct_valid.json made for another model?)")
        out.append(CorrectQuery(query_id, queries[query_id].text, token, int(vocab[token])))
    return out


def tokenize_for_analysis(tokenizer, texts: list[str], *, reference_padding: bool = False
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int32 for the analyses; see the module docstring for the two modes."""
    if not texts:
        raise DataError("no queries to tokenize")
    encoded = [tokenizer(text).input_ids for text in texts]
    if reference_padding:
        length = max(len(tokenizer.tokenize(text)) for text in texts) + 1  # every query + </s> fits
    else:
        length = max(len(ids) for ids in encoded)
    input_ids = np.full((len(texts), length), tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(texts), length), dtype=np.int32)
    for row, ids in enumerate(encoded):
        input_ids[row, :len(ids)] = ids
        mask[row, :len(ids)] = 1
    if reference_padding:
        mask[:] = 1  # the reference passes no attention mask
    return input_ids, mask


def reference_padding_length(tokenizer, texts: list[str]) -> int:
    """The reference's padded length for a query set: longest query in sub-word tokens (no ``</s>``) + 1."""
    return max(len(tokenizer.tokenize(text)) for text in texts) + 1


def reference_padded_groups(tokenizer, texts: list[str], length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Queries padded as the reference pads them to `length` (``padding="max_length"`` without truncation, so
    longer queries keep their own length), with all-ones masks, grouped by padded length so that every batch
    sees exactly the reference's input. Returns ``[(row indices, input_ids [n, L_g]), ...]``."""
    encoded = [tokenizer(text).input_ids for text in texts]
    groups: dict[int, list[int]] = {}
    for row, ids in enumerate(encoded):
        groups.setdefault(max(length, len(ids)), []).append(row)
    out = []
    for group_length, rows in sorted(groups.items()):
        ids = np.full((len(rows), group_length), tokenizer.pad_token_id, dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, :len(encoded[row])] = encoded[row]
        out.append((np.asarray(rows), ids))
    return out
