"""The README's API example runs as written (on a tiny random checkpoint standing in for the real one)."""

from __future__ import annotations

import os
import re

from tests.conftest import REPO_ROOT


def test_readme_api_example_runs(hf_checkpoint, t5_tokenizer, tmp_path):
    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"## The API\n+```python\n(.*?)```", readme, re.S).group(1)
    directory, _ = hf_checkpoint("dsi", tokenizer=t5_tokenizer, vocab_size=32128, d_model=16, d_kv=4, d_ff=32,
                                 num_layers=1, num_heads=2)
    assert '"path/to/DSI-large-NQ10k"' in block
    code = block.replace('"path/to/DSI-large-NQ10k"', repr(str(directory)))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["logits"].shape == (1, 1, 32128)
    assert namespace["model"].config.vocab_size == 32102
    assert (tmp_path / "exported" / "model.safetensors").is_file()


def test_readme_interventions_example_runs(hf_checkpoint):
    import numpy as np

    import genir_jax as gj

    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"### Sites and interventions\n.*?```python\n(.*?)```", readme, re.S).group(1)
    directory, _ = hf_checkpoint("iv", num_layers=2, num_decoder_layers=17, num_heads=4)
    model = gj.load_pretrained(directory)
    rng = np.random.default_rng(0)
    namespace = {"gj": gj, "cfg": model.config, "params": model.params,
                 "ids": rng.integers(1, model.config.vocab_size, (3, 5)), "mask": np.ones((3, 5), np.int32),
                 "start": np.zeros((3, 1), np.int32)}
    exec(compile(block, "README.md", "exec"), namespace)
    clean = gj.forward(model.config, model.params, namespace["ids"], namespace["mask"], namespace["start"])
    assert namespace["logits"].shape == clean.shape
    assert not np.allclose(namespace["logits"], clean)  # the ablations change the output


def test_readme_sweeps_example_runs(tmp_path):
    import numpy as np

    import genir_jax as gj

    readme = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"### Sweeps: every layer, head, neuron and path\n.*?```python\n(.*?)```", readme, re.S).group(1)
    cfg = gj.t5_v1_0(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=3,
                            num_heads=4, dropout_rate=0.0)
    params = gj.init_params(cfg, 0)
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(2, 64, (5, 6)), np.ones((5, 6), np.int32)
    logits = np.asarray(gj.forward(cfg, params, ids, mask, np.zeros((5, 1), np.int32)))[:, 0]
    namespace = {"cfg": cfg, "params": params, "ids": ids, "mask": mask, "targets": logits.argmax(-1)}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["result"].values["rank"].shape == (3 * 4, 5)
    assert (tmp_path / "heads.png").stat().st_size > 1000
