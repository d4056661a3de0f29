"""Bounded resources (query length, config sizes) and inputs that used to be accepted silently (a pair listed
twice in correct_valid.json, overlapping stages, booleans as circuit stages): exit 2 naming file, record and
field, before any computation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from genir_jax.analysis.circuit import circuit_from_json
from genir_jax.analysis.inputs import (MAX_QUERY_TOKENS, encode_queries, read_correct_valid, reference_padded_groups,
                                       reference_padding_length, tokenize_for_analysis)
from genir_jax.analysis.stage_patching import parse_stages
from genir_jax.cli.main import main
from genir_jax.core.config import MAX_PARAMETERS, MAX_SIZES, T5Config
from genir_jax.base.errors import ConfigError, DataError, GenIRError
from tests.conftest import REPO_ROOT


class _WordTokenizer:
    """One token per word, id = 2 + word length (a stand-in with the interface the analyses use)."""

    pad_token_id, eos_token_id = 0, 1

    def tokenize(self, text):
        return text.split()

    def __call__(self, text):
        class Encoded:
            input_ids = [2 + len(word) for word in text.split()] + [1]
        return Encoded()


def test_a_very_long_query_is_truncated_to_the_bound(capsys):
    tokenizer = _WordTokenizer()
    texts = ["short query", " ".join(["word"] * 50_000)]
    encoded = encode_queries(tokenizer, texts)
    assert [len(e) for e in encoded] == [3, MAX_QUERY_TOKENS]
    assert encoded[1][-1] == tokenizer.eos_token_id and encoded[1][:-1] == [6] * (MAX_QUERY_TOKENS - 1)
    assert "1 query longer than 512 tokens truncated" in capsys.readouterr().err
    ids, mask = tokenize_for_analysis(tokenizer, texts)
    assert ids.shape == (2, MAX_QUERY_TOKENS) and mask.sum() == 3 + MAX_QUERY_TOKENS
    ids, mask = tokenize_for_analysis(tokenizer, texts, reference_padding=True)
    assert ids.shape == (2, MAX_QUERY_TOKENS) and mask.all()
    assert reference_padding_length(tokenizer, texts) == MAX_QUERY_TOKENS
    groups = reference_padded_groups(tokenizer, texts, MAX_QUERY_TOKENS)
    assert [g[1].shape for g in groups] == [(2, MAX_QUERY_TOKENS)]
    # within the bound nothing changes
    exact = " ".join(["w"] * (MAX_QUERY_TOKENS - 1))
    assert encode_queries(tokenizer, [exact])[0] == [3] * (MAX_QUERY_TOKENS - 1) + [1]



def _long_text(shared_data, words: int) -> str:
    """Natural words (SQuAD contexts, punctuation and all) repeated to `words` words."""
    data = json.loads((shared_data / "squad-v1.1-dev" / "dev-v1.1.json").read_text(encoding="utf-8"))
    pool = " ".join(paragraph["context"] for paragraph in data["data"][0]["paragraphs"]).split()
    return " ".join(pool[i % len(pool)] for i in range(words))


def test_clipping_before_tokenising_keeps_the_first_tokens(shared_data):
    """A text cut by `clip_text` tokenises, truncated, to exactly the tokens of the whole text truncated
    (natural text, at the data path's 32 tokens and the analyses' 512); the cut ends between words."""
    from genir_jax.checkpoints.tokenizer import CHARS_PER_TOKEN, clip_text, load_tokenizer
    from genir_jax.data.dsi import tokenize_queries

    tokenizer = load_tokenizer(shared_data / "t5-tokenizer")
    text = _long_text(shared_data, 8000)
    for max_tokens in (32, MAX_QUERY_TOKENS):
        clipped = clip_text(text, max_tokens)
        assert len(clipped) <= max_tokens * CHARS_PER_TOKEN < len(text) and text.startswith(clipped)
        assert text[len(clipped)].isspace()
        whole = tokenizer([text], max_length=max_tokens, truncation=True)["input_ids"][0]
        assert tokenizer([clipped], max_length=max_tokens, truncation=True)["input_ids"][0] == whole
    ids, _ = tokenize_queries([text], tokenizer, 32, progress=False)
    assert ids[0].tolist() == tokenizer([text], max_length=32, truncation=True)["input_ids"][0]
    whole = tokenizer(text).input_ids
    assert encode_queries(tokenizer, [text])[0] == whole[:MAX_QUERY_TOKENS - 1] + [tokenizer.eos_token_id]
    assert clip_text("a short query", 2) == "a short query"
    assert clip_text("x" * 200, 2) == "x" * 128  # one huge word: cut inside it, nothing else to keep
    assert clip_text("ab " * 100, 1) == ("ab " * 100)[:62]  # 64 characters end inside a word: cut before it


def test_a_length_limit_beyond_the_token_bound_is_refused_before_padding(shared_data):
    """Rows are padded to the length limit (the reference's padding), so a huge limit is refused at once."""
    from genir_jax.checkpoints.tokenizer import load_tokenizer
    from genir_jax.data.dsi import tokenize_queries

    tokenizer = load_tokenizer(shared_data / "t5-tokenizer")
    with pytest.raises(GenIRError, match=r"max_length must be an integer in 2\.\.8192 .*got 10000000"):
        tokenize_queries(["a query"], tokenizer, 10_000_000, pad_to_max_length=True, progress=False)
    ids, _ = tokenize_queries(["a query"], tokenizer, 8192, pad_to_max_length=True, progress=False)
    assert ids.shape == (1, 8192)


def test_a_two_million_word_query_tokenises_in_bounded_memory_and_time(shared_data):
    """2,000,000 words (10 MB of text) as a query: the training and evaluation path (`tokenize_queries`), the
    analyses' path (`tokenize_for_analysis`, both paddings) and the reference padding length stay within
    200 MB of peak memory and a few seconds (tokenising it whole took 2.3 GB), in a fresh process so the
    peak is this work's."""
    script = f"""
import json, resource, sys, time
from genir_jax.checkpoints.tokenizer import load_tokenizer
from genir_jax.data.dsi import tokenize_queries
from genir_jax.analysis.inputs import reference_padding_length, tokenize_for_analysis
tokenizer = load_tokenizer({str(shared_data / "t5-tokenizer")!r})
tokenize_queries(["warm up"], tokenizer, 32, progress=False); tokenize_for_analysis(tokenizer, ["warm up"])
huge = " ".join(["word"] * 2_000_000)
before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
ids, _ = tokenize_queries([huge, "short"], tokenizer, 32, progress=False)
analysis, _ = tokenize_for_analysis(tokenizer, [huge])
padded, _ = tokenize_for_analysis(tokenizer, [huge, "short"], reference_padding=True)
length = reference_padding_length(tokenizer, [huge])
seconds = time.monotonic() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({{"shapes": [ids.shape, analysis.shape, padded.shape], "length": length,
                  "megabytes": grown, "seconds": seconds}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shapes"] == [[2, 32], [1, MAX_QUERY_TOKENS], [2, MAX_QUERY_TOKENS]]
    assert result["length"] == MAX_QUERY_TOKENS
    assert result["megabytes"] < 200, result
    assert result["seconds"] < 10, result


@pytest.mark.parametrize("field", sorted(k for k in MAX_SIZES if k != "num_heads*d_kv"))
def test_config_fields_beyond_their_bound_are_refused(field):
    base = T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    data = base.to_hf_dict()
    data[field] = MAX_SIZES[field] + 1
    with pytest.raises(ConfigError, match=f"field '{field}' = {MAX_SIZES[field] + 1} exceeds"):
        T5Config.from_hf_dict(data, source="cfg.json")
    data[field] = MAX_SIZES[field] if field != "vocab_size" else 100  # at the bound: accepted (small otherwise)
    if field not in ("d_model", "d_ff", "vocab_size"):
        T5Config.from_hf_dict(data, source="cfg.json")


def test_config_parameter_bound():
    big = dict(vocab_size=32128, d_model=8192, d_kv=128, d_ff=131072, num_heads=64, num_layers=48)
    with pytest.raises(ConfigError, match="implies about"):
        T5Config(**big)
    assert T5Config(vocab_size=32128, d_model=1024, d_kv=128, d_ff=65536, num_layers=24,
                    num_heads=128).approx_parameter_count() < MAX_PARAMETERS  # t5-11b's shape is fine


def test_inspect_refuses_an_absurd_config_before_enumerating(tmp_path, capsys):
    data = T5Config(vocab_size=100, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2).to_hf_dict()
    data["num_layers"] = 10_000_000
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert main(["inspect", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "num_layers" in err and "10000000" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------------
# Silent acceptance
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pairs, message", [
    ([["@DOC_ID_a@", 1], ["@DOC_ID_b@", 2], ["@DOC_ID_a@", "1"]],
     "record index 2: the pair ['@DOC_ID_a@', '1'] is listed twice (first at record index 0)"),
    ([["@DOC_ID_a@", True]], "record index 0: field 1 (query_id) must be a string or an integer"),
    ([["@DOC_ID_a@", 1.5]], "record index 0: field 1 (query_id) must be a string or an integer"),
    ([["@DOC_ID_a@", " "]], "record index 0: field 1 (query_id) is empty"),
])
def test_correct_valid_problems_name_the_record(tmp_path, pairs, message):
    path = tmp_path / "correct.json"
    path.write_text(json.dumps(pairs))
    with pytest.raises(DataError) as info:
        read_correct_valid(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_a_query_correct_for_two_documents_is_not_a_duplicate(tmp_path):
    path = tmp_path / "correct.json"
    path.write_text(json.dumps([["@DOC_ID_a@", 1], ["@DOC_ID_b@", 1]]))
    assert read_correct_valid(path) == [("@DOC_ID_a@", "1"), ("@DOC_ID_b@", "1")]


@pytest.mark.parametrize("spec, message", [("0-3,2-5", "'2-5' overlaps an earlier stage (layer(s) [2, 3])"),
                                           ("0-2,2", "'2' overlaps"), ("1,1", "'1' overlaps")])
def test_overlapping_stages_are_refused(spec, message):
    with pytest.raises(GenIRError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        parse_stages(spec, 6)
    assert parse_stages("0-1,2-3,4-5", 6) == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("stages", [[True], [False, 1], [0, 0], [0.0], ["0"]])
def test_circuit_stage_numbers_must_be_integers_once(stages):
    data = {"patches": [{"component": "attn", "stages": stages, "mode": "zero"}]}
    with pytest.raises(DataError, match=r"c.json: patches\[0\]: field 'stages'"):
        circuit_from_json(data, "c.json", 3)
    assert circuit_from_json({"patches": [{"component": "attn", "stages": [0, 2], "mode": "zero"}]}, "c.json",
                             3).patches[0].stages == (0, 2)
