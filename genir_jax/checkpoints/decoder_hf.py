"""Hugging Face decoder-only checkpoints (GPT-2, Llama, Qwen2) <-> our parameter pytree, in both directions.

Reads a directory with `config.json` and the weights in any form `genir_jax.checkpoints.weights.WeightFiles`
reads (`model.safetensors`, sharded safetensors with `model.safetensors.index.json`, `pytorch_model.bin`);
writes one that transformers' `AutoModelForCausalLM.from_pretrained` loads with the same logits.

`decoder_tensor_specs` is the one table of the Hugging Face names and layouts:

- GPT-2 (`GPT2LMHeadModel`): `transformer.wte` / `wpe`, per layer `ln_1`, `attn.c_attn` (q, k and v fused
  along the output axis; Conv1D weights are stored input-major, [in, out], the transpose of a Linear),
  `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`, then `ln_f`. The fused c_attn is read as three virtual
  tensors ``...c_attn.weight[q]`` etc. (`_FusedQKV`) and written back fused. Checkpoints saved from
  `GPT2Model` (no ``transformer.`` prefix, as the original `gpt2` hub weights) load too.
- Llama / Qwen2 (`LlamaForCausalLM`, `Qwen2ForCausalLM`): `model.embed_tokens`, per layer
  `input_layernorm`, `self_attn.{q,k,v,o}_proj` (Linear, [out, in]; q/k/v biases for Qwen2 or
  `attention_bias`), `post_attention_layernorm`, `mlp.{gate,up,down}_proj`, then `model.norm` and `lm_head`.

Every tensor is checked against the shape the config implies and refused, naming the file and tensor, if it
holds a NaN or an infinity (`genir_jax.checkpoints.weights.assemble_params`, as for T5).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable

import numpy as np

from genir_jax.base.errors import CheckpointError, ConfigError
from genir_jax.checkpoints.hf import load_tokenizer_from, resolve_checkpoint_dir
from genir_jax.checkpoints.weights import (
    CONFIG_NAME, TensorSpec, WeightFiles, assemble_params, dtype_name, identity, tensors_from_specs, transpose,
    write_checkpoint,
)
from genir_jax.core.decoder_config import DecoderConfig

_QKV = ("q", "k", "v")
# Buffers older checkpoints store and transformers re-creates: accepted and dropped on load.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


@dataclasses.dataclass
class PretrainedDecoder:
    """A loaded decoder-only model: its `config`, `params` (plain pytree), `tokenizer` (or None) and `path`."""

    config: DecoderConfig
    params: dict
    tokenizer: Any = None
    path: str | None = None

    def replace(self, **changes: Any) -> "PretrainedDecoder":
        return dataclasses.replace(self, **changes)


def _fused(name: str, part: str) -> str:
    return f"{name}[{part}]"


def decoder_tensor_specs(config: DecoderConfig) -> list[TensorSpec]:
    """Every tensor of the transformers causal LM with this config, in a fixed order (GPT-2's fused
    ``c_attn`` as its three virtual parts)."""
    d, h, g, k, f, v = (config.d_model, config.num_heads, config.num_kv_heads, config.d_kv, config.d_ff,
                        config.vocab_size)

    def spec(hf_name, hf_shape, path, layer=None, to_ours=identity, to_hf=identity, layout="identity"):
        return TensorSpec(hf_name, tuple(hf_shape), tuple(path), layer, to_ours, to_hf, layout)

    def heads_in(heads):  # Linear [heads*K, D] -> ours [D, heads, K]
        return lambda x: np.ascontiguousarray(x.T.reshape(d, heads, k))

    def heads_out(heads):
        return lambda x: np.ascontiguousarray(x.reshape(d, heads * k).T)

    def reshaped(shape):
        return lambda x: np.ascontiguousarray(x.reshape(shape))

    def norm(hf_prefix, ours, layer=None):
        path = ("layers", ours) if layer is not None else (ours,)
        out = [spec(f"{hf_prefix}.weight", (d,), path + ("scale",), layer)]
        if config.is_gpt2:
            out.append(spec(f"{hf_prefix}.bias", (d,), path + ("bias",), layer))
        return out

    specs: list[TensorSpec] = []
    if config.is_gpt2:
        specs += [spec("transformer.wte.weight", (v, d), ("embed",)),
                  spec("transformer.wpe.weight", (config.max_position_embeddings, d), ("pos_embed",))]
        for layer in range(config.num_layers):
            p = f"transformer.h.{layer}"
            specs += norm(f"{p}.ln_1", "attn_norm", layer)
            for part, ours in zip(_QKV, ("query", "key", "value")):  # Conv1D: x @ W, W [D, 3 * H * K]
                specs.append(spec(_fused(f"{p}.attn.c_attn.weight", part), (d, h * k), ("layers", "attn", ours),
                                  layer, reshaped((d, h, k)), reshaped((d, h * k))))
                specs.append(spec(_fused(f"{p}.attn.c_attn.bias", part), (h * k,), ("layers", "attn", f"{ours}_bias"),
                                  layer, reshaped((h, k)), reshaped((h * k,))))
            specs += [spec(f"{p}.attn.c_proj.weight", (h * k, d), ("layers", "attn", "out"), layer,
                           reshaped((h, k, d)), reshaped((h * k, d))),
                      spec(f"{p}.attn.c_proj.bias", (d,), ("layers", "attn", "out_bias"), layer)]
            specs += norm(f"{p}.ln_2", "mlp_norm", layer)
            specs += [spec(f"{p}.mlp.c_fc.weight", (d, f), ("layers", "mlp", "wi"), layer),
                      spec(f"{p}.mlp.c_fc.bias", (f,), ("layers", "mlp", "wi_bias"), layer),
                      spec(f"{p}.mlp.c_proj.weight", (f, d), ("layers", "mlp", "wo"), layer),
                      spec(f"{p}.mlp.c_proj.bias", (d,), ("layers", "mlp", "wo_bias"), layer)]
        specs += norm("transformer.ln_f", "final_norm")
    else:
        specs.append(spec("model.embed_tokens.weight", (v, d), ("embed",)))
        for layer in range(config.num_layers):
            p = f"model.layers.{layer}"
            specs += norm(f"{p}.input_layernorm", "attn_norm", layer)
            for proj, ours, heads in (("q", "query", h), ("k", "key", g), ("v", "value", g)):
                specs.append(spec(f"{p}.self_attn.{proj}_proj.weight", (heads * k, d), ("layers", "attn", ours), layer,
                                  heads_in(heads), heads_out(heads), "q"))
                if config.qkv_bias:
                    specs.append(spec(f"{p}.self_attn.{proj}_proj.bias", (heads * k,),
                                      ("layers", "attn", f"{ours}_bias"), layer, reshaped((heads, k)),
                                      reshaped((heads * k,))))
            specs.append(spec(f"{p}.self_attn.o_proj.weight", (d, h * k), ("layers", "attn", "out"), layer,
                              lambda x: np.ascontiguousarray(x.T.reshape(h, k, d)),
                              lambda x: np.ascontiguousarray(x.reshape(h * k, d).T), "o"))
            if config.out_bias:
                specs.append(spec(f"{p}.self_attn.o_proj.bias", (d,), ("layers", "attn", "out_bias"), layer))
            specs += norm(f"{p}.post_attention_layernorm", "mlp_norm", layer)
            for proj, ours, shape in (("gate", "wi_0", (f, d)), ("up", "wi_1", (f, d)), ("down", "wo", (d, f))):
                specs.append(spec(f"{p}.mlp.{proj}_proj.weight", shape, ("layers", "mlp", ours), layer,
                                  transpose, transpose, "transpose"))
                if config.mlp_bias:
                    specs.append(spec(f"{p}.mlp.{proj}_proj.bias", shape[:1], ("layers", "mlp", f"{ours}_bias"), layer))
        specs += norm("model.norm", "final_norm")
    if not config.tie_word_embeddings:
        specs.append(spec("lm_head.weight", (v, d), ("lm_head",), None, transpose, transpose, "transpose"))
    return specs


class _FusedQKV:
    """The tensors of a checkpoint as `decoder_tensor_specs` names them: GPT-2's fused ``c_attn`` weight and
    bias split into virtual ``[q]`` / ``[k]`` / ``[v]`` thirds (the fused tensor is read once for all three),
    and names without GPT-2's ``transformer.`` prefix (a `GPT2Model` checkpoint) found under it."""

    def __init__(self, files: WeightFiles):
        self.files = files
        stored = files.names()
        self.stored: dict[str, str] = {}  # our name -> stored name
        for name in stored:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            full = name if name.startswith(("transformer.", "model.", "lm_head.")) or \
                "transformer.wte.weight" in stored else f"transformer.{name}"
            if ".attn.c_attn." in full:
                for part in _QKV:
                    self.stored[_fused(full, part)] = name
            else:
                self.stored[full] = name
        self._last: tuple[str, np.ndarray] | None = None

    def names(self) -> set[str]:
        return set(self.stored)

    def source(self, name: str) -> str:
        return self.files.source(self.stored.get(name, name))

    def get(self, name: str) -> np.ndarray:
        stored = self.stored[name]
        if not name.endswith("]"):
            return self.files.get(stored)
        if self._last is None or self._last[0] != stored:
            self._last = (stored, self.files.get(stored))
        fused = self._last[1]
        if fused.shape[-1] % 3:
            raise CheckpointError(f"{self.source(name)}: tensor '{stored}' has shape {fused.shape}, whose last axis "
                                  "is not three equal q, k, v parts")
        return np.split(fused, 3, axis=-1)[_QKV.index(name[-2])]


