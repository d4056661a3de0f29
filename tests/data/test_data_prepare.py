"""Raw corpora and their splits: counts from each SOURCE.md, split arithmetic, the NQ10k scheme, downloads."""

from __future__ import annotations

import collections
import gzip
import hashlib
import json
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genir_jax.data.corpus import read_documents, read_qrels, read_queries
from genir_jax.data.prepare import build_prepared, default_data_dir, load_prepared, prepare_dataset
from genir_jax.data.sources import load_cranfield, load_nq_oracle, load_squad
from genir_jax.data.splits import allocate, round_half_up, split_groups
from genir_jax.base.errors import DataError, GenIRError

# --------------------------------------------------------------------------------------------------
# Split arithmetic
# --------------------------------------------------------------------------------------------------


def test_allocate_by_hand():
    assert allocate([10], 0.1, 0.1) == [(8, 1, 1)]
    assert allocate([14], 0.1, 0.1) == [(12, 1, 1)]
    assert allocate([15], 0.1, 0.1) == [(11, 2, 2)]    # 1.5 rounds half up
    assert allocate([4], 0.1, 0.1) == [(4, 0, 0)]
    # Five-question paragraphs: the running targets round(0.5)=1, round(1.0)=1, round(1.5)=2, round(2.0)=2.
    assert allocate([5, 5, 5, 5], 0.1, 0.1, min_train=1) == [(3, 1, 1), (5, 0, 0), (3, 1, 1), (5, 0, 0)]
    # One-question paragraphs keep their question for training; the shortfall moves on to later groups:
    # after 15 questions the targets are round(1.5) = 2 each, all taken from the 10-question paragraph.
    assert allocate([1, 1, 1, 1, 1, 10], 0.1, 0.1, min_train=1) == [(1, 0, 0)] * 5 + [(6, 2, 2)]
    assert allocate([1] * 6 + [2], 0.1, 0.1, min_train=1) == [(1, 0, 0)] * 6 + [(1, 1, 0)]  # ties: val first
    with pytest.raises(GenIRError, match="must be < 1"):
        allocate([10], 0.5, 0.5)
    with pytest.raises(GenIRError, match=r"in \[0, 1\)"):
        allocate([10], -0.1, 0.1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=40),
       st.sampled_from([0.0, 0.05, 0.1, 0.15, 0.2, 0.25]), st.sampled_from([0.0, 0.1, 0.2]),
       st.integers(0, 2))
def test_allocate_properties(sizes, f_val, f_test, min_train):
    counts = allocate(sizes, f_val, f_test, min_train)
    seen = val_total = test_total = 0
    for size, (train, val, test) in zip(sizes, counts):
        assert train + val + test == size and min(train, val, test) >= 0
        assert train >= min(size, min_train)
        seen += size
        val_total += val
        test_total += test
        target_val = int(Fraction(str(f_val)) * seen + Fraction(1, 2))
        target_test = int(Fraction(str(f_test)) * seen + Fraction(1, 2))
        assert val_total <= target_val and test_total <= target_test
        if min_train == 0 and train > 0:  # capacity left: the running totals hit the rounded targets exactly
            assert (val_total, test_total) == (target_val, target_test)
        if min_train == 0 and train == 0 and size:  # a group too small for both shortfalls gives all it has
            assert val_total + test_total <= target_val + target_test


def test_split_groups_is_a_deterministic_partition_in_order():
    groups = [[f"g{g}q{i}" for i in range(size)] for g, size in enumerate([3, 7, 1, 12, 5, 9])]
    first = split_groups(groups, 0.2, 0.1, seed=3, min_train=1)
    assert split_groups(groups, 0.2, 0.1, seed=3, min_train=1) == first
    assert split_groups(groups, 0.2, 0.1, seed=4, min_train=1) != first
    items = [item for group in groups for item in group]
    assert sorted(sum(first.values(), [])) == sorted(items)
    for name, chosen in first.items():  # original order within each split
        assert chosen == [item for item in items if item in set(chosen)]
    counts = allocate([len(g) for g in groups], 0.2, 0.1, min_train=1)
    for group, (train, val, test) in zip(groups, counts):
        assert sum(item in first["val"] for item in group) == val
        assert sum(item in first["test"] for item in group) == test


# --------------------------------------------------------------------------------------------------
# Real data: counts from SOURCE.md
# --------------------------------------------------------------------------------------------------

