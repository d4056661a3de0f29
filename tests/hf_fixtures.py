"""Build random-weight Hugging Face T5 checkpoints on the fly (test helper, needs torch)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

TINY = dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0)


def build_torch_t5(seed: int = 0, untied_lm_head: bool | None = None, **config: Any):
    """A randomly initialised `T5ForConditionalGeneration` (eval mode).

    transformers 5.x ties `lm_head` to `shared` even for `tie_word_embeddings=False` configs; real
    v1.1 / Flan-T5 checkpoints store a separate output layer, so one is created here explicitly.
    """
    import torch
    from transformers import MT5Config, MT5ForConditionalGeneration, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    settings = {**TINY, **config}
    model_type = settings.pop("model_type", "t5")
    config_cls, model_cls = (MT5Config, MT5ForConditionalGeneration) if model_type == "mt5" else (
        T5Config, T5ForConditionalGeneration)
    hf_config = config_cls(**settings)
    model = model_cls(hf_config).eval()
    if untied_lm_head is None:
        untied_lm_head = settings.get("tie_word_embeddings", True) is False
    if untied_lm_head:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    return model


class HFCheckpointFactory:
    """Writes checkpoints below a temp dir. Formats: safetensors, sharded, bin; config styles hf5 / hf4."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(root)

    def __call__(self, name: str = "ckpt", *, seed: int = 0, fmt: str = "safetensors", config_style: str = "hf5",
                 tokenizer=None, untied_lm_head: bool | None = None, nonfinite: dict[str, float] | None = None,
                 **config: Any):
        """`nonfinite`: {HF tensor name: value} written into the first element of each (a corrupt checkpoint)."""
        model = build_torch_t5(seed=seed, untied_lm_head=untied_lm_head, **config)
        if nonfinite:
            import torch

            state = model.state_dict()
            with torch.no_grad():
                for tensor_name, value in nonfinite.items():
                    state[tensor_name].view(-1)[0] = value
        directory = self.root / name
        if fmt == "safetensors":
            model.save_pretrained(directory)
        elif fmt == "sharded":
            model.save_pretrained(directory, max_shard_size="20KB")
        elif fmt == "bin":
            directory.mkdir(parents=True, exist_ok=True)
            model.config.save_pretrained(directory)
            import torch

            torch.save({k: v.clone() for k, v in model.state_dict().items()}, directory / "pytorch_model.bin")
        else:
            raise ValueError(fmt)
        if config_style == "hf4":
            # transformers 4.x / hub style: one `tie_word_embeddings` flag, no `scale_decoder_outputs`.
            path = directory / "config.json"
            data = json.loads(path.read_text())
            tied = config.get("tie_word_embeddings", True)
            data.pop("scale_decoder_outputs", None)
            data["tie_word_embeddings"] = tied
            path.write_text(json.dumps(data, indent=2))
        if tokenizer is not None:  # with spiece.model, as hub checkpoints have it
            from genir_jax.checkpoints.hf import save_tokenizer

            save_tokenizer(tokenizer, str(directory))
        return directory, model


def poison_safetensors(directory, name: str, value: float, index: int = 0) -> None:
    """Write `value` (NaN, inf) into element `index` of tensor `name` of a saved ``model.safetensors``."""
    from safetensors.numpy import load_file, save_file

    path = pathlib.Path(directory) / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name].reshape(-1)[index % tensors[name].size] = value
    save_file(tensors, str(path), metadata={"format": "pt"})


def torch_logits(model, input_ids, attention_mask, decoder_input_ids, dtype=None) -> np.ndarray:
    """Logits of a transformers PyTorch T5 as float32 numpy."""
    import torch

    if dtype is not None:
        model = model.to(dtype)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
            attention_mask=torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
            decoder_input_ids=torch.as_tensor(np.asarray(decoder_input_ids), dtype=torch.long),
        ).logits
    return out.float().numpy()


def padded_batch(vocab_size: int, lengths: list[int], max_length: int | None = None, seed: int = 0,
                 decoder_steps: int = 1):
    """Random token ids (right-padded with 0) for sequences of the given lengths, their mask and
    decoder inputs starting with the T5 start token 0."""
    rng = np.random.default_rng(seed)
    max_length = max_length or max(lengths)
    ids = np.zeros((len(lengths), max_length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(2, vocab_size, size=length)
        ids[row, length - 1] = 1  # </s>
        mask[row, :length] = 1
    decoder = rng.integers(2, vocab_size, size=(len(lengths), decoder_steps))
    decoder[:, 0] = 0
    return ids, mask, decoder
