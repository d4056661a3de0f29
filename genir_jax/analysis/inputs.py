"""Inputs shared by the analyses: the correct queries, and their tokenisation as the reference does it.

`correct_valid.json` (written by `genir-jax evaluate`, as the reference's eval script) lists
``[docid, query_id]`` for the validation queries whose relevant document the model ranks first: the docid
token (atomic docids) or the docid string (naive / semantic, with its token sequence from the scheme).
Analyses run on those queries, in that order. `load_analysis_inputs` checks that every pair is such a pair
(`check_correct_pairs`): its docid relevant to the query (the query's ``relevant_docs``) and ranked first by
the model, as `evaluate` decides it; other pairs are refused, or kept with a warning (``allow_incorrect``).

Tokenisation, two modes:
- default: each query tokenised with its ``</s>``, right-padded to the longest, with an attention mask;
- reference padding (``reference_padding=True``): as the reference patching scripts, every query is
  padded to (longest query in sub-word tokens without ``</s>``) + 1 tokens and NO attention mask is used,
  so the encoder and the cross-attention also attend to the padding.

Decoder-only checkpoints (GPT-2, Llama, Qwen2; told apart by their config.json, `load_model`) have atomic docids
and one input per query: the prompt `genir-jax evaluate --model-type decoder` ranks (``[start] query
" Document:"``, right-padded with a mask, `genir_jax.training.decoder_dsi.encode_prompts`), whose last real token
predicts the docid token; their pairs are checked by the same rule (`docid_ranks`). Reference padding and docid
sequences do not apply to them.

Bounded length: a query longer than `MAX_QUERY_TOKENS` (512, the length T5 was pre-trained at and its
tokenizer's ``model_max_length``) is truncated to its first 511 tokens plus ``</s>`` (as transformers'
``truncation=True``), with a warning on stderr, so a single huge query cannot make every batch allocate
quadratic attention and position-bias matrices. Queries within the bound are unchanged in both modes. The
text is cut before it is tokenised (`genir_jax.checkpoints.tokenizer.clip_text`), so tokenising a huge
query takes the time and memory of its first tokens only.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

import numpy as np

from genir_jax.checkpoints.tokenizer import clip_text
from genir_jax.core.sites import is_decoder_only
from genir_jax.data.corpus import normalize_id, read_json, read_queries
from genir_jax.docids.tokens import doc_id_of_token, is_docid_token
from genir_jax.base.batching import Batch, batches
from genir_jax.base.errors import DataError, GenIRError


@dataclasses.dataclass(frozen=True)
class CorrectQuery:
    """A validation query the model ranks correctly, with its relevant docid token and that token's id."""

    query_id: str
    text: str
    docid_token: str
    token_id: int
    relevant: bool = True  # the docid is one of the query's relevant documents (`load_correct_queries`)


def read_correct_valid(path: str | os.PathLike, scheme=None) -> list[tuple[str, str]]:
    """``[(docid, query_id)]`` from a reference `correct_valid.json`, validated. The docid is an atomic docid
    token like ``@DOC_ID_7@``, or with a multi-token `scheme` (`genir_jax.docids.schemes.DocidScheme`) one of
    that scheme's docid strings (``1234``, ``3_0_17``) as `genir-jax evaluate` and the reference write them."""
    path = os.fspath(path)
    multi_token = scheme is not None and scheme.multi_token
    data = read_json(path)
    field = "docid" if multi_token else "docid_token"
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of [{field}, query_id] pairs, got {type(data).__name__}")
    known = set(scheme.docids.values()) if multi_token else None
    pairs, seen = [], {}
    for index, entry in enumerate(data):
        if not (isinstance(entry, list) and len(entry) == 2):
            raise DataError(f"{path}: record index {index}: expected [{field}, query_id], got {entry!r}")
        token, query_id = entry
        if multi_token:
            if not isinstance(token, str) or token not in known:
                raise DataError(f"{path}: record index {index}: field 0 (docid) must be a {scheme.name} docid of "
                                f"the model (from {scheme.source or 'its docids.json'}), got {token!r}")
        elif not isinstance(token, str) or not is_docid_token(token):
            hint = ("; a naive / semantic docid? This analysis reads single-token (atomic) docids; over docid "
                    "sequences use `genir-jax sweep` / `genir-jax attribute` or `genir-jax reproduce --docids`"
                    if isinstance(token, str) and token.strip() else "")
            raise DataError(f"{path}: record index {index}: field 0 (docid_token) must be a docid token like "
                            f"'@DOC_ID_7@', got {token!r}{hint}")
        try:
            pair = (token, normalize_id(query_id))
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: record index {index}: field 1 (query_id) {exc}") from None
        if pair in seen:
            raise DataError(f"{path}: record index {index}: the pair [{token!r}, {pair[1]!r}] is listed twice "
                            f"(first at record index {seen[pair]})")
        seen[pair] = index
        pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no correct queries")
    return pairs


