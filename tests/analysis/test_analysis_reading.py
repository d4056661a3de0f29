"""Who reads from whom (paper Fig. 5): readings checked against linear-algebra identities and a brute-force
numpy computation from cached activations; the reference's aggregation re-done with plain dicts; the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.analysis import reading as rd
from genir_jax.analysis.inputs import tokenize_for_analysis
from genir_jax.cli.main import main
from tests.dsi_fixtures import LENS_CORRECT as CORRECT, LENS_DOC_IDS as DOC_IDS, LENS_QUERIES as QUERIES


def _cache(model, ids, mask):
    sites = ["decoder.*.hook_*", "decoder.*.attn.hook_z", "decoder.*.cross_attn.hook_*", "decoder.*.mlp.hook_post"]
    _, cache = gj.forward_with_cache(model.config, model.params, ids, mask, np.zeros((len(ids), 1), np.int32),
                                     cache_sites=sites)
    return {k: np.asarray(v, np.float64) for k, v in cache.items()}


def _vectors(model, cache, b):
    """Every named vector of query b, computed directly from the cache and the parameters."""
    layers = model.params["decoder"]["layers"]
    out = {}
    for l in range(model.config.num_decoder_layers):
        for site in rd.LAYER_COMPONENTS:
            out[f"decoder.{l}.{site}"] = cache[f"decoder.{l}.{site}"][b, 0]
        for kind, name in (("attn", "self_attn"), ("cross_attn", "cross_attn")):
            z = cache[f"decoder.{l}.{kind}.hook_z"][b, 0]
            w_o = np.asarray(layers[name]["out"][l], np.float64)
            for h in range(model.config.num_heads):
                out[f"decoder.{l}.{kind}.head{h}"] = z[h] @ w_o[h]
    return out


def _cos(a, b):
    return a @ b / max(np.linalg.norm(a), 1e-8) / max(np.linalg.norm(b), 1e-8)


_SINGLE_QUERY_CACHES: dict = {}


def brute_force(model, text, reader, sim_type):
    """{(layer, reader index): (extra, {component: reading})} for one query run alone, unpadded, no mask."""
    if text not in _SINGLE_QUERY_CACHES:
        ids = np.asarray([model.tokenizer(text).input_ids])
        _SINGLE_QUERY_CACHES[text] = _cache(model, ids, np.ones_like(ids))
    cache = _SINGLE_QUERY_CACHES[text]
    vectors = _vectors(model, cache, 0)
    layers = model.params["decoder"]["layers"]
    sim = _cos if sim_type == "cosine" else (lambda a, b: a @ b)
    out = {}
    for l in range(model.config.num_decoder_layers):
        names = rd.component_names(model.config, l, reader)
        if reader == "mlp":
            w_in = np.asarray(layers["mlp"]["wi"][l], np.float64)
            post = cache[f"decoder.{l}.mlp.hook_post"][0, 0]
            for i in np.nonzero(post > 0)[0]:
                out[(l, int(i))] = (post[i], {n: sim(w_in[:, i], vectors[n]) for n in names})
        else:
            w_q = np.asarray(layers["cross_attn"]["query"][l], np.float64)
            scores = cache[f"decoder.{l}.cross_attn.hook_attn_scores"][0, :, 0]
            for h in range(model.config.num_heads):
                best = int(np.argmax(scores[h]))
                key = cache[f"decoder.{l}.cross_attn.hook_k"][0, best, h]
                out[(l, h)] = (best, {n: sim(key, vectors[n] @ w_q[:, h]) for n in names})
    return out


def _entries(model, reader, sim_type, reference_padding, batch_size=4, block=None):
    """Our entries (reference format, parsed) for the correct queries, via run_reading's sink."""
    texts = [QUERIES[i] for i in CORRECT]
    ids = [100 + i for i in CORRECT]
    entries: dict[int, list] = {}

    def sink(rows, readings):
        for b, row in enumerate(rows.tolist()):
            entries[row] = [json.loads(e) for e in rd.format_entries(reader, sim_type, ids[row], readings, b)]

    result = rd.run_reading(model.config, model.params, model.tokenizer, texts, reader=reader,
                            layers=range(model.config.num_decoder_layers), stages=[[0], [1, 2], [3]],
                            sim_type=sim_type, topks=[None, 2], batch_size=batch_size,
                            reference_padding=reference_padding, block=block, sink=sink, progress=False)
    return [entries[r] for r in range(len(texts))], result


