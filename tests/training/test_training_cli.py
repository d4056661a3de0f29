"""`genir-jax pretrain` and `genir-jax train` end to end on a tiny corpus, and their handling of bad input."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from genir_jax.cli.main import main

WORDS = ("apple", "river", "mountain", "violin", "glacier", "harbor", "comet", "desert", "falcon", "lantern",
         "meadow", "nebula", "orchid", "pyramid", "quartz", "saturn")


def make_prepared(root: pathlib.Path, documents: int = 16) -> pathlib.Path:
    """A prepared directory (the layout of `genir-jax prepare-data`) of a small synthetic corpus."""
    from genir_jax.data.corpus import Document, Query, write_documents, write_queries

    root.mkdir(parents=True, exist_ok=True)
    docs = [Document(f"d{i}", f"The {w} is the subject of paragraph {i}. Facts about the {w} and its history "
                              f"follow, with more {w} details.") for i, w in enumerate(WORDS[:documents])]
    write_documents(root / "documents.json", docs)
    splits = {"train": [], "val": [], "test": []}
    for i, w in enumerate(WORDS[:documents]):
        splits["train"].append(Query(f"q{i}a", f"what is the {w}", (f"d{i}",)))
        splits["train"].append(Query(f"q{i}b", f"history of the {w}", (f"d{i}",)))
        splits["val"].append(Query(f"q{i}v", f"facts about {w}", (f"d{i}",)))
        splits["test"].append(Query(f"q{i}t", f"{w} details", (f"d{i}",)))
    for name, queries in splits.items():
        write_queries(root / f"{name}_queries.json", queries)
    return root


def make_base(path: pathlib.Path, tokenizer, seed: int = 0) -> pathlib.Path:
    """A random-weight base T5 of the tiny preset with the real T5 tokenizer, saved in HF format."""
    from genir_jax.checkpoints.hf import PretrainedModel, save_pretrained
    from genir_jax.core.model import init_params
    from genir_jax.training.presets import TINY, T5_VOCAB_SIZE

    config = TINY.model.config(T5_VOCAB_SIZE)
    save_pretrained(path, PretrainedModel(config, init_params(config, seed), tokenizer))
    return path


@pytest.fixture
def prepared(tmp_path) -> pathlib.Path:
    return make_prepared(tmp_path / "prepared")


@pytest.mark.slow  # minutes on 2 cores: run by the full suite (.ci/run), not the quick one
def test_pretrain_then_train_tiny(tmp_path, prepared, shared_data, capsys):
    base = tmp_path / "base"
    code = main(["pretrain", "--data", str(prepared), "--preset", "tiny", "-o", str(base), "--steps", "6",
                 "--tokenizer", str(shared_data / "t5-tokenizer"), "--no-progress", "--eval-every", "3",
                 "--checkpoint-every", "3"])
    assert code == 0
    summary = json.loads((base / "pretrain.json").read_text())
    assert summary["best"]["step"] in (3, 6) and summary["data"]["texts"] == 16 + 32
    assert {"config.json", "model.safetensors", "tokenizer.json", "metrics.jsonl"} <= set(os.listdir(base))

    model_dir = tmp_path / "dsi"
    code = main(["train", "--data", str(prepared), "--base", str(base), "--preset", "tiny", "-o", str(model_dir),
                 "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4", "--no-progress",
                 "--optimizer", "adamw", "--remove", "d3"])
    assert code == 0
    summary = json.loads((model_dir / "train.json").read_text())
    assert summary["run"]["optimizer"]["name"] == "adamw"
    assert summary["removed"] == ["d3"]
    assert summary["data"]["index_examples"] == 15 and summary["data"]["retrieval_examples"] == 30
    assert [e["step"] for e in summary["evaluations"]] == [4, 8]
    assert set(summary["final"]) == {"val", "test"} and summary["final"]["test"]["queries"] == 16
    lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert {line["event"] for line in lines} == {"train", "eval"}

    from genir_jax.docids.tokens import docid_vocabulary
    from genir_jax.checkpoints.hf import load_pretrained

    model = load_pretrained(model_dir)
    assert sorted(docid_vocabulary(model.tokenizer).values()) == sorted(f"d{i}" for i in range(16))
    assert json.loads((model_dir / "docids.json").read_text()) == {"format": 1, "scheme": "atomic"}
    assert model.config.vocab_size == 32100 + 16

    # --resume of a finished run re-exports the same model without training.
    code = main(["train", "--data", str(prepared), "--base", str(base), "--preset", "tiny", "-o", str(model_dir),
                 "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4", "--no-progress",
                 "--optimizer", "adamw", "--remove", "d3", "--resume"])
    assert code == 0
    assert json.loads((model_dir / "train.json").read_text())["resumed_from"] == 8
    capsys.readouterr()

    # Resuming with other settings is refused, and names what differs (here the optimizer).
    code = main(["train", "--data", str(prepared), "--base", str(base), "--preset", "tiny", "-o", str(model_dir),
                 "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4", "--no-progress", "--remove", "d3",
                 "--resume"])
    assert code == 2
    err = capsys.readouterr().err
    assert "different spec" in err and "optimizer" in err
    # ... and so is resuming on other data (here: no document removed).
    code = main(["train", "--data", str(prepared), "--base", str(base), "--preset", "tiny", "-o", str(model_dir),
                 "--steps", "8", "--eval-every", "4", "--checkpoint-every", "4", "--no-progress",
                 "--optimizer", "adamw", "--resume"])
    assert code == 2
    assert "different fingerprint" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing-data", "missing-base", "unknown-remove", "not-empty", "bad-steps",
                                  "no-val"])
@pytest.mark.slow  # over 20 s on 2 cores: run by the full suite (.ci/run), not the quick one
def test_bad_input_exits_2_without_outputs(case, tmp_path, prepared, t5_tokenizer, capsys):
    base = make_base(tmp_path / "base", t5_tokenizer)
    out = tmp_path / "out"
    args = ["train", "--data", str(prepared), "--base", str(base), "--preset", "tiny", "-o", str(out),
            "--no-progress"]
    expected = None
    if case == "missing-data":
        args[2] = str(tmp_path / "nope")
        expected = "documents.json"
    elif case == "missing-base":
        args[4] = str(tmp_path / "nobase")
        expected = "nobase"
    elif case == "unknown-remove":
        args += ["--remove", "d1, d99"]
        expected = "d99"
    elif case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expected = "not empty"
    elif case == "bad-steps":
        args += ["--steps", "0"]
        expected = "steps"
    elif case == "no-val":
        os.remove(prepared / "val_queries.json")
        expected = "val queries"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and expected in err
    if case == "not-empty":
        assert os.listdir(out) == ["keep.txt"]
    else:
        assert not out.exists()


def test_pretrain_bad_tokenizer_exits_2(tmp_path, prepared, capsys):
    out = tmp_path / "base"
    assert main(["pretrain", "--data", str(prepared), "--preset", "tiny", "-o", str(out),
                 "--tokenizer", str(tmp_path / "missing-tokenizer"), "--no-progress"]) == 2
    assert "missing-tokenizer" in capsys.readouterr().err
    assert not out.exists()
