"""Naive and semantic docids: semantic id construction, mapping validation, prepare-data / train / evaluate with
each scheme, evaluation against exhaustive scoring, and bad input (exit 2, nothing written)."""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np
import pytest

from genir_jax.cli.main import main
from genir_jax.docids.schemes import (DocidScheme, docid_token_sequences, naive_scheme, read_semantic_mapping,
                                     semantic_scheme)
from genir_jax.base.errors import DataError
from genir_jax.docids.semantic_ids import build_semantic_mapping, hierarchical_ids
from tests.training.test_training_cli import make_prepared

TRAIN = ["--preset", "tiny", "--steps", "4", "--eval-every", "4", "--checkpoint-every", "4", "--no-progress"]


def _texts(count: int) -> list[str]:
    topics = ["river water fish boat", "star planet orbit comet", "violin music concert song",
              "bread flour oven bake", "goal match team score"]
    return [f"{topics[i % len(topics)]} item{i} note{i % 7}" for i in range(count)]


# --------------------------------------------------------------------------------------------------
# Semantic ids
# --------------------------------------------------------------------------------------------------

def test_semantic_ids_deterministic_unique_prefix_free_and_bounded():
    doc_ids = [f"d{i}" for i in range(60)]
    first = build_semantic_mapping(doc_ids, _texts(60), k=3, c=4, seed=7, progress=False)
    again = build_semantic_mapping(doc_ids, _texts(60), k=3, c=4, seed=7, progress=False)
    assert first == again
    assert set(first) == set(doc_ids)
    parts = [tuple(int(p) for p in v.split("_")) for v in first.values()]
    assert len(set(parts)) == len(parts)
    for a, b in itertools.permutations(parts, 2):
        assert b[:len(a)] != a, (a, b)
    assert max(len(p) for p in parts) >= 3  # 60 documents, leaves of <= 4: at least two levels of clusters
    leaves: dict[tuple, list[int]] = {}
    for p in parts:
        leaves.setdefault(p[:-1], []).append(p[-1])
    for prefix, positions in leaves.items():
        assert sorted(positions) == list(range(len(positions))) and len(positions) <= 4, prefix
        assert all(0 <= level < 3 for level in prefix)
    semantic_scheme(first, doc_ids, "built")  # our own validation agrees


def test_a_corpus_smaller_than_c_is_still_clustered_once():
    """DSI's Algorithm 1 clusters its input into k clusters before looking at sizes: 12 documents with
    c = 100 get ids "cluster_position", not bare positions (which would equal naive ids)."""
    ids = hierarchical_ids(np.eye(12)[:, :6] + np.arange(12)[:, None] * 1e-3, k=3, c=100, seed=0, progress=False)
    assert all(len(i) == 2 for i in ids) and {i[0] for i in ids} == {0, 1, 2} and len(set(ids)) == 12
    few = hierarchical_ids(np.eye(2), k=3, c=100, seed=0, progress=False)  # fewer documents than clusters
    assert sorted(few) == [(0, 0), (1, 0)]


def test_hierarchical_ids_end_on_identical_vectors():
    ids = hierarchical_ids(np.ones((25, 3)), k=2, c=3, seed=0, progress=False)
    assert len(set(ids)) == 25 and max(len(i) for i in ids) >= 3



def test_a_cluster_of_exactly_c_documents_is_a_leaf():
    """Three far-apart groups of 4, 5 and 2 documents, k = 3, c = 4: the group of exactly c documents is a
    leaf (ids "cluster_position", positions 0..3); only the group of 5 is clustered again."""
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 100.0
    sizes = (4, 5, 2)
    points = np.concatenate([centres[g] + rng.normal(scale=0.01, size=(n, 3)) for g, n in enumerate(sizes)])
    ids = hierarchical_ids(points, k=3, c=4, seed=0, progress=False)
    groups = np.repeat(np.arange(3), sizes)
    exact_c = [ids[i] for i in np.flatnonzero(groups == 0)]
    assert all(len(i) == 2 for i in exact_c) and len({i[0] for i in exact_c}) == 1
    assert sorted(i[1] for i in exact_c) == [0, 1, 2, 3]
    assert all(len(ids[i]) == 3 for i in np.flatnonzero(groups == 1))  # c + 1 documents: split once more
    assert all(len(ids[i]) == 2 for i in np.flatnonzero(groups == 2))


