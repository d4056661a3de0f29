"""DSI training examples, built and tokenized as the reference's ``preprocess.py`` / ``train.py`` build them.

- Indexing examples: one per document, ``text = document.text[:1000]`` (the reference cuts the raw text to
  1000 characters, then the tokenizer truncates to `max_length` tokens), label = the document's docid.
- Retrieval examples: one per (training query, relevant document) pair, in query order.
- Ratio (indexing : retrieval, the reference's ``-r``; the paper uses 32): with D indexing and Q retrieval
  examples and ratio r, if ``D < Q * r`` the indexing list is repeated to about ``Q * r`` examples, if
  ``D > Q * r`` the retrieval list to about ``D / r``, with the reference's float arithmetic: ``x = target /
  size - 1``; whole copies are appended while ``x > 1`` (``x -= 1``), then the first ``round(x * size)``
  examples (Python's round: halves to even). ``ratio=None`` keeps both lists as they are.
- Order: all indexing examples, then all retrieval examples (training shuffles).
- ``remove``: the reference drops every training example whose label is one of the removed documents AFTER
  the ratio repetition (``train.py --remove``); so do we. Ids may be plain (``17``) or docid tokens.
- Atomic docid labels: the docid token only, no EOS, so the decoder runs one step from start token 0.
  Naive / semantic labels (``docid_sequences``): the docid's token sequence ending with EOS (as the
  reference's ``text_target`` tokenization), right-padded with 0 to the longest docid of the corpus (one
  label width for every batch) with a 0/1 ``label_mask``.
- Tokenization: ``tokenizer(text, max_length=max_length, truncation=True)`` as the reference (T5 keeps the
  final ``</s>`` inside `max_length`), every distinct text once, each cut first to what its first
  `max_length` tokens can come from (`genir_jax.checkpoints.tokenizer.clip_text`: a huge text never
  tokenises whole); results can be cached on disk under a hash of the examples, the tokenizer's
  vocabulary and settings, and `max_length`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np
from tqdm.auto import tqdm

from genir_jax.checkpoints.tokenizer import clip_text
from genir_jax.data.corpus import Document, Query
from genir_jax.docids.tokens import doc_id_of_token, docid_token_ids, is_docid_token
from genir_jax.base.errors import DataError, GenIRError
from genir_jax.base.io import atomic_path
from genir_jax.base.options import MAX_TOKENS

INDEX_TEXT_MAX_CHARS = 1000  # the reference's text_max_length
INDEX, RETRIEVAL = "index", "retrieval"
_CACHE_FORMAT = 1
_TOKENIZE_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class DSIExample:
    """One training example: input text -> document id; `kind` is "index" or "retrieval"."""

    text: str
    doc_id: str
    kind: str


@dataclasses.dataclass
class TokenizedExamples:
    """Padded token ids of DSI examples: right-padded with 0, one docid label per example."""

    input_ids: np.ndarray       # int32 [N, L]
    attention_mask: np.ndarray  # int32 [N, L]
    labels: np.ndarray          # int32 [N]: the docid token id (one decoder step, no EOS); or [N, T] sequences
    label_mask: np.ndarray | None = None  # int32 [N, T] for sequence labels (1: a real token, EOS included)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------------------------------
# Building examples
# --------------------------------------------------------------------------------------------------

def parse_doc_id_list(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"D1, D2"`` (the reference's ``--remove`` syntax) or an iterable -> stripped plain document ids."""
    if text is None:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    ids = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        ids.append(doc_id_of_token(item) if is_docid_token(item) else item)
    return tuple(dict.fromkeys(ids))


def repeat_to(examples: list, target: float) -> list:
    """The reference's repetition of `examples` to about `target` items (see the module docstring)."""
    size = len(examples)
    factor = (target / size) - 1
    repeated = list(examples)
    while factor > 1:
        repeated = repeated + examples
        factor -= 1
    return repeated + examples[:round(factor * size)]


