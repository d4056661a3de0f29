"""Atomic document identifiers: one new vocabulary token per document, and embedding resizing.

The token spelling is the reference code's, ``@DOC_ID_<id>@``. Adding docids follows what the reference
does with transformers: ``tokenizer.add_tokens(tokens)`` then ``model.resize_token_embeddings(len(tokenizer))``.
Resizing keeps the first ``min(old, new)`` rows (so a T5 vocabulary of 32128 rows shrinks to 32100 + the
docids when fewer than 28 docids are added, exactly as transformers does) and initialises added rows
like transformers' ``mean_resizing``: a sample of N(mean, 1e-9 * covariance) of the old rows, or the
mean when that covariance is not positive definite. Our sample comes from a seeded numpy generator, so
the result is deterministic.
"""

from __future__ import annotations

import collections
import copy
from typing import Iterable, Sequence

import jax.numpy as jnp
import numpy as np

from genir_jax.core.config import T5Config
from genir_jax.core.decoder_config import DecoderConfig
from genir_jax.core.decoder_modules import INIT_STD
from genir_jax.core.sites import is_decoder_only
from genir_jax.base.errors import GenIRError
from genir_jax.checkpoints.hf import PretrainedModel

DOCID_PREFIX = "@DOC_ID_"
DOCID_SUFFIX = "@"
_MEAN_RESIZING_EPSILON = 1e-9  # transformers' scale of the covariance for added embeddings


def docid_token(doc_id: str | int) -> str:
    """The atomic docid token of a document id, e.g. ``7 -> "@DOC_ID_7@"`` (ids are stripped strings)."""
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise TypeError(f"document ids must be str or int, got {type(doc_id).__name__}: {doc_id!r}")
    text = str(doc_id).strip()
    if not text:
        raise ValueError("document id is empty")
    return f"{DOCID_PREFIX}{text}{DOCID_SUFFIX}"


def is_docid_token(token: str) -> bool:
    """Whether a vocabulary entry is an atomic docid token."""
    return token.startswith(DOCID_PREFIX) and token.endswith(DOCID_SUFFIX) and len(token) > len(DOCID_PREFIX) + 1


def doc_id_of_token(token: str) -> str:
    """Inverse of `docid_token`."""
    if not is_docid_token(token):
        raise ValueError(f"{token!r} is not a docid token ({DOCID_PREFIX}<id>{DOCID_SUFFIX})")
    return token[len(DOCID_PREFIX):-len(DOCID_SUFFIX)]


