"""The site grammar, the resumable sweep store, and `genir-jax sweep` / `genir-jax attribute` end to end on a
tiny DSI checkpoint (the one of tests/cli/test_cli_patching.py)."""

from __future__ import annotations

import csv
import json
import numpy as np
import pytest

import genir_jax as gj
from genir_jax.cli.main import main
from genir_jax.core.config import T5Config
from genir_jax.base.errors import GenIRError
from genir_jax.interp.interventions import FROM_SOURCE
from genir_jax.interp.site_grammar import SiteSpecError, parse_sweep, swept_sites
from tests.dsi_fixtures import DOC_IDS, QUERIES

CFG = T5Config(vocab_size=100, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_decoder_layers=3, num_heads=2)
ORDER = [3, 0, 4, 1]  # the queries of correct.json, in its order


# --------------------------------------------------------------------------------------------------
# Grammar
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, axes, shape, first, last", [
    ("decoder.*.cross_attn.hook_z[head]", ("layer", "head"), (3, 2),
     {"site": "decoder.0.cross_attn.hook_z", "layer": 0, "head": 0}, {"layer": 2, "head": 1}),
    ("decoder.2,1.mlp.hook_post[neuron=0-3]", ("layer", "neuron"), (2, 4),
     {"layer": 2, "neuron": 0}, {"layer": 1, "neuron": 3}),
    ("decoder.1.attn.hook_z[head=1]", ("layer", "head"), (1, 1), {"layer": 1, "head": 1}, {"head": 1}),
    ("decoder.0-1.mlp", ("layer",), (2,), {"site": "decoder.0.hook_mlp_out", "component": "mlp"}, {"layer": 1}),
    ("decoder.2.hook_mlp_out", ("layer",), (1,), {"site": "decoder.2.hook_mlp_out"}, {"layer": 2}),
    ("decoder.*.*", ("layer", "component"), (3, 3), {"site": "decoder.0.hook_attn_out", "component": "attn"},
     {"site": "decoder.2.hook_mlp_out", "component": "mlp"}),
    ("decoder.1,2.{mlp,cross_attn}", ("layer", "component"), (2, 2), {"site": "decoder.1.hook_mlp_out"},
     {"site": "decoder.2.hook_cross_attn_out"}),
    ("encoder.*.*", ("layer", "component"), (2, 2), {"site": "encoder.0.hook_attn_out"}, {"site": "encoder.1.hook_mlp_out"}),
    ("encoder.hook_out", ("site",), (1,), {"site": "encoder.hook_out", "layer": -1}, {"site": "encoder.hook_out"}),
    ("decoder.hook_embed", ("site",), (1,), {"site": "decoder.hook_embed", "stack": "decoder"}, {}),
    ("encoder.final_ln.hook_normalized", ("site",), (1,), {"site": "encoder_final_ln.hook_normalized"}, {}),
    ("encoder.hook_out[position]", ("site", "position"), (1, 5), {"position": 0}, {"position": 4}),
    ("encoder.*.hook_resid_post[position=1,3]", ("layer", "position"), (2, 2), {"layer": 0, "position": 1},
     {"layer": 1, "position": 3}),
    ("decoder.*.cross_attn.hook_v[position=4]", ("layer", "position"), (3, 1), {"position": 4}, {"layer": 2}),
    ("decoder.2.mlp x decoder.*.attn.hook_z[head=0]", ("layer", "layer_2", "head"), (1, 3, 1),
     {"site": "decoder.2.hook_mlp_out", "site_2": "decoder.0.attn.hook_z", "head": 0}, {"layer_2": 2}),
    (["decoder.2.mlp", "decoder.*.attn"], ("config",), (4,), {"site": "decoder.2.hook_mlp_out"},
     {"site": "decoder.2.hook_attn_out"}),
])
def test_grammar_builds_the_right_sweep(spec, axes, shape, first, last):
    sweep = parse_sweep(CFG, spec, value=0.0, length=5)
    assert sweep.axes == axes and sweep.shape == shape and sweep.size == int(np.prod(shape))
    assert first.items() <= sweep.label(0).items()
    assert last.items() <= sweep.label(sweep.size - 1).items()


