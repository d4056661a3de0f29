"""Encoder swap (Table 2) and minimal circuit (Table 4): numbers computed another way."""

from __future__ import annotations

import json

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import interventions as ivs
from genir_jax.analysis.circuit import PAPER_CIRCUIT, circuit_from_json
from genir_jax.analysis.encoder_swap import encoder_swap_ranks, summarize
from genir_jax.analysis.inputs import CorrectQuery, reference_padded_groups
from genir_jax.cli.main import main
from genir_jax.base.errors import DataError
from genir_jax.interp.patching import Source, ranks_of_targets
from tests.dsi_fixtures import TINY_REAL_VOCAB

DOCS = [f"d{i}" for i in range(8)]
VAL = ["who wrote the harry potter books", "what is the capital of france", "when did the war end",
       "how many legs does a spider have", "where is the eiffel tower", "who painted the mona lisa"]
TEST = ["who is the author of harry potter", "capital city of france", "what year did the war end",
        "spider legs count", "eiffel tower location in paris france today", "mona lisa painter"]
DIMS = {**TINY_REAL_VOCAB, "num_layers": 2, "num_decoder_layers": 6}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, t5_tokenizer):
    from tests.hf_fixtures import HFCheckpointFactory

    root = tmp_path_factory.mktemp("swap")
    factory = HFCheckpointFactory(root)
    base_dir, _ = factory("base", tokenizer=t5_tokenizer, **DIMS)
    other_dir, _ = factory("other", seed=3, tokenizer=t5_tokenizer, **DIMS)
    full = gj.add_docid_tokens(gj.load_pretrained(base_dir), DOCS)
    other = gj.add_docid_tokens(gj.load_pretrained(other_dir), DOCS)
    gj.save_pretrained(root / "full", full)
    gj.save_pretrained(root / "other", other)
    (root / "val.json").write_text(json.dumps([{"id": f"v{i}", "query": q, "relevant_docs": [DOCS[i]]}
                                               for i, q in enumerate(VAL)]))
    (root / "test.json").write_text(json.dumps([{"id": f"t{i}", "query": q, "relevant_docs": [DOCS[i]]}
                                                for i, q in enumerate(TEST)]))
    (root / "correct.json").write_text(json.dumps([[gj.docid_token(DOCS[i]), f"v{i}"] for i in (2, 0, 5, 1)]))
    return root, full, other, base_dir


def _batch(model, texts):
    enc = model.tokenizer(texts, padding=True, return_tensors="np")
    return enc.input_ids, enc.attention_mask


def test_swap_with_own_encoder_changes_nothing(setup):
    _, full, _, _ = setup
    ids, mask = _batch(full, VAL)
    targets = gj.docid_token_ids(full.tokenizer, DOCS[:6])
    clean = gj.forward(full.config, full.params, ids, mask, np.zeros((6, 1), np.int32))
    expected = np.asarray(ranks_of_targets(clean[:, 0], targets)[0])
    swapped = encoder_swap_ranks(full.config, full.params, Source(full.config, full.params), ids, mask, targets,
                                 progress=False)
    np.testing.assert_array_equal(swapped, expected)


def test_swap_equals_the_hybrid_model(setup):
    """Other model's encoder layers (and embeddings), then the full model's final norm and decoder."""
    _, full, other, _ = setup
    ids, mask = _batch(full, VAL)
    targets = gj.docid_token_ids(full.tokenizer, DOCS[:6])
    hybrid_encoder = dict(other.params, encoder={**other.params["encoder"],
                                                 "final_norm": full.params["encoder"]["final_norm"]})
    encoded, _ = gj.encode(full.config, hybrid_encoder, ids, mask)
    hidden, _ = gj.decode(full.config, full.params, encoded, mask, np.zeros((6, 1), np.int32))
    logits = gj.unembed(full.config, full.params, hidden[:, 0])
    expected = np.asarray(ranks_of_targets(logits, targets)[0])
    swapped = encoder_swap_ranks(full.config, full.params, Source(other.config, other.params), ids, mask, targets,
                                 progress=False)
    np.testing.assert_array_equal(swapped, expected)
    assert (swapped != 0).any()


