"""`prepare_dataset`: turn a corpus into the prepared directory every other command reads.

Layout of a prepared directory (all JSON in the reference code's formats, see `genir_jax.data.corpus`)::

    documents.json        every indexed document            [{"id", "text"}]
    train_queries.json    queries for retrieval training    [{"id", "query", "relevant_docs"}]
    val_queries.json      validation queries (correct_valid.json and the analyses use these)
    test_queries.json     test queries (absent when a reference-json input has no test file)
    val_qrels.json        reference qrels of val / test     {"query", "q0", "docid", "rel"}
    test_qrels.json
    val.qrels test.qrels  the same judgements in plain TREC format (query 0 docid rel), for trec_eval
    prepare.json          dataset, options (split scheme included), source checksums, counts, notes, the split
                          check (``split``), the regime (``"paper"`` or null) and the docid scheme
    semantic_docids.json  with ``--docids semantic`` only: {doc id: "3_0_17"} (the reference's mapping format),
                          built by hierarchical k-means or validated from a given mapping file
    naive_docids.json     with ``--docids naive`` only (unless ``--naive-order corpus``): {doc id: "17"}, the
                          documents numbered in a seeded random order (the split's ``seed``, recorded in
                          prepare.json's ``docids``), so neighbouring ids do not share an article; with
                          ``corpus`` the naive ids are the document ids (article order)

Split schemes (``split``; deterministic for a given seed; counts by cumulative rounding, see
`genir_jax.data.splits`). Every document is indexed whatever the scheme; the scheme decides which queries
train and so which documents are also seen through retrieval examples:

- ``nq10k`` (the paper's NQ10k, and the reference code's NQ split): the documents that have queries are
  split 80/10/10 (fractions are options); all queries of a validation (test) document are validation (test)
  queries, so validation and test documents have NO training query and are seen in training only through
  indexing. Needs one relevant document per query.
- ``per-document``: each document's queries are split 80/10/10 keeping at least one training query per
  document, so every validation/test document is also seen with training queries (one-query documents are
  training-only). Needs one relevant document per query.
- ``random``: the queries are split 80/10/10 at random as one group.

The manifest records the scheme and checks it on the written splits (``split``: how many validation /
test documents also have training queries, and how many are indexed only); ``regime: "paper"`` marks a
directory prepared with ``paper_regime`` (whose default split is ``nq10k``).

Datasets (default split in brackets):

- ``squad-dev`` [per-document]: every paragraph is a document and is indexed (2067; 10570 questions).
  ``nq10k`` gives it the paper's regime: about 10% of the paragraphs are validation documents, indexed only.
- ``nq-oracle`` [nq10k]: real NQ questions and their gold passages, about one question per passage, the
  NQ10k setting at a quarter of its size. All 2600 passages are indexed (also the ~500 whose questions are
  held out of the source).
- ``cranfield`` [random]: all documents with text are indexed (1398); queries have several relevant
  documents (shared between queries), so only ``random`` applies and a test query's documents are usually
  also trained on. Qrels keep Cranfield's graded judgements (grade = 5 - relevance code) instead of
  4 - position.
- ``reference-json``: existing documents / train / val (/ test) files are validated (unique ids, non-empty
  texts, every relevant document in the corpus, no query id in two splits) and written in canonical form.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from genir_jax.data.corpus import (Document, Query, qrels_from_queries, read_documents, read_queries,
                                   validate_documents, validate_queries, write_documents, write_qrels,
                                   write_queries, write_trec_qrels)
from genir_jax.data.sources import (CRANFIELD_DIR, NQ_DIR, SQUAD_DEV_SHA256, SQUAD_DEV_URL, RawCorpus,
                                    load_cranfield, load_nq_oracle, load_squad, squad_dev_file)
from genir_jax.data.splits import as_fraction, split_groups
from genir_jax.base.errors import DataError, GenIRError, SettingError
from genir_jax.base.io import atomic_directory, check_output_dir, read_json, sha256_of, write_json

DATASETS = ("squad-dev", "nq-oracle", "cranfield", "reference-json")
SPLIT_SCHEMES = ("nq10k", "per-document", "random")
DEFAULT_SPLITS = {"squad-dev": "per-document", "nq-oracle": "nq10k", "cranfield": "random"}
PAPER_SPLIT = "nq10k"  # the split of the paper regime (``paper_regime=True``) unless one is given
DATA_ENV = "GENIR_JAX_DATA"
DOCUMENTS_FILE = "documents.json"
MANIFEST_FILE = "prepare.json"
SPLIT_NAMES = ("train", "val", "test")


def queries_file(split: str) -> str:
    return f"{split}_queries.json"


def qrels_file(split: str) -> str:
    return f"{split}_qrels.json"


def trec_qrels_file(split: str) -> str:
    return f"{split}.qrels"


def default_data_dir() -> pathlib.Path:
    """``$GENIR_JAX_DATA``, else ``../shared/data`` from the current directory, else beside the project."""
    configured = os.environ.get(DATA_ENV)
    if configured:
        return pathlib.Path(configured)
    from_cwd = pathlib.Path.cwd().parent / "shared" / "data"
    beside_project = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data"
    return from_cwd if from_cwd.is_dir() or not beside_project.is_dir() else beside_project


class Prepared:
    """A split corpus: documents, queries per split, optional graded qrels, notes and source checksums."""

    def __init__(self, documents: list[Document], splits: dict[str, list[Query]],
                 grades: dict[str, dict[str, int]] | None = None, notes: list[str] | None = None,
                 sources: dict[str, str] | None = None):
        self.documents = documents
        self.splits = splits
        self.grades = grades
        self.notes = notes or []
        self.sources = sources or {}

    def counts(self) -> dict[str, int]:
        counts = {"documents": len(self.documents)}
        for name, queries in self.splits.items():
            counts[f"{name}_queries"] = len(queries)
            counts[f"{name}_documents"] = len({d for q in queries for d in q.relevant_docs})
        return counts


# --------------------------------------------------------------------------------------------------
# Splitting each source
# --------------------------------------------------------------------------------------------------

def _check_fractions(val_fraction, test_fraction) -> None:
    if as_fraction(val_fraction, "val_fraction") + as_fraction(test_fraction, "test_fraction") >= 1:
        raise GenIRError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")


def _require_one_relevant_document(raw: RawCorpus, scheme: str, dataset: str) -> None:
    """Document-wise splits assign each query to its relevant document: refuse queries with several."""
    several = [q.id for q in raw.queries if len(q.relevant_docs) != 1]
    if several:
        raise DataError(f"{dataset}: split {scheme!r} needs exactly one relevant document per query, but "
                        f"{len(several)} of {len(raw.queries)} queries have several (first: {several[0]!r}); use "
                        "--split random")


def split_squad(raw: RawCorpus, seed: int, val_fraction, test_fraction) -> Prepared:
    """Per document (SQuAD: per paragraph, the source's groups), its queries split by cumulative rounding
    with one training query kept."""
    if raw.groups is not None:
        groups = [[raw.queries[i] for i in group] for group in raw.groups]
    else:
        by_document: dict[str, list[Query]] = {}
        for query in raw.queries:
            by_document.setdefault(query.relevant_docs[0], []).append(query)
        groups = list(by_document.values())
    splits = split_groups(groups, val_fraction, test_fraction, seed=seed, min_train=1)
    return Prepared(raw.documents, splits, notes=raw.notes)


def split_by_document(raw: RawCorpus, seed: int, val_fraction, test_fraction) -> Prepared:
    """NQ10k scheme: split the documents that have queries; each query follows its (first) relevant document."""
    queried = list(dict.fromkeys(q.relevant_docs[0] for q in raw.queries))
    doc_split = split_groups([queried], val_fraction, test_fraction, seed=seed)
    split_of = {doc: name for name, docs in doc_split.items() for doc in docs}
    splits: dict[str, list[Query]] = {name: [] for name in SPLIT_NAMES}
    for query in raw.queries:
        splits[split_of[query.relevant_docs[0]]].append(query)
    notes = raw.notes + [f"documents with queries: {len(queried)} (train {len(doc_split['train'])}, val "
                         f"{len(doc_split['val'])}, test {len(doc_split['test'])}); documents without queries: "
                         f"{len(raw.documents) - len(queried)} (indexed only)"]
    return Prepared(raw.documents, splits, notes=notes)


def split_queries(raw: RawCorpus, seed: int, val_fraction, test_fraction) -> Prepared:
    """Queries split at random as one group."""
    splits = split_groups([raw.queries], val_fraction, test_fraction, seed=seed)
    return Prepared(raw.documents, splits, grades=raw.grades, notes=raw.notes)


SPLITTERS = {"nq10k": split_by_document, "per-document": split_squad, "random": split_queries}


def split_raw(raw: RawCorpus, scheme: str, dataset: str, seed: int, val_fraction, test_fraction) -> Prepared:
    """`raw` split by `scheme` (one of `SPLIT_SCHEMES`, see the module docstring)."""
    if scheme not in SPLIT_SCHEMES:
        raise GenIRError(f"unknown split {scheme!r}; choose one of {', '.join(SPLIT_SCHEMES)}")
    if scheme != "random":
        _require_one_relevant_document(raw, scheme, dataset)
    return SPLITTERS[scheme](raw, seed, val_fraction, test_fraction)


def split_record(prepared: Prepared, scheme: str | None) -> dict[str, Any]:
    """The manifest's ``split``: the scheme and, checked on the splits as written, how many validation / test
    documents also have training queries and how many are seen in training only through indexing."""
    train_docs = {doc for query in prepared.splits.get("train", []) for doc in query.relevant_docs}
    record: dict[str, Any] = {"scheme": scheme}
    for name in ("val", "test"):
        docs = {doc for query in prepared.splits.get(name, []) for doc in query.relevant_docs}
        record[f"{name}_documents"] = len(docs)
        record[f"{name}_documents_with_train_queries"] = len(docs & train_docs)
        record[f"{name}_documents_indexed_only"] = len(docs - train_docs)
    return record


def load_reference_json(documents: str, train_queries: str, val_queries: str,
                        test_queries: str | None = None) -> Prepared:
    """Validate existing reference-format files (no query id may appear in two splits)."""
    docs = read_documents(documents)
    paths = {"train": train_queries, "val": val_queries, "test": test_queries}
    splits: dict[str, list[Query]] = {}
    owner: dict[str, str] = {}
    for name, path in paths.items():
        if path is None:
            continue
        splits[name] = read_queries(path, docs)
        for query in splits[name]:
            if query.id in owner:
                raise DataError(f"{path}: query id {query.id!r} is also in {owner[query.id]} (a query may be in "
                                "one split only)")
            owner[query.id] = os.fspath(path)
    sources = {os.path.basename(os.fspath(p)): sha256_of(p) for p in [documents, *paths.values()] if p is not None}
    return Prepared(docs, splits, sources=sources)


# --------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------

def build_prepared(name: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0,
                   val_fraction: float = 0.1, test_fraction: float = 0.1, download: bool = False,
                   url: str = SQUAD_DEV_URL, sha256: str = SQUAD_DEV_SHA256, documents: str | None = None,
                   train_queries: str | None = None, val_queries: str | None = None,
                   test_queries: str | None = None, split: str | None = None) -> Prepared:
    """Read and split dataset `name` (one of `DATASETS`) without writing anything; `split` is one of
    `SPLIT_SCHEMES` (default: the dataset's, `DEFAULT_SPLITS`)."""
    if name not in DATASETS:
        raise GenIRError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split is not None and name == "reference-json":
        raise SettingError("{0} does not apply to reference-json: its train/val/test files are the split", "split")
    if split is not None and split not in SPLIT_SCHEMES:
        raise GenIRError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SCHEMES)}")
    if name == "reference-json":
        missing = [flag for flag, value in (("documents", documents), ("train_queries", train_queries),
                                            ("val_queries", val_queries)) if value is None]
        if missing:
            raise GenIRError(f"reference-json needs the files {', '.join(missing)}")
        return load_reference_json(documents, train_queries, val_queries, test_queries)
    _check_fractions(val_fraction, test_fraction)
    data_dir = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    scheme = split or DEFAULT_SPLITS[name]
    if name == "squad-dev":
        path = squad_dev_file(data_dir, download_missing=download, url=url, sha256=sha256)
        raw = load_squad(path)
        files = [path]
    elif name == "nq-oracle":
        directory = data_dir / NQ_DIR
        raw = load_nq_oracle(directory)
        files = [directory / "passages.jsonl.gz", directory / "questions.jsonl.gz"]
    else:
        directory = data_dir / CRANFIELD_DIR
        raw = load_cranfield(directory)
        files = [directory / "cran.all.1400", directory / "cran.qry", directory / "cranqrel"]
    prepared = split_raw(raw, scheme, name, seed, val_fraction, test_fraction)
    prepared.sources = {os.path.basename(os.fspath(f)): sha256_of(f) for f in files}
    return prepared


