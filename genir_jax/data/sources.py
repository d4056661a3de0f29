"""Readers of the raw corpora in ``shared/data`` (SQuAD v1.1 dev, NQ-open oracle, Cranfield) and a
checksummed download for the one with a public URL (SQuAD dev).

Each reader turns its source into our `Document` / `Query` records (see each SOURCE.md for the formats):

- SQuAD: document = paragraph, id = its 0-based index in file order (articles, then paragraphs);
  query = question, id = the SQuAD question id, relevant_docs = its own paragraph.
- NQ-open oracle: document id = 0-based line number in ``passages.jsonl.gz``, text = ``"{title}: {text}"``;
  query id = ``Q<0-based line number>`` in ``questions.jsonl.gz``; the relevant document is the passage equal
  to the question's gold ``(title, text)``.
- Cranfield: document id = its ``.I`` number, text = the ``.W`` abstract with whitespace collapsed (the title
  when there is no abstract; stray ``.A``/``.B``/``.W`` marker lines inside abstracts are dropped).
  Documents 471 and 995 have no text at all and are left out. The k-th query of ``cran.qry`` has id ``k``
  (its ``.I`` numbers are not contiguous; ``cranqrel`` numbers queries 1..225). Relevance codes 1 (complete
  answer) .. 4 (minimum interest) order ``relevant_docs`` (code 1 first, ties by document number); code -1
  (not relevant) and judgements of left-out documents are dropped. Grades for the qrels: ``5 - code``.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import re
import urllib.error
import urllib.request

from genir_jax.data.corpus import Document, Query, json_type, iter_json_lines, read_json
from genir_jax.base.errors import DataError, MissingDataError
from genir_jax.base.io import atomic_path, sha256_of

SQUAD_DEV_DIR = "squad-v1.1-dev"
SQUAD_DEV_FILE = "dev-v1.1.json"
SQUAD_DEV_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json"
SQUAD_DEV_SHA256 = "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"
NQ_DIR = "nq-open-oracle"
CRANFIELD_DIR = "cranfield"


@dataclasses.dataclass
class RawCorpus:
    """A corpus as its source gives it: documents, queries, optional graded judgements and notes.

    `groups` lists, for sources whose queries come in natural groups (SQuAD: one per paragraph), the
    indices into `queries` of each group; `grades` maps query id -> doc id -> qrels grade where the source
    has graded judgements.
    """

    documents: list[Document]
    queries: list[Query]
    groups: list[list[int]] | None = None
    grades: dict[str, dict[str, int]] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Download with a checksum
# --------------------------------------------------------------------------------------------------

def download(url: str, destination: str | os.PathLike, sha256: str) -> str:
    """Fetch `url` to `destination` if its SHA-256 matches; otherwise raise and leave nothing behind."""
    destination = os.fspath(destination)
    digest = hashlib.sha256()
    with atomic_path(destination) as temp:
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(temp, "wb") as handle:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    handle.write(block)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DataError(f"{url}: download failed ({exc}); nothing was written to {destination}") from exc
        if digest.hexdigest() != sha256.lower():
            raise DataError(f"{url}: SHA-256 {digest.hexdigest()} does not match the expected {sha256}; "
                            f"nothing was written to {destination}")
    return destination


def squad_dev_file(data_dir: str | os.PathLike, *, download_missing: bool = False, url: str = SQUAD_DEV_URL,
                   sha256: str = SQUAD_DEV_SHA256) -> str:
    """Path of ``dev-v1.1.json`` under `data_dir`, downloaded (and checksummed) first if asked and missing."""
    path = os.path.join(os.fspath(data_dir), SQUAD_DEV_DIR, SQUAD_DEV_FILE)
    if not os.path.isfile(path):
        if not download_missing:
            raise MissingDataError(f"{path}: file not found (pass {{0}} to fetch it from {url}, or give {{1}} the folder "
                                   "that holds it)", "download", "data_dir")
        download(url, path, sha256)
    return path


# --------------------------------------------------------------------------------------------------
# SQuAD v1.1
# --------------------------------------------------------------------------------------------------

def _get(record, name: str, kind: type, where: str):
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got a JSON {json_type(record)}")
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: field {name!r} must be a JSON {json_type(kind())}, got a JSON "
                        f"{json_type(value)}")
    if kind is str and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def load_squad(path: str | os.PathLike) -> RawCorpus:
    """Paragraphs and questions of an official SQuAD v1.1 JSON file (one query group per paragraph)."""
    path = os.fspath(path)
    data = read_json(path)
    articles = _get(data, "data", list, path)
    documents: list[Document] = []
    queries: list[Query] = []
    groups: list[list[int]] = []
    seen: dict[str, str] = {}
    for a, article in enumerate(articles):
        for p, paragraph in enumerate(_get(article, "paragraphs", list, f"{path}: data[{a}]")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            doc_id = str(len(documents))
            documents.append(Document(doc_id, _get(paragraph, "context", str, where)))
            group = []
            for q, qa in enumerate(_get(paragraph, "qas", list, where)):
                qa_where = f"{where}.qas[{q}]"
                query_id = _get(qa, "id", str, qa_where).strip()
                if query_id in seen:
                    raise DataError(f"{qa_where}: field 'id': duplicate question id {query_id!r} "
                                    f"(first at {seen[query_id]})")
                seen[query_id] = qa_where
                group.append(len(queries))
                queries.append(Query(query_id, _get(qa, "question", str, qa_where), (doc_id,)))
            groups.append(group)
    if not documents:
        raise DataError(f"{path}: no paragraphs")
    return RawCorpus(documents, queries, groups=groups)


# --------------------------------------------------------------------------------------------------
# NQ-open oracle
# --------------------------------------------------------------------------------------------------

def nq_document_text(title: str, text: str) -> str:
    return f"{title}: {text}"


def load_nq_oracle(directory: str | os.PathLike) -> RawCorpus:
    """Passages (ids by line order) and questions (relevant doc = the passage equal to the gold one)."""
    directory = os.fspath(directory)
    passages_path = os.path.join(directory, "passages.jsonl.gz")
    questions_path = os.path.join(directory, "questions.jsonl.gz")
    documents: list[Document] = []
    by_content: dict[tuple[str, str], str] = {}
    for index, (line, record) in enumerate(iter_json_lines(passages_path)):
        where = f"{passages_path}: line {line}"
        title, text = _get(record, "title", str, where), _get(record, "text", str, where)
        if (title, text) in by_content:
            raise DataError(f"{where}: duplicate passage (same title and text as document "
                            f"{by_content[(title, text)]}); gold passages could not be matched unambiguously")
        doc_id = str(index)
        by_content[(title, text)] = doc_id
        documents.append(Document(doc_id, nq_document_text(title, text)))
    if not documents:
        raise DataError(f"{passages_path}: no passages")
    queries: list[Query] = []
    for index, (line, record) in enumerate(iter_json_lines(questions_path)):
        where = f"{questions_path}: line {line}"
        question = _get(record, "question", str, where)
        gold = _get(record, "gold", dict, where)
        key = (_get(gold, "title", str, f"{where}: field 'gold'"), _get(gold, "text", str, f"{where}: field 'gold'"))
        if key not in by_content:
            raise DataError(f"{where}: field 'gold': passage {key[0]!r} is not in {passages_path}")
        queries.append(Query(f"Q{index}", question, (by_content[key],)))
    if not queries:
        raise DataError(f"{questions_path}: no questions")
    return RawCorpus(documents, queries)


# --------------------------------------------------------------------------------------------------
# Cranfield (SMART format)
# --------------------------------------------------------------------------------------------------

_MARKER = re.compile(r"^\.([IATBW])(?:\s+(\S+))?\s*$")


def _smart_records(path: str) -> list[tuple[str, int, dict[str, list[str]]]]:
    """(``.I`` value, line number, {field letter: lines}) of a SMART file; a field's lines end at the next
    marker line, except that inside ``.W`` later ``.A/.B/.T/.W`` marker lines are stray and dropped."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            lines = handle.read().replace("\r", "").split("\n")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    records: list[tuple[str, int, dict[str, list[str]]]] = []
    field = None
    for number, line in enumerate(lines, start=1):
        match = _MARKER.match(line)
        if match and match.group(1) == "I":
            if not match.group(2):
                raise DataError(f"{path}: line {number}: '.I' marker without a number")
            records.append((match.group(2), number, {}))
            field = None
            continue
        if match and not match.group(2):
            if not records:
                raise DataError(f"{path}: line {number}: field marker {line.strip()!r} before the first '.I'")
            if field == "W":
                continue  # a stray marker inside an abstract (documents 240, 576, 578)
            field = match.group(1)
            records[-1][2].setdefault(field, [])
            continue
        if field is not None:
            records[-1][2][field].append(line)
        elif line.strip():
            where = f"line {number}" if not records else f"record .I {records[-1][0]} (line {number})"
            raise DataError(f"{path}: {where}: text outside a field")
    return records