def test_grammar_masks_and_swept_sites():
    sweep = parse_sweep(CFG, "decoder.2,1.mlp.hook_post[neuron=0-3]", value=0.0)
    mask = sweep.config(CFG, 5)["decoder"]["mlp.hook_post"][0].mask  # layer 1, neuron 1
    expected = np.zeros((3, 1, 1, 32), np.float32)
    expected[1, 0, 0, 1] = 1
    np.testing.assert_array_equal(mask, expected)
    assert swept_sites(CFG, sweep) == ["decoder.1.mlp.hook_post", "decoder.2.mlp.hook_post"]
    grid = parse_sweep(CFG, ["encoder.hook_out", "decoder.0.{attn,mlp}"], value=FROM_SOURCE)
    assert swept_sites(CFG, grid) == ["encoder.hook_out", "decoder.0.hook_attn_out", "decoder.0.hook_mlp_out"]
    assert all(t.value is FROM_SOURCE for t in grid.terms)


@pytest.mark.parametrize("spec, message", [
    ("decoder.*.hook_mlp_ot", "did you mean 'decoder.0.hook_mlp_out'"),
    ("decoder.5.mlp", "decoder layer 5 out of range; expected 0-2"),
    ("decoder.2-0.mlp", "is empty"),
    ("decoder.*.attn.hook_z[head=2]", "head 2 out of range; expected 0-1"),
    ("decoder.0.mlp.hook_post[neuron=32]", "neuron 32 out of range; expected 0-31"),
    ("decoder.*.hook_mlp_out[neuron]", "[neuron] applies to MLP sites"),
    ("decoder.*.hook_attn_out[head]", "[head] applies to attention sites"),
    ("decoder.*.mlp[unit]", "unknown unit '[unit]'"),
    ("encoder.hook_out[head]", "does not apply to the stack-level site"),
    ("decoder.*.{attn,foo}", "unknown component(s) ['foo']"),
    ("encoder.*.{cross_attn}", "the encoder has attn, mlp"),
    ("decoder.*.*[head]", "does not apply to a component grid"),
    ("decoder.0.attn.hook_z[head=0,0]", "listed twice"),
    ("decoder.x.mlp", "cannot parse"),
    ("mlp", "cannot parse"),
    ("decoder.*.hook_out", "unknown site"),
])
def test_grammar_errors_name_the_spec(spec, message):
    with pytest.raises(SiteSpecError) as info:
        parse_sweep(CFG, ["decoder.0.mlp", spec], value=0.0, length=5)
    assert isinstance(info.value, GenIRError)
    assert f"site spec '{spec}'" in str(info.value)
    assert message in str(info.value)


