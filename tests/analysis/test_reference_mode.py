"""`--reference` on every analysis command: the reference scripts' file names, keys and row order, and the
encoder swap's first-query semantics against a hand computation.

The expected names and keys below are copied from the reference scripts (technion-cs-nlp/re-gen-ir,
code/analysis/*.py); each constant says where. Numbers are compared with the reference itself by
benchmarks/reference_agreement/ (it needs TransformerLens), not here.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.analysis.circuit import reference_retrieval_metrics
from genir_jax.analysis.encoder_swap import encoder_swap_ranks
from genir_jax.analysis.inputs import load_correct_queries, tokenize_for_analysis
from genir_jax.cli.main import main
from genir_jax.interp.patching import Source
from tests.dsi_fixtures import TINY_REAL_VOCAB

DOCS = [f"d{i}" for i in range(6)]
VAL = ["who wrote the harry potter books", "what is the capital of france", "when did the war end",
       "how many legs does a spider have", "where is the eiffel tower", "who painted the mona lisa"]
DIMS = {**TINY_REAL_VOCAB, "num_layers": 2, "num_decoder_layers": 3}
# d0 has two correct queries (v0, then v3): the swap's first-query rule matters
CORRECT = [["@DOC_ID_d2@", "v2"], ["@DOC_ID_d0@", "v0"], ["@DOC_ID_d5@", "v5"], ["@DOC_ID_d0@", "v3"]]

# swap_encoder.py: results[missing_model_path][...] assignments, in order
SWAP_KEYS = ["Mean Rank of prev. correct", "Median:", "Number of non 0 ranks", "Non 0 ranks", "missing_ranks",
             "Mean of Missing document ranks", "MRR:", "median"]
# eval_patching_single_combis.py / eval_patching_t5.py: df.to_csv(...) and json.dump(...) names
SINGLE_FILES = {"patching_results_single_combis.csv", "ranks_correct_queries_patching_single_combis.json"}
T5_FILES = {"patching_results_t5_single_combis.csv", "ranks_correct_queries_patching_t5_single_combis.json",
            "patching_results_t5_all_and_attn.json"}
CSV_HEADER = ["", "component", "stage", "mode", "!=0", ">5", ">10", ">100"]  # pandas index + combi dict keys
# eval_patching_all_stages.py: store_results(results, .../patching_results_best_circuit.json); results =
# {} then hits@1, hits@10, recall@5 (its eval), then config
CIRCUIT_FILE, CIRCUIT_KEYS = "patching_results_best_circuit.json", ["hits@1", "hits@10", "recall@5", "config"]
# cross-attention-outputs.py
CRATTN_WRITES_FILES = {"per_q_averages_sII.json", "per_q_averages_sIII.json", "cr_attn_ratios.json"}
CRATTN_RATIO_KEYS = ["10-II", "100-II", "1000-II", "10-III", "100-III", "1000-III"]
# eval_residual_rank.py
RESIDUAL_FILES = {"all_dec_resid_results.csv", "all_ranks_correct_doc.csv"}


@pytest.fixture(scope="module")
def ref(tmp_path_factory, t5_tokenizer):
    from tests.hf_fixtures import HFCheckpointFactory

    root = tmp_path_factory.mktemp("reference-mode")
    factory = HFCheckpointFactory(root)
    base_dir, _ = factory("base", tokenizer=t5_tokenizer, **DIMS)
    other_dir, _ = factory("other", seed=3, tokenizer=t5_tokenizer, **DIMS)
    full = gj.add_docid_tokens(gj.load_pretrained(base_dir), DOCS)
    gj.save_pretrained(root / "full", full)
    gj.save_pretrained(root / "other", gj.add_docid_tokens(gj.load_pretrained(other_dir), DOCS))
    (root / "val.json").write_text(json.dumps([{"id": f"v{i}", "query": q, "relevant_docs": [DOCS[i]]}
                                               for i, q in enumerate(VAL)]))
    (root / "correct.json").write_text(json.dumps(CORRECT))
    return root, full, base_dir


def _inputs(root, *extra):
    return ["--val-queries", str(root / "val.json"), "--correct-valid", str(root / "correct.json"), "--no-progress",
            "--allow-incorrect", *extra]  # a random model, and d0 is not v3's relevant document


def _files(directory):
    return {p.name for p in directory.iterdir()}


def test_swap_encoder_reference_ranks_only_the_first_correct_query(ref, tmp_path):
    root, full, _ = ref
    (tmp_path / "missing.json").write_text(json.dumps({str(root / "other"): "@DOC_ID_d0@, @DOC_ID_d5@"}))
    common = ["swap-encoder", "--complete-model-path", str(root / "full"), "--missing-docs-for-model",
              str(tmp_path / "missing.json"), *_inputs(root)]
    assert main(common + ["-o", str(tmp_path / "ref"), "--reference"]) == 0
    assert main(common + ["-o", str(tmp_path / "ours")]) == 0
    assert _files(tmp_path / "ref") == {"swapped_encoder.json"}
    got = json.loads((tmp_path / "ref" / "swapped_encoder.json").read_text())[str(root / "other")]
    assert list(got) == SWAP_KEYS

    # by hand: the swapped ranks of the four correct queries, then the first query of d0 (record 1) and d5
    queries = load_correct_queries(root / "val.json", root / "correct.json", full.tokenizer)
    ids, mask = tokenize_for_analysis(full.tokenizer, [q.text for q in queries])
    other = gj.load_pretrained(root / "other")
    ranks = [int(r) for r in encoder_swap_ranks(full.config, full.params, Source(other.config, other.params), ids,
                                                mask, np.asarray([q.token_id for q in queries]), progress=False)]
    first = [ranks[1], ranks[2]]
    assert got["missing_ranks"] == first
    assert got["Mean of Missing document ranks"] == pytest.approx(sum(first) / 2, abs=0)
    assert got["MRR:"] == pytest.approx((1 / (first[0] + 1) + 1 / (first[1] + 1)) / 2, abs=1e-15)
    assert got["median"] == float(min(first))  # torch.median of two values: the lower one
    assert got["Mean Rank of prev. correct"] == pytest.approx(sum(ranks) / 4, abs=0)
    assert got["Median:"] == float(sorted(ranks)[1])
    assert got["Non 0 ranks"] == [r for r in ranks if r != 0]

    ours = json.loads((tmp_path / "ours" / "swapped_encoder.json").read_text())[str(root / "other")]
    assert ours["missing_ranks"] == [ranks[1], ranks[3], ranks[2]]  # default: every correct query of d0, then d5
    assert "Hits@1 (missing)" in ours and "Hits@1 (missing)" not in got


def test_swap_encoder_reference_refuses_a_removed_document_without_correct_query(ref, tmp_path, capsys):
    root, _, _ = ref
    (tmp_path / "missing.json").write_text(json.dumps({str(root / "other"): "d1"}))
    assert main(["swap-encoder", "--complete-model-path", str(root / "full"), "--missing-docs-for-model",
                 str(tmp_path / "missing.json"), *_inputs(root), "-o", str(tmp_path / "never"), "--reference"]) == 2
    assert "@DOC_ID_d1@" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_patch_stages_reference_files_rows_and_keys(ref, tmp_path):
    root, _, base_dir = ref
    out = tmp_path / "out"
    assert main(["patch-stages", "-c", str(root / "full"), *_inputs(root), "-o", str(out), "--reference",
                 "--modes", "zero,t5", "--t5", str(base_dir), "--stages", "thirds", "--allow-incorrect"]) == 0
    assert _files(out) == SINGLE_FILES | T5_FILES  # no stages.json: only the reference's files
    with open(out / "patching_results_t5_single_combis.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == CSV_HEADER
    # eval_patching_t5.py: components = ['mlp', 'cross_attn', 'attn', 'encoder.23.hook_resid_post'] x 3 stages
    components = ["mlp", "cross_attn", "attn", "encoder.1.hook_resid_post"]
    expected = [(c, s) for c in components for s in range(3)]
    assert [(r[1], int(r[2])) for r in rows[1:]] == expected
    assert [int(r[0]) for r in rows[1:]] == list(range(12))
    assert rows[-1][4:] == ["0.0"] * 4 and rows[-2][4:] == ["0.0"] * 4  # the reference's empty encoder rows
    ranks = json.loads((out / "ranks_correct_queries_patching_t5_single_combis.json").read_text())
    assert list(ranks) == [f"{s}-{c}-t5" for c, s in expected]
    assert ranks["1-encoder.1.hook_resid_post-t5"] == [] and len(ranks["0-encoder.1.hook_resid_post-t5"]) == 4
    single = json.loads((out / "ranks_correct_queries_patching_single_combis.json").read_text())
    assert list(single) == [f"{s}-{c}-zero" for c in ("mlp", "cross_attn", "attn") for s in range(3)]
    all_and_attn = json.loads((out / "patching_results_t5_all_and_attn.json").read_text())
    assert list(all_and_attn) == ["hits@1", "hits@10", "recall@5", "config"]
    assert all_and_attn["config"] == "0-0 attn, cr, mlp = T5, 1-1 attn, cr, mlp = T5, 2-2 only attn = t5"


def test_circuit_reference_file_and_keys(ref, tmp_path):
    root, _, _ = ref
    out = tmp_path / "out"
    assert main(["circuit", "-c", str(root / "full"), "--test-queries", str(root / "val.json"), *_inputs(root),
                 "-o", str(out), "--reference", "--stages", "thirds"]) == 0
    assert _files(out) == {CIRCUIT_FILE}
    got = json.loads((out / CIRCUIT_FILE).read_text())
    assert list(got) == CIRCUIT_KEYS
    assert all(0.0 <= got[k] <= 1.0 for k in CIRCUIT_KEYS[:3])


def test_reference_retrieval_metrics_by_hand():
    """The reference's eval: hits by rank position (0-based, < 10 and < 5), word tokens never relevant, every
    qrels entry relevant whatever its grade, recall@5 over the query's qrels entries."""
    doc_of = {10: "a", 11: "b", 12: "c", 13: "d"}
    top = np.asarray([[10, 5, 11, 6, 7, 13, 8, 9, 1, 2, 3],     # q1: a at 0, b at 2, d at 5 (outside the top 5)
                      [5, 6, 7, 8, 9, 1, 2, 3, 4, 12, 10],      # q2: c at 9 (inside hits@10), a at 10
                      [5, 6, 7, 8, 9, 1, 2, 3, 4, 0, 11]])     # q3: b at 10 only (outside hits@10)
    qrels = {"q1": {"a": 4, "b": 3, "d": 2}, "q2": {"c": 4, "a": 0}, "q3": {"b": 4}}
    got = reference_retrieval_metrics(top, ["q1", "q2", "q3"], qrels, doc_of)
    assert got == {"hits@1": 1 / 3, "hits@10": 2 / 3, "recall@5": (2 / 3 + 0 + 0) / 3}