def params_from_decoder_tensors(config: DecoderConfig, tensors: _FusedQKV, dtype="float32") -> dict:
    """Our params from a checkpoint's tensors (`config` decides the table; every tensor it names must exist)."""
    specs = decoder_tensor_specs(config)
    available = tensors.names()
    missing = [s.hf_name for s in specs if s.hf_name not in available]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{tensors.source(missing[0])}: missing tensor(s) {shown} required by config.json")
    unknown = sorted(available - {s.hf_name for s in specs} - {"lm_head.weight"})
    if unknown:
        warnings.warn(f"ignoring {len(unknown)} unexpected tensor(s) in the checkpoint: {unknown[:5]}", stacklevel=3)
    dims = (f"model_type={config.model_type}, vocab_size={config.vocab_size}, hidden={config.d_model}, "
            f"heads={config.num_heads}, kv_heads={config.num_kv_heads}, head_dim={config.d_kv}, "
            f"intermediate={config.d_ff}")
    return assemble_params(specs, tensors.get, tensors.source, dtype, dims)


def load_decoder_only(path_or_hub_id: str | os.PathLike, *, dtype: str = "float32", load_tokenizer: bool = True,
                      cache_dir: str | os.PathLike | None = None) -> PretrainedDecoder:
    """Load a transformers GPT-2 / Llama / Qwen2 checkpoint (directory, or a hub id in the local cache;
    never downloaded). `dtype`: parameter dtype ("float32", "bfloat16", or "auto" to keep the stored one)."""
    directory = resolve_checkpoint_dir(path_or_hub_id, None if cache_dir is None else os.fspath(cache_dir))
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ConfigError(f"{config_path}: config file not found in checkpoint directory {directory}")
    config = DecoderConfig.from_json_file(config_path)
    params = params_from_decoder_tensors(config, _FusedQKV(WeightFiles(directory)), dtype)
    tokenizer = load_tokenizer_from(directory) if load_tokenizer else None
    return PretrainedDecoder(config=config, params=params, tokenizer=tokenizer, path=directory)


