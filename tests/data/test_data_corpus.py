"""Reference-format documents, queries and qrels: round trips, validation and error messages."""

from __future__ import annotations

import gzip
import json
import re
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genir_jax.data.corpus import (Document, Query, qrels_from_queries, read_documents, read_qrels, read_queries,
                                   write_documents, write_qrels, write_queries, write_trec_qrels)
from genir_jax.base.errors import DataError, GenIRError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

ids = st.one_of(
    st.integers(min_value=-10**12, max_value=10**12).map(str),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")), min_size=1, max_size=12),
)
texts = st.text(min_size=1, max_size=40).filter(lambda t: t.strip())


def _dump(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@st.composite
def corpora(draw):
    doc_ids = draw(st.lists(ids, min_size=1, max_size=8, unique=True))
    documents = [Document(d, draw(texts)) for d in doc_ids]
    query_ids = draw(st.lists(ids, min_size=1, max_size=6, unique=True))
    queries = [Query(q, draw(texts), tuple(draw(st.lists(st.sampled_from(doc_ids), min_size=1, max_size=6,
                                                         unique=True))))
               for q in query_ids]
    return documents, queries


# --------------------------------------------------------------------------------------------------
# Round trips (hypothesis)
# --------------------------------------------------------------------------------------------------

@FAST
@given(corpora())
def test_documents_and_queries_round_trip(tmp_path, corpus):
    documents, queries = corpus
    write_documents(tmp_path / "d.json", documents)
    write_queries(tmp_path / "q.json", queries)
    assert read_documents(tmp_path / "d.json") == documents
    assert read_queries(tmp_path / "q.json", documents) == queries
    raw = json.loads((tmp_path / "q.json").read_text(encoding="utf-8"))
    assert raw == [{"id": q.id, "query": q.text, "relevant_docs": list(q.relevant_docs)} for q in queries]


@FAST
@given(corpora())
def test_qrels_round_trip_is_four_minus_position(tmp_path, corpus):
    _, queries = corpus
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_qrels(tmp_path / "qrels.json", queries)
    assert bool(caught) == any(len(q.relevant_docs) > 4 for q in queries)  # rel <= 0 from the 5th on
    raw = json.loads((tmp_path / "qrels.json").read_text(encoding="utf-8"))
    expected_rows = [(q.id, "q0", f"@DOC_ID_{d}@", 4 - position)
                     for q in queries for position, d in enumerate(q.relevant_docs)]
    assert list(zip(raw["query"], raw["q0"], raw["docid"], raw["rel"])) == expected_rows
    assert read_qrels(tmp_path / "qrels.json") == {q.id: {d: 4 - i for i, d in enumerate(q.relevant_docs)}
                                                   for q in queries}


@FAST
@given(corpora(), st.sampled_from(["id", "text"]), st.data())
def test_a_missing_document_field_is_named(tmp_path, corpus, field, data):
    documents, _ = corpus
    records = [{"id": d.id, "text": d.text} for d in documents]
    broken = data.draw(st.integers(0, len(records) - 1))
    del records[broken][field]
    path = _dump(tmp_path / "docs.json", records)
    with pytest.raises(DataError) as error:
        read_documents(path)
    message = str(error.value)
    assert str(path) in message and f"record index {broken}" in message and f"missing field '{field}'" in message


@FAST
@given(corpora(), st.data())
def test_a_duplicate_document_id_is_named(tmp_path, corpus, data):
    documents, _ = corpus
    records = [{"id": d.id, "text": d.text} for d in documents]
    source = data.draw(st.integers(0, len(records) - 1))
    records.append({"id": records[source]["id"], "text": "again"})
    path = _dump(tmp_path / "docs.json", records)
    with pytest.raises(DataError, match=rf"record index {len(records) - 1} .*duplicate document id .*"
                                        rf"first at record index {source}"):
        read_documents(path)


@FAST
@given(corpora(), st.data())
def test_a_relevant_document_outside_the_corpus_is_named(tmp_path, corpus, data):
    documents, queries = corpus
    index = data.draw(st.integers(0, len(queries) - 1))
    missing = "not-in-corpus-" + str(len(documents))
    queries[index] = Query(queries[index].id, queries[index].text, queries[index].relevant_docs + (missing,))
    write_queries(tmp_path / "q.json", queries)
    read_queries(tmp_path / "q.json")  # fine without a corpus to check against
    with pytest.raises(DataError, match=rf"q\.json: record index {index} \(id .*\): field 'relevant_docs': "
                                        rf"document '{missing}' is not in the corpus"):
        read_queries(tmp_path / "q.json", documents)


# --------------------------------------------------------------------------------------------------
# Specific malformed inputs
# --------------------------------------------------------------------------------------------------

def test_integer_ids_are_read_as_stripped_strings(tmp_path):
    """The reference's NQ files use integer ids; docid tokens use str(id).strip()."""
    docs = _dump(tmp_path / "docs.json", [{"id": -5462359833619124697, "text": "a"}, {"id": " 7 ", "text": "b"}])
    queries = _dump(tmp_path / "q.json", [{"id": "Q-1", "query": "x", "relevant_docs": [-5462359833619124697, 7]}])
    documents = read_documents(docs)
    assert documents == [Document("-5462359833619124697", "a"), Document("7", "b")]
    assert read_queries(queries, documents) == [Query("Q-1", "x", ("-5462359833619124697", "7"))]


def test_the_reference_sample_queries_read(tmp_path):
    """The reference repository's sample_data/val_queries_sample.json (three records, integer doc ids)."""
    sample = [{"id": "Q-5462359833619124697", "query": "who sings every light in the house is on",
               "relevant_docs": [-5462359833619124697]},
              {"id": "Q-9054071723383098347", "query": "what is the meaning of the greek word metanoia",
               "relevant_docs": [-9054071723383098347]}]
    queries = read_queries(_dump(tmp_path / "val_queries_sample.json", sample))
    assert [q.relevant_docs for q in queries] == [("-5462359833619124697",), ("-9054071723383098347",)]


@pytest.mark.parametrize("content, expected", [
    ('[{"id": 1, "text": "a"}', r"invalid JSON at line 1, column \d+"),
    ('{"id": 1, "text": "a"}', r"expected a JSON list of document records, got a JSON object"),
    ('[["1", "a"]]', r"record index 0: expected a JSON object, got a JSON list"),
    ('[{"id": 1, "text": ""}]', r"record index 0 \(id '1'\): field 'text' is empty"),
    ('[{"id": 1, "text": "   "}]', r"record index 0 \(id '1'\): field 'text' is empty"),
    ('[{"id": 1, "text": 5}]', r"record index 0 \(id '1'\): field 'text' must be a string, got a JSON integer"),
    ('[{"id": 1.5, "text": "a"}]', r"record index 0: field 'id' must be a string or an integer, got a JSON number \(1\.5\)"),
    ('[{"id": true, "text": "a"}]', r"record index 0: field 'id' must be a string or an integer, got a JSON boolean"),
    ('[{"id": "  ", "text": "a"}]', r"record index 0 \(id ''\): field 'id' is empty"),
    ('[{"id": "a b", "text": "a"}]', r"record index 0 \(id 'a b'\): field 'id' 'a b' must not contain whitespace"),
    ('[]', r"no documents"),
    ('[{"id": 1, "text": "a"}, {"id": "1", "text": "b"}]', r"record index 1 \(id '1'\): field 'id': duplicate"),
])
def test_bad_documents(tmp_path, content, expected):
    path = tmp_path / "documents.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + expected):
        read_documents(path)


@pytest.mark.parametrize("record, expected", [
    ({"id": "q", "query": "x"}, r"record index 0 \(id 'q'\): missing field 'relevant_docs'"),
    ({"id": "q", "relevant_docs": ["1"]}, r"record index 0 \(id 'q'\): missing field 'query'"),
    ({"query": "x", "relevant_docs": ["1"]}, r"record index 0: missing field 'id'"),
    ({"id": "q", "query": "x", "relevant_docs": []}, r"record index 0 \(id 'q'\): field 'relevant_docs' is empty"),
    ({"id": "q", "query": "x", "relevant_docs": "1"}, r"record index 0 \(id 'q'\): field 'relevant_docs' must be a list"),
    ({"id": "q", "query": "x", "relevant_docs": ["1", 1]}, r"record index 0 \(id 'q'\): field 'relevant_docs' lists document '1' twice"),
    ({"id": "q", "query": "x", "relevant_docs": [None]}, r"record index 0 \(id 'q'\): field 'relevant_docs'\[0\] must be a string or an integer, got a JSON null"),
    ({"id": "q", "query": "", "relevant_docs": ["1"]}, r"record index 0 \(id 'q'\): field 'query' is empty"),
])
def test_bad_queries(tmp_path, record, expected):
    path = _dump(tmp_path / "queries.json", [record])
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + expected):
        read_queries(path)