def load_correct_queries(val_queries_path: str | os.PathLike, correct_valid_path: str | os.PathLike,
                         tokenizer) -> list[CorrectQuery]:
    """The correct queries (order of correct_valid.json) with their text, target token id and whether the
    docid is relevant to the query (checked by `check_correct_pairs`, not here).

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
        query = queries[query_id]
        out.append(CorrectQuery(query_id, query.text, token, int(vocab[token]),
                                doc_id_of_token(token) in query.relevant_docs))
    return out


@dataclasses.dataclass(frozen=True)
class CorrectSequenceQuery:
    """A validation query the model answers correctly with a multi-token (naive / semantic) docid: greedy
    decoding gives exactly its relevant docid's tokens (`tokens`, ending with EOS)."""

    query_id: str
    text: str
    docid: str          # the docid string (as correct_valid.json spells it)
    doc_id: str         # the document it names
    tokens: tuple[int, ...]
    relevant: bool = True  # the document is one of the query's relevant documents

    @property
    def docid_token(self) -> str:
        """The docid as correct_valid.json spells it (the name `CorrectQuery` gives it)."""
        return self.docid


def load_correct_sequence_queries(val_queries_path: str | os.PathLike, correct_valid_path: str | os.PathLike,
                                  scheme, tokenizer) -> list[CorrectSequenceQuery]:
    """The correct queries of a naive / semantic model (order of correct_valid.json) with their docid token
    sequences (`genir_jax.docids.schemes.docid_token_sequences`) and relevance (as `load_correct_queries`);
    errors name the file and record."""
    from genir_jax.docids.schemes import docid_token_sequences

    queries = {q.id: q for q in read_queries(val_queries_path)}
    pairs = read_correct_valid(correct_valid_path, scheme)
    for index, (_, query_id) in enumerate(pairs):
        if query_id not in queries:
            raise DataError(f"{os.fspath(correct_valid_path)}: record index {index}: query id {query_id!r} is not in "
                            f"{os.fspath(val_queries_path)}")
    doc_ids = [scheme.doc_id_of(docid) for docid, _ in pairs]
    sequences = docid_token_sequences(scheme, tokenizer, doc_ids, scheme.source or os.fspath(correct_valid_path))
    return [CorrectSequenceQuery(query_id, queries[query_id].text, docid, doc_id, tuple(tokens),
                                 doc_id in queries[query_id].relevant_docs)
            for (docid, query_id), doc_id, tokens in zip(pairs, doc_ids, sequences)]


MAX_QUERY_TOKENS = 512


_TRUNCATION_REPORTED: set[str] = set()  # queries whose truncation was already reported by this process