def decoder_tensors_from_params(config: DecoderConfig, params: dict) -> dict[str, np.ndarray]:
    """{Hugging Face name: tensor} of our params, GPT-2's q / k / v thirds fused back into ``c_attn``."""
    out: dict[str, np.ndarray] = {}
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in tensors_from_specs(decoder_tensor_specs(config), params):
        if name.endswith("]"):
            parts.setdefault(name[:-3], {})[name[-2]] = tensor
            if len(parts[name[:-3]]) == 3:
                out[name[:-3]] = np.concatenate([parts[name[:-3]][p] for p in _QKV], axis=-1)
        else:
            out[name] = tensor
    return out


def save_decoder_only(path: str | os.PathLike, model: PretrainedDecoder, *, dtype: str | None = None,
                      max_shard_bytes: int | None = None) -> str:
    """Write a transformers checkpoint directory (config.json, safetensors, tokenizer if any), atomically;
    `max_shard_bytes` splits the weights into shards with an index."""
    config = model.config
    tensors = decoder_tensors_from_params(config, model.params)
    if dtype is not None:
        tensors = {name: np.asarray(t, dtype=np.dtype(dtype)) for name, t in tensors.items()}
    stored = dtype_name(next(iter(tensors.values())).dtype)
    tokenizer: Callable | None = None
    if model.tokenizer is not None:
        tokenizer = model.tokenizer.save_pretrained
    return write_checkpoint(path, tensors, lambda d: config.to_json_file(os.path.join(d, CONFIG_NAME), dtype=stored),
                            max_shard_bytes, tokenizer)