def restrict_documents(prepared: Prepared, max_documents: int) -> Prepared:
    """Keep the first `max_documents` documents (corpus order) and the queries whose relevant documents are
    all kept: a small corpus for smoke runs (`reproduce --preset tiny`) with the same split rule."""
    if not isinstance(max_documents, int) or isinstance(max_documents, bool) or max_documents < 1:
        raise GenIRError(f"max_documents must be a positive integer, got {max_documents!r}")
    documents = prepared.documents[:max_documents]
    kept = {doc.id for doc in documents}
    splits = {name: [q for q in queries if set(q.relevant_docs) <= kept] for name, queries in prepared.splits.items()}
    grades = None if prepared.grades is None else {
        query: judged for query, judged in prepared.grades.items()
        if any(query == q.id for queries in splits.values() for q in queries)}
    notes = prepared.notes + [f"restricted to the first {len(documents)} documents and their queries"]
    return Prepared(documents, splits, grades, notes, prepared.sources)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The ``prepare.json`` of a prepared directory as a dict (None when there is none: directories written
    by hand or before it existed)."""
    path = os.path.join(os.fspath(directory), MANIFEST_FILE)
    if not os.path.isfile(path):
        return None
    record = read_json(path)
    return record if isinstance(record, dict) else None


def prepared_scheme_name(prepared_dir: str | os.PathLike) -> str | None:
    """The docid scheme a prepared directory was made for (``prepare.json`` field ``docids.scheme``), if any."""
    from genir_jax.docids.schemes import SCHEMES

    path = os.path.join(os.fspath(prepared_dir), MANIFEST_FILE)
    record = read_manifest(prepared_dir)
    record = record.get("docids") if record is not None else None
    name = record.get("scheme") if isinstance(record, dict) else None
    if name is not None and name not in SCHEMES:
        raise DataError(f"{path}: field 'docids.scheme': unknown docid scheme {name!r}")
    return name


def prepared_scheme(prepared_dir: str | os.PathLike | None, doc_ids, *, docids: str | None = None,
                    semantic_docid_mapping: str | None = None):
    """The `DocidScheme` of `docids` (default: the one `prepared_dir` was made for, else atomic); semantic ids
    from `semantic_docid_mapping`, else the prepared directory's `SEMANTIC_MAPPING_FILE`; naive ids from its
    `NAIVE_MAPPING_FILE` (shuffled), else the document ids (a directory prepared with ``naive_order="corpus"``
    or for another scheme)."""
    from genir_jax.docids.schemes import NAIVE_MAPPING_FILE, SEMANTIC_MAPPING_FILE, resolve_scheme

    default = None
    files = {SEMANTIC_MAPPING_FILE: None, NAIVE_MAPPING_FILE: None}
    if prepared_dir is not None:
        default = prepared_scheme_name(prepared_dir) if docids is None else None
        for name in files:
            candidate = os.path.join(os.fspath(prepared_dir), name)
            files[name] = candidate if os.path.isfile(candidate) else None
    return resolve_scheme(docids, doc_ids, mapping=semantic_docid_mapping, default=default,
                          default_mapping=files[SEMANTIC_MAPPING_FILE], naive_mapping=files[NAIVE_MAPPING_FILE])


def prepared_split(directory: str | os.PathLike) -> dict | None:
    """The split record of a prepared directory's prepare.json (scheme, indexed-only validation documents),
    or None for directories prepared before it was recorded."""
    split = (read_manifest(directory) or {}).get("split")
    return split if isinstance(split, dict) else None


def write_prepared(out_dir: str | os.PathLike, prepared: Prepared, manifest: dict[str, Any],
                   extra: dict[str, Any] | None = None) -> None:
    """Write every file of the layout (and `extra` JSON files, name -> data) into a staging directory, then
    move them into `out_dir`."""
    documents = validate_documents(prepared.documents)
    for name, queries in prepared.splits.items():
        validate_queries(queries, documents, source=f"{name} queries")
    with atomic_directory(out_dir) as staging:
        write_documents(os.path.join(staging, DOCUMENTS_FILE), documents)
        for name, queries in prepared.splits.items():
            if not queries:
                continue  # e.g. test_fraction=0: no test files at all rather than an empty, unreadable one
            write_queries(os.path.join(staging, queries_file(name)), queries)
            if name != "train":
                write_qrels(os.path.join(staging, qrels_file(name)), queries, prepared.grades)
                write_trec_qrels(os.path.join(staging, trec_qrels_file(name)),
                                 qrels_from_queries(queries, prepared.grades))
        for file_name, data in (extra or {}).items():
            write_json(os.path.join(staging, file_name), data, indent=1)
        write_json(os.path.join(staging, MANIFEST_FILE), manifest, indent=2)


def check_prepare_settings(name: str, *, val_fraction: float = 0.1, test_fraction: float = 0.1,
                           max_documents: int | None = None, split: str | None = None,
                           paper_regime: bool = False) -> None:
    """`prepare_dataset`'s settings, checked before anything is read (`SettingError` naming the setting)."""
    import math

    for setting, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value < 1:
            raise SettingError("{0} must be a number in [0, 1), got %s" % value, setting)
    if val_fraction + test_fraction >= 1:
        raise SettingError("{0} + {1} must be < 1, got %s + %s" % (val_fraction, test_fraction),
                           "val_fraction", "test_fraction")
    if max_documents is not None and (not isinstance(max_documents, int) or isinstance(max_documents, bool)
                                      or max_documents < 1):
        raise SettingError("{0} must be a positive integer, got %r" % (max_documents,), "max_documents")
    if name == "reference-json" and (split is not None or paper_regime):
        raise SettingError("{0} / {1} do not apply to reference-json: its train/val/test files are the split",
                           "split", "paper_regime")


