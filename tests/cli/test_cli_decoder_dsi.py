"""`genir-jax train --model-type decoder` and `genir-jax evaluate --model-type decoder` (atomic docids) end to
end on a tiny corpus with a random GPT-2 (atomic, naive and semantic docids), and the one-line refusals."""

from __future__ import annotations

import json
import os

import pytest

from genir_jax.cli.main import main
from tests.decoder_fixtures import save_decoder_base, train_tokenizer
from tests.training.test_training_cli import make_prepared

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


@pytest.mark.slow  # about a minute on 2 cores
@pytest.mark.parametrize("scheme", ["naive", "semantic"])
def test_train_then_evaluate_decoder_only_sequence_docids(tmp_path, capsys, scheme):
    """Naive / semantic docids (replaces the tests that pinned their refusal): training learns the docid token
    sequences, validation and evaluate decode them by beam search after the prompt, correct_valid.json holds
    the scheme's docid strings of queries whose relevant docid is first and greedily decoded."""
    from genir_jax.checkpoints.decoder_hf import load_decoder_only
    from genir_jax.data.prepare import load_prepared
    from genir_jax.docids.retrieval import read_trec_run
    from genir_jax.docids.schemes import docid_trie, read_scheme

    prepared = make_prepared(tmp_path / "prepared", documents=6)
    options = []
    if scheme == "semantic":
        mapping = {f"d{i}": f"{i % 2}_{i // 2}" for i in range(6)}
        (tmp_path / "semantic.json").write_text(json.dumps(mapping))
        options = ["--semantic-docid-mapping", str(tmp_path / "semantic.json")]
    base = _base(tmp_path, prepared)
    out = tmp_path / "dsi"
    code = main(["train", "--model-type", "decoder", "--data", str(prepared), "--base", str(base), "--preset",
                 "tiny", "-o", str(out), "--steps", "160", "--batch-size", "8", "--log-every", "20",
                 "--eval-every", "80", "--checkpoint-every", "80", "--no-progress", "--docids", scheme] + options)
    assert code == 0
    summary = json.loads((out / "train.json").read_text())
    assert summary["model_type"] == "decoder" and summary["docids"] == scheme
    assert summary["data"]["longest_docid_tokens"] >= 2
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["event"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0  # it learns
    recorded = read_scheme(out / "docids.json")
    assert recorded.name == scheme and sorted(recorded.docids) == [f"d{i}" for i in range(6)]
    model = load_decoder_only(out)
    assert model.config.vocab_size == load_decoder_only(base).config.vocab_size  # no docid tokens added

    evaluated = tmp_path / "eval"
    capsys.readouterr()
    code = main(["evaluate", "--model-type", "decoder", "--checkpoint", str(out), "--prepared", str(prepared),
                 "--max-length", "32", "--num-beams", "6", "-o", str(evaluated), "--json"])
    assert code == 0
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["metrics"]["queries"] == 6 and "after the prompt (decoder-only)" in metrics["ranking"]
    # validation (6 beams: one per document) decoded as evaluate does
    assert metrics["metrics"]["Hits@1"] == pytest.approx(summary["final"]["val"]["Hits@1"])
    run = read_trec_run(evaluated / "run.trec")
    assert len(run) == 6 and all(1 <= len(ranked) <= 6 for ranked in run.values())
    assert len(json.loads((evaluated / "correct_valid.json").read_text())) == metrics["correct_first"]

    # on the memorised training queries the relevant docid is first and greedily decoded
    memorised = tmp_path / "eval-train"
    assert main(["evaluate", "--model-type", "decoder", "--checkpoint", str(out), "--prepared", str(prepared),
                 "--split", "train", "--name", "valid", "--max-length", "32", "-o", str(memorised)]) == 0
    metrics = json.loads((memorised / "metrics.json").read_text())
    run = read_trec_run(memorised / "run.trec")
    correct = json.loads((memorised / "correct_valid.json").read_text())
    assert len(correct) == metrics["correct_first"] >= 6
    _, splits = load_prepared(prepared)
    relevant = {q.id: q.relevant_docs[0] for q in splits["train"]}
    for docid, query_id in correct:  # the scheme's docid string of a relevant document ranked first
        assert docid == recorded.text(relevant[query_id]) and run[query_id][0][0] == relevant[query_id]
    trie = docid_trie(recorded, model.tokenizer, list(recorded.docids), "test", decoder_only=True)
    assert all(seq[-1] == model.tokenizer.eos_token_id for seq in trie.docids)


def test_a_preset_without_decoder_settings_is_refused(tmp_path, capsys):
    prepared = make_prepared(tmp_path / "prepared", documents=4)
    assert main(["train", "--model-type", "decoder", "--data", str(prepared), "--base", str(tmp_path / "nowhere"),
                 "--preset", "t5-large", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--preset t5-large has no settings for decoder-only models (--model-type decoder); choose one of tiny, cpu" \
        in err


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