def apply_ratio(index: list, retrieval: list, ratio: int | None) -> tuple[list, list]:
    """Index and retrieval lists rebalanced to `ratio` indexing examples per retrieval example."""
    if ratio is None:
        return index, retrieval
    if isinstance(ratio, bool) or not isinstance(ratio, (int, np.integer)) or ratio < 1:
        raise GenIRError(f"ratio must be a positive integer or None, got {ratio!r}")
    ratio = int(ratio)
    if not index or not retrieval:
        raise DataError(f"an indexing:retrieval ratio of {ratio} needs indexing and retrieval examples, got "
                        f"{len(index)} documents and {len(retrieval)} training (query, document) pairs")
    no_docs, no_queries = len(index), len(retrieval)
    if no_docs < no_queries * ratio:
        index = repeat_to(index, no_queries * ratio)
    elif no_docs > no_queries * ratio:
        retrieval = repeat_to(retrieval, no_docs / ratio)
    return index, retrieval


def build_dsi_examples(documents: Sequence[Document], train_queries: Sequence[Query], *, ratio: int | None = None,
                       remove: Iterable[str] | str = ()) -> list[DSIExample]:
    """Indexing then retrieval examples, rebalanced by `ratio`, without the documents in `remove`."""
    known = {doc.id for doc in documents}
    for query in train_queries:
        for doc_id in query.relevant_docs:
            if doc_id not in known:
                raise DataError(f"training query {query.id!r}: relevant document {doc_id!r} is not in the corpus")
    removed = parse_doc_id_list(remove)
    unknown = [doc_id for doc_id in removed if doc_id not in known]
    if unknown:
        raise DataError(f"remove: documents {unknown[:5]} are not in the corpus ({len(known)} documents)")
    index = [DSIExample(doc.text[:INDEX_TEXT_MAX_CHARS], doc.id, INDEX) for doc in documents]
    retrieval = [DSIExample(query.text, doc_id, RETRIEVAL) for query in train_queries for doc_id in query.relevant_docs]
    index, retrieval = apply_ratio(index, retrieval, ratio)
    examples = index + retrieval
    if removed:
        dropped = set(removed)
        examples = [example for example in examples if example.doc_id not in dropped]
    return examples


# --------------------------------------------------------------------------------------------------
# Tokenization (and its cache)
# --------------------------------------------------------------------------------------------------