def test_summary_statistics_by_hand():
    queries = [CorrectQuery(f"q{i}", "", gj.docid_token(d), i) for i, d in enumerate(["a", "b", "c", "a", "d"])]
    summary = summarize(np.array([0, 3, 0, 8, 1]), queries, ["a", "@DOC_ID_d@", "zz"]).as_reference_dict()
    assert summary["Mean Rank of prev. correct"] == pytest.approx(12 / 5)
    assert summary["Median:"] == 1.0
    assert summary["Number of non 0 ranks"] == 3 and summary["Non 0 ranks"] == [3, 8, 1]
    assert summary["missing_ranks"] == [0, 8, 1]  # documents in the given order: a (twice), then d
    assert summary["MRR:"] == pytest.approx((1 + 1 / 9 + 1 / 2) / 3)
    assert summary["median"] == 1.0 and summary["Hits@1 (missing)"] == pytest.approx(1 / 3)
    assert summary["missing_without_correct_query"] == ["@DOC_ID_zz@"]
    even = summarize(np.array([4, 1, 2, 9]), queries[:4], []).as_reference_dict()
    assert even["Median:"] == 2.0  # torch.median: the lower middle value


def test_swap_cli(setup, tmp_path):
    root, _, _, base_dir = setup
    missing = {str(root / "other"): "d0, d2, d7", str(root / "full"): ["@DOC_ID_d5@"]}
    (tmp_path / "missing.json").write_text(json.dumps(missing))
    args = ["swap-encoder", "--complete-model-path", str(root / "full"), "--missing-docs-for-model",
            str(tmp_path / "missing.json"), "--val-queries", str(root / "val.json"), "--correct-valid",
            str(root / "correct.json"), "-o", str(tmp_path / "out"), "--t5", str(base_dir), "--no-progress",
            "--allow-incorrect"]  # a random model: its pairs are relevant, not its top tokens
    assert main(args) == 0
    results = json.loads((tmp_path / "out" / "swapped_encoder.json").read_text())
    assert list(results) == [str(root / "other"), str(root / "full"), str(base_dir)]
    own = results[str(root / "full")]
    assert own["missing_documents"] == ["@DOC_ID_d5@"] and len(own["missing_ranks"]) == 1
    other = results[str(root / "other")]
    assert other["missing_without_correct_query"] == ["@DOC_ID_d7@"] and len(other["missing_ranks"]) == 2
    assert "missing_ranks" not in results[str(base_dir)]
    (tmp_path / "bad.json").write_text(json.dumps({str(root / "other"): "nope1"}))
    assert main(args[:4] + [str(tmp_path / "bad.json")] + args[5:11] + ["-o", str(tmp_path / "never"),
                                                                          "--no-progress"]) == 2
    assert not (tmp_path / "never").exists()


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_empty_circuit_reproduces_plain_evaluation(setup, tmp_path):
    root, _, _, _ = setup
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"name": "nothing", "patches": []}))
    common = ["-c", str(root / "full"), "--test-queries", str(root / "test.json"), "--val-queries",
              str(root / "val.json"), "--correct-valid", str(root / "correct.json"), "--no-progress",
              "--allow-incorrect"]  # a random model: its pairs are relevant, not its top tokens
    assert main(["circuit", *common, "--circuit", str(empty), "-o", str(tmp_path / "c")]) == 0
    assert main(["evaluate", "--checkpoint", str(root / "full"), "--queries", str(root / "test.json"),
                 "-o", str(tmp_path / "e")]) == 0
    circuit = json.loads((tmp_path / "c" / "minimal_circuit.json").read_text())
    plain = json.loads((tmp_path / "e" / "metrics.json").read_text())["metrics"]
    stages = json.loads((tmp_path / "c" / "stages.json").read_text())  # default below 24 decoder layers: auto
    assert stages["method"] == "auto" and stages["stages"] == circuit["stages"]
    assert circuit["mean_over_correct_queries"] == stages["split"]["held_out_queries"]  # means: held-out half
    assert [l for stage in stages["stages"] for l in stage] == list(range(len(stages["features"]["ratio_mlp"])))
    for metric in ("Hits@1", "Hits@10", "Recall@5", "MRR@10", "nDCG@10"):
        assert circuit["unpatched"][metric] == pytest.approx(plain[metric])
        assert circuit["patched"][metric] == pytest.approx(plain[metric])
    runs = [[line.split()[:4] for line in (tmp_path / d / f).read_text().splitlines()]
            for d, f in (("c", "run_unpatched.trec"), ("c", "run_circuit.trec"), ("e", "run.trec"))]
    assert runs[0] == runs[1] == runs[2]


