"""A T5 tokenizer on the `tokenizers` library alone: the analyses' tokenizer without importing transformers.

Importing transformers takes over a second and the analyses only encode queries and look tokens up, so
`load_tokenizer(directory, fast=True)` (what `load_pretrained(..., fast_tokenizer=True)` and the analysis
commands use) returns a `T5FastTokenizer` built from the checkpoint's ``tokenizer.json``. It gives the
same ids, tokens and strings as ``transformers.AutoTokenizer`` for the methods it offers: transformers
5.x does not run a T5 ``tokenizer.json``'s pipeline as stored but rebuilds it (Precompiled normaliser,
whitespace split + Metaspace pre-tokeniser, ``$A </s>`` template), and this class rebuilds it the same
way. Whenever that equivalence is not known to hold (no ``tokenizer.json``, a tokenizer class other than
T5's, transformers 4.x installed, which keeps the stored pipeline and may convert from ``spiece.model``),
the transformers tokenizer is returned instead. Training and export (adding docid tokens, saving) need
the transformers tokenizer: `T5FastTokenizer` is read-only and says so.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any, Sequence

import numpy as np

from genir_jax.base.errors import CheckpointError, GenIRError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_T5_CLASSES = frozenset({"T5Tokenizer", "T5TokenizerFast"})

# Characters of raw text per token that a query's first tokens can come from: no T5 piece is longer than 16
# characters, and natural text averages about 4; the rest is room for whitespace and characters the
# normaliser drops.
CHARS_PER_TOKEN = 64


def clip_text(text: str, max_tokens: int) -> str:
    """`text` cut, before tokenising, to what its first `max_tokens` tokens can come from: at most
    `max_tokens` x `CHARS_PER_TOKEN` characters, ending at a whitespace so no word is split (T5 splits on
    whitespace before it segments words). So a query of millions of words never tokenises whole (the
    tokeniser's per-character alignments took gigabytes), and the first `max_tokens` tokens are those of
    the whole text wherever its first part has fewer than 64 characters per token (any natural text)."""
    budget = int(max_tokens) * CHARS_PER_TOKEN
    if len(text) <= budget:
        return text
    head = text[:budget]
    if text[budget].isspace():  # the cut falls between words
        return head
    words = head.rsplit(maxsplit=1)
    return words[0] if len(words) == 2 else head


class Encoding(dict):
    """What a call returns: a dict (``input_ids``, ``attention_mask``) with attribute access, as
    transformers' `BatchEncoding`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class T5FastTokenizer:
    """A T5 tokenizer (SentencePiece unigram) on `tokenizers`, with the transformers methods the analyses use:
    ``__call__`` (one text or a batch; ``add_special_tokens``, ``padding``, ``truncation``/``max_length``,
    ``return_tensors="np"``), `tokenize`, `get_vocab`, `convert_ids_to_tokens`, `convert_tokens_to_ids`,
    `decode`, ``len()``, the special tokens and their ids. Read-only: no `add_tokens`, no saving of its own
    (`genir_jax.checkpoints.hf.save_tokenizer` copies its files)."""

    def __init__(self, directory: str | os.PathLike, backend=None):
        """`backend`: the `tokenizers.Tokenizer` of the directory's tokenizer.json when already read
        (`load_tokenizer` reads it once to check its model type); it is reconfigured in place."""
        from tokenizers import decoders, normalizers, pre_tokenizers, processors

        self.directory = os.fspath(directory)
        self.name_or_path = self.directory
        path = os.path.join(self.directory, TOKENIZER_JSON)
        if backend is None:
            backend = _read_backend(path)
        settings = _read_config(self.directory)
        self.eos_token = _token_text(settings.get("eos_token", "</s>"))
        self.unk_token = _token_text(settings.get("unk_token", "<unk>"))
        self.pad_token = _token_text(settings.get("pad_token", "<pad>"))
        self.clean_up_tokenization_spaces = bool(settings.get("clean_up_tokenization_spaces", False))
        self.model_max_length = settings.get("model_max_length")
        eos_id = backend.token_to_id(self.eos_token)
        if eos_id is None:
            raise CheckpointError(f"{path}: the end-of-sequence token {self.eos_token!r} is not in the vocabulary")

        # The pipeline transformers 5.x's T5Tokenizer builds around the stored vocabulary and added tokens.
        charsmap = _precompiled_charsmap(_stored_normalizer(backend))
        backend.normalizer = None if charsmap is None else normalizers.Precompiled(charsmap)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True),
        ])
        backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
        backend.post_processor = processors.TemplateProcessing(
            single=["$A", self.eos_token], pair=["$A", self.eos_token, "$B", self.eos_token],
            special_tokens=[(self.eos_token, eos_id)],
        )
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = False
        self._backend = backend
        self._vocab: dict[str, int] | None = None

    # ---- special tokens and vocabulary ---------------------------------------------------------------

    @property
    def eos_token_id(self) -> int | None:
        return self._backend.token_to_id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._backend.token_to_id(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._backend.token_to_id(self.pad_token)

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(i for i, token in self._backend.get_added_tokens_decoder().items() if token.special)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (transformers' `vocab_size`)."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        if self._vocab is None:
            self._vocab = self._backend.get_vocab(with_added_tokens=True)
        return dict(self._vocab)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Ids of tokens; an unknown token gives the unknown token's id, as transformers does."""
        if isinstance(tokens, str):
            token_id = self._backend.token_to_id(tokens)
            return self.unk_token_id if token_id is None else token_id
        return [self.convert_tokens_to_ids(token) for token in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, (int, np.integer)):
            return self._backend.id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(int(i)) for i in ids if int(i) not in skip]

    # ---- encoding -------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], *, add_special_tokens: bool = True, padding: bool | str = False,
                 truncation: bool | str = False, max_length: int | None = None, return_tensors: str | None = None,
                 return_attention_mask: bool = True, verbose: bool = True) -> Encoding:
        """Encode one text (lists of ids) or a batch of texts (lists of lists, or arrays with
        ``return_tensors="np"``). ``padding``: True / "longest" pads to the longest, "max_length" to
        `max_length`, on the right with the pad token and a 0 mask. ``truncation`` with `max_length` keeps
        the first tokens so that, with ``</s>``, each sequence has at most `max_length`."""
        del verbose  # transformers' switch for its length warnings; nothing to warn about here
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a sequence of str")
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors={return_tensors!r}: this tokenizer returns lists or numpy arrays (\"np\")")
        if truncation not in (False, True, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"truncation={truncation!r} is not supported")
        truncate = truncation not in (False, "do_not_truncate")
        if truncate and max_length is None:
            max_length = self.model_max_length
        if truncate:
            self._backend.enable_truncation(int(max_length))
        try:
            encoded = self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        finally:
            if truncate:
                self._backend.no_truncation()
        ids = [e.ids for e in encoded]
        masks = [[1] * len(row) for row in ids]
        if padding not in (False, "do_not_pad"):
            if padding in (True, "longest"):
                width = max(len(row) for row in ids)
            elif padding == "max_length":
                if max_length is None:
                    raise ValueError("padding='max_length' needs max_length")
                width = max([int(max_length)] + [len(row) for row in ids])
            else:
                raise ValueError(f"padding={padding!r} is not supported")
            pad = self.pad_token_id
            masks = [m + [0] * (width - len(row)) for row, m in zip(ids, masks)]
            ids = [row + [pad] * (width - len(row)) for row in ids]
        if return_tensors == "np":
            if len({len(row) for row in ids}) > 1:
                raise ValueError("sequences of different lengths need padding=True for return_tensors='np'")
            ids_out: Any = np.asarray(ids, dtype=np.int64).reshape(len(ids), -1)
            masks_out: Any = np.asarray(masks, dtype=np.int64).reshape(len(ids), -1)
        else:
            ids_out, masks_out = (ids[0], masks[0]) if single else (ids, masks)
        out = Encoding(input_ids=ids_out)
        if return_attention_mask:
            out["attention_mask"] = masks_out
        return out

    # ---- decoding -------------------------------------------------------------------------------------

    def decode(self, token_ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [int(token_ids)]
        text = self._backend.decode([int(t) for t in token_ids], skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]

    # ---- what it does not do --------------------------------------------------------------------------

    def add_tokens(self, *args, **kwargs):
        raise GenIRError("this tokenizer (genir_jax.checkpoints.tokenizer.T5FastTokenizer) is read-only; load the model with "
                         "load_pretrained(..., fast_tokenizer=False) to add tokens")

    add_special_tokens = add_tokens

    def to_transformers(self):
        """The transformers tokenizer of the same directory (imports transformers)."""
        return load_tokenizer(self.directory, fast=False)

    def __repr__(self) -> str:
        return f"T5FastTokenizer({self.directory!r}, vocabulary={len(self)})"


def load_tokenizer(directory: str | os.PathLike, *, fast: bool = True):
    """The tokenizer saved in `directory`: a `T5FastTokenizer` when `fast` and it is equivalent to
    transformers' (see the module docstring), else ``transformers.AutoTokenizer``'s. Raises
    `CheckpointError` when the files are unreadable."""
    directory = os.fspath(directory)
    if fast and _settings_supported(directory):
        backend = _read_backend(os.path.join(directory, TOKENIZER_JSON))  # read once: checked, then used
        if type(backend.model).__name__ == "Unigram":
            return T5FastTokenizer(directory, backend)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:
        raise CheckpointError(f"{directory}: tokenizer files present but unreadable ({exc})") from exc


def fast_tokenizer_supported(directory: str | os.PathLike) -> bool:
    """Whether `T5FastTokenizer` gives exactly what transformers' tokenizer of `directory` gives."""
    directory = os.fspath(directory)
    if not _settings_supported(directory):
        return False
    try:
        with open(os.path.join(directory, TOKENIZER_JSON), encoding="utf-8") as handle:
            model = json.load(handle).get("model", {})
    except (OSError, ValueError):
        return False
    return model.get("type") == "Unigram"


def _settings_supported(directory: str) -> bool:
    """Whether the files and settings of `directory` allow `T5FastTokenizer` (all but the model type, which
    needs tokenizer.json read): a tokenizer.json, transformers 5.x, a T5 tokenizer class, default specials."""
    if not os.path.isfile(os.path.join(directory, TOKENIZER_JSON)):
        return False
    if _transformers_major() < 5:
        return False
    settings = _read_config(directory)
    if settings.get("tokenizer_class") not in _T5_CLASSES:
        return False
    return not (settings.get("split_special_tokens") or settings.get("add_bos_token")
                or settings.get("add_eos_token") is False)


def _read_backend(path: str):
    """The `tokenizers.Tokenizer` stored at `path` (parsed by tokenizers itself, no Python JSON pass)."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as exc:  # OSError, JSON errors, and tokenizers raises a plain Exception on a bad file
        raise CheckpointError(f"{path}: not a readable tokenizers file ({exc})") from exc


def _stored_normalizer(backend) -> dict | None:
    """The stored normaliser of `backend` as its JSON dict (None when it has none)."""
    normalizer = backend.normalizer
    return None if normalizer is None else json.loads(normalizer.__getstate__())


def _transformers_major() -> int:
    from importlib import metadata

    try:
        return int(metadata.version("transformers").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, TOKENIZER_CONFIG)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str:
    return value.get("content") if isinstance(value, dict) else str(value)


def _precompiled_charsmap(normalizer: dict | None) -> bytes | None:
    if not normalizer:
        return None
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts:
        if part.get("type") == "Precompiled" and "precompiled_charsmap" in part:
            return base64.b64decode(part["precompiled_charsmap"])
    return None


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (``clean_up_tokenization_spaces``)."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))