def test_neuron_readings_sum_to_the_mlp_input_and_heads_sum_to_their_layer(lens_dsi):
    _, model = lens_dsi
    texts = [QUERIES[i] for i in CORRECT]
    ids, mask = tokenize_for_analysis(model.tokenizer, texts)
    cache = _cache(model, ids, mask)
    w_in = np.asarray(model.params["decoder"]["layers"]["mlp"]["wi"], np.float64)
    readings = rd.reading_batch(model.config, model.params, ids, mask, reader="mlp", layers=range(4))
    checked = 0
    for reading in readings:
        l = reading.layer
        kept = [j for j, n in enumerate(reading.names) if rd.is_aggregated(n)]
        for b in range(len(texts)):
            post = cache[f"decoder.{l}.mlp.hook_post"][b, 0]
            valid = reading.valid[b]
            np.testing.assert_array_equal(reading.readers[b][valid], np.nonzero(post > 0)[0])
            np.testing.assert_allclose(reading.extra[b][valid], post[post > 0], rtol=1e-5)
            r = cache[f"decoder.{l}.hook_resid_mid_cross"][b, 0]
            for i, values in zip(reading.readers[b][valid], reading.values[b][valid]):
                values = dict(zip(reading.names, values.astype(np.float64)))
                assert sum(values[reading.names[j]] for j in kept) == pytest.approx(w_in[l][:, i] @ r, rel=1e-4,
                                                                                    abs=1e-4)
                for p in range(l):
                    for kind in ("attn", "cross_attn"):
                        heads = sum(values[f"decoder.{p}.{kind}.head{h}"] for h in range(model.config.num_heads))
                        assert heads == pytest.approx(values[f"decoder.{p}.hook_{kind}_out"], rel=1e-4, abs=1e-4)
                checked += 1
    assert checked > 20
    assert "decoder.0.hook_resid_pre" in readings[1].names and rd.is_aggregated("decoder.0.hook_resid_pre")


def test_head_readings_sum_to_the_query_key_score(lens_dsi):
    _, model = lens_dsi
    texts = [QUERIES[i] for i in CORRECT]
    ids, mask = tokenize_for_analysis(model.tokenizer, texts)
    cache = _cache(model, ids, mask)
    w_q = np.asarray(model.params["decoder"]["layers"]["cross_attn"]["query"], np.float64)
    readings = rd.reading_batch(model.config, model.params, ids, mask, reader="cross_attn", layers=[0, 2, 3])
    assert [r.layer for r in readings] == [0, 2, 3]
    for reading in readings:
        l = reading.layer
        kept = [j for j, n in enumerate(reading.names) if rd.is_aggregated(n)]
        for b in range(len(texts)):
            scores = cache[f"decoder.{l}.cross_attn.hook_attn_scores"][b, :, 0]
            r = cache[f"decoder.{l}.hook_resid_mid"][b, 0]
            for h in range(model.config.num_heads):
                best = int(np.argmax(scores[h]))
                assert mask[b, best] == 1 and reading.extra[b, h] == best
                key = cache[f"decoder.{l}.cross_attn.hook_k"][b, best, h]
                total = reading.values[b, h, kept].astype(np.float64).sum()
                assert total == pytest.approx((r @ w_q[l][:, h]) @ key, rel=1e-4, abs=1e-4)


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
@pytest.mark.parametrize("reader, sim_type", [("mlp", "cosine"), ("cross_attn", "dot")])
def test_reference_padding_equals_brute_force_per_query(lens_dsi, reader, sim_type):
    _, model = lens_dsi
    ours, _ = _entries(model, reader, sim_type, reference_padding=True, batch_size=2, block=3)
    masked, _ = _entries(model, reader, sim_type, reference_padding=False)
    for row, query in enumerate(CORRECT):
        expected = brute_force(model, QUERIES[query], reader, sim_type)
        key = "position" if reader == "mlp" else "head"
        got = {(e["layer"], e[key]): e for e in ours[row]}
        assert list(got) == list(expected)  # same readers, in the reference's order (layer, then index)
        for k, (extra, values) in expected.items():
            entry = got[k]
            assert list(entry["value"]) == list(values)
            np.testing.assert_allclose(list(entry["value"].values()), list(values.values()), rtol=1e-4, atol=1e-5)
            if reader == "mlp":
                assert entry["actviation"] == pytest.approx(round(float(extra), 2), abs=1e-6)
            else:
                assert entry["enc_position"] == extra
            assert entry["q_id"] == 100 + query and entry["sim_type"] == sim_type
        # proper masks in padded batches give the same numbers
        assert [(e["layer"], e[key]) for e in masked[row]] == list(expected)
        np.testing.assert_allclose([v for e in masked[row] for v in e["value"].values()],
                                   [v for e in ours[row] for v in e["value"].values()], rtol=1e-4, atol=1e-5)