def test_a_sweep_beyond_the_config_bound_is_refused_before_it_is_built():
    """Three neuron grids of 192 configs each (7,077,888 combinations; their tables took over 6 GB and minutes
    to build) are refused at once, naming --sites and the bound, with almost nothing allocated; so are the
    library's product, concat and site_grid beyond the bound."""
    import time
    import tracemalloc

    from genir_jax.interp import sweep as sw

    config = CFG.replace(d_ff=64)
    spec = " x ".join(["decoder.*.mlp.hook_post[neuron]"] * 3)
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(SiteSpecError) as info:
            parse_sweep(config, spec, value=0.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - started < 5 and peak < 20e6, peak
    assert str(info.value).startswith(f"--sites '{spec}': 7,077,888 configurations; a sweep holds at most 1,048,576")
    grid = sw.site_grid(config, "decoder.*.mlp.hook_post", unit="neuron")
    with pytest.raises(GenIRError, match="product: 7,077,888 configurations"):
        sw.product(grid, grid, grid)
    with pytest.raises(GenIRError, match="concat: 1,050,624 configurations"):
        sw.concat(*[grid] * 5472)
    with pytest.raises(GenIRError, match="site_grid decoder.0.mlp.hook_post...: 3,145,728 configurations"):
        sw.site_grid(config.replace(d_ff=1 << 20), "decoder.*.mlp.hook_post", unit="neuron")
    many = parse_sweep(config.replace(d_ff=1 << 16), "decoder.0.mlp.hook_post[neuron=0-65535]", value=0.0)
    assert many.size == 1 << 16  # a long index range parses in linear time (it was quadratic)


def test_grammar_position_on_encoder_needs_the_length():
    with pytest.raises(SiteSpecError, match="needs the query length"):
        parse_sweep(CFG, "encoder.hook_out[position]", value=0.0)
    assert parse_sweep(CFG, "decoder.*.mlp[position]", value=0.0).shape == (3, 1)  # the decoder has one position


# --------------------------------------------------------------------------------------------------
# Library-level inputs of the checkpoint (computed independently of the command)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(dsi):
    root, model, t5_dir = dsi
    enc = model.tokenizer([QUERIES[i] for i in ORDER], padding=True, return_tensors="np")
    targets = gj.docid_token_ids(model.tokenizer, [DOC_IDS[i] for i in ORDER])
    candidates = np.asarray(sorted(gj.docid_token_ids(model.tokenizer, DOC_IDS)), np.int32)
    return model, np.asarray(enc.input_ids, np.int32), np.asarray(enc.attention_mask, np.int32), targets, candidates


class _Killed(Exception):
    pass


def _killing_store(path, settings, after):
    from genir_jax.interp.sweep_store import DirectoryStore

    class KillingStore(DirectoryStore):
        def put(self, key, arrays):
            if self.puts >= after:
                raise _Killed(key)
            super().put(key, arrays)

    return KillingStore(path, settings)


def test_store_resumes_after_a_kill_and_refuses_other_settings(inputs, tmp_path):
    from genir_jax.interp.patching import run_sweep
    from genir_jax.interp.sweep_store import DirectoryStore, StoreError

    model, ids, mask, targets, candidates = inputs
    sweep = parse_sweep(model.config, "decoder.*.cross_attn.hook_z[head]", value=0.0)
    kwargs = dict(metrics=("rank", "docid_rank", "logit"), candidates=candidates, config_chunk=2, progress=False)
    reference = run_sweep(model.config, model.params, ids, mask, targets, sweep, **kwargs)
    settings = {"sites": ["decoder.*.cross_attn.hook_z[head]"], "mode": "zero", "chunks": (2, None)}
    with pytest.raises(_Killed):
        run_sweep(model.config, model.params, ids, mask, targets, sweep, store=_killing_store(tmp_path / "s", settings, 2),
                  **kwargs)
    assert len(DirectoryStore(tmp_path / "s", settings)) == 2
    assert not [p for p in (tmp_path / "s" / "chunks").iterdir() if p.name.endswith(".tmp")]
    store = DirectoryStore(tmp_path / "s", settings)
    resumed = run_sweep(model.config, model.params, ids, mask, targets, sweep, store=store, **kwargs)
    assert reference.stats["configs_computed"] == 6 and resumed.stats["configs_computed"] == 2
    for m in kwargs["metrics"]:
        np.testing.assert_array_equal(resumed.values[m], reference.values[m])
    assert resumed.aggregates.keys() == reference.aggregates.keys()
    for name in reference.aggregates:
        np.testing.assert_allclose(resumed.aggregates[name], reference.aggregates[name])
    with pytest.raises(StoreError) as info:
        DirectoryStore(tmp_path / "s", {**settings, "mode": "mean", "seed": 3})
    text = str(info.value)
    assert "resuming with other settings is refused" in text
    assert 'mode: stored "zero", now "mean"' in text and "seed: stored <absent>, now 3" in text
    store.clear()
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------

def _args(root, out, command="sweep"):
    return [command, "--checkpoint", str(root / "dsi"), "--val-queries", str(root / "val.json"),
            "--correct-valid", str(root / "correct.json"), "-o", str(out), "--no-progress",
            "--allow-incorrect"]  # a random model: its pairs are relevant, not its top tokens


def _csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_sweep_writes_results_equal_to_run_sweep(dsi, inputs, tmp_path):
    from genir_jax.interp.patching import runner_up_foils
    from genir_jax.interp.patching import run_sweep

    root, _, _ = dsi
    model, ids, mask, targets, candidates = inputs
    out = tmp_path / "heads"
    spec = "decoder.*.cross_attn.hook_z[head]"
    assert main(_args(root, out) + ["--sites", spec, "--metric", "rank,docid_rank", "--metric", "logit_diff",
                                    "--foil", "runner-up", "--hits", "1,3", "--per-query"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["clean.json", "heatmap_docid_rank.png", "heatmap_logit_diff.png", "heatmap_rank.png",
                     "per_query.npz", "results.csv", "sweep.json"]

    foils = runner_up_foils(model.config, model.params, ids, mask, targets, candidates)
    assert not np.any(foils == targets) and set(foils.tolist()) <= set(candidates.tolist())
    expected = run_sweep(model.config, model.params, ids, mask, targets, parse_sweep(model.config, spec, value=0.0),
                         metrics=("rank", "docid_rank", "logit_diff"), candidates=candidates, foil_ids=foils,
                         hits=(1, 3), progress=False)
    rows = _csv(out / "results.csv")
    assert list(rows[0]) == list(expected.sweep.labels) + list(expected.aggregates)
    assert "hits@3" in rows[0] and "logit_diff_effect" in rows[0]
    assert len(rows) == 6
    for k, row in enumerate(rows):
        assert int(row["layer"]) == expected.sweep.label(k)["layer"] and int(row["head"]) == expected.sweep.label(k)["head"]
        for name, column in expected.aggregates.items():
            assert float(row[name]) == pytest.approx(column[k], rel=1e-5, abs=1e-5), name

    clean = json.loads((out / "clean.json").read_text())
    assert clean["queries"] == 4
    assert clean["clean"]["docid_rank"] == pytest.approx(np.mean(expected.clean["docid_rank"]))
    assert clean["clean"]["hits@1"] == pytest.approx(np.mean(expected.clean["docid_rank"] < 1))
    assert clean["settings"]["sites"] == [spec] and clean["settings"]["mode"] == "zero"
    per_query = np.load(out / "per_query.npz")
    np.testing.assert_array_equal(per_query["docid_rank"], expected.values["docid_rank"])
    np.testing.assert_array_equal(per_query["foils"], foils)
    assert list(per_query["query_ids"]) == ["103", "100", "104", "101"]
    info = json.loads((out / "sweep.json").read_text())
    assert info["sweep"]["axes"] == ["layer", "head"] and info["sweep"]["shape"] == [3, 2]
    assert info["sweep"]["heatmap"] == "head" and info["stats"]["configs_computed"] == 6
    assert not (out / ".sweep-chunks").exists()


@pytest.mark.parametrize("mode", ["mean", "source"])  # resample: see the attribute test
def test_sweep_modes_and_layouts(dsi, inputs, tmp_path, mode):
    from genir_jax.interp import interventions as ivs
    from genir_jax.interp.patching import derangement
    from genir_jax.interp.patching import Source, run_sweep

    root, _, t5_dir = dsi
    model, ids, mask, targets, candidates = inputs
    out = tmp_path / mode
    extra = {"mean": [], "resample": ["--seed", "3"], "source": ["--source-model", str(t5_dir)]}[mode]
    spec = "decoder.1,2.mlp.hook_post[neuron=0-7]" if mode == "mean" else "decoder.*.*"
    assert main(_args(root, out) + ["--sites", spec, "--mode", mode, "--metric", "logprob,docid_rank", *extra]) == 0
    rows = _csv(out / "results.csv")
    sweep = parse_sweep(model.config, spec, value=0.0)
    source = None
    if mode == "mean":
        means = ivs.mean_activations(model.config, model.params, ids, mask, swept_sites(model.config, sweep),
                                     progress=False)
        sweep = parse_sweep(model.config, spec, value=means)
        assert (out / "heatmap_logprob.png").exists()
    else:
        sweep = parse_sweep(model.config, spec, value=FROM_SOURCE)
        if mode == "resample":
            perm = derangement(4, 3)
            assert not np.any(perm == np.arange(4))
            source = Source(model.config, model.params, ids[perm], mask[perm])
        else:
            base = gj.load_pretrained(t5_dir)
            source = Source(base.config, base.params)
        assert json.loads((out / "sweep.json").read_text())["sweep"]["heatmap"] == "component"
    expected = run_sweep(model.config, model.params, ids, mask, targets, sweep, source=source,
                         metrics=("docid_rank", "logprob"), candidates=candidates, progress=False)
    assert len(rows) == sweep.size
    np.testing.assert_allclose([float(r["logprob_effect"]) for r in rows], expected.aggregates["logprob_effect"],
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([float(r["hits@10"]) for r in rows], expected.aggregates["hits@10"])


@pytest.mark.parametrize("extra, message", [
    (["--sites", "decoder.*.hook_mlp_ot"], "did you mean 'decoder.0.hook_mlp_out'"),
    (["--sites", "decoder.*.cross_attn.hook_z[head=0,5]"], "head 5 out of range; expected 0-1"),
    (["--sites", "decoder.*.mlp", "--metric", "logit_diff"], "--metric logit_diff needs --foil"),
    (["--sites", "decoder.*.mlp", "--metric", "logit_diff", "--foil", "d2"], "the foil equals the target of query '101'"),
    (["--sites", "decoder.*.mlp", "--metric", "logit_diff", "--foil", "nope"], "is not in the model's vocabulary"),
    (["--sites", "decoder.*.mlp", "--metric", "hits"], "--metric: unknown metric(s) ['hits']"),
    (["--sites", "decoder.*.mlp", "--mode", "median"], "--mode: unknown mode 'median'"),
    (["--sites", "decoder.*.mlp", "--mode", "source"], "--mode source needs --source-model"),
    (["--sites", "decoder.*.mlp", "--method", "atp"], "use `genir-jax attribute"),
    (["--sites", "decoder.*.mlp", "--config-chunk", "0"], "--config-chunk must be in 1..65536"),
    (["--sites", " x ".join(["decoder.*.mlp.hook_post[neuron]"] * 4)], "configurations; a sweep holds at most 1,048,576"),
    (["attribute", "--sites", " x ".join(["decoder.*.mlp.hook_post[neuron]"] * 4)],
     "configurations; a sweep holds at most 1,048,576"),
    (["attribute", "--sites", "decoder.*.mlp", "--metric", "rank"],
     "--metric rank is not differentiable for --method atp"),
    (["attribute", "--sites", "decoder.*.mlp", "--metric", "docid_rank", "--method", "exact"],
     "--metric docid_rank is not differentiable for --method exact"),
    (["attribute", "--sites", "decoder.*.mlp", "--method", "ig"], "--method ig: expected one of atp, atp*, exact"),
    (["--sites", "decoder.0.mlp", "--receivers", "mlp[1-7]"], "--receivers 'mlp[1-7]': layer 3 out of range; expected 0-2"),
    (["--sites", "decoder.0.mlp", "--receivers", "mlp[1]+logit"], "cannot parse 'logit'"),
    (["attribute", "--sites", "decoder.0.mlp", "--receivers", "all"], "--receivers (path patching) runs exactly"),
])
def test_bad_input_exits_2_without_outputs(dsi, tmp_path, capsys, extra, message):
    root, _, _ = dsi
    out = tmp_path / "never"
    command = "sweep"
    if extra[0] == "attribute":
        command, extra = "attribute", extra[1:]
    assert main(_args(root, out, command) + extra) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output_is_refused_before_computing(dsi, tmp_path, capsys):
    root, _, _ = dsi
    (tmp_path / "file").write_text("x")
    assert main(_args(root, tmp_path / "file") + ["--sites", "decoder.*.mlp"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_cli_resumes_after_a_kill_and_refuses_other_settings(dsi, tmp_path, monkeypatch, capsys):
    from genir_jax.interp import sweep_store

    root, _, _ = dsi
    spec = ["--sites", "decoder.*.cross_attn.hook_z[head]", "--sites", "encoder.hook_out", "--metric", "rank,logit",
            "--config-chunk", "2"]
    assert main(_args(root, tmp_path / "whole") + spec) == 0
    whole = (tmp_path / "whole" / "results.csv").read_text()

    out = tmp_path / "resumed"
    original_put = sweep_store.DirectoryStore.put
    calls = []

    def dying_put(self, key, arrays):
        if len(calls) == 1:
            raise KeyboardInterrupt  # the kill, after one finished chunk
        calls.append(key)
        original_put(self, key, arrays)

    monkeypatch.setattr(sweep_store.DirectoryStore, "put", dying_put)
    assert main(_args(root, out) + spec) == 130  # interrupted: exit 130, one line, no traceback
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.setattr(sweep_store.DirectoryStore, "put", original_put)
    assert sorted(p.name for p in out.iterdir()) == [".sweep-chunks"]  # no partial outputs
    assert len(list((out / ".sweep-chunks" / "chunks").glob("*.npz"))) == 1

    other = [s if s != "rank,logit" else "rank,logprob" for s in spec]
    assert main(_args(root, out) + other) == 2
    err = capsys.readouterr().err
    assert "resuming with other settings is refused" in err and "metrics" in err and "logprob" in err
    assert main(_args(root, out) + spec + ["--seed", "7"]) == 0  # the seed does not matter for zero ablation
    assert (out / "results.csv").read_text() == whole
    info = json.loads((out / "sweep.json").read_text())
    assert info["stats"]["configs_computed"] == 7 - 2 and info["stats"]["configs"] == 7
    assert not (out / ".sweep-chunks").exists()


def test_attribute_exact_reports_the_mean_effect(dsi, tmp_path, capsys):
    root, _, _ = dsi
    spec = ["--sites", "decoder.*.*", "--metric", "logit"]
    assert main(_args(root, tmp_path / "sweep") + spec) == 0
    capsys.readouterr()
    assert main(_args(root, tmp_path / "attr", "attribute") + spec + ["--method", "exact", "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert "top 3 of 9 configs" in printed
    effects = [float(r["logit_effect"]) for r in _csv(tmp_path / "sweep" / "results.csv")]
    rows = _csv(tmp_path / "attr" / "attribution.csv")
    assert list(rows[0]) == ["site", "stack", "component", "layer", "score"]
    np.testing.assert_allclose([float(r["score"]) for r in rows], effects, rtol=1e-6)
    assert (tmp_path / "attr" / "heatmap_logit.png").exists()
    assert json.loads((tmp_path / "attr" / "attribution.json").read_text())["method"] == "exact"


def test_attribute_checks_its_top_units_against_exact_patching(dsi, tmp_path, capsys):
    """atp* re-runs its top units exactly: attribution.json's exact_check holds the exact effects (equal to a
    `sweep` of the same sites), the estimates of attribution.csv, their Spearman correlation and sign
    agreement; the printout says them, with a warning exactly when the record has one."""
    from genir_jax.interp.attribution import sign_agreement, spearman

    root, _, _ = dsi
    spec = ["--sites", "decoder.*.cross_attn.hook_z[head]", "--metric", "logit", "--heatmap-vmax", "2.5"]
    assert main(_args(root, tmp_path / "sweep") + spec) == 0
    capsys.readouterr()
    assert main(_args(root, tmp_path / "attr", "attribute") + spec + ["--method", "atp*", "--check-exact", "4"]) == 0
    captured = capsys.readouterr()
    record = json.loads((tmp_path / "attr" / "attribution.json").read_text())
    check = record["exact_check"]
    exact = {int(u["config"]): u["exact"] for u in check["units"]}
    effects = [float(r["logit_effect"]) for r in _csv(tmp_path / "sweep" / "results.csv")]
    scores = [float(r["score"]) for r in _csv(tmp_path / "attr" / "attribution.csv")]
    magnitudes = [float(r["magnitude"]) for r in _csv(tmp_path / "attr" / "attribution.csv")]
    assert list(exact) == list(np.argsort(-np.asarray(magnitudes), kind="stable")[:4])
    np.testing.assert_allclose(list(exact.values()), [effects[k] for k in exact], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([u["estimate"] for u in check["units"]], [scores[k] for k in exact], rtol=1e-6)
    assert check["spearman"] == pytest.approx(spearman([scores[k] for k in exact], list(exact.values())))
    assert check["sign_agreement"] == sign_agreement([scores[k] for k in exact], list(exact.values()))
    assert check["units"][0]["layer"] is not None and check["units"][0]["head"] is not None
    assert "exact patching of the top 4 by GradDrop magnitude: Spearman" in captured.out
    assert ("disagrees with exact patching" in captured.err) == (check["warning"] is not None)
    # both maps on the one colour scale asked for
    assert record["heatmap_vmax"] == {"logit": 2.5}
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["heatmap_vmax"] == {"logit": 2.5}
    assert main(_args(root, tmp_path / "unchecked", "attribute") + spec + ["--method", "atp", "--check-exact", "0"]) == 0
    assert "exact_check" not in json.loads((tmp_path / "unchecked" / "attribution.json").read_text())
    assert "exact patching of the top" not in capsys.readouterr().out


def test_attribute_warns_in_one_line_where_the_estimate_disagrees(dsi, tmp_path, capsys, monkeypatch):
    """An exact check whose effects have the estimates' opposite signs: one warning line on stderr, the same
    warning in attribution.json."""
    from genir_jax.interp import attribution

    def opposite(config, params, ids, mask, targets, result, *, top, **_):
        configs = np.arange(min(top, result.sweep.size))
        return attribution.Agreement(result.method, result.metric, configs, result.scores[configs],
                                     -result.scores[configs])

    monkeypatch.setattr(attribution, "check_against_exact", opposite)
    root, _, _ = dsi
    assert main(_args(root, tmp_path / "attr", "attribute") + ["--sites", "decoder.*.cross_attn.hook_z[head]",
                                                               "--method", "atp", "--metric", "logit"]) == 0
    captured = capsys.readouterr()
    # the fixture's random model does not rank its pairs first (--allow-incorrect's own warning is another line)
    warnings = [line for line in captured.err.splitlines() if "warning" in line and "pairs are not correct" not in line]
    assert len(warnings) == 1 and warnings[0].startswith(
        "genir-jax: warning: atp disagrees with exact patching on its top 6 units: Spearman -1.00, same sign 0%")
    check = json.loads((tmp_path / "attr" / "attribution.json").read_text())["exact_check"]
    assert check["sign_agreement"] == 0.0 and check["warning"] == warnings[0].split("warning: ", 1)[1]


def test_attribute_atp_with_the_real_module(dsi, inputs, tmp_path, capsys):
    from genir_jax.interp.patching import run_sweep

    root, _, _ = dsi
    model, ids, mask, targets, candidates = inputs
    out = tmp_path / "atp"
    # decoder.hook_out feeds the logits linearly: there AtP's first-order estimate is exact.
    assert main(_args(root, out, "attribute") + ["--sites", "decoder.*.cross_attn.hook_z[head]", "--method", "atp*",
                                                 "--metric", "logit_diff", "--foil", "runner-up", "--mode", "resample",
                                                 "--per-query", "--top", "2"]) == 0
    rows = _csv(out / "attribution.csv")
    assert len(rows) == 6 and list(rows[0])[:5] == ["site", "stack", "component", "layer", "head"]
    assert all(np.isfinite(float(r["score"])) for r in rows)
    assert list(rows[0])[-3:] == ["score", "magnitude", "abs_atp"]  # GradDrop, and |AtP| without it
    per_query = np.load(out / "per_query.npz")["score"]
    assert per_query.shape == (6, 4)
    np.testing.assert_allclose([float(r["abs_atp"]) for r in rows], np.abs(per_query).mean(axis=1), rtol=1e-5,
                               atol=1e-7)
    assert (out / "heatmap_logit_diff.png").exists()
    printed = capsys.readouterr().out
    assert "top 2 of 6 configs" in printed and "|atp|" in printed and "graddrop" in printed
    refused = tmp_path / "refused"
    assert main(_args(root, refused, "attribute") + ["--sites", "encoder.0.hook_resid_post", "--method", "atp*",
                                                     "--metric", "logit"]) == 2
    err = capsys.readouterr().err
    assert "no QK fix for encoder.*.hook_resid_post" in err and "--method atp" in err and not refused.exists()
    linear = tmp_path / "linear"
    assert main(_args(root, linear, "attribute") + ["--sites", "decoder.hook_out", "--metric", "logit"]) == 0
    exact = run_sweep(model.config, model.params, ids, mask, targets, parse_sweep(model.config, "decoder.hook_out"),
                      metrics=("logit",), progress=False)
    score = float(_csv(linear / "attribution.csv")[0]["score"])
    assert score == pytest.approx(float(exact.aggregates["logit_effect"][0]), rel=1e-3, abs=1e-4)


def test_sweep_receivers_all_none_and_some(dsi, tmp_path):
    """Path patching from the command line: along every path it is ordinary patching, along none the clean
    run, into the last MLP's input only something in between."""
    root, _, _ = dsi
    spec = ["--sites", "decoder.0.{attn,mlp}", "--metric", "logit"]
    runs = {}
    for name, extra in (("plain", []), ("all", ["--receivers", "all"]), ("none", ["--receivers", "none"]),
                        ("mlp2", ["--receivers", "mlp[2]"])):
        assert main(_args(root, tmp_path / name) + spec + extra) == 0
        runs[name] = np.asarray([float(r["logit_effect"]) for r in _csv(tmp_path / name / "results.csv")])
    rows = _csv(tmp_path / "mlp2" / "results.csv")
    assert rows[0]["receivers"] == "mlp[2]"
    np.testing.assert_allclose(runs["all"], runs["plain"], atol=1e-5)
    np.testing.assert_allclose(runs["none"], 0.0, atol=1e-5)
    assert np.abs(runs["plain"]).max() > 1e-3
    assert not np.allclose(runs["mlp2"], runs["plain"], atol=1e-5)