def _added_rows(old: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` new rows drawn like transformers' mean resizing, in float64 then cast back."""
    old64 = np.asarray(old, dtype=np.float64)
    mean = old64.mean(axis=0)
    centered = old64 - mean
    covariance = _MEAN_RESIZING_EPSILON * (centered.T @ centered) / old64.shape[0]
    try:
        factor = np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:
        return np.repeat(mean[None, :], count, axis=0)
    noise = rng.standard_normal((count, old64.shape[1])) @ factor.T
    return mean[None, :] + noise


def _resize_rows(table: np.ndarray, new_rows: int, mean_resizing: bool, rng: np.random.Generator,
                 initializer_std: float) -> np.ndarray:
    old_rows = table.shape[0]
    if new_rows <= old_rows:
        return table[:new_rows]
    added = new_rows - old_rows
    if mean_resizing:
        extra = _added_rows(table, added, rng)
    else:
        extra = rng.normal(0.0, initializer_std, size=(added, table.shape[1]))
    return np.concatenate([table, extra.astype(table.dtype)], axis=0)


def resize_token_embeddings(
    config: T5Config, params: dict, new_num_tokens: int, *, seed: int = 0, mean_resizing: bool = True,
    pad_to_multiple_of: int | None = None,
) -> tuple[T5Config, dict]:
    """Resize the shared embedding (and an untied `lm_head`) to `new_num_tokens` rows.

    Returns the new config (vocab_size updated) and a new params dict; the inputs are not modified.
    """
    if pad_to_multiple_of:
        new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
    if new_num_tokens <= max(config.pad_token_id, config.eos_token_id, config.decoder_start_token_id):
        raise ValueError(f"cannot resize the vocabulary to {new_num_tokens} tokens: special token ids would be lost")
    rng = np.random.default_rng(seed)
    shared = np.asarray(params["shared"])
    new_params = dict(params)
    new_params["shared"] = jnp.asarray(
        _resize_rows(shared, new_num_tokens, mean_resizing, rng, config.initializer_factor))
    if not config.tie_word_embeddings:
        lm_head = np.asarray(params["lm_head"])  # [D, V]: resize its columns as rows of the transpose
        new_params["lm_head"] = jnp.asarray(
            _resize_rows(lm_head.T, new_num_tokens, mean_resizing, rng, config.initializer_factor).T)
    return config.replace(vocab_size=new_num_tokens), new_params


def resize_decoder_embeddings(
    config: DecoderConfig, params: dict, new_num_tokens: int, *, seed: int = 0, mean_resizing: bool = True,
    pad_to_multiple_of: int | None = None,
) -> tuple[DecoderConfig, dict]:
    """`resize_token_embeddings` for a decoder-only model: the token embedding ``embed`` [V, D] and an untied
    ``lm_head`` [D, V]; random rows are drawn as the model initialises them (normal, std `INIT_STD`, transformers'
    ``initializer_range`` 0.02). GPT-2's learned positions are untouched."""
    if pad_to_multiple_of:
        new_num_tokens = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
    special = [i for i in (config.bos_token_id, config.eos_token_id, config.pad_token_id) if i is not None]
    if new_num_tokens <= max(special, default=-1):
        raise ValueError(f"cannot resize the vocabulary to {new_num_tokens} tokens: special token ids would be lost")
    rng = np.random.default_rng(seed)
    new_params = dict(params)
    new_params["embed"] = jnp.asarray(_resize_rows(np.asarray(params["embed"]), new_num_tokens, mean_resizing, rng,
                                                   INIT_STD))
    if not config.tie_word_embeddings:
        lm_head = np.asarray(params["lm_head"])  # [D, V]: resize its columns as rows of the transpose
        new_params["lm_head"] = jnp.asarray(_resize_rows(lm_head.T, new_num_tokens, mean_resizing, rng, INIT_STD).T)
    return config.replace(vocab_size=new_num_tokens), new_params


def add_docid_tokens(
    model: PretrainedModel, doc_ids: Iterable[str | int], *, seed: int = 0, mean_resizing: bool = True,
    pad_to_multiple_of: int | None = None,
) -> PretrainedModel:
    """A copy of `model` whose tokenizer knows ``@DOC_ID_<id>@`` for every id, with embeddings resized to
    the tokenizer's length. Tokens the tokenizer already has are kept at their ids. `model` may also be a
    decoder-only `genir_jax.checkpoints.decoder_hf.PretrainedDecoder` (`resize_decoder_embeddings`)."""
    if model.tokenizer is None:
        raise GenIRError("adding docid tokens needs a tokenizer; this model was loaded without one")
    tokens = [docid_token(d) for d in doc_ids]
    duplicates = sorted(token for token, count in collections.Counter(tokens).items() if count > 1)
    if duplicates:
        raise GenIRError(f"duplicate document ids: {duplicates[:5]}")
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.add_tokens(tokens)
    resize = resize_decoder_embeddings if is_decoder_only(model.config) else resize_token_embeddings
    config, params = resize(
        model.config, model.params, len(tokenizer), seed=seed, mean_resizing=mean_resizing,
        pad_to_multiple_of=pad_to_multiple_of,
    )
    return model.replace(config=config, params=params, tokenizer=tokenizer)


def docid_token_ids(tokenizer, doc_ids: Sequence[str | int]) -> np.ndarray:
    """Vocabulary ids of the docid tokens of `doc_ids`; raises if one is not in the vocabulary."""
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for doc_id in doc_ids:
        token = docid_token(doc_id)
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == unk:
            raise GenIRError(f"docid token {token!r} (document {doc_id!r}) is not in the tokenizer's vocabulary")
        ids.append(token_id)
    return np.asarray(ids, dtype=np.int32)


def docid_vocabulary(tokenizer) -> dict[int, str]:
    """Every docid token id of a tokenizer mapped to its document id."""
    return {
        token_id: doc_id_of_token(token)
        for token, token_id in tokenizer.get_vocab().items()
        if is_docid_token(token)
    }
