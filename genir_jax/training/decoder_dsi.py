"""DSI examples for decoder-only models (GPT-2, Llama, Qwen2): text, prompt, docid token(s).

The layout is the reference's decoder-only one (technion-cs-nlp/re-gen-ir, ``code/preprocess.py``,
``tokenize_data`` / ``truncate_doc`` for ``model_type == 'decoder-only'``): the text (a document for indexing, a
query for retrieval) followed by the prompt ``" Document:"`` and the docid, as one sequence

    [the tokenizer's leading special tokens (e.g. Llama's BOS)] text[:max_length] " Document:" @DOC_ID_<id>@

with the loss on the docid token only (the reference's labels are -100 before the docid). Differences from the
reference, which tokenizes ``f"{text} Document: 1"`` and splits it back: we tokenize the text and the prompt
separately (the same ids for GPT-2's byte-level BPE), and we append no trailing special tokens (the reference
adds and trains any the tokenizer appends; GPT-2's and Llama's append none). Evaluation feeds the same rows
without the docid (`encode_prompts`) and ranks the docid tokens by the logits at the prompt's last token, as the
reference's ``eval.py`` (``get_predictions_decoder``) does (`genir_jax.docids.retrieval.docid_step_logits`).

Naive / semantic docids: the docid's tokens follow the prompt (tokenized without special tokens, as the
reference's ``tokenize_data`` does for decoder-only targets), then EOS, with the loss on every docid token and
the EOS (`genir_jax.docids.schemes.docid_token_sequences` with ``decoder_only=True``). The EOS is our addition:
the reference appends only the tokenizer's trailing special tokens (none for GPT-2 / Llama), so its docids are
not prefix-free ("1" is a prefix of "12"), and a trie-constrained beam search could not tell where one ends.
Evaluation decodes them from the prompt by trie-constrained beam search (`genir_jax.docids.decoding`).

Padding: rows are right-padded (the reference's choice too), so every real token keeps its position ``0..n-1``
and, the attention being causal, a row's logits do not depend on the padding; the docid is predicted at the
last real prompt token. A batch in the training step's format (`genir_jax.training.loop.causal_lm_loss`):
``input_ids`` / ``attention_mask`` [N, S] (prompt + docid), ``targets`` [N, S] = the next token of each
position, ``target_mask`` [N, S] = 1 exactly at the position whose next token is the docid.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from genir_jax.base.errors import DataError, SettingError
from genir_jax.data.corpus import Query
from genir_jax.data.dsi import DSIExample
from genir_jax.docids.tokens import docid_token_ids

PROMPT = " Document:"  # the reference's separator between the text and the docid


def check_model_type(model_type: str) -> bool:
    """Whether `model_type` (one of `genir_jax.base.options.MODEL_TYPES`) is "decoder"; an unknown type is a
    `SettingError` naming ``model_type``. Every docid scheme works with both families."""
    from genir_jax.base.options import MODEL_TYPES

    if model_type not in MODEL_TYPES:
        raise SettingError("{0} must be one of %s, got %r" % (", ".join(MODEL_TYPES), model_type), "model_type")
    return model_type == "decoder"


def start_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Llama's BOS; none for GPT-2)."""
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for at in range(len(full) - len(plain) + 1):
        if full[at:at + len(plain)] == plain:
            return full[:at]
    return []


