"""`[checkpoint]` in path options is the checkpoint directory for every command, resolved in one place."""

from __future__ import annotations

import argparse
import shutil

import pytest

from genir_jax.base.errors import GenIRError
from genir_jax.cli.main import main
from genir_jax.cli.paths import resolve_placeholders


@pytest.mark.parametrize("command, extra", [
    ("sweep", ["--sites", "decoder.*.mlp", "--metric", "rank"]),
    ("attribute", ["--sites", "decoder.*.mlp", "--method", "exact", "--metric", "logit"]),
])
def test_defaults_resolve_to_the_checkpoint(dsi, tmp_path, monkeypatch, command, extra):
    root, _, _ = dsi
    checkpoint = tmp_path / "model"
    shutil.copytree(root / "dsi", checkpoint)
    shutil.copy(root / "correct.json", checkpoint / "correct_valid.json")  # the documented default
    monkeypatch.chdir(tmp_path)
    assert main([command, "-c", str(checkpoint), "--val-queries", str(root / "val.json"), "--no-progress",
                 "--allow-incorrect", *extra]) == 0  # a random model: the pairs are relevant, not its top tokens
    assert not (tmp_path / "[checkpoint]").exists()
    written = {path.name for path in checkpoint.iterdir()} - {path.name for path in (root / "dsi").iterdir()}
    assert written - {"correct_valid.json"}, "the outputs go to the checkpoint directory"


def test_every_string_option_and_the_source_option():
    args = argparse.Namespace(checkpoint="/m", output="[checkpoint]/out", correct_valid="[checkpoint]/c.json", k=3)
    resolve_placeholders(args)
    assert (args.output, args.correct_valid, args.k) == ("/m/out", "/m/c.json", 3)
    swap = argparse.Namespace(complete_model_path="/full", checkpoint_option="complete_model_path",
                              output="[checkpoint]")
    resolve_placeholders(swap)
    assert swap.output == "/full"
    with pytest.raises(GenIRError, match="--output: \\[checkpoint\\] stands for the checkpoint directory"):
        resolve_placeholders(argparse.Namespace(output="[checkpoint]/x"))