@pytest.mark.parametrize("mapping, message", [
    ({"d0": "0_0", "d1": "0_1"}, "document 'd2' has no semantic id"),
    ({"d0": "0_0", "d1": "0_1", "d2": "0_1"}, "record 'd2': semantic id '0_1' duplicates that of document 'd1'"),
    ({"d0": "0", "d1": "0_1", "d2": "1"}, "record 'd1': semantic id '0_1' extends the id '0' of document 'd0'"),
    ({"d0": "0_0", "d1": 5, "d2": "1"}, "record 'd1': the semantic id must be a string"),
    ({"d0": "0__1", "d1": "1", "d2": "2"}, "record 'd0'"),
])
def test_semantic_mapping_validation(tmp_path, mapping, message):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(mapping))
    with pytest.raises(DataError) as error:
        read_semantic_mapping(path, ["d0", "d1", "d2"])
    assert str(path) in str(error.value) and message in str(error.value)


def test_docid_token_sequences(t5_tokenizer):
    naive = docid_token_sequences(naive_scheme(["17", "2066"]), t5_tokenizer, ["17", "2066"], "x")
    assert naive == [t5_tokenizer("17")["input_ids"], t5_tokenizer("2066")["input_ids"]]
    assert all(seq[-1] == t5_tokenizer.eos_token_id for seq in naive)
    semantic = DocidScheme("semantic", {"a": "3_0_17"})
    # the reference: tokenizer(id.split("_"), is_split_into_words=True) as the target
    expected = t5_tokenizer(["3", "0", "17"], is_split_into_words=True)["input_ids"]
    assert docid_token_sequences(semantic, t5_tokenizer, ["a"], "x") == [expected]
    with pytest.raises(DataError, match=r"docs\.json: record 'a\{b': naive docid 'a\{b' cannot be represented"):
        docid_token_sequences(naive_scheme(["a{b"]), t5_tokenizer, ["a{b"], "docs.json")


# --------------------------------------------------------------------------------------------------
# prepare-data
# --------------------------------------------------------------------------------------------------

def _reference_json_args(source: pathlib.Path) -> list[str]:
    return ["--dataset", "reference-json", "--documents", str(source / "documents.json"),
            "--train-queries", str(source / "train_queries.json"), "--val-queries", str(source / "val_queries.json")]


def test_prepare_data_naive_and_semantic(tmp_path, capsys):
    source = make_prepared(tmp_path / "source")
    doc_ids = [f"d{i}" for i in range(16)]
    assert main(["prepare-data", *_reference_json_args(source), "-o", str(tmp_path / "naive"),
                 "--docids", "naive"]) == 0
    manifest = json.loads((tmp_path / "naive" / "prepare.json").read_text())
    # naive ids by a seeded shuffle (the default order), written beside the manifest
    assert manifest["docids"] == {"scheme": "naive", "order": "shuffled", "seed": 0, "file": "naive_docids.json"}
    assert sorted(json.loads((tmp_path / "naive" / "naive_docids.json").read_text()).values(), key=int) == \
        [str(i) for i in range(16)]
    assert not (tmp_path / "naive" / "semantic_docids.json").exists()

    out = tmp_path / "semantic"
    assert main(["prepare-data", *_reference_json_args(source), "-o", str(out), "--docids", "semantic",
                 "--semantic-k", "2", "--semantic-c", "3"]) == 0
    mapping = json.loads((out / "semantic_docids.json").read_text())
    assert list(mapping) == doc_ids and all(isinstance(v, str) for v in mapping.values())
    manifest = json.loads((out / "prepare.json").read_text())
    assert manifest["docids"]["build"] == {"embedding": "tfidf-lsa", "k": 2, "c": 3, "seed": 0}
    assert "semantic_docids.json" in manifest["files"]
    semantic_scheme(mapping, doc_ids, "written")

    given = tmp_path / "given.json"  # the reference's spelling of the option, a mapping file of our own
    given.write_text(json.dumps({d: f"{i % 4}_{i // 4}" for i, d in enumerate(doc_ids)}))
    out = tmp_path / "given"
    assert main(["prepare-data", *_reference_json_args(source), "-o", str(out), "--docids", "semantic",
                 "--semantic-doc-id-mapping", str(given)]) == 0
    assert json.loads((out / "semantic_docids.json").read_text()) == json.loads(given.read_text())