def pad_token_id(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad token, else its EOS (as the reference sets), else 0 (padding is
    masked: its value never matters)."""
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return 0


def prompt_rows(texts: Sequence[str], tokenizer, max_length: int) -> list[list[int]]:
    """Token ids of ``[start] text[:max_length] PROMPT`` for every text (`max_length` counts text tokens only,
    as the reference's ``--max-length``)."""
    if max_length < 1:
        raise DataError(f"max_length must be >= 1, got {max_length}")
    start = start_tokens(tokenizer)
    prompt = list(tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    return [start + list(ids)[:max_length] + prompt for ids in encoded]


def _right_padded(rows: Sequence[Sequence[int]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), width), pad, dtype=np.int32)
    mask = np.zeros((len(rows), width), dtype=np.int32)
    for row, tokens in enumerate(rows):
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1
    return ids, mask


def encode_prompts(queries: Sequence[Query | str], tokenizer, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int32 of query prompts without the docid, right-padded to the longest row:
    the logits at each row's last real token rank the docids."""
    texts = [q.text if isinstance(q, Query) else q for q in queries]
    if not texts:
        raise DataError("no queries to tokenize")
    rows = prompt_rows(texts, tokenizer, max_length)
    return _right_padded(rows, max(len(r) for r in rows), pad_token_id(tokenizer))


def encode_examples(examples: Sequence[DSIExample], tokenizer, max_length: int, *,
                    width: int | None = None, docid_sequences=None) -> dict[str, np.ndarray]:
    """A batch group of DSI examples (prompt + docid, right-padded to `width` columns; default: the longest text
    at `max_length` tokens and the longest docid, so a group has one width whatever its texts): ``input_ids``,
    ``attention_mask``, ``targets`` (next tokens) and ``target_mask`` (1 only where a docid token is predicted).
    `docid_sequences` (``{doc id: token ids ending with EOS}``): naive / semantic docids; else atomic tokens."""
    if not examples:
        raise DataError("no DSI examples to tokenize")
    if docid_sequences is None:
        docids = [[int(t)] for t in docid_token_ids(tokenizer, [e.doc_id for e in examples])]
        longest = 1
    else:
        missing = sorted({e.doc_id for e in examples if e.doc_id not in docid_sequences})
        if missing:
            raise DataError(f"{len(missing)} DSI example(s) have no docid sequence (e.g. {missing[:3]})")
        docids = [[int(t) for t in docid_sequences[e.doc_id]] for e in examples]
        longest = max(len(s) for s in docid_sequences.values())
    prompts = prompt_rows([e.text for e in examples], tokenizer, max_length)
    rows = [row + docid for row, docid in zip(prompts, docids)]
    if width is None:
        width = max_length + len(start_tokens(tokenizer)) + len(tokenizer(PROMPT, add_special_tokens=False)
                                                                  ["input_ids"]) + longest
    if max(len(r) for r in rows) > width:
        raise DataError(f"a DSI example has {max(len(r) for r in rows)} tokens, more than the width {width}")
    pad = pad_token_id(tokenizer)
    input_ids, attention_mask = _right_padded(rows, width, pad)
    targets = np.concatenate([input_ids[:, 1:], np.full((len(rows), 1), pad, np.int32)], axis=1)
    target_mask = np.zeros_like(input_ids)
    for row, (prompt, docid) in enumerate(zip(prompts, docids)):  # the last prompt token predicts the first
        target_mask[row, len(prompt) - 1:len(prompt) - 1 + len(docid)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets, "target_mask": target_mask}


def load_model_of_type(path: str, model_type: str, *, dtype: str = "float32"):
    """The checkpoint in `path` as `model_type` (`genir_jax.base.options.MODEL_TYPES`) says: a T5
    (`genir_jax.checkpoints.hf.load_pretrained`) or a decoder-only model (`load_decoder_only`). A directory whose
    config.json says the other family is refused naming the setting ``model_type`` (``--model-type``)."""
    from genir_jax.checkpoints.decoder_hf import load_decoder_only
    from genir_jax.checkpoints.hf import load_pretrained
    from genir_jax.core.config import read_config_json
    from genir_jax.core.decoder_config import DECODER_MODEL_TYPES

    decoder = model_type == "decoder"
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        found = read_config_json(config_path)
        found = found.get("model_type") if isinstance(found, dict) else None
        if not decoder and found in DECODER_MODEL_TYPES:
            raise SettingError("%s: model_type %r is a decoder-only model; give {0} decoder" % (config_path, found),
                               "model_type")
        if decoder and found not in DECODER_MODEL_TYPES:
            raise SettingError("%s: model_type %r is not a decoder-only model (%s); drop {0} decoder"
                               % (config_path, found, ", ".join(DECODER_MODEL_TYPES)), "model_type")
    return load_decoder_only(path, dtype=dtype) if decoder else load_pretrained(path, dtype=dtype)
