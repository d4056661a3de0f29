"""`genir-jax head-logit-lens`: the thin command writes what the library computes, and names its flags in errors."""

from __future__ import annotations

import json

import numpy as np

from genir_jax.analysis.head_logit_lens import run_head_logit_lens
from genir_jax.analysis.inputs import load_analysis_inputs
from genir_jax.analysis.residual import docid_mask
from genir_jax.cli.main import main


def _args(root, out, *extra):
    return ["head-logit-lens", "--checkpoint", str(root / "dsi"), "--val-queries", str(root / "val.json"),
            "--correct-valid", str(root / "correct.json"), "-o", str(out), "--no-progress", "--allow-incorrect",
            *extra]  # a random model: its pairs are relevant, not its top tokens


def test_command_writes_the_library_result(dsi, tmp_path, capsys):
    root, model, _ = dsi
    assert main(_args(root, tmp_path / "out", "--top", "5")) == 0
    inputs = load_analysis_inputs(root / "dsi", root / "val.json", root / "correct.json", allow_incorrect=True)
    expected = run_head_logit_lens(model.config, model.params, inputs.input_ids, inputs.attention_mask, inputs.targets,
                                   docid_mask(model.tokenizer, model.config.vocab_size), top=5)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "head_logit_lens_ranks.npy"), expected.target_rank)
    summary = json.loads((tmp_path / "out" / "head_logit_lens.json").read_text())
    assert summary == expected.summary() and summary["queries"] == 4
    printed = json.loads(capsys.readouterr().out)
    assert printed["queries"] == 4 and len(printed["best_heads"]) == 5


def test_bad_top_names_the_flag(dsi, tmp_path, capsys):
    root, _, _ = dsi
    assert main(_args(root, tmp_path / "out", "--top", "0")) == 2
    assert "--top must be in 1..10000, got 0" in capsys.readouterr().err  # refused by argparse, before loading
    assert not (tmp_path / "out" / "head_logit_lens.json").exists()