def test_squad_dev(shared_data):
    raw = load_squad(shared_data / "squad-v1.1-dev" / "dev-v1.1.json")
    sizes = [len(group) for group in raw.groups]
    assert len(raw.documents) == 2067 and len(raw.queries) == 10570          # SOURCE.md
    assert (min(sizes), max(sizes)) == (1, 30)
    prepared = build_prepared("squad-dev", shared_data)
    splits = prepared.splits
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8456, 1057, 1057]  # round(0.1 * 10570) each
    assert prepared.documents == raw.documents                                 # every paragraph is indexed
    train_docs = {q.relevant_docs[0] for q in splits["train"]}
    assert train_docs == {d.id for d in raw.documents}
    for split in ("val", "test"):
        assert {q.relevant_docs[0] for q in splits[split]} <= train_docs     # seen with other queries
    per_doc = collections.Counter(q.relevant_docs[0] for q in raw.queries)
    singles = {doc for doc, n in per_doc.items() if n == 1}
    assert not singles & {q.relevant_docs[0] for q in splits["val"] + splits["test"]}
    assert {q.id for s in splits.values() for q in s} == {q.id for q in raw.queries}


def test_nq_oracle_follows_the_nq10k_scheme(shared_data):
    directory = shared_data / "nq-open-oracle"
    with gzip.open(directory / "passages.jsonl.gz", "rt", encoding="utf-8") as handle:
        passages = [json.loads(line) for line in handle]
    with gzip.open(directory / "questions.jsonl.gz", "rt", encoding="utf-8") as handle:
        questions = [json.loads(line) for line in handle]
    assert (len(passages), len(questions)) == (2600, 2145)                      # SOURCE.md
    gold_lines = {passages.index(q["gold"]) for q in questions}               # first equal passage, by line
    raw = load_nq_oracle(directory)
    assert [d.id for d in raw.documents] == [str(i) for i in range(2600)]
    assert raw.documents[5].text == f"{passages[5]['title']}: {passages[5]['text']}"
    assert {q.relevant_docs[0] for q in raw.queries} == {str(i) for i in gold_lines}

    splits = build_prepared("nq-oracle", shared_data).splits
    docs = {name: {q.relevant_docs[0] for q in queries} for name, queries in splits.items()}
    assert not docs["train"] & docs["val"] and not docs["train"] & docs["test"] and not docs["val"] & docs["test"]
    expected_held_out = round_half_up(Fraction(len(gold_lines), 10))
    assert len(docs["val"]) == len(docs["test"]) == expected_held_out == 210
    assert len(docs["train"]) == len(gold_lines) - 2 * expected_held_out
    assert sum(len(q) for q in splits.values()) == 2145


def test_cranfield(shared_data):
    directory = shared_data / "cranfield"
    lines = [line.split() for line in (directory / "cranqrel").read_text().replace("\r", "").splitlines()
             if line.strip()]
    codes = collections.Counter(code for _, _, code in lines)
    assert codes == {"1": 128, "2": 387, "3": 734, "4": 363, "-1": 225}        # SOURCE.md
    raw = load_cranfield(directory)
    assert len(raw.documents) == 1400 - 2 and {"471", "995"}.isdisjoint(d.id for d in raw.documents)
    assert len(raw.queries) == 225 and [q.id for q in raw.queries] == [str(k) for k in range(1, 226)]
    assert raw.queries[0].text.startswith("what similarity laws must be obeyed when constructing aeroelastic")
    assert raw.queries[2].text.startswith("what problems of heat conduction in composite slabs")  # cran.qry .I 004
    # Query 1 by hand from cranqrel: code 2 {184, 29, 31, 57, 378, 859, 875} first, by document number.
    assert raw.queries[0].relevant_docs[:8] == ("29", "31", "57", "184", "378", "859", "875", "12")
    grades = collections.Counter(g for docs in raw.grades.values() for g in docs.values())
    assert grades == {4: 128, 3: 387, 2: 734 - 1, 1: 363}                     # minus (125, 995, code 3)
    assert "995" not in raw.grades["125"]
    doc_240 = next(d for d in raw.documents if d.id == "240")
    assert "application to turbulent separations" in doc_240.text and ".A" not in doc_240.text
    splits = build_prepared("cranfield", shared_data).splits
    assert [len(splits[s]) for s in ("train", "val", "test")] == [179, 23, 23]  # round(22.5) = 23


# --------------------------------------------------------------------------------------------------
# prepare_dataset: files, determinism, reference-json, errors
# --------------------------------------------------------------------------------------------------

