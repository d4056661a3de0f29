"""Docid schemes (the reference's ``--doc-ids atomic|naive|semantic``): what the decoder must generate.

- ``atomic``: one new vocabulary token ``@DOC_ID_<id>@`` per document, one decoder step (`genir_jax.docids.tokens`).
- ``naive``: the document id string tokenized as ordinary text, then EOS (the reference's
  ``tokenizer(text_target=str(doc_id))``): id ``"1234"`` -> the T5 pieces of ``1234`` + ``</s>``.
- ``semantic``: a mapping ``{doc id: "3_0_17"}`` (the reference's ``--semantic-doc-id-mapping`` JSON file),
  each ``_``-separated part tokenized as its own word, then EOS (the reference's
  ``tokenizer(text_target=id.split("_"), is_split_into_words=True)``, which for T5 equals tokenizing the
  parts joined by spaces). `genir_jax.docids.semantic_ids` builds such a mapping (hierarchical k-means).

Naive and semantic docids use the tokenizer's existing vocabulary (no new tokens). Every docid must survive
the tokenizer: no unknown token and a lossless round trip (decoding its tokens gives the id text back), so
that decoded beams map back to documents. A scheme is recorded as ``docids.json`` (`DOCIDS_FILE`) in a
trained model's directory (scheme, the doc id -> docid string map, where it came from) and read back by
``evaluate`` and the analyses; a checkpoint without that file is atomic (older exports, the reference's
atomic models).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

from genir_jax.base.errors import CheckpointError, DataError, GenIRError, SettingError

SCHEMES = ("atomic", "naive", "semantic")
DOCIDS_FILE = "docids.json"                  # scheme record in a trained model (and a prepared directory)
SEMANTIC_MAPPING_FILE = "semantic_docids.json"  # a prepared directory's mapping, in the reference's format
NAIVE_MAPPING_FILE = "naive_docids.json"        # a prepared directory's shuffled naive ids {doc id: "17"}
# How `prepare-data --docids naive` numbers the documents: "shuffled" (default: a seeded permutation, so that
# neighbouring ids do not share an article and with it a leading token) or "corpus" (each document's own id,
# numbered in article order by the sources)
NAIVE_ORDERS = ("shuffled", "corpus")
_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class DocidScheme:
    """A scheme and, for naive / semantic, the docid string of every document (corpus order)."""

    name: str
    docids: Mapping[str, str] | None = None  # doc id -> docid string; None for atomic
    source: str | None = None                # file or procedure the docids came from
    build: Mapping[str, Any] | None = None   # how a built semantic mapping was made (embedding, k, c, seed)

    @property
    def multi_token(self) -> bool:
        return self.name != "atomic"

    def text(self, doc_id: str) -> str:
        """The docid as the reference spells it in runs and correct_valid.json."""
        if self.name == "atomic":
            from genir_jax.docids.tokens import docid_token

            return docid_token(doc_id)
        return self.docids[doc_id]

    def doc_id_of(self, text: str) -> str:
        """Inverse of `text` (e.g. for correct_valid.json entries); a `DataError` if no document has it."""
        if self.name == "atomic":
            from genir_jax.docids.tokens import doc_id_of_token

            return doc_id_of_token(text)
        inverse = {docid: doc_id for doc_id, docid in self.docids.items()}
        if text not in inverse:
            raise DataError(f"{self.name} docid {text!r} belongs to no document of {self.source or 'the scheme'}")
        return inverse[text]

    def words(self, doc_id: str) -> str:
        """The text the tokenizer encodes for `doc_id` (semantic parts joined by spaces)."""
        text = self.text(doc_id)
        return " ".join(text.split("_")) if self.name == "semantic" else text

    def to_json(self) -> dict:
        data: dict[str, Any] = {"format": _FORMAT, "scheme": self.name}
        if self.source is not None:
            data["source"] = self.source
        if self.build is not None:
            data["build"] = dict(self.build)
        if self.docids is not None:
            data["docids"] = dict(self.docids)
        return data


def check_scheme(name: str, setting: str = "docids") -> str:
    """`name` if it is one of `SCHEMES`; else a `SettingError` naming `setting`."""
    if name not in SCHEMES:
        raise SettingError("{0}: unknown docid scheme %r; choose one of %s" % (name, ", ".join(SCHEMES)), setting)
    return name


def naive_scheme(doc_ids: Sequence[str]) -> DocidScheme:
    """Each document's id string is its docid."""
    return DocidScheme("naive", {d: str(d).strip() for d in doc_ids}, source="document ids")