def encode_queries(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each query with its ``</s>``, truncated to `MAX_QUERY_TOKENS` (see the module docstring).
    Each truncated query is reported once per process: the analyses tokenise the same queries more than once
    (masked, then reference-padded, then batched), and one warning per query is what the user needs."""
    encoded, truncated = [], 0
    for text in texts:
        clipped = clip_text(text, MAX_QUERY_TOKENS)
        ids = list(tokenizer(clipped).input_ids)
        cut = len(ids) > MAX_QUERY_TOKENS or len(clipped) < len(text)
        if len(ids) > MAX_QUERY_TOKENS:
            ids = ids[:MAX_QUERY_TOKENS - 1] + [tokenizer.eos_token_id]
        if cut and text not in _TRUNCATION_REPORTED:
            _TRUNCATION_REPORTED.add(text)
            truncated += 1
        encoded.append(ids)
    if truncated:
        print(f"genir-jax: warning: {truncated} quer{'y' if truncated == 1 else 'ies'} longer than "
              f"{MAX_QUERY_TOKENS} tokens truncated to {MAX_QUERY_TOKENS}", file=sys.stderr)
    return encoded


def tokenize_for_analysis(tokenizer, texts: list[str], *, reference_padding: bool = False
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int32 for the analyses; see the module docstring for the two modes."""
    if not texts:
        raise DataError("no queries to tokenize")
    encoded = encode_queries(tokenizer, texts)
    if reference_padding:
        length = reference_padding_length(tokenizer, texts)  # every query + </s> fits
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
    """The reference's padded length for a query set: longest query in sub-word tokens (no ``</s>``) + 1, at
    most `MAX_QUERY_TOKENS`."""
    return min(max(len(tokenizer.tokenize(clip_text(text, MAX_QUERY_TOKENS))) for text in texts) + 1, MAX_QUERY_TOKENS)


def reference_padded_groups(tokenizer, texts: list[str], length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Queries padded as the reference pads them to `length` (``padding="max_length"`` without truncation, so
    longer queries keep their own length), with all-ones masks, grouped by padded length so that every batch
    sees exactly the reference's input. Returns ``[(row indices, input_ids [n, L_g]), ...]``."""
    encoded = encode_queries(tokenizer, texts)
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


@dataclasses.dataclass
class AnalysisInputs:
    """A checkpoint loaded for analysis and the validation queries it answers correctly, tokenised (masked
    padding, or the reference's padding). `targets`: the docid token ids [N] (atomic docids) or the docid
    token sequences [N, T] (naive / semantic: ending with EOS, right-padded with 0, `target_mask` 1 on their
    real tokens, `scheme` the model's docid scheme)."""

    model: object
    queries: list
    input_ids: np.ndarray
    attention_mask: np.ndarray
    targets: np.ndarray
    target_mask: np.ndarray | None = None
    scheme: object = None

    @property
    def texts(self) -> list[str]:
        return [q.text for q in self.queries]

    def subset(self, rows) -> "AnalysisInputs":
        """The same model and only the queries at `rows` (in that order), e.g. the held-out half of an
        automatic stage fit; the tokenisation keeps its padded width."""
        rows = np.asarray(rows, dtype=np.int64)
        return dataclasses.replace(
            self, queries=[self.queries[int(r)] for r in rows], input_ids=self.input_ids[rows],
            attention_mask=self.attention_mask[rows], targets=self.targets[rows],
            target_mask=None if self.target_mask is None else self.target_mask[rows])


def load_model(path: str | os.PathLike, *, tokenizer: bool = True, **kw):
    """A checkpoint for analysis, of the family its config.json names (`checkpoint_is_decoder_only`): a T5
    (`genir_jax.checkpoints.hf.load_for_analysis`, keyword arguments go to it) or a decoder-only model
    (`genir_jax.checkpoints.decoder_hf.load_decoder_only`, which takes ``dtype``); with `tokenizer`, refuses
    one without tokenizer files."""
    from genir_jax.base.errors import GenIRError
    from genir_jax.checkpoints.hf import checkpoint_is_decoder_only, load_for_analysis  # no transformers for T5

    if checkpoint_is_decoder_only(path):
        from genir_jax.checkpoints.decoder_hf import load_decoder_only

        model = load_decoder_only(str(path), dtype=kw.get("dtype", "float32"), load_tokenizer=tokenizer)
    else:
        model = load_for_analysis(str(path), load_tokenizer=tokenizer, **kw)
    if tokenizer and model.tokenizer is None:
        raise GenIRError(f"{os.fspath(path)}: no tokenizer files; the checkpoint must include its tokenizer")
    return model


def check_vocabulary_covers(name: str, config, *token_ids: np.ndarray, model: str = "the T5",
                            tokens: str = "query") -> None:
    """Refuse a base / source model (its `config`; `name`, e.g. its directory, and `model` say which in the
    message) whose vocabulary does not hold every id of `token_ids` (the GenIR model's `tokens`): its
    activations patched into, or its encoder run on, the GenIR model's inputs need that word vocabulary."""
    if max(int(np.max(ids)) for ids in token_ids) >= config.vocab_size:
        raise GenIRError(f"{name}: {model}'s vocabulary ({config.vocab_size}) does not cover the {tokens} tokens; "
                         "it must share the GenIR model's word vocabulary")


def load_analysis_inputs(checkpoint: str | os.PathLike, val_queries: str | os.PathLike,
                         correct_valid: str | os.PathLike, *, sequences: bool = False, scheme=None, model=None,
                         reference_padding: bool = False, allow_incorrect: bool = False, **load) -> AnalysisInputs:
    """The checkpoint (or an already loaded `model` of it), its correct validation queries
    (`load_correct_queries`; with `sequences`, `load_correct_sequence_queries` under `scheme`, by default the
    checkpoint's own), checked to be correct (`check_correct_pairs`, which `allow_incorrect` turns into a
    warning) and their tokenisation (`tokenize_for_analysis`). `load`: keyword arguments of `load_model`
    (e.g. ``dtype``)."""
    model = model if model is not None else load_model(checkpoint, **load)
    if is_decoder_only(model.config):
        return _decoder_only_inputs(model, checkpoint, val_queries, correct_valid, sequences=sequences,
                                    reference_padding=reference_padding, allow_incorrect=allow_incorrect)
    if sequences:
        from genir_jax.docids.schemes import checkpoint_scheme
        from genir_jax.docids.sequence_targets import pad_targets

        scheme = scheme if scheme is not None else checkpoint_scheme(checkpoint)
        queries = load_correct_sequence_queries(val_queries, correct_valid, scheme, model.tokenizer)
        targets, target_mask = pad_targets([q.tokens for q in queries])
    else:
        queries = load_correct_queries(val_queries, correct_valid, model.tokenizer)
        targets, target_mask = np.asarray([q.token_id for q in queries], dtype=np.int32), None
    texts = [q.text for q in queries]
    inputs = AnalysisInputs(model, queries, *tokenize_for_analysis(model.tokenizer, texts), targets,
                            target_mask=target_mask, scheme=scheme)
    check_correct_pairs(inputs, correct_valid, val_queries, allow_incorrect=allow_incorrect)
    if reference_padding:
        ids, mask = tokenize_for_analysis(model.tokenizer, texts, reference_padding=True)
        inputs = dataclasses.replace(inputs, input_ids=ids, attention_mask=mask)
    return inputs


DECODER_PROMPT_TOKENS = 128  # query tokens of a decoder-only prompt: `genir-jax evaluate`'s default --max-length


def _decoder_only_inputs(model, checkpoint, val_queries, correct_valid, *, sequences: bool, reference_padding: bool,
                         allow_incorrect: bool) -> AnalysisInputs:
    """`load_analysis_inputs` of a decoder-only DSI checkpoint (atomic docids): the rows `genir-jax evaluate
    --model-type decoder` ranks (`genir_jax.training.decoder_dsi.encode_prompts`: ``[start] query " Document:"``,
    the query cut to `DECODER_PROMPT_TOKENS`, right-padded), the docid token the target of each row's last
    real token."""
    if sequences:
        raise GenIRError(f"{os.fspath(checkpoint)}: a decoder-only checkpoint has atomic docids only (no docid "
                         "sequences)")
    if reference_padding:
        raise GenIRError(f"{os.fspath(checkpoint)}: reference padding reproduces the reference's T5 scripts; it is "
                         "not applicable to decoder-only models (their prompts are right-padded with a mask)")
    queries = load_correct_queries(val_queries, correct_valid, model.tokenizer)
    ids, mask = encode_for_model(model, [q.text for q in queries])
    targets = np.asarray([q.token_id for q in queries], dtype=np.int32)
    inputs = AnalysisInputs(model, queries, ids, mask, targets)
    check_correct_pairs(inputs, correct_valid, val_queries, allow_incorrect=allow_incorrect)
    return inputs


def encode_for_model(model, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) of query texts as the model's family takes them: T5 queries
    (`tokenize_for_analysis`, masked padding) or decoder-only prompts (`encode_prompts`, queries cut to
    `DECODER_PROMPT_TOKENS`)."""
    if not is_decoder_only(model.config):
        return tokenize_for_analysis(model.tokenizer, texts)
    from genir_jax.training.decoder_dsi import encode_prompts

    return encode_prompts(texts, model.tokenizer, DECODER_PROMPT_TOKENS)


def docid_ranks(model, input_ids, attention_mask, target_ids, batch_size: int = 64) -> np.ndarray:
    """int [N]: the full-vocabulary rank of each query's atomic docid token at the step that predicts it
    (`genir_jax.docids.retrieval.docid_step_logits`: T5's first decoder step, a decoder-only model's last
    prompt token), ties broken by token id as `genir_jax.interp.metrics.ranks_of_targets` breaks them: rank 0
    iff it is the whole vocabulary's top token (`jnp.argmax`), the rule `genir-jax evaluate` applies."""
    import jax

    from genir_jax.docids.retrieval import docid_step_logits
    from genir_jax.interp.metrics import ranks_of_targets

    step = jax.jit(lambda params, ids, mask, targets: ranks_of_targets(
        docid_step_logits(model.config, params, ids, mask), targets)[0])
    out = np.zeros(len(target_ids), dtype=np.int64)
    for batch in batches((np.asarray(input_ids), np.asarray(attention_mask), np.asarray(target_ids, np.int32)),
                         max(1, min(batch_size, len(target_ids)))):
        out[batch.rows] = np.asarray(step(model.params, *batch.arrays))[:batch.size]
    return out


def check_correct_pairs(inputs: AnalysisInputs, correct_valid: str | os.PathLike, val_queries: str | os.PathLike,
                        *, allow_incorrect: bool = False) -> np.ndarray:
    """bool [N]: which pairs of `correct_valid` (`inputs.queries`) are correct as `genir-jax evaluate` decides
    it: the docid is one of the query's relevant documents and the model ranks it first (every docid token
    the top token of the whole vocabulary at its step, masked queries, one teacher-forced forward:
    `genir_jax.docids.sequence_targets.worst_step_ranks`, the rank rule of the analyses; `inputs` tokenised
    with masks, as evaluate ranks). An analysis of other pairs silently measures something else, so they are
    refused (a `DataError` naming the file, the first such pair and their count); `allow_incorrect` keeps
    them with a one-line warning on stderr."""
    from genir_jax.docids.sequence_targets import worst_step_ranks

    model, queries, path = inputs.model, inputs.queries, os.fspath(correct_valid)
    if is_decoder_only(model.config):
        ranks = docid_ranks(model, inputs.input_ids, inputs.attention_mask, inputs.targets)
    else:
        ranks = worst_step_ranks(model.config, model.params, inputs.input_ids, inputs.attention_mask,
                                 [q.tokens if inputs.target_mask is not None else (q.token_id,) for q in queries])
    relevant = np.asarray([q.relevant for q in queries], dtype=bool)
    correct = relevant & (ranks == 0)
    wrong = np.flatnonzero(~correct)
    if not wrong.size:
        return correct
    counts = (f"{wrong.size} of {len(queries)} pairs are not correct: {int(np.sum(~relevant))} not relevant to "
              f"their query in {os.fspath(val_queries)}, {int(np.sum(ranks != 0))} not ranked first by the model")
    if allow_incorrect:
        print(f"genir-jax: warning: {path}: {counts}; kept (--allow-incorrect)", file=sys.stderr)
        return correct
    first = int(wrong[0])
    query = queries[first]
    field = "docid" if inputs.target_mask is not None else "docid_token"
    why = (f"is not a relevant document of query {query.query_id!r}" if not relevant[first] else
           f"is at rank {int(ranks[first])}, not first, for query {query.query_id!r}"
           + (" (its worst step)" if inputs.target_mask is not None else ""))
    raise DataError(f"{path}: record index {first}: field 0 ({field}) {query.docid_token!r} {why} ({counts}; "
                    "correct_valid.json must list the pairs whose relevant docid the model ranks first, as "
                    "genir-jax evaluate writes it; --allow-incorrect accepts them)")


def query_batches(tokenizer, texts: Sequence[str], batch_size: int, *, reference_padding: bool = False,
                  block: int | None = None) -> list[Batch]:
    """Batches (`genir_jax.base.batching.Batch`, arrays ``(input_ids [batch_size, T], attention_mask)``) covering
    every query once.

    Default: all queries padded to the longest with a mask, consecutive rows per batch
    (`genir_jax.base.batching.batches`). Reference mode (the reading and cross-attention-output scripts run each
    query alone, unpadded, without a mask): a batch holds queries of one token length, no padding, an
    all-ones mask; queries are grouped within consecutive blocks of `block` rows (all rows when None), so
    results complete block by block, and batches are ordered by their first row. Short batches are filled
    up to `batch_size` with copies of their first row (callers keep ``batch.rows`` only), so each input
    shape compiles once.
    """
    if batch_size < 1:
        raise GenIRError("--batch-size must be >= 1")
    if not reference_padding:
        ids, mask = tokenize_for_analysis(tokenizer, list(texts))
        return list(batches((ids, mask), batch_size))
    if not texts:
        raise GenIRError("no queries to tokenize")
    count = len(texts)
    encoded = [np.asarray(ids, dtype=np.int32) for ids in encode_queries(tokenizer, list(texts))]
    block = block or count
    out: list[Batch] = []
    for block_start in range(0, count, block):
        by_length: dict[int, list[int]] = {}
        for row in range(block_start, min(block_start + block, count)):
            by_length.setdefault(len(encoded[row]), []).append(row)
        block_batches = []
        for group in by_length.values():
            group_rows = np.asarray(group)
            ids = np.stack([encoded[r] for r in group])
            for batch in batches((ids,), batch_size):
                padded = batch.arrays[0]
                block_batches.append(Batch(group_rows[batch.rows], (padded, np.ones_like(padded))))
        out.extend(sorted(block_batches, key=lambda b: int(b.rows[0])))
    return out