def _collapse(lines: list[str]) -> str:
    return " ".join(" ".join(lines).split())


def load_cranfield(directory: str | os.PathLike) -> RawCorpus:
    """Cranfield 1400: documents, the 225 queries and their graded relevant documents (see module doc)."""
    directory = os.fspath(directory)
    docs_path = os.path.join(directory, "cran.all.1400")
    queries_path = os.path.join(directory, "cran.qry")
    qrels_path = os.path.join(directory, "cranqrel")
    documents: list[Document] = []
    empty: list[str] = []
    seen: set[str] = set()
    for doc_id, line, fields in _smart_records(docs_path):
        if doc_id in seen:
            raise DataError(f"{docs_path}: line {line}: duplicate document .I {doc_id}")
        seen.add(doc_id)
        text = _collapse(fields.get("W", [])) or _collapse(fields.get("T", []))
        if not text:
            empty.append(doc_id)
            continue
        documents.append(Document(doc_id, text))
    query_texts: list[str] = []
    for number, (_, line, fields) in enumerate(_smart_records(queries_path), start=1):
        text = _collapse(fields.get("W", []))
        if not text:
            raise DataError(f"{queries_path}: line {line}: query {number} has no '.W' text")
        query_texts.append(text)

    judged: dict[str, list[tuple[int, int, str]]] = collections.defaultdict(list)
    dropped_empty = 0
    try:
        with open(qrels_path, encoding="utf-8") as handle:
            qrel_lines = handle.read().replace("\r", "").split("\n")
    except FileNotFoundError:
        raise DataError(f"{qrels_path}: file not found") from None
    for number, line in enumerate(qrel_lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 3 or not all(re.fullmatch(r"-?\d+", p) for p in parts):
            raise DataError(f"{qrels_path}: line {number}: expected 'query_no doc_no relevance' integers, "
                            f"got {line.strip()!r}")
        query_no, doc_no, code = (int(p) for p in parts)
        if not 1 <= query_no <= len(query_texts):
            raise DataError(f"{qrels_path}: line {number}: query {query_no} does not exist "
                            f"({queries_path} has {len(query_texts)} queries)")
        if code == -1:
            continue
        if not 1 <= code <= 4:
            raise DataError(f"{qrels_path}: line {number}: relevance code {code} is not one of -1, 1, 2, 3, 4")
        if str(doc_no) not in seen:
            raise DataError(f"{qrels_path}: line {number}: document {doc_no} is not in {docs_path}")
        if str(doc_no) in empty:
            dropped_empty += 1
            continue
        judged[str(query_no)].append((code, doc_no, str(doc_no)))

    queries: list[Query] = []
    grades: dict[str, dict[str, int]] = {}
    without = []
    for number, text in enumerate(query_texts, start=1):
        ranked = sorted(judged.get(str(number), []))
        if not ranked:
            without.append(number)
            continue
        query_id = str(number)
        queries.append(Query(query_id, text, tuple(doc for _, _, doc in ranked)))
        grades[query_id] = {doc: 5 - code for code, _, doc in ranked}
    notes = [f"documents without any text left out: {', '.join(empty) or 'none'}",
             f"judgements of left-out documents dropped: {dropped_empty}",
             f"queries without a relevant document left out: {', '.join(map(str, without)) or 'none'}"]
    return RawCorpus(documents, queries, grades=grades, notes=notes)
