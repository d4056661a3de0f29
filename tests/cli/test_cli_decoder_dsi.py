"""`genir-jax train --model-type decoder` and `genir-jax evaluate --model-type decoder` (atomic docids) end to
end on a tiny corpus with a random GPT-2, and the one-line refusal of naive / semantic docids."""

from __future__ import annotations

import json
import os

import pytest

from genir_jax.cli.main import main
from tests.decoder_fixtures import save_decoder_base, train_tokenizer
from tests.training.test_training_cli import make_prepared

ATOMIC_ONLY = "only atomic docids are supported for decoder-only models so far (--model-type decoder)"


def _base(tmp_path, prepared, kind="gpt2"):
    from genir_jax.data.prepare import load_prepared

    documents, splits = load_prepared(prepared)
    texts = [d.text for d in documents] + [q.text for q in splits["train"]]
    return save_decoder_base(tmp_path / "base", kind, train_tokenizer(texts, bos=kind == "llama"))


@pytest.mark.slow  # about a minute on 2 cores
def test_train_then_evaluate_a_decoder_only_dsi_model(tmp_path, capsys):
    from genir_jax.checkpoints.decoder_hf import load_decoder_only
    from genir_jax.docids.tokens import docid_vocabulary

    prepared = make_prepared(tmp_path / "prepared", documents=8)
    base = _base(tmp_path, prepared)
    out = tmp_path / "dsi"
    code = main(["train", "--model-type", "decoder", "--data", str(prepared), "--base", str(base), "--preset",
                 "tiny", "-o", str(out), "--steps", "40", "--batch-size", "8", "--log-every", "5",
                 "--eval-every", "20", "--checkpoint-every", "20", "--no-progress"])
    assert code == 0
    summary = json.loads((out / "train.json").read_text())
    assert summary["model_type"] == "decoder" and summary["docids"] == "atomic"
    assert summary["data"]["index_examples"] == 8 and summary["data"]["retrieval_examples"] == 16
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0  # it learns (6.4 -> 3.2 when written)
    model = load_decoder_only(out)  # an HF decoder-only checkpoint with the docid tokens
    assert sorted(docid_vocabulary(model.tokenizer).values()) == [f"d{i}" for i in range(8)]
    assert json.loads((out / "docids.json").read_text())["scheme"] == "atomic"

    evaluated = tmp_path / "eval"
    capsys.readouterr()
    code = main(["evaluate", "--model-type", "decoder", "--checkpoint", str(out), "--prepared", str(prepared),
                 "--max-length", "32", "-o", str(evaluated), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["metrics"]["queries"] == 8 and printed["Hits@1"] == metrics["metrics"]["Hits@1"]
    assert metrics["metrics"]["Hits@1"] == pytest.approx(summary["final"]["val"]["Hits@1"])
    correct = json.loads((evaluated / "correct_valid.json").read_text())
    assert len(correct) == metrics["correct_first"]
    assert {"run.trec", "metrics.json", "correct_valid.json"} <= set(os.listdir(evaluated))


def test_naive_and_semantic_docids_are_refused_for_decoder_models(tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prepared", documents=4)
    runs = [["train", "--model-type", "decoder", "--data", str(prepared), "--base", str(tmp_path / "nowhere"),
             "--preset", "tiny", "-o", str(tmp_path / "out"), "--docids", "naive"],
            ["evaluate", "--model-type", "decoder", "--checkpoint", str(tmp_path / "nowhere"), "--prepared",
             str(prepared), "-o", str(tmp_path / "eval"), "--docids", "semantic"]]
    for argv in runs:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ATOMIC_ONLY in err
        assert not (tmp_path / "out").exists() and not (tmp_path / "eval").exists()


def test_a_prepared_naive_corpus_is_refused_for_decoder_models(tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prepared", documents=4)
    (prepared / "prepare.json").write_text(json.dumps({"docids": {"scheme": "naive"}}))  # prepared for naive docids
    base = _base(tmp_path, prepared)
    assert main(["train", "--model-type", "decoder", "--data", str(prepared), "--base", str(base), "--preset",
                 "tiny", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "naive docids: " + ATOMIC_ONLY in err


def test_a_preset_without_decoder_settings_is_refused(tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prepared", documents=4)
    assert main(["train", "--model-type", "decoder", "--data", str(prepared), "--base", str(tmp_path / "nowhere"),
                 "--preset", "cpu", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--preset cpu has no settings for decoder-only models (--model-type decoder); choose one of tiny" in err


def test_a_checkpoint_of_the_other_family_names_model_type(tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prepared", documents=4)
    base = _base(tmp_path, prepared)
    assert main(["train", "--data", str(prepared), "--base", str(base), "--preset", "tiny",
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_type 'gpt2' is a decoder-only model; give --model-type decoder" in err
    (base / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert main(["evaluate", "--model-type", "decoder", "--checkpoint", str(base), "--prepared", str(prepared),
                 "-o", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_type 't5' is not a decoder-only model" in err
    assert "drop --model-type decoder" in err


def test_reference_mode_is_refused_for_decoder_models(tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prepared", documents=4)
    assert main(["evaluate", "--model-type", "decoder", "--reference-mode", "--checkpoint", str(tmp_path / "nowhere"),
                 "--prepared", str(prepared), "-o", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--reference-mode reproduces the reference's T5 evaluation" in err
