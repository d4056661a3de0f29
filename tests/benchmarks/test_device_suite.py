"""`benchmarks/device_suite.py` in its smallest setting on the CPU: it runs every part and writes one JSON whose
numbers are consistent with each other (the accelerator run is the same code on a larger shape)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_device_suite_small_writes_every_part(tmp_path):
    out = tmp_path / "suite.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "device_suite.py"), "--size", "small",
                           "--out", str(out)], capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    suite = json.loads(out.read_text())
    assert suite["platform"] == "cpu" and suite["size"] == "small"
    sweep = suite["sweep"]
    assert sweep["configs"] == 2 * 128 and sweep["queries"] == 16
    assert sweep["clean_rank0_fraction"] == 1.0  # targets are the clean top token
    assert sweep["steady_cq_per_s"] == pytest.approx(sweep["configs"] * sweep["queries"] / sweep["warm_s"])
    assert sweep["projected_all_neurons_s"] == pytest.approx(sweep["warm_s"])  # every layer was swept
    attribution = suite["attribution"]
    assert attribution["configs"] == sweep["configs"] and attribution["all_neurons"] == sweep["all_neurons"] == 256
    assert attribution["all_share_of_exact_cold"] == pytest.approx(
        attribution["all_cold_s"] / (sweep["projected_all_neurons_s"] + sweep["compile_s"]))
    assert suite["training"]["examples_per_s"] > 0 and suite["training"]["loss"] > 0
    for task in ("sweep", "train"):
        plan = suite["plan"][task]
        assert plan["predicted_device_bytes"] > 0 and plan["predicted_flops_per_step"] > 0
        assert plan["measured_peak_bytes"] > 0  # host RSS on the CPU, the allocator's peak on an accelerator