@pytest.mark.parametrize("case", ["missing", "duplicate", "prefix", "scheme"])
def test_prepare_data_bad_docids_exit_2_without_output(tmp_path, capsys, case):
    source = make_prepared(tmp_path / "source")
    mapping = {f"d{i}": f"{i}_0" for i in range(16)}
    if case == "missing":
        del mapping["d5"]
    elif case == "duplicate":
        mapping["d5"] = mapping["d4"]
    elif case == "prefix":
        mapping["d5"] = "4"
    given = tmp_path / "map.json"
    given.write_text(json.dumps(mapping))
    out = tmp_path / "out"
    extra = ["--docids", "lexical"] if case == "scheme" else ["--docids", "semantic", "--semantic-docid-mapping",
                                                               str(given)]
    assert main(["prepare-data", *_reference_json_args(source), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert ("unknown docid scheme 'lexical'" in err) if case == "scheme" else (str(given) in err and "'d5'" in err)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------
# train and evaluate
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, t5_tokenizer) -> pathlib.Path:
    """A random base T5 smaller than the tiny preset's (1+1 layers, d_model 16) with the real T5 tokenizer."""
    from genir_jax.core.config import t5_v1_0
    from genir_jax.checkpoints.hf import PretrainedModel, save_pretrained
    from genir_jax.core.model import init_params

    config = t5_v1_0(vocab_size=32128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                     num_heads=2)
    path = tmp_path_factory.mktemp("base") / "base"
    save_pretrained(path, PretrainedModel(config, init_params(config, 1), t5_tokenizer))
    return path


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_train_naive_records_scheme_and_evaluate_reads_it(tmp_path, base_dir, capsys):
    prepared = make_prepared(tmp_path / "prepared")
    model_dir = tmp_path / "model"
    assert main(["train", "--data", str(prepared), "--base", str(base_dir), "-o", str(model_dir), *TRAIN,
                 "--docids", "naive"]) == 0
    recorded = json.loads((model_dir / "docids.json").read_text())
    assert recorded["scheme"] == "naive" and recorded["docids"] == {f"d{i}": f"d{i}" for i in range(16)}
    summary = json.loads((model_dir / "train.json").read_text())
    assert summary["docids"] == "naive" and summary["final"]["val"]["queries"] == 16
    assert summary["data"]["longest_docid_tokens"] >= 3  # "d15" -> pieces + EOS
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(model_dir), "--prepared", str(prepared), "-o", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["docids"] == "naive" and report["decoding"]["queries_per_s"] > 0
    # evaluate reads the scheme back and ranks exactly as the evaluation at the end of training
    for name in ("Hits@1", "Hits@10", "MRR@10"):
        assert report["metrics"][name] == pytest.approx(summary["final"]["val"][name])
    assert main(["evaluate", "--checkpoint", str(model_dir), "--prepared", str(prepared), "-o", str(tmp_path / "x"),
                 "--docids", "atomic"]) == 2
    assert "was trained with" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_finetune_semantic_records_scheme(tmp_path, base_dir):
    import dataclasses

    from genir_jax.data.prepare import load_prepared
    from genir_jax.docids.schemes import checkpoint_scheme
    from genir_jax.checkpoints.hf import load_pretrained
    from genir_jax.training.dsi import finetune
    from genir_jax.training.presets import TINY

    documents, splits = load_prepared(make_prepared(tmp_path / "prepared", documents=8))
    mapping = {f"d{i}": f"{i % 3}_{i // 3}" for i in range(8)}
    scheme = semantic_scheme(mapping, [d.id for d in documents], "test mapping")
    settings = dataclasses.replace(TINY.dsi, index_max_length=32, query_max_length=32)  # one compiled step
    run = dataclasses.replace(TINY.dsi.run, steps=3, eval_every=3, checkpoint_every=3)
    summary = finetune(load_pretrained(base_dir), documents, {"train": splits["train"], "val": splits["val"]},
                       settings, run, str(tmp_path / "model"), scheme=scheme, progress=False)
    assert summary["docids"] == "semantic" and summary["final"]["val"]["queries"] == 8
    assert summary["data"]["longest_docid_tokens"] == 5  # "0_2" -> ▁ 0 ▁ 2 </s>
    recorded = checkpoint_scheme(tmp_path / "model")
    assert recorded.name == "semantic" and dict(recorded.docids) == mapping


def _exhaustive_ranking(model, queries, docids):
    """Every docid's beam score (sum of log-probabilities / number of tokens) by a plain forward pass."""
    from genir_jax.data.dsi import tokenize_queries
    from genir_jax.core.model import forward

    ids, mask = tokenize_queries(queries, model.tokenizer, 32)
    scores = np.zeros((len(queries), len(docids)))
    for j, seq in enumerate(docids):
        target = np.tile(np.asarray(seq, np.int32), (len(queries), 1))
        decoder_in = np.concatenate([np.zeros((len(queries), 1), np.int32), target[:, :-1]], axis=1)
        logits = np.asarray(forward(model.config, model.params, ids, mask, decoder_in), np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        scores[:, j] = np.take_along_axis(log_probs, target[..., None], axis=-1)[..., 0].sum(axis=1) / len(seq)
    return scores


def test_evaluate_naive_equals_exhaustive_scoring(tmp_path, base_dir, t5_tokenizer, capsys):
    from genir_jax.data.corpus import read_queries
    from genir_jax.checkpoints.hf import load_pretrained
    from genir_jax.base.io import write_json

    prepared = make_prepared(tmp_path / "prepared", documents=8)
    model_dir = tmp_path / "model"  # an untrained base with a naive docids.json (reference-style ids "0".."7")
    model = load_pretrained(base_dir)
    params = {**model.params, "shared": np.asarray(model.params["shared"]) * 3.0}  # sharper distributions
    from genir_jax.checkpoints.hf import save_pretrained

    save_pretrained(model_dir, model.replace(params=params))
    doc_ids = [f"d{i}" for i in range(8)]
    docids = {d: str(10 * i + 3) for i, d in enumerate(doc_ids)}
    write_json(model_dir / "docids.json", {"format": 1, "scheme": "naive", "docids": docids})
    # scheme "naive" with custom strings is what a reference-trained naive model's ids look like
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(model_dir), "--prepared", str(prepared), "-o", str(out)]) == 0
    model = load_pretrained(model_dir)
    queries = read_queries(prepared / "val_queries.json")
    sequences = [t5_tokenizer(docids[d])["input_ids"] for d in doc_ids]
    scores = _exhaustive_ranking(model, queries, sequences)
    run_lines = (out / "run.trec").read_text().split("\n")
    for row, query in enumerate(queries):
        order = np.argsort(-scores[row], kind="stable")
        lines = [line.split() for line in run_lines if line.startswith(f"{query.id} ")]
        assert [line[2] for line in lines] == [doc_ids[j] for j in order]
        np.testing.assert_allclose([float(line[4]) for line in lines], scores[row, order], rtol=1e-4)
    first = [doc_ids[int(np.argmax(scores[row]))] for row in range(len(queries))]
    hits1 = np.mean([f == q.relevant_docs[0] for f, q in zip(first, queries)])
    ranks = [list(np.argsort(-scores[row], kind="stable")).index(doc_ids.index(q.relevant_docs[0]))
             for row, q in enumerate(queries)]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["Hits@1"] == pytest.approx(hits1)
    assert metrics["MRR@10"] == pytest.approx(np.mean([1 / (r + 1) for r in ranks]))
    assert metrics["Hits@10"] == pytest.approx(1.0)
    correct = json.loads((out / "correct_valid.json").read_text())
    assert all(docid in docids.values() for docid, _ in correct)
    assert len(correct) <= round(hits1 * len(queries))