def prepare_dataset(name: str, out_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                    **options: Any) -> dict[str, Any]:
    """Read, split and write dataset `name` to `out_dir` (layout in the module docstring); returns the manifest.

    Options: ``seed`` (0), ``val_fraction`` / ``test_fraction`` (0.1), ``split`` (one of `SPLIT_SCHEMES`;
    default the dataset's), ``paper_regime`` (False; True records ``regime: "paper"`` and makes ``nq10k``
    the default split), ``download`` (SQuAD: fetch the file with a SHA-256 check when it is missing;
    ``url`` / ``sha256`` override the source), and for ``reference-json`` the paths ``documents``,
    ``train_queries``, ``val_queries``, ``test_queries``.
    """
    check_output_dir(out_dir, "out_dir")  # a file, or a folder we cannot write: refused before any reading
    paper_regime = bool(options.pop("paper_regime", False))
    check_prepare_settings(name, val_fraction=options.get("val_fraction", 0.1),
                           test_fraction=options.get("test_fraction", 0.1),
                           max_documents=options.get("max_documents"), split=options.get("split"),
                           paper_regime=paper_regime)
    if paper_regime and options.get("split") is None:
        options["split"] = PAPER_SPLIT
    if options.get("split") is None:
        options.pop("split", None)
    max_documents = options.pop("max_documents", None)
    docids = options.pop("docids", "atomic")
    naive_order = options.pop("naive_order", None)
    semantic_mapping = options.pop("semantic_mapping", None)
    semantic_k = options.pop("semantic_k", None)
    semantic_c = options.pop("semantic_c", None)
    prepared = build_prepared(name, data_dir, **options)
    if max_documents is not None:
        prepared = restrict_documents(prepared, max_documents)
        options["max_documents"] = max_documents
    empty = [split for split in ("train", "val") if not prepared.splits.get(split)]
    if empty:
        raise DataError(f"{name}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} empty "
                        "(too few queries for the fractions given)")
    if name == "reference-json":
        recorded = {key: os.fspath(value) for key, value in options.items() if value is not None}
    else:
        recorded = {"seed": options.get("seed", 0), "val_fraction": options.get("val_fraction", 0.1),
                    "test_fraction": options.get("test_fraction", 0.1),
                    "split": options.get("split") or DEFAULT_SPLITS[name]}
        if options.get("download"):
            recorded.update(download=True, url=options.get("url", SQUAD_DEV_URL))
        if options.get("max_documents") is not None:
            recorded["max_documents"] = options["max_documents"]
    written = {split: queries for split, queries in prepared.splits.items() if queries}
    docid_record, extra = prepared_docids(prepared.documents, docids, semantic_mapping, semantic_k, semantic_c,
                                          seed=options.get("seed", 0), naive_order=naive_order)
    manifest = {
        "dataset": name,
        "options": recorded,
        "sources_sha256": prepared.sources,
        "counts": prepared.counts(),
        "notes": prepared.notes,
        "split": split_record(prepared, None if name == "reference-json" else recorded["split"]),
        "regime": "paper" if paper_regime else None,
        "docids": docid_record,
        "files": sorted([DOCUMENTS_FILE, MANIFEST_FILE] + [queries_file(s) for s in written] + list(extra)
                        + [f for s in written if s != "train" for f in (qrels_file(s), trec_qrels_file(s))]),
    }
    write_prepared(out_dir, prepared, manifest, extra)
    return manifest


