"""`benchmarks/bench_decoder_sweep.py` on a tiny GPT-2 shape: both sides run, TransformerLens' ranks equal
genir-jax's on every sampled pair and the JSON's rates are consistent. Needs a venv with TransformerLens 2.x
(``TL_PYTHON``, default /work/tlvenv2/bin/python) for the comparison, which is skipped without one (CI has
none: TransformerLens is a benchmark-only peer); genir-jax's side runs everywhere."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TL_PYTHON = os.environ.get("TL_PYTHON", "/work/tlvenv2/bin/python")


@pytest.mark.slow
def test_the_genir_jax_side_runs_without_transformer_lens(tmp_path):
    """What CI can run (TransformerLens is a benchmark-only peer): the sweep over every neuron, timed twice."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_decoder_sweep.py"),
                           "--queries", "6", "--layers", "3", "--d-ff", "16", "--vocab", "512", "--skip-tl",
                           "--allow-busy", "--json", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ours = json.loads(out.read_text())["genir_jax"]
    assert ours["configs"] == 3 * 16 and ours["queries"] == 6 and ours["neurons_per_layer"] == 16
    assert ours["steady_cq_per_s"] == pytest.approx(ours["configs"] * ours["queries"] / ours["warm_s"])
    assert "genir-jax only (--skip-tl)" in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TL_PYTHON), reason=f"no TransformerLens venv at {TL_PYTHON} (TL_PYTHON)")
def test_tiny_decoder_sweep_against_transformer_lens(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_decoder_sweep.py"),
                           "--queries", "6", "--layers", "3", "--d-ff", "16", "--vocab", "512",
                           "--tl-per-layer", "3", "--tl-reference-queries", "2", "--tl-python", TL_PYTHON,
                           "--allow-busy", "--json", str(out)],
                          capture_output=True, text=True, timeout=1200, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    ours = result["genir_jax"]
    assert ours["configs"] == 3 * 16 and ours["queries"] == 6
    assert ours["steady_cq_per_s"] == pytest.approx(ours["configs"] * ours["queries"] / ours["warm_s"])
    assert result["failures"] == []
    assert set(result["tl_loops"]) == {"reference", "batched", "cached", "cached_configs_batched"}
    for name, loop in result["tl_loops"].items():
        assert loop["ranks_equal"], name
        assert loop["configs"] == 9 and loop["queries"] == (2 if name == "reference" else 6)
        assert loop["pairs_checked"] == loop["configs"] * loop["queries"]
    assert result["transformer_lens"]["logit_check"]["max_abs_tl_vs_transformers"] < 1e-4