def test_reading_reference_numbering_layers_and_files(ref, tmp_path):
    """eval_neuron_reading.py dumps at i % 50 == 0 (so _0 is empty and queries 0..49 land in _50) and once more
    after the loop (the last block, named by the last index i); every decoder layer is read (it loops over
    range(model.cfg.n_layers)). crattn-reading shares this writer and its default already is every layer."""
    root, full, _ = ref
    command, prefix = "neuron-reading", "all_queries_neuron_similarities"
    out = tmp_path / "out"
    assert main([command, "-c", str(root / "full"), *_inputs(root), "-o", str(out), "--reference",
                 "--queries-per-file", "2", "--stages", "thirds"]) == 0
    assert {n for n in _files(out) if n.startswith(prefix)} == {f"{prefix}_dot_{i}.json" for i in (0, 2, 3)}
    assert not any("summary" in n for n in _files(out)) and "stages.json" not in _files(out)
    assert json.loads((out / f"{prefix}_dot_0.json").read_text()) == []
    first = json.loads((out / f"{prefix}_dot_2.json").read_text())
    assert [e["q_id"] for e in first][0] == "v2" and {e["q_id"] for e in first} == {"v2", "v0"}
    last = json.loads((out / f"{prefix}_dot_3.json").read_text())
    assert {e["q_id"] for e in last} == {"v5", "v3"}
    layers = {e["layer"] for e in first + last}
    assert layers == set(range(full.config.num_decoder_layers))  # default (neuron-reading): the last stage only