def test_paper_circuit_equals_independent_patching(setup, tmp_path):
    root, full, _, _ = setup
    assert main(["circuit", "-c", str(root / "full"), "--test-queries", str(root / "test.json"), "--val-queries",
                 str(root / "val.json"), "--correct-valid", str(root / "correct.json"), "--allow-incorrect",
                 "--stages", "0-1,2-4,5",
                 "-o", str(tmp_path / "c"), "--no-progress", "--k", "5"]) == 0
    report = json.loads((tmp_path / "c" / "minimal_circuit.json").read_text())
    assert report["config"] == ("remove attn in layers 0-5; remove cross_attn in layers 0-1; "
                                "mean mlp in layers 0-4")
    stages = json.loads((tmp_path / "c" / "stages.json").read_text())
    assert stages["method"] == "explicit" and stages["stages"] == report["stages"] == [[0, 1], [2, 3, 4], [5]]
    # the same circuit built with the generic builders, on the means of the correct queries
    val_ids, val_mask = _batch(full, [VAL[i] for i in (2, 0, 5, 1)])
    means = ivs.mean_activations(full.config, full.params, val_ids, val_mask, ["decoder.*.hook_mlp_out"],
                                 progress=False)
    iv = ivs.combine(ivs.zero_ablation(full.config, ["decoder.*.hook_attn_out"]),
                     ivs.zero_ablation(full.config, ["decoder.0.hook_cross_attn_out", "decoder.1.hook_cross_attn_out"]),
                     ivs.mean_ablation(full.config, means, [f"decoder.{l}.hook_mlp_out" for l in range(5)]))
    ids, mask = _batch(full, TEST)
    logits = np.asarray(gj.forward(full.config, full.params, ids, mask, np.zeros((6, 1), np.int32),
                                   interventions=iv))[:, 0]
    docid_ids = np.asarray(sorted(gj.docid_vocabulary(full.tokenizer)))
    order = np.argsort(-logits[:, docid_ids], axis=1, kind="stable")[:, :5]
    lines = (tmp_path / "c" / "run_circuit.trec").read_text().splitlines()
    run_docs = [[l.split()[2] for l in lines if l.split()[0] == f"t{q}"] for q in range(6)]
    vocab = gj.docid_vocabulary(full.tokenizer)
    assert run_docs == [[vocab[int(docid_ids[j])] for j in row] for row in order]


def test_circuit_file_validation():
    assert circuit_from_json(PAPER_CIRCUIT.as_json(), "c.json", 3) == PAPER_CIRCUIT
    with pytest.raises(DataError, match=r"c.json: patches\[0\]: field 'component' must be one of"):
        circuit_from_json({"patches": [{"component": "ffn", "stages": "all", "mode": "zero"}]}, "c.json", 3)
    with pytest.raises(DataError, match=r"field 'stages' must be \"all\" or a list of stage indices in \[0, 3\)"):
        circuit_from_json({"patches": [{"component": "mlp", "stages": [3], "mode": "zero"}]}, "c.json", 3)
    with pytest.raises(DataError, match="field 'mode' must be 'zero' or 'mean'"):
        circuit_from_json({"patches": [{"component": "mlp", "stages": [0], "mode": "t5"}]}, "c.json", 3)


def test_reference_padding_groups_keep_longer_queries_whole(t5_tokenizer):
    texts = ["short one", "a much longer query than the others here", "mid size query"]
    groups = reference_padded_groups(t5_tokenizer, texts, length=5)
    lengths = {len(t5_tokenizer(t).input_ids) for t in texts}
    assert sorted(ids.shape[1] for _, ids in groups) == sorted({max(5, n) for n in lengths})
    for rows, ids in groups:
        for row, padded in zip(rows, ids):
            real = t5_tokenizer(texts[row]).input_ids
            assert list(padded[:len(real)]) == real and not padded[len(real):].any()


def _numpy_top(logits: np.ndarray, columns: np.ndarray, k: int) -> np.ndarray:
    """[N, k] token ids of the top `k` of `columns` by logit (ties: lower token id first)."""
    order = np.argsort(-logits[:, columns], axis=1, kind="stable")[:, :k]
    return columns[order]


