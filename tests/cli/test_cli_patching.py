"""`genir-jax patch-stages` end to end on a tiny DSI checkpoint: files, formats, reference padding, errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.interp import interventions as ivs
from genir_jax.cli.main import main
from genir_jax.interp.patching import ranks_of_targets
from tests.dsi_fixtures import DOC_IDS, QUERIES


def _run(root, out, *extra):
    return main(["patch-stages", "--checkpoint", str(root / "dsi"), "--val-queries", str(root / "val.json"),
                 "--correct-valid", str(root / "correct.json"), "-o", str(out), "--no-progress",
                 "--allow-incorrect", *extra])  # a random model: the pairs are not its top tokens


def _read(out):
    with open(out / "patching_results_single_combis.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    return rows, json.loads((out / "ranks_correct_queries_patching_single_combis.json").read_text())


def test_outputs_follow_the_reference_layout(dsi, tmp_path):
    root, model, t5_dir = dsi
    assert _run(root, tmp_path / "out", "--modes", "zero,mean,t5", "--t5", str(t5_dir), "--stages", "thirds") == 0
    rows, ranks = _read(tmp_path / "out")
    assert rows[0] == ["", "component", "stage", "mode", "!=0", ">5", ">10", ">100"]
    expected = [(c, s, m) for m in ("mean", "zero", "t5") for c in ("mlp", "cross_attn", "attn") for s in range(3)]
    expected.append(("encoder.1.hook_resid_post", 0, "t5"))
    assert [(r[1], int(r[2]), r[3]) for r in rows[1:]] == expected
    assert [int(r[0]) for r in rows[1:]] == list(range(len(expected)))
    assert list(ranks) == [f"{s}-{c}-{m}" for c, s, m in expected]
    for row in rows[1:]:
        key_ranks = np.asarray(ranks[f"{row[2]}-{row[1]}-{row[3]}"])
        assert len(key_ranks) == 4
        assert float(row[4]) == pytest.approx(np.mean(key_ranks != 0))
        assert float(row[7]) == pytest.approx(np.mean(key_ranks > 100))

    # an independent computation of one row: zero the MLP outputs of stage 0 (layer 0), masked inputs
    order = [3, 0, 4, 1]
    enc = model.tokenizer([QUERIES[i] for i in order], padding=True, return_tensors="np")
    targets = gj.docid_token_ids(model.tokenizer, [DOC_IDS[i] for i in order])
    iv = ivs.zero_ablation(model.config, ["decoder.0.hook_mlp_out"])
    logits = gj.forward(model.config, model.params, enc.input_ids, enc.attention_mask,
                        np.zeros((4, 1), np.int32), interventions=iv)
    np.testing.assert_array_equal(ranks["0-mlp-zero"], np.asarray(ranks_of_targets(logits[:, 0], targets)[0]))


def test_reference_padding_pads_to_longest_plus_one_without_mask(dsi, tmp_path):
    root, model, _ = dsi
    assert _run(root, tmp_path / "ref", "--reference-padding", "--stages", "0,1-2") == 0
    rows, ranks = _read(tmp_path / "ref")
    assert len(rows) == 1 + 2 * 3 * 2
    order = [3, 0, 4, 1]
    tok = model.tokenizer
    length = max(len(tok.tokenize(QUERIES[i])) for i in order) + 1
    ids = np.asarray([tok(QUERIES[i], padding="max_length", max_length=length).input_ids for i in order])
    ones = np.ones_like(ids)
    targets = gj.docid_token_ids(tok, [DOC_IDS[i] for i in order])
    # mean over the queries padded the same way, then one query at a time, as the reference loops
    means = ivs.mean_activations(model.config, model.params, ids, ones, ["decoder.*.hook_cross_attn_out"],
                                 progress=False)
    iv = ivs.mean_ablation(model.config, means, ["decoder.1.hook_cross_attn_out", "decoder.2.hook_cross_attn_out"])
    expected = []
    for row in range(4):
        logits = gj.forward(model.config, model.params, ids[row:row + 1], ones[row:row + 1], np.zeros((1, 1)),
                            interventions=iv)
        expected.append(int(ranks_of_targets(logits[:, 0], targets[row:row + 1])[0][0]))
    assert ranks["1-cross_attn-mean"] == expected
    default_dir = tmp_path / "masked"
    assert _run(root, default_dir, "--stages", "0,1-2") == 0
    assert _read(default_dir)[1].keys() == ranks.keys()


def test_stages_json_names_the_stages(dsi, tmp_path, capsys):
    """Every run writes stages.json and prints its stages: auto by default below 24 decoder layers,
    thirds = the old default, explicit ranges as given."""
    from genir_jax.analysis.stage_patching import default_stages

    root, _, _ = dsi
    for extra, method in (((), "auto"), (("--stages", "auto"), "auto"), (("--stages", "thirds"), "thirds"),
                          (("--stages", "0,1-2"), "explicit")):
        out = tmp_path / method / str(len(extra))
        capsys.readouterr()
        assert _run(root, out, "--modes", "zero", *extra) == 0
        record = json.loads((out / "stages.json").read_text())
        printed = json.loads(capsys.readouterr().out)
        assert record["method"] == method and printed["stages_method"] == method
        stages = record["stages"]
        assert printed["stages"] == stages and record["num_decoder_layers"] == 3
        assert [layer for stage in stages for layer in stage] == [0, 1, 2]
        assert all(stage == list(range(stage[0], stage[-1] + 1)) for stage in stages)
        rows, ranks = _read(out)
        assert len(rows) == 1 + 3 * len(stages) and len(ranks) == 3 * len(stages)
        queries = {len(per_query) for per_query in ranks.values()}
        if method == "auto":  # fitted on 2 of the 4 correct queries, reported on the other 2
            assert record["k"] == len(stages) and set(record["features"]) >= {"ratio_mlp", "lens_log1p_rank"}
            assert record["split"]["fit_queries"] == record["split"]["held_out_queries"] == 2
            assert queries == {2} and printed["queries"] == 2
            assert set(record["split"]["held_out_query_ids"]).isdisjoint(record["split"]["fit_query_ids"])
        else:
            assert queries == {4} and printed["queries"] == 4 and "split" not in record
        if method == "thirds":
            assert stages == default_stages(3) == [[0], [1], [2]]
        if method == "explicit":
            assert stages == [[0], [1, 2]] and record["spec"] == "0,1-2"


@pytest.mark.parametrize("problem, message", [
    ("unknown_query", "record index 1: query id '999' is not in"),
    ("unknown_docid", "docid token '@DOC_ID_zzz@' is not in the model's vocabulary"),
    ("bad_mode", "--modes: unknown mode"),
    ("t5_without_base", "--modes t5 needs --t5"),
    ("bad_stages", "--stages: '0-9' is outside the decoder's layers 0-2"),
])
def test_bad_input_exits_2_without_outputs(dsi, tmp_path, capsys, problem, message):
    root, _, _ = dsi
    extra = []
    correct = [[gj.docid_token("d1"), 100], [gj.docid_token("d2"), 101]]
    if problem == "unknown_query":
        correct[1][1] = 999
    if problem == "unknown_docid":
        correct[0][0] = "@DOC_ID_zzz@"
    (root / "correct_bad.json").write_text(json.dumps(correct))
    extra = {"bad_mode": ["--modes", "zero,median"], "t5_without_base": ["--modes", "t5"],
             "bad_stages": ["--stages", "0-9"]}.get(problem, [])
    out = tmp_path / "never"
    code = main(["patch-stages", "--checkpoint", str(root / "dsi"), "--val-queries", str(root / "val.json"),
                 "--correct-valid", str(root / "correct_bad.json"), "-o", str(out), "--no-progress",
                 "--allow-incorrect", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_cached_programs_give_the_same_files(dsi, tmp_path):
    """The command with the program cache (as `genir-jax` keeps it next to the XLA cache): a first run that
    writes the compiled programs and a second that loads them write the files of a run without it, byte for
    byte, zero, mean and t5 modes alike."""
    from genir_jax.base import program_cache

    root, _, t5_dir = dsi
    extra = ("--modes", "zero,mean,t5", "--t5", str(t5_dir), "--stages", "thirds")
    assert _run(root, tmp_path / "plain", *extra) == 0
    program_cache.set_program_cache_dir(tmp_path / "programs")
    try:
        for name in ("stored", "loaded"):
            program_cache.forget_loaded_programs()
            assert _run(root, tmp_path / name, *extra) == 0
    finally:
        program_cache.set_program_cache_dir(None)
        program_cache.forget_loaded_programs()
    assert any(path.name.startswith("clean_state-") for path in (tmp_path / "programs").iterdir())
    for path in sorted((tmp_path / "plain").iterdir()):
        for name in ("stored", "loaded"):
            assert (tmp_path / name / path.name).read_bytes() == path.read_bytes(), (name, path.name)
