"""Shared setup for the reference-agreement checks (not tests: they need the reference code and a
TransformerLens 2.x environment, which genir-jax itself never depends on).

    REFERENCE_CODE=/path/to/re-gen-ir/code REFERENCE_PYTHON=/path/to/tl2-venv/bin/python \
        python benchmarks/reference_agreement/check_patching.py

The reference scripts are run unmodified where they work; where they crash on their own bugs, a copy is
patched minimally in a temporary directory and every change is printed.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np

REFERENCE_CODE = pathlib.Path(os.environ.get("REFERENCE_CODE", "/work/refcode/code"))
REFERENCE_PYTHON = os.environ.get("REFERENCE_PYTHON", "/work/ref-venv/bin/python")
TOKENIZER = pathlib.Path(os.environ.get("GENIR_JAX_DATA", pathlib.Path(__file__).resolve().parents[3] / "shared"
                                        / "data")) / "t5-tokenizer"

QUERIES = ["who wrote the harry potter books", "what is the capital of france", "when did the second world war end",
           "how many legs does a spider have", "where is the eiffel tower", "who painted the mona lisa",
           "what is the boiling point of water", "which planet is the largest in the solar system"]


def build_dsi(root: pathlib.Path, name: str, seed: int, layers: int = 24, d_model: int = 32) -> pathlib.Path:
    """A random T5 with the real T5 tokenizer and one docid token per query, saved in HF format."""
    from transformers import AutoTokenizer

    import genir_jax as gj
    from tests.hf_fixtures import HFCheckpointFactory

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    directory, _ = HFCheckpointFactory(root)(f"{name}-base", seed=seed, tokenizer=tokenizer, vocab_size=32128,
                                             d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
                                             num_decoder_layers=layers, num_heads=4)
    # random (not mean-resized) docid rows: mean resizing makes the docid logits nearly tied
    model = gj.add_docid_tokens(gj.load_pretrained(directory), [f"d{i}" for i in range(len(QUERIES))],
                                mean_resizing=False, seed=seed)
    # docid rows scaled up so the targets rank high, where logits are sparse (few float32 near-ties)
    token_ids = gj.docid_token_ids(model.tokenizer, [f"d{i}" for i in range(len(QUERIES))])
    shared = np.array(model.params["shared"])
    shared[token_ids] *= 4.0
    gj.save_pretrained(root / name, model.replace(params={**model.params, "shared": shared}))
    return root / name


def write_queries(root: pathlib.Path, correct_rows=(3, 0, 5, 1, 6)) -> tuple[pathlib.Path, pathlib.Path]:
    val = [{"id": 100 + i, "query": q, "relevant_docs": [f"d{i}"]} for i, q in enumerate(QUERIES)]
    (root / "val.json").write_text(json.dumps(val))
    (root / "correct_valid.json").write_text(json.dumps([[f"@DOC_ID_d{i}@", 100 + i] for i in correct_rows]))
    return root / "val.json", root / "correct_valid.json"


def patched_copy(script: str, replacements: list[tuple[str, str]], workdir: pathlib.Path) -> pathlib.Path:
    """A copy of a reference script with exact string replacements (each must apply); prints them."""
    target = workdir / "analysis" / script
    target.parent.mkdir(parents=True, exist_ok=True)
    text = (REFERENCE_CODE / "analysis" / script).read_text()
    for old, new in replacements:
        if old not in text:
            raise SystemExit(f"cannot patch {script}: {old!r} not found")
        text = text.replace(old, new)
        print(f"  patched {script}: {old.strip()[:70]!r} -> {new.strip()[:70]!r}")
    target.write_text(text)
    return target


def run_reference(script: pathlib.Path, args: list[str], cwd: pathlib.Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REFERENCE_CODE))
    result = subprocess.run([REFERENCE_PYTHON, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"reference {script.name} failed:\n{result.stderr[-3000:]}")


def run_ours(args: list[str]) -> None:
    from genir_jax.cli.main import main

    code = main(args)
    if code != 0:
        raise SystemExit(f"genir-jax {' '.join(args[:1])} exited {code}")


def workspace() -> pathlib.Path:
    return pathlib.Path(tempfile.mkdtemp(prefix="genir-refcheck-"))


def cleanup(path: pathlib.Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def report(rows: list[tuple[str, bool, str]]) -> int:
    width = max(len(name) for name, _, _ in rows)
    for name, ok, detail in rows:
        print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    return 0 if all(ok for _, ok, _ in rows) else 1


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # the repository root, for `tests`