def _numpy_metrics(top: np.ndarray, targets: np.ndarray) -> dict:
    """Per-query Hits@1, Hits@10 and MRR@10 of one relevant token per query, from ranked token ids."""
    found = [np.flatnonzero(row[:10] == target) for row, target in zip(top, targets)]
    return {"Hits@1": [float(top[i, 0] == t) for i, t in enumerate(targets)],
            "Hits@10": [float(f.size > 0) for f in found],
            "MRR@10": [1.0 / (f[0] + 1) if f.size else 0.0 for f in found]}


def test_circuit_ranks_the_full_vocabulary_and_the_docid_tokens(setup, tmp_path):
    """Table 4 both ways: ranked over the full vocabulary (as the reference: a word token above the docid is a
    miss) and over the docid tokens only, each equal to a numpy ranking of the patched model's logits."""
    root, full, _, _ = setup
    # docid embeddings scaled up: docid and word tokens mix at the top of the vocabulary, so the rankings differ
    token_ids = gj.docid_token_ids(full.tokenizer, DOCS)
    shared = np.array(full.params["shared"])
    shared[token_ids] *= 3.0
    mixed = full.replace(params={**full.params, "shared": shared})
    gj.save_pretrained(tmp_path / "mixed", mixed)
    assert main(["circuit", "-c", str(tmp_path / "mixed"), "--test-queries", str(root / "test.json"),
                 "--val-queries", str(root / "val.json"), "--correct-valid", str(root / "correct.json"),
                 "--allow-incorrect",  # a random model: its pairs are relevant, not its top tokens
                 "--stages", "0-1,2-4,5", "-o", str(tmp_path / "c"), "--no-progress", "--k", "20"]) == 0
    report = json.loads((tmp_path / "c" / "minimal_circuit.json").read_text())
    assert set(report["rankings"]) == {"full vocabulary", "docid tokens only"}
    val_ids, val_mask = _batch(mixed, [VAL[i] for i in (2, 0, 5, 1)])
    means = ivs.mean_activations(mixed.config, mixed.params, val_ids, val_mask, ["decoder.*.hook_mlp_out"],
                                 progress=False)
    circuit = ivs.combine(ivs.zero_ablation(mixed.config, ["decoder.*.hook_attn_out"]),
                          ivs.zero_ablation(mixed.config, ["decoder.0.hook_cross_attn_out",
                                                           "decoder.1.hook_cross_attn_out"]),
                          ivs.mean_ablation(mixed.config, means, [f"decoder.{l}.hook_mlp_out" for l in range(5)]))
    ids, mask = _batch(mixed, TEST)
    targets = np.asarray(token_ids[:6])
    docid_columns = np.asarray(sorted(gj.docid_vocabulary(mixed.tokenizer)))
    everything = np.arange(mixed.config.vocab_size)
    differ = hit_anywhere = False
    for config, interventions in enumerate((None, circuit)):
        logits = np.asarray(gj.forward(mixed.config, mixed.params, ids, mask, np.zeros((6, 1), np.int32),
                                       interventions=interventions))[:, 0]
        full_vocabulary = _numpy_metrics(_numpy_top(logits, everything, 20), targets)
        docid_only = _numpy_metrics(_numpy_top(logits, docid_columns, 20), targets)
        for ranking, expected in (("full vocabulary", full_vocabulary), ("docid tokens only", docid_only)):
            per_query = report["rankings"][ranking]["per_query"]
            assert per_query["query_ids"] == [f"t{i}" for i in range(6)]
            for metric, values in expected.items():
                assert per_query[metric][config] == pytest.approx(values), (ranking, metric, config)
            name = ("unpatched", "patched")[config]
            assert report["rankings"][ranking][name]["Hits@1"] == pytest.approx(np.mean(expected["Hits@1"]))
        differ |= full_vocabulary != docid_only
        hit_anywhere |= any(full_vocabulary["MRR@10"])
        assert report[("unpatched", "patched")[config]]["Hits@1"] == pytest.approx(np.mean(docid_only["Hits@1"]))
    assert hit_anywhere and differ  # word tokens above some docid: the two rankings tell different stories