def shuffled_naive_scheme(doc_ids: Sequence[str], seed: int) -> DocidScheme:
    """Naive ids by a seeded shuffle: the documents in a random order (``numpy.random.default_rng(seed)``) are
    numbered ``"0"``, ``"1"``, ... (`NAIVE_ORDERS`)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(doc_ids))
    docids = {str(doc_ids[index]).strip(): str(number) for number, index in enumerate(order.tolist())}
    return DocidScheme("naive", {d: docids[str(d).strip()] for d in doc_ids}, source=f"shuffled with seed {seed}")


def read_naive_mapping(path: str | os.PathLike, doc_ids: Sequence[str]) -> DocidScheme:
    """A prepared directory's `NAIVE_MAPPING_FILE` ({doc id: naive id}), validated: every document of the
    corpus and no other, unique non-empty ids without whitespace."""
    from genir_jax.base.io import read_json

    path = os.fspath(path)
    mapping = read_json(path)
    if not isinstance(mapping, dict):
        raise DataError(f"{path}: expected a JSON object {{doc id: naive id}}, got {type(mapping).__name__}")
    missing = [d for d in doc_ids if d not in mapping]
    unknown = [key for key in mapping if key not in set(doc_ids)]
    if missing or unknown:
        raise DataError(f"{path}: " + (f"document {missing[0]!r} has no naive id" if missing else
                                       f"document {unknown[0]!r} is not in the corpus")
                        + " (the mapping was made for another corpus)")
    owner: dict[str, str] = {}
    for doc_id in doc_ids:
        value = mapping[doc_id]
        if not isinstance(value, str) or not value or any(ch.isspace() for ch in value):
            raise DataError(f"{path}: record {doc_id!r}: the naive id must be a non-empty string without "
                            f"whitespace, got {value!r}")
        if value in owner:
            raise DataError(f"{path}: record {doc_id!r}: naive id {value!r} duplicates that of document "
                            f"{owner[value]!r} (ids must be unique)")
        owner[value] = doc_id
    return DocidScheme("naive", {d: mapping[d] for d in doc_ids}, source=path)


def semantic_scheme(mapping: Any, doc_ids: Sequence[str], source: str, build: Mapping | None = None) -> DocidScheme:
    """Validate a ``{doc id: "a_b_c"}`` mapping against the corpus: every document present and no other, values strings of
    non-empty ``_``-separated parts without whitespace, unique and prefix-free (as part sequences)."""
    if not isinstance(mapping, dict):
        raise DataError(f"{source}: expected a JSON object {{doc id: semantic id}}, got {type(mapping).__name__}")
    by_key = {str(key).strip(): value for key, value in mapping.items()}
    missing = [d for d in doc_ids if d not in by_key]
    if missing:
        raise DataError(f"{source}: document {missing[0]!r} has no semantic id (field missing for "
                        f"{len(missing)} of {len(doc_ids)} documents, e.g. {missing[:5]})")
    known = set(doc_ids)
    unknown = [key for key in by_key if key not in known]
    if unknown:  # a mapping made for another corpus (or a typo), not silently ignored
        raise DataError(f"{source}: document {unknown[0]!r} is not in the corpus ({len(unknown)} of the mapping's "
                        f"{len(by_key)} entries name no document of the corpus)")
    docids: dict[str, str] = {}
    owner: dict[tuple[str, ...], str] = {}
    for doc_id in doc_ids:
        value = by_key[doc_id]
        if not isinstance(value, str):
            raise DataError(f"{source}: record {doc_id!r}: the semantic id must be a string like '3_0_17', got "
                            f"{type(value).__name__} {value!r}")
        parts = tuple(value.split("_"))
        if any(not part or any(ch.isspace() for ch in part) for part in parts):
            raise DataError(f"{source}: record {doc_id!r}: semantic id {value!r} must be non-empty parts without "
                            "whitespace separated by '_'")
        if parts in owner:
            raise DataError(f"{source}: record {doc_id!r}: semantic id {value!r} duplicates that of document "
                            f"{owner[parts]!r} (ids must be unique)")
        owner[parts] = doc_id
        docids[doc_id] = value
    ordered = sorted(owner)
    for a, b in zip(ordered, ordered[1:]):  # sorted tuples: a prefix sits right before a sequence it prefixes
        if b[:len(a)] == a:
            raise DataError(f"{source}: record {owner[b]!r}: semantic id {'_'.join(b)!r} extends the id "
                            f"{'_'.join(a)!r} of document {owner[a]!r} (ids must be prefix-free)")
    return DocidScheme("semantic", docids, source=source, build=build)


def read_semantic_mapping(path: str | os.PathLike, doc_ids: Sequence[str]) -> DocidScheme:
    """The reference's ``--semantic-doc-id-mapping`` JSON file, validated (see `semantic_scheme`)."""
    from genir_jax.base.io import read_json

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: semantic docid mapping file not found")
    return semantic_scheme(read_json(path), doc_ids, path)