def _reference_style_proportions(entries, topk):
    """The reference's aggregation re-done with lists and dicts: per reader and query the top-k positive
    readings of the kept components as fractions of their sum, averaged per reader, renormalised, averaged."""
    per_reader: dict = {}
    for entry in entries:
        items = [(c, v) for c, v in entry["value"].items() if rd.is_aggregated(c) and v > 0]
        items.sort(key=lambda cv: -cv[1])
        items = items[:topk] if topk else items
        total = sum(v for _, v in items)
        key = (entry["layer"], entry.get("position", entry.get("head")))
        per_reader.setdefault(key, []).append({c: v / total for c, v in items})

    def mean_of(dicts):
        out: dict = {}
        for d in dicts:
            for c, v in d.items():
                out[c] = out.get(c, 0.0) + v / len(dicts)
        return out

    per_layer: dict = {}
    for (layer, _), dicts in per_reader.items():
        avg = mean_of(dicts)
        total = sum(avg.values())
        per_layer.setdefault(layer, []).append({c: v / total for c, v in avg.items()})
    return {layer: mean_of(dicts) for layer, dicts in per_layer.items()}


@pytest.mark.parametrize("reader", ["mlp", "cross_attn"])
def test_proportions_equal_a_dict_based_recomputation(lens_dsi, reader):
    _, model = lens_dsi
    entries, result = _entries(model, reader, "dot", reference_padding=False)
    flat = [e for per_query in entries for e in per_query]
    for agg in result.aggregators:
        expected = _reference_style_proportions(flat, agg.topk)
        got = agg.result()
        assert sorted(got) == sorted(expected)
        for layer, props in expected.items():
            assert set(got[layer]) == set(props)
            for c, v in props.items():
                assert got[layer][c] == pytest.approx(v, rel=1e-9, abs=1e-12)
    # stage buckets: every layer's proportions regrouped by component type and stage
    summary = result.summary()
    for label, agg in zip(("all", "2"), result.aggregators):
        for layer, props in agg.result().items():
            buckets = summary["results"][label]["per_layer"][str(layer)]
            assert buckets["embedding"] + sum(sum(buckets[k]) for k in rd.COMPONENT_TYPES) == \
                pytest.approx(sum(props.values()))
            assert sum(buckets["mlp"][1:]) == pytest.approx(
                sum(v for c, v in props.items() if c.endswith("mlp_out") and int(c.split(".")[1]) >= 1))


def _run(root, command, out, *extra):
    return main([command, "--checkpoint", str(root / "dsi"), "--val-queries", str(root / "val.json"),
                 "--correct-valid", str(root / "correct.json"), "-o", str(out), "--no-progress", "--allow-incorrect",
                 *extra])  # a random model: its pairs are relevant, not its top tokens


