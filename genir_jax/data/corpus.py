"""Documents, queries and qrels in the reference code's JSON formats, read with validation.

Formats (those of the reference implementation, see docs/PAPER.md):

- documents: a JSON list ``[{"id": ..., "text": ...}, ...]``;
- queries: a JSON list ``[{"id": ..., "query": ..., "relevant_docs": [doc id, ...]}, ...]``, most relevant
  document first;
- qrels: a JSON object of four parallel lists ``{"query": [...], "q0": [...], "docid": [...], "rel": [...]}``
  where ``docid`` is spelled as the atomic docid token ``@DOC_ID_<id>@`` (the reference applies its docid
  function before writing) and ``rel = 4 - position in relevant_docs``.

Ids may be JSON strings or integers (the reference's own NQ files use integers); we hold them as stripped
strings, exactly as the reference's ``str(id).strip()`` turns them into docid tokens, and write strings.
Ids must not contain whitespace (TREC run and qrels files are whitespace-separated). Documents and
queries may also be read from JSON lines (``.jsonl``, one record per line) and gzip (``.gz``).

Every error is a `DataError` naming the file, the record (index or line, and id when known) and the field.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

from genir_jax.docids.tokens import DOCID_PREFIX, DOCID_SUFFIX, docid_token, doc_id_of_token, is_docid_token
from genir_jax.base.errors import DataError
from genir_jax.base.io import atomic_path, loads_json, read_json, read_text_file, write_json  # noqa: F401 (read_json: re-exported)
from genir_jax.base.io import open_text as _open_text

QRELS_FIELDS = ("query", "q0", "docid", "rel")
REFERENCE_TOP_GRADE = 4  # the reference's qrels: rel = 4 - position


@dataclass(frozen=True)
class Document:
    """One indexed document: its id (a string) and its text."""

    id: str
    text: str


@dataclass(frozen=True)
class Query:
    """One query: its id, its text and its relevant document ids, most relevant first."""

    id: str
    text: str
    relevant_docs: tuple[str, ...]


Qrels = dict[str, dict[str, int]]  # query id -> {doc id: relevance grade}, in file order


# --------------------------------------------------------------------------------------------------
# Low-level reading
# --------------------------------------------------------------------------------------------------

def _is_json_lines(path: str) -> bool:
    name = path[:-3] if path.endswith(".gz") else path
    return name.endswith(".jsonl")


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(1-based line number, parsed object) for every non-blank line of a JSON lines file."""
    path = os.fspath(path)
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, loads_json(line, path, f"line {number}")
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {number}: invalid JSON at column {exc.colno}: {exc.msg}") from exc
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc


def _records(path: str, what: str) -> list[tuple[str, Any]]:
    """(location label, record) pairs of a JSON list or JSON lines file."""
    if _is_json_lines(path):
        return [(f"line {number}", record) for number, record in iter_json_lines(path)]
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {what} records, got a JSON {json_type(data)}")
    return [(f"record index {index}", record) for index, record in enumerate(data)]


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type ("object", "list", "string", ...), for error messages."""
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", int: "integer", float: "number"}.get(type(value),
                                                                                            type(value).__name__)


# --------------------------------------------------------------------------------------------------
# Field validation
# --------------------------------------------------------------------------------------------------

def normalize_id(value: Any) -> str:
    """A document or query id as we hold it: ``str(value).strip()`` for a str or int (as the reference)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"must be a string or an integer, got a JSON {json_type(value)} ({value!r})")
    text = str(value).strip()
    if not text:
        raise ValueError("is empty")
    if any(ch.isspace() for ch in text):
        raise ValueError(f"{text!r} must not contain whitespace (TREC run and qrels files are whitespace-separated)")
    return text


def _where(path: str, location: str, record: Any, id_field: str = "id") -> str:
    if isinstance(record, dict) and isinstance(record.get(id_field), (str, int)) \
            and not isinstance(record.get(id_field), bool):
        return f"{path}: {location} (id {str(record[id_field]).strip()!r})"
    return f"{path}: {location}"