def build_semantic_scheme(doc_ids: Sequence[str], texts: Sequence[str], *, k: int, c: int, seed: int,
                          progress: bool = True) -> DocidScheme:
    """A semantic scheme built by `genir_jax.docids.semantic_ids.build_semantic_mapping`."""
    from genir_jax.docids.semantic_ids import EMBEDDING, build_semantic_mapping

    mapping = build_semantic_mapping(doc_ids, texts, k=k, c=c, seed=seed, progress=progress)
    build = {"embedding": EMBEDDING, "k": k, "c": c, "seed": seed}
    return semantic_scheme(mapping, doc_ids, "hierarchical k-means", build=build)


def docid_token_sequences(scheme: DocidScheme, tokenizer, doc_ids: Sequence[str], source: str, *,
                          decoder_only: bool = False) -> list[list[int]]:
    """Token ids (ending with EOS) of the docid of every document in `doc_ids`; a `DataError` names the
    document when a docid has an unknown token or does not decode back to its text. `decoder_only`: tokenized
    without special tokens, as the reference's decoder-only targets (no BOS before a docid that follows the
    prompt), then EOS appended to end it (T5's tokenizer appends EOS itself)."""
    if not scheme.multi_token:
        raise ValueError("atomic docids are single tokens (genir_jax.docids.tokens)")
    words = [scheme.words(d) for d in doc_ids]
    eos, unk = tokenizer.eos_token_id, getattr(tokenizer, "unk_token_id", None)
    if eos is None:
        raise DataError(f"{source}: the tokenizer has no EOS token to end {scheme.name} docids with")
    encoded = tokenizer(words, add_special_tokens=not decoder_only)["input_ids"] if words else []
    sequences = []
    for doc_id, text, ids in zip(doc_ids, words, encoded):
        ids = [int(t) for t in ids]
        body = ids[:-1] if ids and ids[-1] == eos else ids
        decoded = tokenizer.decode(body, skip_special_tokens=False) if body else ""
        if not body or (unk is not None and unk in body) or eos in body or decoded != text:
            raise DataError(f"{source}: record {doc_id!r}: {scheme.name} docid {scheme.text(doc_id)!r} cannot be "
                            f"represented by the tokenizer (tokens {tokenizer.convert_ids_to_tokens(body)} decode "
                            f"to {decoded!r})")
        sequences.append(body + [eos])
    return sequences


def docid_trie(scheme: DocidScheme, tokenizer, doc_ids: Sequence[str], source: str, *, decoder_only: bool = False):
    """A `genir_jax.docids.decoding.DocidTrie` of the documents' docids (index i = doc_ids[i]); `decoder_only`
    as `docid_token_sequences`."""
    from genir_jax.docids.decoding import DocidTrie

    sequences = docid_token_sequences(scheme, tokenizer, doc_ids, source, decoder_only=decoder_only)
    try:
        return DocidTrie(sequences, eos_id=tokenizer.eos_token_id)
    except GenIRError as exc:  # e.g. two ids whose tokens coincide
        raise DataError(f"{source}: {exc}") from exc