@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_cli_writes_the_reference_files(lens_dsi, tmp_path):
    root, model = lens_dsi
    out = tmp_path / "out"
    out.mkdir()
    (out / "all_queries_neuron_similarities_dot_99.json").write_text("[]")  # a stale chunk of an earlier run
    assert _run(root, "neuron-reading", out, "--layers", "all", "--topk", "all", "3", "--queries-per-file", "2",
                "--stages", "0,1-2,3", "--batch-size", "2") == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["all_queries_neuron_similarities_dot_0.json", "all_queries_neuron_similarities_dot_2.json",
                     "all_queries_neuron_similarities_dot_4.json", "neuron_ratio_of_top_k_layers-dot-3.json",
                     "neuron_ratio_of_top_k_layers-dot-all.json", "neuron_reading_summary.json", "stages.json"]
    entries = list(rd.iter_raw_entries(out, "mlp", "dot"))
    assert all(list(e) == ["actviation", "sim_type", "value", "layer", "q_id", "position"] for e in entries)
    assert list(dict.fromkeys(e["q_id"] for e in entries)) == [100 + i for i in CORRECT]
    ratios = json.loads((out / "neuron_ratio_of_top_k_layers-dot-all.json").read_text())
    assert set(ratios) <= {"0", "1", "2", "3"}
    assert all(isinstance(pair, list) and len(pair) == 2 for pairs in ratios.values() for pair in pairs)
    summary = json.loads((out / "neuron_reading_summary.json").read_text())
    assert summary["analysis"] == "neuron_reading" and summary["queries"] == 5
    assert summary["stages"] == [[0], [1, 2], [3]] and set(summary["results"]) == {"all", "3"}
    assert json.loads((out / "stages.json").read_text()) == {
        "method": "explicit", "stages": [[0], [1, 2], [3]], "stages_text": "0,1-2,3", "spec": "0,1-2,3",
        "num_decoder_layers": 4}
    layer = summary["results"]["all"]["per_layer"]["3"]
    assert set(layer) == {"readers", "embedding", "attn", "cross_attn", "mlp"} and len(layer["mlp"]) == 3

    out2 = tmp_path / "crattn"
    assert _run(root, "crattn-reading", out2, "--sim-type", "cosine") == 0
    names = sorted(p.name for p in out2.iterdir())
    assert names == ["all_queries_crattn_similarities_cosine_0.json", "crattn_ratio_of_top_k_layers-cosine-all.json",
                     "crattn_reading_summary.json", "stages.json"]
    record = json.loads((out2 / "stages.json").read_text())  # default for a 4-layer decoder: auto
    assert record["method"] == "auto" and [l for stage in record["stages"] for l in stage] == [0, 1, 2, 3]
    assert json.loads((out2 / "crattn_reading_summary.json").read_text())["stages"] == record["stages"]
    entries = list(rd.iter_raw_entries(out2, "cross_attn", "cosine"))
    held_out = record["split"]["held_out_rows"]  # automatic stages: fitted on 2 queries, the other 3 reported
    assert record["split"]["fit_queries"] == 2 and len(held_out) == 3
    assert len(entries) == 3 * 4 * 2
    assert list(dict.fromkeys(e["q_id"] for e in entries)) == [100 + CORRECT[row] for row in held_out]
    assert json.loads((out2 / "crattn_reading_summary.json").read_text())["queries"] == 3
    assert all(list(e) == ["sim_type", "value", "layer", "head", "q_id", "enc_position"] for e in entries)
    assert all(-1 - 1e-6 <= v <= 1 + 1e-6 for e in entries for v in e["value"].values())


@pytest.mark.parametrize("problem, message", [
    ("unknown_query", "record index 1: query id '999' is not in"),
    ("bad_layers", "--layers: '2-7' is outside the decoder's layers 0-3"),
    ("bad_topk", "--topk: 'many' is neither 'all' nor a positive integer"),
    ("stages_gap", "--stages: layers [1, 2] are read from but belong to no stage"),
])
def test_bad_input_exits_2_without_outputs(lens_dsi, tmp_path, capsys, problem, message):
    root, _ = lens_dsi
    correct = [[gj.docid_token("d1"), 101], [gj.docid_token("d0"), 100]]
    if problem == "unknown_query":
        correct[1][1] = 999
    (root / "correct_bad.json").write_text(json.dumps(correct))
    extra = {"bad_layers": ["--layers", "2-7"], "bad_topk": ["--topk", "many"],
             "stages_gap": ["--stages", "0,3", "--layers", "3"]}.get(problem, [])
    out = tmp_path / "never"
    code = main(["neuron-reading", "--checkpoint", str(root / "dsi"), "--val-queries", str(root / "val.json"),
                 "--correct-valid", str(root / "correct_bad.json"), "-o", str(out), "--no-progress",
                 "--allow-incorrect", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
