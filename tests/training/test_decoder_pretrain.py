"""`genir-jax pretrain --model-type decoder`: a fresh Llama-style decoder-only model pre-trained as a causal LM on
the corpus with the T5 vocabulary, exported so that transformers loads it with the same logits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from genir_jax.cli.main import main
from genir_jax.training.pretrain import causal_lm_batch
from tests.decoder_fixtures import torch_causal_logits
from tests.training.test_training_cli import make_prepared


def test_causal_lm_batch_scores_each_next_real_token():
    chunks = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], np.int32)
    batch = causal_lm_batch(chunks, np.array([4, 2]))
    np.testing.assert_array_equal(batch["attention_mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["targets"][:, :3], chunks[:, 1:])
    np.testing.assert_array_equal(batch["target_mask"], [[1, 1, 1, 0], [1, 0, 0, 0]])


def _pretrain(prepared, out, shared_data, *extra):
    return main(["pretrain", "--model-type", "decoder", "--data", str(prepared), "--preset", "tiny", "-o", str(out),
                 "--tokenizer", str(shared_data / "t5-tokenizer"), "--no-progress", *extra])


def test_pretrained_decoder_learns_and_transformers_loads_it(tmp_path, shared_data):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from genir_jax.checkpoints.decoder_hf import load_decoder_only
    from genir_jax.core import decoder_only

    prepared = make_prepared(tmp_path / "prepared", documents=8)
    out = tmp_path / "base"
    assert _pretrain(prepared, out, shared_data, "--steps", "30", "--eval-every", "30", "--log-every", "5") == 0
    summary = json.loads((out / "pretrain.json").read_text())
    assert summary["objective"] == "causal language modelling" and summary["data"]["texts"] == 8 + 16
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    assert losses[-1] < 0.7 * losses[0]  # from about ln(32128) = 10.4
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 2, 32128)

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ids = np.array([tokenizer("The apple is the subject of paragraph 0.")["input_ids"]], np.int32)
    ours = load_decoder_only(out)
    expected = torch_causal_logits(model, ids, np.ones_like(ids))
    got = np.asarray(decoder_only.forward(ours.config, ours.params, ids, np.ones_like(ids)))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert summary["best"]["val_loss"] < losses[0]  # held-out rows too


@pytest.mark.slow  # about a minute on 2 cores: two short pre-training runs
def test_resumed_decoder_pretraining_equals_an_uninterrupted_run(tmp_path, shared_data):
    import shutil

    from safetensors.numpy import load_file

    prepared = make_prepared(tmp_path / "prepared", documents=6)
    flags = ("--steps", "8", "--eval-every", "4", "--checkpoint-every", "4")
    for name in ("whole", "resumed"):
        assert _pretrain(prepared, tmp_path / name, shared_data, *flags) == 0
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")  # as if killed between steps 4 and 8
    (tmp_path / "resumed" / "model.safetensors").unlink()
    assert _pretrain(prepared, tmp_path / "resumed", shared_data, *flags, "--resume") == 0
    assert json.loads((tmp_path / "resumed" / "pretrain.json").read_text())["resumed_from"] == 4
    whole, again = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("whole", "resumed"))
    assert whole.keys() == again.keys()
    for key in whole:
        np.testing.assert_array_equal(again[key], whole[key])


def test_a_preset_without_a_decoder_shape_is_refused(tmp_path, capsys, shared_data):
    prepared = make_prepared(tmp_path / "prepared", documents=4)
    assert main(["pretrain", "--model-type", "decoder", "--data", str(prepared), "--preset", "t5-large",
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--preset t5-large cannot pre-train a decoder-only model (--model-type decoder); choose one of tiny, cpu" \
        in err
    assert not (tmp_path / "out" / "checkpoints").exists()


@pytest.mark.slow  # about 2-3 minutes on 2 cores: pretrain, train and evaluate
def test_pretrain_then_train_then_evaluate_a_decoder_only_model(tmp_path, shared_data, capsys):
    prepared = make_prepared(tmp_path / "prepared", documents=8)
    base = tmp_path / "base"
    assert _pretrain(prepared, base, shared_data, "--steps", "20", "--eval-every", "20") == 0
    dsi = tmp_path / "dsi"
    assert main(["train", "--model-type", "decoder", "--data", str(prepared), "--base", str(base), "--preset", "tiny",
                 "-o", str(dsi), "--steps", "40", "--eval-every", "40", "--checkpoint-every", "40",
                 "--no-progress"]) == 0
    summary = json.loads((dsi / "train.json").read_text())
    assert summary["data"]["index_examples"] == 8 and summary["data"]["retrieval_examples"] == 16
    assert summary["final"]["val"]["queries"] == 8
    assert main(["evaluate", "--model-type", "decoder", "--checkpoint", str(dsi), "--prepared", str(prepared),
                 "-o", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    # evaluate ranks as the training's validation did, and 40 steps on 8 documents beat chance (1/8)
    assert metrics == pytest.approx(summary["final"]["val"])
    assert metrics["Hits@1"] > 1 / 8