def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of what decides a tokenizer's ids: its class, its pipeline and vocabulary (added tokens too)."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # per-call settings, not part of the vocabulary
        state.pop("padding", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


def _encode(texts: Sequence[str], tokenizer, max_length: int, progress: bool) -> list[list[int]]:
    encoded: list[list[int]] = []
    starts = range(0, len(texts), _TOKENIZE_BATCH)
    for start in tqdm(starts, desc="tokenizing", unit="batch", disable=not progress or len(starts) < 4):
        batch = [clip_text(text, max_length) for text in texts[start:start + _TOKENIZE_BATCH]]
        encoded.extend(tokenizer(batch, max_length=max_length, truncation=True)["input_ids"])
    return encoded


def _pad(rows: Sequence[Sequence[int]], max_length: int, pad_to_max_length: bool) -> tuple[np.ndarray, np.ndarray]:
    width = max_length if pad_to_max_length else max((len(r) for r in rows), default=1)
    ids = np.zeros((len(rows), width), dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def _check_max_length(max_length: int) -> None:
    """2 (a token and ``</s>``) to `MAX_TOKENS`: rows are padded to it, so it bounds what is allocated."""
    if (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
            or not 2 <= max_length <= MAX_TOKENS):
        raise GenIRError(f"max_length must be an integer in 2..{MAX_TOKENS} (room for a token and </s>; rows are "
                         f"padded to it), got {max_length!r}")


def sequence_labels(examples: Sequence[DSIExample], docid_sequences) -> tuple[np.ndarray, np.ndarray]:
    """[N, T] labels and 0/1 mask of `examples` from ``{doc id: token ids ending with EOS}``; T is the
    longest sequence in `docid_sequences` (so every batch of a corpus has the same label width)."""
    width = max(len(seq) for seq in docid_sequences.values())
    labels = np.zeros((len(examples), width), dtype=np.int32)
    mask = np.zeros((len(examples), width), dtype=np.int32)
    for i, example in enumerate(examples):
        if example.doc_id not in docid_sequences:
            raise DataError(f"example {i}: document {example.doc_id!r} has no docid")
        seq = docid_sequences[example.doc_id]
        labels[i, :len(seq)] = seq
        mask[i, :len(seq)] = 1
    return labels, mask


def _tokenize_unique(examples: Sequence[DSIExample], tokenizer, max_length: int, progress: bool,
                     docid_sequences=None):
    texts = list(dict.fromkeys(example.text for example in examples))
    position = {text: i for i, text in enumerate(texts)}
    rows = _encode(texts, tokenizer, max_length, progress)
    unique_ids, unique_mask = _pad(rows, max_length, False)
    row_of_example = np.asarray([position[e.text] for e in examples], dtype=np.int64)
    if docid_sequences is not None:
        labels, label_mask = sequence_labels(examples, docid_sequences)
        return unique_ids, unique_mask, row_of_example, labels, label_mask
    doc_ids = list(dict.fromkeys(example.doc_id for example in examples))
    label_of = dict(zip(doc_ids, docid_token_ids(tokenizer, doc_ids).tolist())) if doc_ids else {}
    labels = np.asarray([label_of[e.doc_id] for e in examples], dtype=np.int32)
    return unique_ids, unique_mask, row_of_example, labels, None


def _cache_key(examples: Sequence[DSIExample], tokenizer, max_length: int, docid_sequences=None) -> str:
    digest = hashlib.sha256(json.dumps({"format": _CACHE_FORMAT, "max_length": int(max_length),
                                        "tokenizer": tokenizer_fingerprint(tokenizer)}).encode())
    if docid_sequences is not None:
        digest.update(json.dumps(sorted((d, list(map(int, s))) for d, s in docid_sequences.items())).encode())
    for example in examples:
        digest.update(json.dumps([example.text, example.doc_id]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def examples_fingerprint(groups: Sequence[tuple[Sequence[DSIExample], int]], tokenizer, docid_sequences=None) -> str:
    """A short hash of groups of (examples, max_length) with the tokenizer and docid sequences: what decides
    their token arrays, computed without tokenizing (so every process of a multi-process run, which
    tokenizes only its rows, agrees on it)."""
    digest = hashlib.sha256()
    for examples, max_length in groups:
        digest.update(_cache_key(examples, tokenizer, max_length, docid_sequences).encode())
    return digest.hexdigest()[:16]


def tokenize_examples(examples: Sequence[DSIExample], tokenizer, max_length: int,
                      cache_dir: str | os.PathLike | None = None, progress: bool = True,
                      docid_sequences=None) -> TokenizedExamples:
    """Token ids, masks and docid labels of `examples`; with `cache_dir`, read from / written to a cache file
    named by a hash of the examples, the tokenizer and `max_length` (so a change of any of them misses).
    `docid_sequences` (``{doc id: token ids ending with EOS}``, naive / semantic docids) gives sequence
    labels [N, T] with a `label_mask` instead of atomic docid token labels [N]."""
    _check_max_length(max_length)
    if not examples:
        raise DataError("no examples to tokenize")
    if docid_sequences is not None and not docid_sequences:
        raise DataError("docid_sequences is empty")
    cache_path = None
    if cache_dir is not None:
        key = _cache_key(examples, tokenizer, max_length, docid_sequences)[:32]
        cache_path = os.path.join(os.fspath(cache_dir), f"dsi-examples-{key}.npz")
        if os.path.isfile(cache_path):
            with np.load(cache_path) as stored:
                rows, mask, index, labels = (stored[k] for k in ("input_ids", "attention_mask", "row", "labels"))
                label_mask = stored["label_mask"] if "label_mask" in stored.files else None
            if index.shape[0] == len(examples) and labels.shape[0] == len(examples):
                return TokenizedExamples(rows[index], mask[index], labels, label_mask)
    rows, mask, index, labels, label_mask = _tokenize_unique(examples, tokenizer, max_length, progress,
                                                             docid_sequences)
    if cache_path is not None:
        extra = {} if label_mask is None else {"label_mask": label_mask}
        with atomic_path(cache_path) as temp:
            with open(temp, "wb") as handle:
                np.savez(handle, input_ids=rows, attention_mask=mask, row=index, labels=labels, **extra)
    return TokenizedExamples(rows[index], mask[index], labels, label_mask)


def tokenize_queries(queries: Sequence[Query | str], tokenizer, max_length: int, *,
                     pad_to_max_length: bool = False, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int32 of query texts, truncated like training inputs. Padded to the longest
    query, or to `max_length` (the reference's ``padding="max_length"``, which matters only without a mask)."""
    _check_max_length(max_length)
    texts = [q.text if isinstance(q, Query) else q for q in queries]
    if not texts:
        raise DataError("no queries to tokenize")
    return _pad(_encode(texts, tokenizer, max_length, progress), max_length, pad_to_max_length)
