"""What cross-attention writes (paper Tables 5 and 6): docid shares and head tokens checked against a
brute-force numpy logit lens of cached activations; reference padding per query; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.analysis import cross_attention_writes as cw
from genir_jax.analysis.inputs import tokenize_for_analysis
from genir_jax.cli.main import main
from tests.dsi_fixtures import LENS_CORRECT as CORRECT, LENS_DOC_IDS as DOC_IDS, LENS_QUERIES as QUERIES

STAGES = [[0], [1, 2], [3]]


def _numpy_lens(model, vectors):
    """Logit lens in float64 numpy: final RMS norm with its scale, d_model ** -0.5, tied embedding."""
    x = np.asarray(vectors, np.float64)
    scale = np.asarray(model.params["decoder"]["final_norm"]["scale"], np.float64)
    x = x / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + model.config.layer_norm_epsilon) * scale
    return (x * model.config.d_model ** -0.5) @ np.asarray(model.params["shared"], np.float64).T


def _docid_ids(model):
    return set(gj.docid_token_ids(model.tokenizer, DOC_IDS).tolist())


def _brute_counts(model, ids, mask, layers, cutoffs):
    sites = [f"decoder.{l}.hook_cross_attn_out" for l in layers]
    _, cache = gj.forward_with_cache(model.config, model.params, ids, mask, np.zeros((len(ids), 1), np.int32),
                                     cache_sites=sites)
    docids = _docid_ids(model)
    counts = np.zeros((len(ids), len(layers), len(cutoffs)), int)
    for j, site in enumerate(sites):
        logits = _numpy_lens(model, np.asarray(cache[site])[:, 0])
        for b in range(len(ids)):
            order = np.argsort(-logits[b], kind="stable")
            for c, k in enumerate(cutoffs):
                counts[b, j, c] = sum(int(t) in docids for t in order[:k])
    return counts


def test_docid_shares_equal_a_numpy_logit_lens(lens_dsi):
    _, model = lens_dsi
    texts = [QUERIES[i] for i in CORRECT]
    result = cw.docid_shares(model.config, model.params, model.tokenizer, texts, stages=STAGES, batch_size=3,
                             progress=False)
    assert result.layers == [1, 2, 3]
    ids, mask = tokenize_for_analysis(model.tokenizer, texts)
    expected = _brute_counts(model, ids, mask, [1, 2, 3], (10, 100, 1000))
    np.testing.assert_array_equal(result.counts, expected)
    assert expected[..., 2].sum() > 0  # docids do reach the top 1000 in this model (the check is not vacuous)
    per_q = result.per_q_averages()
    assert list(per_q) == ["II", "III"]
    # query-major, layers ascending, fractions of the cutoff
    assert per_q["II"]["100"] == [expected[b, j, 1] / 100 for b in range(5) for j in (0, 1)]
    assert per_q["III"]["1000"] == [expected[b, 2, 2] / 1000 for b in range(5)]
    averages = result.averages()
    assert list(averages) == ["10-II", "100-II", "1000-II", "10-III", "100-III", "1000-III"]
    assert averages["1000-II"] == pytest.approx(expected[:, :2, 2].mean() / 1000)


def test_reference_padding_equals_per_query_runs(lens_dsi):
    _, model = lens_dsi
    texts = [QUERIES[i] for i in CORRECT]
    result = cw.docid_shares(model.config, model.params, model.tokenizer, texts, stages=STAGES, batch_size=2,
                             reference_padding=True, cutoffs=(5, 50, 500), progress=False)
    for b, text in enumerate(texts):
        ids = np.asarray([model.tokenizer(text).input_ids])
        np.testing.assert_array_equal(result.counts[b], _brute_counts(model, ids, np.ones_like(ids), [1, 2, 3],
                                                                      (5, 50, 500))[0])


def test_head_top_tokens_equal_a_numpy_logit_lens(lens_dsi):
    _, model = lens_dsi
    texts = ["who wrote the harry potter books", "when did the war end"]
    heads = [(3, 1), (1, 0)]
    entries = cw.head_top_tokens(model.config, model.params, model.tokenizer, texts, heads, top=5, progress=False)
    assert [(e["query"], e["layer"], e["head"]) for e in entries] == [(t, l, h) for t in texts for l, h in heads]
    docids = _docid_ids(model)
    w_o = np.asarray(model.params["decoder"]["layers"]["cross_attn"]["out"], np.float64)
    sites = ["decoder.3.cross_attn.hook_z", "decoder.1.cross_attn.hook_z"]
    docids_lead = 0
    for entry in entries:
        ids = np.asarray([model.tokenizer(entry["query"]).input_ids])  # alone, unpadded
        _, cache = gj.forward_with_cache(model.config, model.params, ids, np.ones_like(ids), np.zeros((1, 1), np.int32),
                                         cache_sites=sites)
        z = np.asarray(cache[f"decoder.{entry['layer']}.cross_attn.hook_z"], np.float64)[0, 0, entry["head"]]
        logits = _numpy_lens(model, z @ w_o[entry["layer"], entry["head"]])
        ranking = [int(t) for t in np.argsort(-logits, kind="stable")]
        order = [t for t in ranking if t not in docids][:5]
        docids_lead += any(t in docids for t in ranking[:5])
        assert entry["token_ids"] == order
        np.testing.assert_allclose(entry["logits"], logits[order], rtol=1e-4, atol=1e-5)
        assert entry["tokens"] == model.tokenizer.convert_ids_to_tokens(order)
        assert entry["words"] == [model.tokenizer.decode([t]).strip() for t in order]
    assert docids_lead > 0  # docids do lead some heads' rankings, and are left out of the word tokens


def _run(root, out, *extra):
    return main(["crattn-writes", "--checkpoint", str(root / "dsi"), "--val-queries", str(root / "val.json"),
                 "--correct-valid", str(root / "correct.json"), "-o", str(out), "--no-progress", "--allow-incorrect",
                 *extra])  # a random model: its pairs are relevant, not its top tokens


def test_cli_writes_the_reference_files(lens_dsi, tmp_path):
    root, _ = lens_dsi
    out = tmp_path / "out"
    assert _run(root, out, "--stages", "0,1-2,3", "--batch-size", "2") == 0
    assert sorted(p.name for p in out.iterdir()) == ["cr_attn_ratios.json", "crattn_writes_summary.json",
                                                    "per_q_averages_sII.json", "per_q_averages_sIII.json",
                                                    "stages.json"]
    assert json.loads((out / "stages.json").read_text())["stages"] == [[0], [1, 2], [3]]
    per_q = json.loads((out / "per_q_averages_sII.json").read_text())
    assert list(per_q) == ["10", "100", "1000"] and all(len(v) == 5 * 2 for v in per_q.values())
    ratios = json.loads((out / "cr_attn_ratios.json").read_text())
    assert ratios["100-II"] == pytest.approx(np.mean(per_q["100"]))
    summary = json.loads((out / "crattn_writes_summary.json").read_text())
    assert summary["analysis"] == "crattn_writes" and summary["queries"] == 5 and summary["cutoffs"] == [10, 100, 1000]
    assert summary["docid_share"]["II"]["100"] == pytest.approx(ratios["100-II"])
    assert set(summary["per_layer"]) == {"1", "2", "3"}

    tokens_dir = tmp_path / "tokens"
    code = main(["crattn-head-tokens", "--checkpoint", str(root / "dsi"), "--queries", "who wrote the harry potter books",
                 "--heads", "3.1,2.0", "-o", str(tokens_dir), "--no-progress"])
    assert code == 0
    entries = json.loads((tokens_dir / "crattn_head_tokens.json").read_text())
    assert [(e["layer"], e["head"]) for e in entries] == [(3, 1), (2, 0)]
    assert set(entries[0]) == {"query", "layer", "head", "token_ids", "tokens", "words", "logits"}


@pytest.mark.parametrize("command, extra, message", [
    ("crattn-writes", ["--stages", "0-3"], "--stages: need at least two stages"),
    ("crattn-writes", ["--cutoffs", "10,ten"], "--cutoffs: expected comma-separated integers"),
    ("crattn-head-tokens", ["--heads", "3.2"], "--heads: '3.2': head 2 is outside 0-1"),
    ("crattn-head-tokens", ["--heads", "9.0"], "--heads: '9.0': layer 9 is outside the decoder's layers 0-3"),
])
def test_bad_input_exits_2_without_outputs(lens_dsi, tmp_path, capsys, command, extra, message):
    root, _ = lens_dsi
    out = tmp_path / "never"
    if command == "crattn-writes":
        argv = [command, "--checkpoint", str(root / "dsi"), "--val-queries", str(root / "val.json"),
                "--correct-valid", str(root / "correct.json"), "--allow-incorrect"]
    else:
        argv = [command, "--checkpoint", str(root / "dsi"), "--queries", "who wrote the harry potter books"]
    assert main(argv + ["-o", str(out), "--no-progress", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