def test_raw_file_numbering_of_the_reference_including_its_overwrite(tmp_path):
    """4 queries, 3 per file: the reference writes [] to _0, q0-q2 to _3, then the last block (q3, i = 3) to _3
    again, losing q0-q2; 1 query: _0 holds it. Default numbering: by the first query's index."""
    from genir_jax.analysis import reading

    def fake_format(reader, sim_type, query_id, readings, b):
        return [json.dumps({"q_id": query_id})]

    original = reading.format_entries
    reading.format_entries = fake_format
    try:
        for numbering, count, expected in ((True, 4, {"_0": [], "_3": ["q3"]}), (True, 1, {"_0": ["q0"]}),
                                           (True, 7, {"_0": [], "_3": ["q0", "q1", "q2"], "_6": ["q6"]}),
                                           (False, 4, {"_0": ["q0", "q1", "q2"], "_3": ["q3"]})):
            directory = tmp_path / f"{numbering}-{count}"
            directory.mkdir()
            writer = reading.RawEntryWriter(directory, "mlp", "dot", [f"q{i}" for i in range(count)], 3,
                                            reference_numbering=numbering)
            writer(np.arange(count), [])
            writer.close()
            got = {p.name.split("dot")[1][:-5]: [e["q_id"] for e in json.loads(p.read_text())]
                   for p in directory.iterdir()}
            assert got == expected, (numbering, count)  # 7: q3-q5 went to _6, then the last block (q6) over it
            lost = {(True, 4): 3, (True, 7): 6}.get((numbering, count))
            assert writer.overwritten == ([] if lost is None else [f"all_queries_neuron_similarities_dot_{lost}.json"])
    finally:
        reading.format_entries = original