def test_duplicate_query_ids(tmp_path):
    path = _dump(tmp_path / "queries.json", [{"id": "q", "query": "x", "relevant_docs": ["1"]},
                                             {"id": "q", "query": "y", "relevant_docs": ["1"]}])
    with pytest.raises(DataError, match=r"record index 1 \(id 'q'\): field 'id': duplicate query id 'q' "
                                        r"\(first at record index 0\)"):
        read_queries(path)


def test_json_lines_and_gzip(tmp_path):
    lines = [{"id": "a", "text": "first"}, {"id": "b", "text": "second"}]
    plain = tmp_path / "docs.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n", encoding="utf-8")
    packed = tmp_path / "docs.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write(plain.read_text(encoding="utf-8"))
    expected = [Document("a", "first"), Document("b", "second")]
    assert read_documents(plain) == read_documents(packed) == expected

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: invalid JSON at column \d+"):
        read_documents(broken)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"id": "a", "text": "x"}\n\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"missing\.jsonl: line 3 \(id 'b'\): missing field 'text'"):
        read_documents(missing)


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: file not found"):
        read_documents(tmp_path / "nope.json")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe[\x00")
    with pytest.raises(DataError, match=r"binary\.json: cannot be read as UTF-8"):
        read_documents(binary)
    assert issubclass(DataError, GenIRError)


@pytest.mark.parametrize("data, expected", [
    ([1], r"expected a JSON object with lists"),
    ({"query": ["q"], "q0": ["q0"], "docid": ["@DOC_ID_1@"]}, r"missing field 'rel' \(qrels need"),
    ({"query": ["q"], "q0": ["q0"], "docid": ["@DOC_ID_1@"], "rel": 4}, r"field 'rel' must be a list"),
    ({"query": ["q", "r"], "q0": ["q0"], "docid": ["@DOC_ID_1@"], "rel": [4]}, r"the lists must have equal lengths"),
    ({"query": ["q"], "q0": ["q0"], "docid": ["@DOC_ID_1@"], "rel": ["4"]},
     r"entry 0 \(query 'q'\): field 'rel' must be an integer, got a JSON string"),
    ({"query": ["q", "q"], "q0": ["q0", "q0"], "docid": ["@DOC_ID_1@", "1"], "rel": [4, 3]},
     r"entry 1 \(query 'q'\): field 'docid': document '1' is judged twice"),
    ({"query": ["q"], "q0": ["q0"], "docid": [""], "rel": [4]}, r"entry 0 \(query 'q'\): field 'docid' is empty"),
])
def test_bad_qrels(tmp_path, data, expected):
    path = _dump(tmp_path / "qrels.json", data)
    with pytest.raises(DataError, match=re.escape(str(path)) + ": " + expected):
        read_qrels(path)


def test_qrels_grades_and_trec_format(tmp_path):
    queries = [Query("1", "x", ("5", "3", "9", "2", "8")), Query("2", "y", ("3",))]
    with pytest.warns(UserWarning, match="more than 4 relevant documents"):
        write_qrels(tmp_path / "reference.json", queries)
    assert read_qrels(tmp_path / "reference.json") == {"1": {"5": 4, "3": 3, "9": 2, "2": 1, "8": 0}, "2": {"3": 4}}
    grades = {"1": {"5": 4, "3": 4, "9": 3, "2": 1, "8": 1}}
    write_qrels(tmp_path / "graded.json", queries, grades)  # no warning: grades given for the long query
    assert read_qrels(tmp_path / "graded.json") == {"1": grades["1"], "2": {"3": 4}}
    write_trec_qrels(tmp_path / "graded.qrels", qrels_from_queries(queries, grades))
    assert (tmp_path / "graded.qrels").read_text().splitlines() == [
        "1 0 5 4", "1 0 3 4", "1 0 9 3", "1 0 2 1", "1 0 8 1", "2 0 3 4"]


def test_writers_validate_and_leave_nothing_on_error(tmp_path):
    target = tmp_path / "docs.json"
    with pytest.raises(DataError, match="duplicate document id '1'"):
        write_documents(target, [Document("1", "a"), Document("1", "b")])
    with pytest.raises(DataError, match="field 'query' is empty"):
        write_queries(tmp_path / "q.json", [Query("q", " ", ("1",))])
    assert list(tmp_path.iterdir()) == []


@FAST
@given(corpora(), st.booleans())
def test_json_lines_read_like_json_lists(tmp_path, corpus, packed):
    documents, queries = corpus
    write_documents(tmp_path / "d.json", documents)
    write_queries(tmp_path / "q.json", queries)
    for name in ("d", "q"):
        records = json.loads((tmp_path / f"{name}.json").read_text(encoding="utf-8"))
        text = "".join(json.dumps(r) + "\n" for r in records)
        target = tmp_path / (f"{name}.jsonl.gz" if packed else f"{name}.jsonl")
        if packed:
            with gzip.open(target, "wt", encoding="utf-8") as handle:
                handle.write(text)
        else:
            target.write_text(text, encoding="utf-8")
    suffix = ".jsonl.gz" if packed else ".jsonl"
    assert read_documents(tmp_path / f"d{suffix}") == documents
    assert read_queries(tmp_path / f"q{suffix}", documents) == queries


@pytest.mark.parametrize("name", ["docs.json", "docs.jsonl", "docs.json.gz"])
def test_an_integer_too_long_for_python_is_named(tmp_path, name):
    """A 5,000-digit integer id is over Python's int-string limit (4,300 digits): a DataError naming the file
    and the record, not a bare ValueError from the JSON parser."""
    huge = "7" * 5000
    records = ['{"id": 1, "text": "a b"}', '{"id": %s, "text": "c d"}' % huge]
    text = "\n".join(records) if ".jsonl" in name else "[" + ", ".join(records) + "]"
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    where = "line 2" if ".jsonl" in name else "record index 1"
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: {where}: an integer of 5000 digits"):
        read_documents(path)
    queries = tmp_path / ("q" + name)
    queries.write_bytes(path.read_bytes())
    with pytest.raises(DataError, match=rf"{where}: an integer of 5000 digits"):
        read_queries(queries)