def _field(record: Any, name: str, where: str) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got a JSON {json_type(record)}")
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    return record[name]


def _id_field(record: Any, name: str, where: str) -> str:
    value = _field(record, name, where)
    try:
        return normalize_id(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: field {name!r} {exc}") from None


def _text_field(record: Any, name: str, where: str) -> str:
    value = _field(record, name, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got a JSON {json_type(value)}")
    if not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


# --------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------

def validate_documents(documents: Iterable[Document], source: str = "documents") -> list[Document]:
    """Check ids are unique and texts non-empty (for documents built in code); returns them as a list."""
    documents = list(documents)
    seen: dict[str, int] = {}
    for index, doc in enumerate(documents):
        where = f"{source}: record index {index} (id {doc.id!r})"
        try:
            normalize_id(doc.id)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{source}: record index {index}: field 'id' {exc}") from None
        if not isinstance(doc.text, str) or not doc.text.strip():
            raise DataError(f"{where}: field 'text' is empty")
        if doc.id in seen:
            raise DataError(f"{where}: duplicate document id {doc.id!r} (first at record index {seen[doc.id]})")
        seen[doc.id] = index
    return documents


def read_documents(path: str | os.PathLike) -> list[Document]:
    """Documents of a reference-format file, validated: every record has a unique id and a non-empty text."""
    path = os.fspath(path)
    documents: list[Document] = []
    seen: dict[str, str] = {}
    for location, record in _records(path, "document"):
        where = _where(path, location, record)
        doc_id = _id_field(record, "id", where)
        text = _text_field(record, "text", where)
        if doc_id in seen:
            raise DataError(f"{where}: field 'id': duplicate document id {doc_id!r} (first at {seen[doc_id]})")
        seen[doc_id] = location
        documents.append(Document(doc_id, text))
    if not documents:
        raise DataError(f"{path}: no documents")
    return documents


def write_documents(path: str | os.PathLike, documents: Iterable[Document]) -> None:
    """Atomically write documents in the reference format."""
    documents = validate_documents(documents, os.fspath(path))
    write_json(path, [{"id": doc.id, "text": doc.text} for doc in documents])


# --------------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------------

def _relevant_docs(record: Any, where: str) -> tuple[str, ...]:
    value = _field(record, "relevant_docs", where)
    if not isinstance(value, list):
        raise DataError(f"{where}: field 'relevant_docs' must be a list of document ids, got a JSON "
                        f"{json_type(value)}")
    if not value:
        raise DataError(f"{where}: field 'relevant_docs' is empty (a query needs a relevant document)")
    docs: list[str] = []
    for position, item in enumerate(value):
        try:
            doc_id = normalize_id(item)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: field 'relevant_docs'[{position}] {exc}") from None
        if doc_id in docs:
            raise DataError(f"{where}: field 'relevant_docs' lists document {doc_id!r} twice")
        docs.append(doc_id)
    return tuple(docs)


def _check_in_corpus(queries: Sequence[Query], documents: Iterable[Document] | None, where_of) -> None:
    if documents is None:
        return
    known = {doc.id for doc in documents}
    for index, query in enumerate(queries):
        for doc_id in query.relevant_docs:
            if doc_id not in known:
                raise DataError(f"{where_of(index, query)}: field 'relevant_docs': document {doc_id!r} is not in "
                                f"the corpus ({len(known)} documents)")


def validate_queries(queries: Iterable[Query], documents: Iterable[Document] | None = None,
                     source: str = "queries") -> list[Query]:
    """Check queries built in code like `read_queries` checks a file; returns them as a list."""
    queries = list(queries)
    seen: dict[str, int] = {}
    for index, query in enumerate(queries):
        where = f"{source}: record index {index} (id {query.id!r})"
        try:
            normalize_id(query.id)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{source}: record index {index}: field 'id' {exc}") from None
        if not isinstance(query.text, str) or not query.text.strip():
            raise DataError(f"{where}: field 'query' is empty")
        if not query.relevant_docs:
            raise DataError(f"{where}: field 'relevant_docs' is empty (a query needs a relevant document)")
        if len(set(query.relevant_docs)) != len(query.relevant_docs):
            raise DataError(f"{where}: field 'relevant_docs' lists a document twice")
        if query.id in seen:
            raise DataError(f"{where}: duplicate query id {query.id!r} (first at record index {seen[query.id]})")
        seen[query.id] = index
    _check_in_corpus(queries, documents, lambda i, q: f"{source}: record index {i} (id {q.id!r})")
    return queries


def read_queries(path: str | os.PathLike, documents: Iterable[Document] | None = None) -> list[Query]:
    """Queries of a reference-format file, validated; with `documents`, every relevant document must exist."""
    path = os.fspath(path)
    queries: list[Query] = []
    locations: list[str] = []
    seen: dict[str, str] = {}
    for location, record in _records(path, "query"):
        where = _where(path, location, record)
        query_id = _id_field(record, "id", where)
        text = _text_field(record, "query", where)
        relevant = _relevant_docs(record, where)
        if query_id in seen:
            raise DataError(f"{where}: field 'id': duplicate query id {query_id!r} (first at {seen[query_id]})")
        seen[query_id] = location
        queries.append(Query(query_id, text, relevant))
        locations.append(location)
    if not queries:
        raise DataError(f"{path}: no queries")
    _check_in_corpus(queries, documents, lambda i, q: f"{path}: {locations[i]} (id {q.id!r})")
    return queries


def write_queries(path: str | os.PathLike, queries: Iterable[Query]) -> None:
    """Atomically write queries in the reference format."""
    queries = validate_queries(queries, source=os.fspath(path))
    write_json(path, [{"id": q.id, "query": q.text, "relevant_docs": list(q.relevant_docs)} for q in queries])


# --------------------------------------------------------------------------------------------------
# Qrels
# --------------------------------------------------------------------------------------------------

def qrels_from_queries(queries: Iterable[Query], grades: Mapping[str, Mapping[str, int]] | None = None) -> Qrels:
    """Relevance grades of every (query, relevant document): ``grades[query][doc]`` where given, else the
    reference's ``4 - position`` (so the 5th and later relevant documents get grades <= 0, which trec_eval
    counts as non-relevant; datasets with many graded judgements, like Cranfield, pass `grades`)."""
    qrels: Qrels = {}
    for query in queries:
        given = (grades or {}).get(query.id, {})
        qrels[query.id] = {doc: int(given.get(doc, REFERENCE_TOP_GRADE - position))
                           for position, doc in enumerate(query.relevant_docs)}
    return qrels


def write_qrels(path: str | os.PathLike, queries: Iterable[Query],
                grades: Mapping[str, Mapping[str, int]] | None = None) -> None:
    """Atomically write the reference's qrels JSON for `queries` (docids spelled ``@DOC_ID_<id>@``)."""
    queries = list(queries)
    many = [q.id for q in queries if len(q.relevant_docs) > REFERENCE_TOP_GRADE and (grades or {}).get(q.id) is None]
    if many:
        warnings.warn(f"{os.fspath(path)}: {len(many)} queries (e.g. {many[0]!r}) have more than "
                      f"{REFERENCE_TOP_GRADE} relevant documents; with rel = 4 - position the later ones get "
                      "rel <= 0 and count as non-relevant (pass grades= to keep them)", stacklevel=2)
    data: dict[str, list] = {name: [] for name in QRELS_FIELDS}
    for query_id, docs in qrels_from_queries(queries, grades).items():
        for doc_id, rel in docs.items():
            data["query"].append(query_id)
            data["q0"].append("q0")
            data["docid"].append(docid_token(doc_id))
            data["rel"].append(rel)
    write_json(path, data)


def _qrels_doc_id(value: Any, where: str) -> str:
    if isinstance(value, str) and is_docid_token(value.strip()):
        value = doc_id_of_token(value.strip())
    try:
        return normalize_id(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: field 'docid' {exc} (expected {DOCID_PREFIX}<id>{DOCID_SUFFIX} or an id)") \
            from None


def _read_trec_qrels(path: str, text: str) -> Qrels:
    """Plain TREC qrels (``query iteration docid rel`` per line, what `write_trec_qrels` writes)."""
    qrels: Qrels = {}
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}: line {number}"
        if len(parts) != 4:
            raise DataError(f"{where}: expected 4 fields 'query iteration docid rel' (TREC qrels) or a JSON object "
                            f"with lists {list(QRELS_FIELDS)}, got {len(parts)} fields")
        query_id, _, doc_field, rel_field = parts
        doc_id = _qrels_doc_id(doc_field, where)
        try:
            rel = int(rel_field)
        except ValueError:
            raise DataError(f"{where}: relevance {rel_field!r} must be an integer") from None
        docs = qrels.setdefault(query_id, {})
        if doc_id in docs:
            raise DataError(f"{where}: document {doc_id!r} is judged twice for query {query_id!r}")
        docs[doc_id] = rel
    if not qrels:
        raise DataError(f"{path}: no judgements")
    return qrels


def read_qrels(path: str | os.PathLike) -> Qrels:
    """Qrels as ``{query id: {doc id: rel}}``: the reference's qrels JSON (docids may be docid tokens or plain
    ids) or plain TREC qrels (``query iteration docid rel``, as `prepare-data` writes ``val.qrels``)."""
    path = os.fspath(path)
    text = read_text_file(path)
    if not text.strip():
        raise DataError(f"{path}: is empty; expected qrels (a JSON object or TREC lines 'query 0 docid rel')")
    if not text.lstrip().startswith(("{", "[", '"')):
        return _read_trec_qrels(path, text)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with lists {list(QRELS_FIELDS)}, got a JSON "
                        f"{json_type(data)}")
    for name in QRELS_FIELDS:
        if name not in data:
            raise DataError(f"{path}: missing field {name!r} (qrels need {list(QRELS_FIELDS)})")
        if not isinstance(data[name], list):
            raise DataError(f"{path}: field {name!r} must be a list, got a JSON {json_type(data[name])}")
    lengths = {name: len(data[name]) for name in QRELS_FIELDS}
    if len(set(lengths.values())) != 1:
        raise DataError(f"{path}: the lists must have equal lengths, got {lengths}")
    if not lengths["query"]:
        raise DataError(f"{path}: no judgements")
    qrels: Qrels = {}
    for index in range(lengths["query"]):
        where = f"{path}: entry {index}"
        try:
            query_id = normalize_id(data["query"][index])
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: field 'query' {exc}") from None
        where = f"{where} (query {query_id!r})"
        doc_id = _qrels_doc_id(data["docid"][index], where)
        rel = data["rel"][index]
        if isinstance(rel, bool) or not isinstance(rel, int):
            raise DataError(f"{where}: field 'rel' must be an integer, got a JSON {json_type(rel)} ({rel!r})")
        docs = qrels.setdefault(query_id, {})
        if doc_id in docs:
            raise DataError(f"{where}: field 'docid': document {doc_id!r} is judged twice for this query")
        docs[doc_id] = rel
    return qrels


def write_trec_qrels(path: str | os.PathLike, qrels: Mapping[str, Mapping[str, int]]) -> None:
    """Atomically write qrels in the plain TREC format (``query 0 docid rel``), for trec_eval itself."""
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8") as handle:
            for query_id, docs in qrels.items():
                for doc_id, rel in docs.items():
                    handle.write(f"{query_id} 0 {doc_id} {rel}\n")
