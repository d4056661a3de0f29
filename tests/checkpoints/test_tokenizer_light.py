"""The analyses' light tokenizer path: `load_tokenizer` reads tokenizer.json once (tokenizers only, no Python
JSON pass, no transformers import) and gives exactly transformers' T5TokenizerFast ids, special tokens and
added docid tokens; where it cannot be equivalent it falls back to transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import genir_jax as gj
from genir_jax.base.errors import CheckpointError
from genir_jax.checkpoints.tokenizer import T5FastTokenizer, fast_tokenizer_supported, load_tokenizer

DOC_IDS = ["0", "17", "d3", "doc-42", "x_y"]
TEXTS = ["who wrote the iliad ?", "  two  spaces\tand a tab", "café ½ \ufb01", "<extra_id_3> and </s> inside",
         "@DOC_ID_17@ then @DOC_ID_doc-42@.", "@DOC_ID_unknown@", "", "日本語"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def dsi_checkpoint(tmp_path_factory, t5_tokenizer):
    """A DSI checkpoint as `genir-jax train` saves it: the shared T5 vocabulary plus added docid tokens."""
    from tests.hf_fixtures import HFCheckpointFactory

    root = tmp_path_factory.mktemp("lighttok")
    directory, _ = HFCheckpointFactory(root)("base", tokenizer=t5_tokenizer, vocab_size=32128, d_model=8, d_kv=4,
                                             d_ff=16, num_layers=1, num_heads=2)
    gj.save_pretrained(root / "dsi", gj.add_docid_tokens(gj.load_pretrained(directory), DOC_IDS))
    return root / "dsi"


def _questions(shared_data, count: int) -> list[str]:
    data = json.loads((shared_data / "squad-v1.1-dev" / "dev-v1.1.json").read_text(encoding="utf-8"))
    return [qa["question"] for article in data["data"] for paragraph in article["paragraphs"]
            for qa in paragraph["qas"]][:count]


@pytest.mark.parametrize("which", ["shared", "dsi"])
def test_light_tokenizer_equals_transformers_fast(which, shared_data, dsi_checkpoint):
    from transformers import AutoTokenizer, T5TokenizerFast

    directory = shared_data / "t5-tokenizer" if which == "shared" else dsi_checkpoint
    light, reference = load_tokenizer(directory), AutoTokenizer.from_pretrained(str(directory))
    assert isinstance(light, T5FastTokenizer) and isinstance(reference, T5TokenizerFast)
    assert len(light) == len(reference) and light.get_vocab() == reference.get_vocab()
    assert light.vocab_size == reference.vocab_size
    assert light.all_special_ids == sorted(reference.all_special_ids)
    for name in ("pad", "eos", "unk"):
        assert getattr(light, f"{name}_token") == getattr(reference, f"{name}_token")
        assert getattr(light, f"{name}_token_id") == getattr(reference, f"{name}_token_id")
    texts = _questions(shared_data, 2000) + TEXTS
    assert light(texts).input_ids == reference(texts).input_ids
    ours, theirs = light(texts, padding=True, return_tensors="np"), reference(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours.input_ids, theirs.input_ids)
    np.testing.assert_array_equal(ours.attention_mask, theirs.attention_mask)
    added = list(range(reference.vocab_size, len(reference)))
    assert light.convert_ids_to_tokens(added) == reference.convert_ids_to_tokens(added)
    assert [light.decode([i]) for i in added] == [reference.decode([i]) for i in added]
    if which == "dsi":  # the docid tokens: one id each, after the base vocabulary, as transformers adds them
        tokens = [gj.docid_token(d) for d in DOC_IDS]
        assert light.convert_tokens_to_ids(tokens) == reference.convert_tokens_to_ids(tokens)
        assert [light.tokenize(t) for t in tokens] == [reference.tokenize(t) for t in tokens] == [[t] for t in tokens]
        np.testing.assert_array_equal(gj.docid_token_ids(light, DOC_IDS), gj.docid_token_ids(reference, DOC_IDS))


def test_loading_for_analysis_does_not_import_transformers(dsi_checkpoint):
    code = ("import sys\nfrom genir_jax.checkpoints.hf import load_for_analysis\n"
            f"model = load_for_analysis({str(dsi_checkpoint)!r})\n"
            "ids = model.tokenizer(['who wrote it', '@DOC_ID_17@'], padding=True, return_tensors='np').input_ids\n"
            "print(type(model.tokenizer).__name__, ids.tolist(), 'transformers' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    name, rest = result.stdout.strip().split(" ", 1)
    assert name == "T5FastTokenizer"
    assert rest.endswith("False"), result.stdout  # transformers was never imported


def test_one_read_decides_and_builds(tmp_path, shared_data, monkeypatch):
    """load_tokenizer parses tokenizer.json once (tokenizers' own reader) and uses it both to check the model
    type and to build the tokenizer; a file tokenizers cannot read is a CheckpointError naming it."""
    from tokenizers import Tokenizer

    source = shared_data / "t5-tokenizer"
    reads = []
    original = Tokenizer.from_file
    monkeypatch.setattr(Tokenizer, "from_file", staticmethod(lambda path: reads.append(path) or original(path)))
    assert isinstance(load_tokenizer(source), T5FastTokenizer)
    assert reads == [os.path.join(str(source), "tokenizer.json")]
    monkeypatch.undo()

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).write_bytes((source / name).read_bytes())
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: not a readable tokenizers file"):
        load_tokenizer(broken)


def test_other_model_types_fall_back_to_transformers(tmp_path, shared_data):
    """A tokenizer.json that is not a Unigram model (here a word-level one under a T5 class name) is not
    rebuilt as T5's pipeline: transformers' tokenizer is returned."""
    from tokenizers import Tokenizer, models

    source = shared_data / "t5-tokenizer"
    directory = tmp_path / "wordlevel"
    directory.mkdir()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "hello": 3}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_bytes((source / "tokenizer_config.json").read_bytes())
    assert not fast_tokenizer_supported(directory)
    try:
        tokenizer = load_tokenizer(directory)
    except CheckpointError:
        return  # transformers refused the odd file itself: also not our light tokenizer
    assert not isinstance(tokenizer, T5FastTokenizer)