def test_prepare_writes_the_layout_deterministically(shared_data, tmp_path):
    manifest = prepare_dataset("cranfield", tmp_path / "a", shared_data, seed=1)
    prepare_dataset("cranfield", tmp_path / "b", shared_data, seed=1)
    prepare_dataset("cranfield", tmp_path / "c", shared_data, seed=2)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == manifest["files"] == sorted(["documents.json", "prepare.json", "train_queries.json",
                                                 "val_queries.json", "test_queries.json", "val_qrels.json",
                                                 "test_qrels.json", "val.qrels", "test.qrels"])
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "val_queries.json").read_bytes() != (tmp_path / "c" / "val_queries.json").read_bytes()
    documents, splits = load_prepared(tmp_path / "a")
    assert len(documents) == manifest["counts"]["documents"] == 1398
    qrels = read_qrels(tmp_path / "a" / "test_qrels.json")
    raw = load_cranfield(shared_data / "cranfield")
    assert qrels == {q.id: raw.grades[q.id] for q in splits["test"]}          # graded, not 4 - position
    assert manifest["sources_sha256"]["cranqrel"] == hashlib.sha256(
        (shared_data / "cranfield" / "cranqrel").read_bytes()).hexdigest()


def _write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def test_reference_json(tmp_path):
    docs = _write(tmp_path / "docs.json", [{"id": 1, "text": "one"}, {"id": 2, "text": "two"}])
    train = _write(tmp_path / "train.json", [{"id": "a", "query": "q a", "relevant_docs": [1]}])
    val = _write(tmp_path / "val.json", [{"id": "b", "query": "q b", "relevant_docs": [2, 1]}])
    manifest = prepare_dataset("reference-json", tmp_path / "out", documents=docs, train_queries=train,
                               val_queries=val)
    assert manifest["counts"]["documents"] == 2 and "test_queries.json" not in manifest["files"]
    out = tmp_path / "out"
    assert read_documents(out / "documents.json")[0].id == "1"
    assert read_queries(out / "val_queries.json")[0].relevant_docs == ("2", "1")
    assert json.loads((out / "val_qrels.json").read_text()) == {
        "query": ["b", "b"], "q0": ["q0", "q0"], "docid": ["@DOC_ID_2@", "@DOC_ID_1@"], "rel": [4, 3]}

    clash = _write(tmp_path / "clash.json", [{"id": "a", "query": "again", "relevant_docs": [2]}])
    with pytest.raises(DataError, match=r"clash\.json: query id 'a' is also in .*train\.json"):
        prepare_dataset("reference-json", tmp_path / "bad", documents=docs, train_queries=train, val_queries=clash)
    orphan = _write(tmp_path / "orphan.json", [{"id": "c", "query": "q c", "relevant_docs": [3]}])
    with pytest.raises(DataError, match=r"orphan\.json: record index 0 \(id 'c'\): field 'relevant_docs': "
                                        r"document '3' is not in the corpus"):
        prepare_dataset("reference-json", tmp_path / "bad", documents=docs, train_queries=train, val_queries=orphan)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(GenIRError, match="needs the files val_queries"):
        prepare_dataset("reference-json", tmp_path / "bad", documents=docs, train_queries=train)


def _tiny_squad(path):
    data = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
        {"context": "Paris is the capital of France.", "qas": [
            {"id": f"q{i}", "question": f"question {i}?", "answers": []} for i in range(10)]},
        {"context": "Berlin is in Germany.", "qas": [{"id": "solo", "question": "where?", "answers": []}]}]}]}
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_squad_download_checks_the_sha256(tmp_path):
    source = _tiny_squad(tmp_path / "served.json")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match=r"dev-v1\.1\.json: file not found \(pass download to fetch it"):
        prepare_dataset("squad-dev", tmp_path / "out", data_dir)
    with pytest.raises(DataError, match=r"SHA-256 .* does not match the expected 0000; nothing was written"):
        prepare_dataset("squad-dev", tmp_path / "out", data_dir, download=True, url=source.as_uri(), sha256="0000")
    assert not list(data_dir.rglob("*.json")) and not (tmp_path / "out").exists()
    with pytest.raises(DataError, match=r"download failed"):
        prepare_dataset("squad-dev", tmp_path / "out", data_dir, download=True,
                        url=(tmp_path / "absent.json").as_uri(), sha256=digest)
    manifest = prepare_dataset("squad-dev", tmp_path / "out", data_dir, download=True, url=source.as_uri(),
                               sha256=digest)
    assert (data_dir / "squad-v1.1-dev" / "dev-v1.1.json").read_bytes() == source.read_bytes()
    assert manifest["counts"] == {"documents": 2, "train_queries": 9, "train_documents": 2,
                                        "val_queries": 1, "val_documents": 1, "test_queries": 1,
                                        "test_documents": 1}


