"""Random-weight transformers causal LMs (GPT-2, Llama, Qwen2) saved as checkpoints (test helper, needs torch)."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

TINY = {
    "gpt2": dict(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
    "llama": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, rope_theta=500.0, max_position_embeddings=64, tie_word_embeddings=False),
    "qwen2": dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=True),
}


def build_torch_causal_lm(kind: str, seed: int = 0, **overrides: Any):
    """A transformers causal LM of `kind` (eval mode, eager attention) whose every weight is random: biases and
    norm scales too (transformers initialises them to 0 and 1, which would leave them untested)."""
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    config_cls, model_cls = {"gpt2": (GPT2Config, GPT2LMHeadModel), "llama": (LlamaConfig, LlamaForCausalLM),
                             "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY[kind], **overrides})
    config._attn_implementation = "eager"  # the plain softmax(QK^T)V path, no fused kernel
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif param.ndim == 1:  # norm scales
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


def save_causal_lm(model, directory: pathlib.Path, fmt: str = "safetensors") -> pathlib.Path:
    """`save_pretrained` as one safetensors file or (``fmt="sharded"``) shards with an index."""
    if fmt == "sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
    else:
        model.save_pretrained(directory)
    return pathlib.Path(directory)


def torch_causal_logits(model, input_ids, attention_mask, position_ids=None) -> np.ndarray:
    """Logits of a transformers causal LM as float32 numpy (position_ids None: what transformers derives)."""
    import torch

    kwargs = {} if position_ids is None else {"position_ids": torch.as_tensor(np.array(position_ids), dtype=torch.long)}
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
                    attention_mask=torch.as_tensor(np.asarray(attention_mask), dtype=torch.long), **kwargs).logits
    return out.float().numpy()


def padded_causal_batch(vocab_size: int, lengths: list[int], side: str, seed: int = 0):
    """Random token ids of the given lengths, padded (with 0) on `side` ("left" / "right"), and their mask."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        span = slice(width - length, width) if side == "left" else slice(0, length)
        ids[row, span] = rng.integers(1, vocab_size, size=length)
        mask[row, span] = 1
    return ids, mask


def train_tokenizer(texts, *, bos: bool = False, vocab_size: int = 1000):
    """A byte-level BPE tokenizer (GPT-2's kind) trained on `texts`, as a transformers fast tokenizer with EOS
    ``<|endoftext|>``; ``bos=True`` makes it put ``<s>`` before every text, as Llama's does."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    trained = ByteLevelBPETokenizer()
    trained.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=1,
                                special_tokens=["<|endoftext|>", "<s>"])
    if bos:
        trained.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    options = {"bos_token": "<s>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=trained._tokenizer, eos_token="<|endoftext|>", **options)


def save_decoder_base(directory: pathlib.Path, kind: str, tokenizer, seed: int = 0) -> pathlib.Path:
    """A random transformers causal LM of `kind` sized to `tokenizer` (128 positions), saved with it."""
    positions = {"n_positions": 128} if kind == "gpt2" else {"max_position_embeddings": 128}
    specials = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = build_torch_causal_lm(kind, seed=seed, vocab_size=len(tokenizer), **positions, **specials)
    save_causal_lm(model, directory)
    tokenizer.save_pretrained(directory)
    return pathlib.Path(directory)