def test_crattn_writes_reference_files_and_placeholders(ref, tmp_path):
    """Without -o / --correct-valid: the reference's '[checkpoint]' defaults."""
    root, _, _ = ref
    import shutil

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(root / "full", checkpoint)
    shutil.copy(root / "correct.json", checkpoint / "correct_valid.json")
    before = _files(checkpoint)
    assert main(["crattn-writes", "-c", str(checkpoint), "--val-queries", str(root / "val.json"), "--reference",
                 "--stages", "thirds", "--no-progress", "--allow-incorrect"]) == 0  # as `_inputs`
    assert _files(checkpoint) - before == CRATTN_WRITES_FILES
    assert list(json.loads((checkpoint / "cr_attn_ratios.json").read_text())) == CRATTN_RATIO_KEYS
    per_q = json.loads((checkpoint / "per_q_averages_sII.json").read_text())
    assert list(per_q) == ["10", "100", "1000"] and len(per_q["10"]) == 4  # 4 queries x 1 layer (stage II = [1])


def test_residual_rank_reference_writes_only_its_files(ref, tmp_path):
    root, _, _ = ref
    out = tmp_path / "out"
    assert main(["residual-rank", "-c", str(root / "full"), *_inputs(root), "-o", str(out), "--reference"]) == 0
    assert _files(out) == RESIDUAL_FILES


def test_patch_stages_refuses_pairs_the_model_does_not_rank_first(ref, tmp_path, capsys):
    """Every correct_valid pair must be ranked first by the model (rank 0), as `evaluate` writes it; docid rows
    scaled up 1000x make a docid every query's top token here, and that docid its relevant document."""
    root, full, _ = ref
    token_ids = gj.docid_token_ids(full.tokenizer, DOCS)
    shared = np.array(full.params["shared"])
    shared[token_ids] *= 1000.0
    model = full.replace(params={**full.params, "shared": shared})
    gj.save_pretrained(tmp_path / "dsi", model)
    ids, mask = tokenize_for_analysis(model.tokenizer, VAL)
    top = np.asarray(gj.forward(model.config, model.params, ids, mask, np.zeros((len(VAL), 1), np.int32)))[:, 0]
    top = top.argmax(-1)
    assert set(top.tolist()) <= set(token_ids)
    tokens = {t: d for t, d in zip(token_ids, DOCS)}
    answers = [tokens[int(t)] for t in top]
    wrong = next(d for d in DOCS if d != answers[1])  # also relevant to v1, but not its top token
    (tmp_path / "val.json").write_text(json.dumps([{"id": f"v{i}", "query": q, "relevant_docs": [answers[i]] + (
        [wrong] if i == 1 else [])} for i, q in enumerate(VAL)]))
    pairs = [[gj.docid_token(answers[i]), f"v{i}"] for i in (4, 1, 2)]
    (tmp_path / "correct.json").write_text(json.dumps(pairs))
    argv = ["patch-stages", "-c", str(tmp_path / "dsi"), "--val-queries", str(tmp_path / "val.json"),
            "--correct-valid", str(tmp_path / "correct.json"), "--modes", "zero", "--stages", "thirds", "--no-progress"]
    assert main(argv + ["-o", str(tmp_path / "good")]) == 0
    pairs[1][0] = gj.docid_token(wrong)
    (tmp_path / "correct.json").write_text(json.dumps(pairs))
    capsys.readouterr()
    assert main(argv + ["-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert f"correct.json: record index 1: field 0 (docid_token) '{pairs[1][0]}' is at rank" in err
    assert "for query 'v1' (1 of 3 pairs are not correct: 0 not relevant" in err and not (tmp_path / "bad").exists()
    assert main(argv + ["-o", str(tmp_path / "allowed"), "--allow-incorrect"]) == 0