def preparation_lines(manifest: dict[str, Any], out_dir: str | os.PathLike) -> list[str]:
    """What `prepare-data` (and reproduce's prepare step) prints: labelled lines from a `prepare_dataset`
    manifest (``--json`` prints the manifest's summary fields instead)."""
    counts, split = manifest["counts"], manifest.get("split") or {}
    queries = " / ".join(f"{name} {counts[f'{name}_queries']}" for name in ("train", "val", "test")
                         if f"{name}_queries" in counts)
    scheme = (manifest.get("docids") or {}).get("scheme", "atomic")
    lines = [f"prepared {manifest['dataset']}: {out_dir}",
             f"  {counts['documents']} documents, {scheme} docids; queries {queries}"]
    if split.get("scheme"):
        held_out = ", ".join(f"{name} documents {split[f'{name}_documents']} ({split[f'{name}_documents_indexed_only']} "
                             "indexed only)" for name in ("val", "test") if f"{name}_documents" in split)
        lines.append(f"  split {split['scheme']}" + (f": {held_out}" if held_out else ""))
    if manifest.get("regime"):
        lines.append(f"  regime {manifest['regime']}")
    lines += [f"  note: {note}" for note in manifest.get("notes") or []]
    return lines


def prepared_docids(documents, scheme: str, semantic_mapping=None, k=None, c=None, *, seed: int = 0,
                    naive_order: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's ``docids`` record and the extra files of a docid scheme (see the module docstring);
    `naive_order` (naive only; default ``"shuffled"``, one of `genir_jax.docids.schemes.NAIVE_ORDERS`)."""
    from genir_jax.docids.schemes import (NAIVE_MAPPING_FILE, NAIVE_ORDERS, SEMANTIC_MAPPING_FILE,
                                         build_semantic_scheme, check_scheme, read_semantic_mapping,
                                         shuffled_naive_scheme)
    from genir_jax.docids.semantic_ids import DEFAULT_C, DEFAULT_K

    check_scheme(scheme)
    if naive_order is not None and scheme != "naive":
        raise SettingError("{0} needs {1} naive, got {1} %s" % scheme, "naive_order", "docids")
    if scheme == "naive":
        order = naive_order or NAIVE_ORDERS[0]
        if order not in NAIVE_ORDERS:
            raise SettingError("{0} must be one of %s, got %r" % (", ".join(NAIVE_ORDERS), order), "naive_order")
        if order == "corpus":
            return {"scheme": "naive", "order": "corpus"}, {}
        built = shuffled_naive_scheme([doc.id for doc in documents], seed)
        return {"scheme": "naive", "order": "shuffled", "seed": seed, "file": NAIVE_MAPPING_FILE}, \
            {NAIVE_MAPPING_FILE: dict(built.docids)}
    if scheme != "semantic":
        if semantic_mapping is not None or k is not None or c is not None:
            raise SettingError("{0} / {1} / {2} need {3} semantic, got {3} %s" % scheme,
                               "semantic_mapping", "semantic_k", "semantic_c", "docids")
        return {"scheme": scheme}, {}
    doc_ids = [doc.id for doc in documents]
    if semantic_mapping is not None:
        if k is not None or c is not None:
            raise SettingError("{0} / {1} build a mapping; they cannot go with {2}",
                               "semantic_k", "semantic_c", "semantic_mapping")
        built = read_semantic_mapping(semantic_mapping, doc_ids)
        record = {"scheme": "semantic", "file": SEMANTIC_MAPPING_FILE, "source": os.path.abspath(semantic_mapping),
                  "source_sha256": sha256_of(semantic_mapping)}
    else:
        built = build_semantic_scheme(doc_ids, [doc.text for doc in documents], k=DEFAULT_K if k is None else k,
                                      c=DEFAULT_C if c is None else c, seed=seed)
        record = {"scheme": "semantic", "file": SEMANTIC_MAPPING_FILE, "build": dict(built.build)}
    parts = [len(text.split("_")) for text in built.docids.values()]
    record["levels"] = {"min": min(parts), "max": max(parts)}
    return record, {SEMANTIC_MAPPING_FILE: dict(built.docids)}


def load_prepared(directory: str | os.PathLike) -> tuple[list[Document], dict[str, list[Query]]]:
    """Documents and the queries of every split present in a prepared directory, validated together."""
    directory = pathlib.Path(directory)
    if not (directory / DOCUMENTS_FILE).is_file():
        raise DataError(f"{directory / DOCUMENTS_FILE}: file not found (is {directory} a prepared directory? "
                        "see `genir-jax prepare-data`)")
    documents = read_documents(directory / DOCUMENTS_FILE)
    splits = {name: read_queries(directory / queries_file(name), documents)
              for name in SPLIT_NAMES if (directory / queries_file(name)).is_file()}
    return documents, splits