def write_scheme(path: str | os.PathLike, scheme: DocidScheme) -> None:
    from genir_jax.base.io import write_json

    write_json(path, scheme.to_json(), indent=1)


def read_scheme(path: str | os.PathLike) -> DocidScheme:
    """A `DOCIDS_FILE`, validated."""
    from genir_jax.base.io import read_json

    path = os.fspath(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("scheme"), str):
        raise CheckpointError(f"{path}: expected an object with field 'scheme' (one of {', '.join(SCHEMES)})")
    name = data["scheme"]
    if name not in SCHEMES:
        raise CheckpointError(f"{path}: field 'scheme': unknown docid scheme {name!r}")
    if name == "atomic":
        return DocidScheme("atomic", source=data.get("source"))
    docids = data.get("docids")
    if not isinstance(docids, dict) or not docids:
        raise CheckpointError(f"{path}: field 'docids' must be a non-empty object {{doc id: docid}}")
    doc_ids = list(docids)
    if name == "semantic":
        return semantic_scheme(docids, doc_ids, path, build=data.get("build"))
    bad = [d for d, text in docids.items() if not isinstance(text, str) or not text.strip()]
    if bad:
        raise CheckpointError(f"{path}: record {bad[0]!r}: field 'docids' value must be a non-empty string")
    return DocidScheme("naive", docids, source=data.get("source"))


def checkpoint_scheme(directory: str | os.PathLike) -> DocidScheme:
    """The scheme a trained model records; atomic when it has no `DOCIDS_FILE`."""
    path = os.path.join(os.fspath(directory), DOCIDS_FILE)
    return read_scheme(path) if os.path.isfile(path) else DocidScheme("atomic")


def resolve_scheme(name: str | None, doc_ids: Sequence[str], *, mapping: str | None = None,
                   default: str | None = None, default_mapping: str | os.PathLike | None = None,
                   naive_mapping: str | os.PathLike | None = None) -> DocidScheme:
    """The scheme called `name` (None: `default`, else atomic) with its docids: semantic ids from the file
    `mapping`, else `default_mapping` (a prepared directory's; `genir_jax.data.prepare.prepared_scheme`); naive
    ids from `naive_mapping` (a prepared directory's shuffled ids), else the document ids.
    Errors name the settings ``docids`` and ``semantic_docid_mapping``."""
    if name is None:
        name = default or "atomic"
    check_scheme(name)
    if mapping is not None and name != "semantic":
        raise SettingError("{0} is for {1} semantic, not %s" % name, "semantic_docid_mapping", "docids")
    if name == "atomic":
        return DocidScheme("atomic")
    if name == "naive":
        return read_naive_mapping(naive_mapping, doc_ids) if naive_mapping is not None else naive_scheme(doc_ids)
    if mapping is None and default_mapping is not None:
        mapping = os.fspath(default_mapping)
    if mapping is None:
        raise SettingError("{0} semantic needs {1} FILE (or a prepared directory made with `genir-jax "
                           "prepare-data --docids semantic`, which holds %s)" % SEMANTIC_MAPPING_FILE,
                           "docids", "semantic_docid_mapping")
    return read_semantic_mapping(mapping, doc_ids)


def add_scheme_arguments(parser, *, default_help: str) -> None:
    """``--docids`` and ``--semantic-docid-mapping`` (also spelled ``--semantic-doc-id-mapping``)."""
    parser.add_argument("--docids", "--doc-ids", dest="docids", default=None, metavar="{atomic,naive,semantic}",
                        help=f"docid scheme: atomic (one new token per document), naive (the id string as ordinary "
                             f"tokens + EOS) or semantic (hierarchical cluster ids '3_0_17'); {default_help}")
    parser.add_argument("--semantic-docid-mapping", "--semantic-doc-id-mapping", dest="semantic_docid_mapping",
                        default=None, metavar="FILE",
                        help="semantic docids: the reference's JSON mapping {doc id: \"3_0_17\"}")