def test_squad_format_errors_name_the_record(tmp_path):
    path = tmp_path / "squad-v1.1-dev" / "dev-v1.1.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "x"}]}]}]}))
    with pytest.raises(DataError, match=r"dev-v1\.1\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field "
                                        r"'question'"):
        prepare_dataset("squad-dev", tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()


def test_nq_gold_passage_must_exist(tmp_path):
    directory = tmp_path / "nq-open-oracle"
    directory.mkdir()
    with gzip.open(directory / "passages.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"title": "A", "text": "alpha"}) + "\n")
    with gzip.open(directory / "questions.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"question": "q?", "answers": [], "gold": {"title": "A", "text": "alpha"}}) + "\n")
        handle.write(json.dumps({"question": "r?", "answers": [], "gold": {"title": "B", "text": "beta"}}) + "\n")
    with pytest.raises(DataError, match=r"questions\.jsonl\.gz: line 2: field 'gold': passage 'B' is not in"):
        load_nq_oracle(directory)


def test_default_data_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GENIR_JAX_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("GENIR_JAX_DATA")
    assert default_data_dir().parts[-2:] == ("shared", "data")


def test_max_documents_keeps_a_prefix_and_its_queries(shared_data, tmp_path):
    full = build_prepared("squad-dev", shared_data)
    manifest = prepare_dataset("squad-dev", tmp_path / "small", shared_data, max_documents=40)
    documents, splits = load_prepared(tmp_path / "small")
    assert [d.id for d in documents] == [d.id for d in full.documents[:40]]
    kept = {d.id for d in documents}
    for name, queries in splits.items():
        expected = [q for q in full.splits[name] if set(q.relevant_docs) <= kept]
        assert [q.id for q in queries] == [q.id for q in expected]
    assert manifest["options"]["max_documents"] == 40
    with pytest.raises(GenIRError, match="max_documents must be a positive integer"):
        prepare_dataset("squad-dev", tmp_path / "never", shared_data, max_documents=0)
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------------------------------
# Naive docids: a seeded shuffle by default, the corpus order on request
# --------------------------------------------------------------------------------------------------

def test_naive_ids_are_a_seeded_shuffle_of_the_documents(shared_data, tmp_path):
    from genir_jax.base.errors import SettingError
    from genir_jax.data.prepare import prepared_scheme
    from genir_jax.docids.schemes import naive_scheme

    manifest = prepare_dataset("squad-dev", tmp_path / "a", shared_data, max_documents=60, seed=3, docids="naive")
    documents, _ = load_prepared(tmp_path / "a")
    doc_ids = [d.id for d in documents]
    assert manifest["docids"] == {"scheme": "naive", "order": "shuffled", "seed": 3, "file": "naive_docids.json"}
    assert "naive_docids.json" in manifest["files"]
    ids = json.loads((tmp_path / "a" / "naive_docids.json").read_text())
    assert list(ids) == doc_ids and sorted(ids.values(), key=int) == [str(i) for i in range(60)]  # a permutation
    assert list(ids.values()) != doc_ids  # squad-dev's document ids are numbered in article order
    neighbours = sum(abs(int(ids[a]) - int(ids[b])) == 1 for a, b in zip(doc_ids, doc_ids[1:]))
    assert neighbours < 10  # neighbouring documents (often one article) rarely get neighbouring ids
    assert prepared_scheme(tmp_path / "a", doc_ids).docids == ids  # what `train` and `evaluate` use
    prepare_dataset("squad-dev", tmp_path / "b", shared_data, max_documents=60, seed=3, docids="naive")
    prepare_dataset("squad-dev", tmp_path / "c", shared_data, max_documents=60, seed=4, docids="naive")
    assert json.loads((tmp_path / "b" / "naive_docids.json").read_text()) == ids
    assert json.loads((tmp_path / "c" / "naive_docids.json").read_text()) != ids
    corpus = prepare_dataset("squad-dev", tmp_path / "d", shared_data, max_documents=60, seed=3, docids="naive",
                             naive_order="corpus")
    assert corpus["docids"] == {"scheme": "naive", "order": "corpus"}
    assert not (tmp_path / "d" / "naive_docids.json").exists()
    assert prepared_scheme(tmp_path / "d", doc_ids).docids == naive_scheme(doc_ids).docids  # the old ids
    with pytest.raises(SettingError, match="naive_order needs docids naive"):
        prepare_dataset("squad-dev", tmp_path / "never", shared_data, max_documents=60, naive_order="corpus")
    with pytest.raises(SettingError, match="naive_order must be one of shuffled, corpus"):
        prepare_dataset("squad-dev", tmp_path / "never", shared_data, max_documents=60, docids="naive",
                        naive_order="sorted")
    assert not (tmp_path / "never").exists()