@pytest.mark.parametrize("case", ["missing", "duplicate", "prefix", "unrepresentable", "scheme"])
def test_train_bad_docids_exit_2_without_output(tmp_path, base_dir, case, capsys):
    prepared = make_prepared(tmp_path / "prepared", documents=4)
    mapping = {f"d{i}": f"{i}_0" for i in range(4)}
    extra = ["--docids", "semantic", "--semantic-docid-mapping", str(tmp_path / "map.json")]
    expected = [str(tmp_path / "map.json")]
    if case == "missing":
        del mapping["d2"]
        expected.append("'d2'")
    elif case == "duplicate":
        mapping["d2"] = mapping["d1"]
        expected.append("'d2'")
    elif case == "prefix":
        mapping["d2"] = "1"
        expected.append("'d1'")
    elif case == "unrepresentable":
        mapping["d2"] = "1_{x}"
        expected.append("record 'd2'")
    else:
        extra = ["--docids", "lexical"]
        expected = ["unknown docid scheme 'lexical'"]
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    out = tmp_path / "model"
    assert main(["train", "--data", str(prepared), "--base", str(base_dir), "-o", str(out), *TRAIN, *extra]) == 2
    err = capsys.readouterr().err
    assert all(part in err for part in expected), err
    assert not out.exists()


def test_naive_mapping_file_is_validated(tmp_path):
    from genir_jax.docids.schemes import read_naive_mapping, shuffled_naive_scheme

    doc_ids = ["a", "b", "c"]
    shuffled = shuffled_naive_scheme(doc_ids, 1)
    assert sorted(shuffled.docids.values()) == ["0", "1", "2"] and shuffled == shuffled_naive_scheme(doc_ids, 1)
    path = tmp_path / "naive_docids.json"
    path.write_text(json.dumps(dict(shuffled.docids)))
    assert read_naive_mapping(path, doc_ids).docids == shuffled.docids
    for mapping, message in (({"a": "0", "b": "1"}, "document 'c' has no naive id"),
                             ({"a": "0", "b": "1", "c": "2", "z": "3"}, "document 'z' is not in the corpus"),
                             ({"a": "0", "b": "0", "c": "2"}, "record 'b': naive id '0' duplicates that of document "
                                                              "'a'"),
                             ({"a": "0", "b": "1 2", "c": "2"}, "record 'b': the naive id must be a non-empty")):
        path.write_text(json.dumps(mapping))
        with pytest.raises(DataError, match=message):
            read_naive_mapping(path, doc_ids)
