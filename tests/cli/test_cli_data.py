"""`genir-jax prepare-data`, `evaluate` and `bm25` end to end: outputs, and exit code 2 without outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.cli.main import main
from genir_jax.data.dsi import tokenize_queries
from genir_jax.docids.retrieval import read_trec_run
from tests.dsi_fixtures import tiny_dsi_model

DOC_IDS = [f"d{i}" for i in range(30)]


def _write(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def _fails(capsys, argv, *fragments):
    """Run the CLI expecting exit code 2 and an error line containing every fragment."""
    assert main(argv) == 2
    error = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in error, (fragment, error)
    return error


@pytest.fixture
def reference_files(tmp_path):
    documents = [{"id": d, "text": f"document {d} about topic {i % 7}"} for i, d in enumerate(DOC_IDS)]
    train = [{"id": f"t{i}", "query": f"topic {i % 7} question {i}", "relevant_docs": [DOC_IDS[i]]} for i in range(20)]
    val = [{"id": f"v{i}", "query": f"what about document {DOC_IDS[i]} topic {i % 7}",
            "relevant_docs": [DOC_IDS[i], DOC_IDS[(i + 1) % 30]]} for i in range(20, 30)]
    return {"documents": _write(tmp_path / "docs.json", documents), "train": _write(tmp_path / "train.json", train),
            "val": _write(tmp_path / "val.json", val)}


def _prepare(files, out):
    return main(["prepare-data", "--dataset", "reference-json", "--documents", files["documents"],
                 "--train-queries", files["train"], "--val-queries", files["val"], "-o", str(out)])


def test_prepare_data_on_real_data(shared_data, tmp_path, capsys):
    out = tmp_path / "squad"
    assert main(["prepare-data", "--dataset", "squad-dev", "--data-dir", str(shared_data), "-o", str(out),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"]["documents"] == 2067
    assert printed["counts"]["train_queries"] + printed["counts"]["val_queries"] + \
        printed["counts"]["test_queries"] == 10570
    manifest = json.loads((out / "prepare.json").read_text())
    assert manifest["dataset"] == "squad-dev" and manifest["options"]["seed"] == 0
    assert manifest["sources_sha256"]["dev-v1.1.json"] == \
        "95aa6a52d5d6a735563366753ca50492a658031da74f301ac5238b03966972c9"     # SOURCE.md


def test_prepare_data_prints_labelled_lines(shared_data, tmp_path, capsys):
    """Without --json, prepare-data prints what it wrote as labelled lines, with the counts of prepare.json."""
    out = tmp_path / "squad"
    assert main(["prepare-data", "--dataset", "squad-dev", "--data-dir", str(shared_data), "-o", str(out),
                 "--max-documents", "50"]) == 0
    printed = capsys.readouterr().out.splitlines()
    counts = json.loads((out / "prepare.json").read_text())["counts"]
    assert printed[0] == f"prepared squad-dev: {out}"
    assert printed[1] == (f"  50 documents, atomic docids; queries train {counts['train_queries']} / val "
                          f"{counts['val_queries']} / test {counts['test_queries']}")
    assert printed[2].startswith("  split per-document: val documents ") and "{" not in "".join(printed)


@pytest.mark.parametrize("broken, fragments", [
    ("documents", ["docs.json: record index 3 (id 'd1'): field 'id': duplicate document id 'd1' (first at record "
                   "index 1)"]),
    ("empty", ["docs.json: record index 2 (id 'd2'): field 'text' is empty"]),
    ("json", ["train.json: invalid JSON at line 1, column"]),
    ("missing", ["val.json: record index 1 (id 'v21'): missing field 'query'"]),
    ("orphan", ["val.json: record index 0 (id 'v20'): field 'relevant_docs': document 'nowhere' is not in the "
                "corpus"]),
])
def test_prepare_data_bad_input(reference_files, tmp_path, capsys, broken, fragments):
    docs = json.loads(open(reference_files["documents"]).read())
    val = json.loads(open(reference_files["val"]).read())
    if broken == "documents":
        docs[3]["id"] = "d1"
        _write(tmp_path / "docs.json", docs)
    elif broken == "empty":
        docs[2]["text"] = ""
        _write(tmp_path / "docs.json", docs)
    elif broken == "json":
        (tmp_path / "train.json").write_text('[{"id": "t0", "query": ')
    elif broken == "missing":
        del val[1]["query"]
        _write(tmp_path / "val.json", val)
    else:
        val[0]["relevant_docs"] = ["nowhere"]
        _write(tmp_path / "val.json", val)
    out = tmp_path / "out"
    assert _prepare(reference_files, out) == 2
    error = capsys.readouterr().err
    assert error.startswith("genir-jax prepare-data: error: ")
    for fragment in fragments:
        assert fragment in error
    assert not out.exists() and not list(tmp_path.glob(".out*"))             # no partial outputs


def test_evaluate_and_bm25(reference_files, hf_checkpoint, t5_tokenizer, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    assert _prepare(reference_files, prepared) == 0
    model, token_ids = tiny_dsi_model(hf_checkpoint, t5_tokenizer, DOC_IDS)
    checkpoint = tmp_path / "dsi"
    gj.save_pretrained(checkpoint, model)
    capsys.readouterr()

    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--prepared", str(prepared), "--split", "val",
                 "-o", str(out), "--k", "5", "--max-length", "16", "--batch-size", "4", "--json"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["correct_valid.json", "metrics.json", "run.trec"]
    printed = json.loads(capsys.readouterr().out)  # --json: the metrics as one JSON line

    # Brute force: the checkpoint as saved, the queries as tokenized, argsort of the docid logits.
    loaded = gj.load_pretrained(checkpoint)
    queries = json.loads((prepared / "val_queries.json").read_text())
    ids, mask = tokenize_queries([q["query"] for q in queries], loaded.tokenizer, 16)
    logits = np.asarray(gj.forward(loaded.config, loaded.params, ids, mask, np.zeros((len(ids), 1), np.int32)))
    order = np.argsort(-logits[:, 0, token_ids], axis=1, kind="stable")[:, :5]
    run = read_trec_run(out / "run.trec")
    assert list(run) == [q["id"] for q in queries]
    for query, row in zip(queries, order):
        assert [d for d, _ in run[query["id"]]] == [DOC_IDS[i] for i in row]
    correct = json.loads((out / "correct_valid.json").read_text())
    top_token = logits[:, 0].argmax(-1)  # correct also needs the docid to be the top token overall
    expected_correct = [[gj.docid_token(DOC_IDS[row[0]]), q["id"]] for q, row, top in zip(queries, order, top_token)
                        if DOC_IDS[row[0]] in q["relevant_docs"] and top == token_ids[row[0]]]
    assert correct == expected_correct
    # Hits@1 by hand: the first relevant document has grade 4, the second 3 (both relevant).
    hits1 = np.mean([DOC_IDS[row[0]] in q["relevant_docs"] for q, row in zip(queries, order)])
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["Hits@1"] == pytest.approx(hits1) and printed == metrics and metrics["queries"] == 10

    # The reference's evaluation: full vocabulary, padded to --max-length, no attention mask.
    ref_out = tmp_path / "eval-ref"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--queries", str(prepared / "val_queries.json"),
                 "-o", str(ref_out), "--k", "50", "--max-length", "16", "--reference-mode"]) == 0
    ids_ref, _ = tokenize_queries([q["query"] for q in queries], loaded.tokenizer, 16, pad_to_max_length=True)
    full = np.asarray(gj.forward(loaded.config, loaded.params, ids_ref, np.ones_like(ids_ref),
                                 np.zeros((len(ids), 1), np.int32)))[:, 0, :]
    top = np.argsort(-full, axis=1, kind="stable")[:, :50]
    names = {int(t): d for t, d in zip(token_ids, DOC_IDS)}
    ref_run = read_trec_run(ref_out / "run.trec")
    for query, row in zip(queries, top):
        got = [d for d, _ in ref_run[query["id"]]]
        assert [d for d in got if not d.startswith("NON_DOCID@")] == [names[t] for t in row if t in names]
        assert [r for r, d in enumerate(got) if not d.startswith("NON_DOCID@")] == \
            [r for r, t in enumerate(row) if t in names]
    kinds = {d.startswith("NON_DOCID@") for r in ref_run.values() for d, _ in r}
    assert kinds == {True, False}                     # word tokens and docids both in the reference's top 50
    capsys.readouterr()

    bm25_out = tmp_path / "bm25"
    assert main(["bm25", "--prepared", str(prepared), "--split", "val", "-o", str(bm25_out)]) == 0
    assert sorted(p.name for p in bm25_out.iterdir()) == ["metrics.json", "run.trec"]
    assert json.loads((bm25_out / "metrics.json").read_text())["metrics"]["queries"] == 10


def test_evaluate_bad_input_writes_nothing(reference_files, hf_checkpoint, t5_tokenizer, tmp_path, capsys):
    prepared = tmp_path / "prepared"
    assert _prepare(reference_files, prepared) == 0
    model, _ = tiny_dsi_model(hf_checkpoint, t5_tokenizer, DOC_IDS[:10])    # another corpus
    checkpoint = tmp_path / "other"
    gj.save_pretrained(checkpoint, model)
    out = tmp_path / "eval"
    _fails(capsys, ["evaluate", "--checkpoint", str(checkpoint), "--prepared", str(prepared), "-o", str(out)],
           "genir-jax evaluate: error: ", "val_qrels.json: query 'v20': relevant document 'd20' has no docid token",
           "another corpus / vocabulary")
    plain = hf_checkpoint("plain", tokenizer=t5_tokenizer, vocab_size=32128, d_model=16, d_kv=4, d_ff=32,
                          num_layers=1, num_heads=2)[0]
    _fails(capsys, ["evaluate", "--checkpoint", str(plain), "--prepared", str(prepared), "-o", str(out)],
           "the tokenizer has no docid tokens")
    qrels = json.loads((prepared / "val_qrels.json").read_text())
    qrels["rel"][3] = "high"
    bad_qrels = _write(tmp_path / "bad_qrels.json", qrels)
    _fails(capsys, ["evaluate", "--checkpoint", str(checkpoint), "--queries", str(prepared / "val_queries.json"),
                    "--qrels", bad_qrels, "-o", str(out)],
           "bad_qrels.json: entry 3 (query 'v21'): field 'rel' must be an integer, got a JSON string")
    other_qrels = _write(tmp_path / "other_qrels.json", {"query": ["zz"], "q0": ["q0"], "docid": ["@DOC_ID_d1@"],
                                                          "rel": [4]})
    _fails(capsys, ["bm25", "--prepared", str(prepared), "--split", "val", "--qrels", other_qrels, "-o", str(out)],
           "other_qrels.json: the queries and the qrels do not match: 10 queries without judgements")
    assert not out.exists() and not list(tmp_path.glob(".eval*"))


def test_prepare_data_naive_order(shared_data, tmp_path, capsys):
    """--docids naive shuffles the ids by default (naive_docids.json, its seed in prepare.json); --naive-order
    corpus keeps the document ids; --naive-order without naive docids is refused naming the flags."""
    common = ["prepare-data", "--dataset", "squad-dev", "--data-dir", str(shared_data), "--max-documents", "30"]
    assert main([*common, "--docids", "naive", "--seed", "5", "-o", str(tmp_path / "shuffled")]) == 0
    assert json.loads((tmp_path / "shuffled" / "prepare.json").read_text())["docids"]["seed"] == 5
    assert (tmp_path / "shuffled" / "naive_docids.json").is_file()
    assert main([*common, "--docids", "naive", "--naive-order", "corpus", "-o", str(tmp_path / "corpus")]) == 0
    assert json.loads((tmp_path / "corpus" / "prepare.json").read_text())["docids"] == {"scheme": "naive",
                                                                                         "order": "corpus"}
    capsys.readouterr()
    assert main([*common, "--naive-order", "corpus", "-o", str(tmp_path / "never")]) == 2
    assert "--naive-order needs --docids naive, got --docids atomic" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
