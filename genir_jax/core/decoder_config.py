"""`DecoderConfig`: the hyper-parameters of a decoder-only (causal language model) GenIR model.

One frozen (hashable) dataclass, a static argument of `jax.jit`, for two families that differ in a few
switches (`genir_jax.core.decoder_only` implements both):

- GPT-2 (`model_type` ``gpt2``): learned absolute positions, LayerNorm with bias, a GELU MLP (``gelu_new``),
  biases on every projection, the unembedding tied to the token embedding.
- Llama / Qwen2 (``llama``, ``qwen2``): rotary positions (RoPE, base `rope_theta`), RMS norm, a SwiGLU MLP,
  grouped-query attention (`num_kv_heads` key/value heads shared by groups of query heads), a separate
  `lm_head` unless `tie_word_embeddings`; Qwen2 adds biases to the q/k/v projections.

Field names follow the T5 config where the site registry reads them (`d_model`, `num_heads`, `d_kv`,
`d_ff`, `num_layers`); `from_hf_dict` / `to_hf_dict` read and write the `config.json` of transformers'
`GPT2Config`, `LlamaConfig` and `Qwen2Config` (4.x's top-level `rope_theta` and 5.x's `rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from genir_jax.base.errors import ConfigError
from genir_jax.core.config import MAX_PARAMETERS, SUPPORTED_ACTIVATIONS, read_config_json

DECODER_MODEL_TYPES = ("gpt2", "llama", "qwen2")
_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# config.json keys each family interprets; everything else is carried through unchanged on save.
_GPT2_KEYS = frozenset({"model_type", "vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions",
                        "layer_norm_epsilon", "activation_function", "tie_word_embeddings", "scale_attn_weights",
                        "scale_attn_by_inverse_layer_idx", "add_cross_attention", "bos_token_id", "eos_token_id",
                        "pad_token_id", "dtype", "torch_dtype", "transformers_version"})
_ROPE_KEYS = frozenset({"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                        "rope_theta", "rope_parameters", "rope_scaling", "max_position_embeddings",
                        "tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "sliding_window",
                        "layer_types", "max_window_layers", "bos_token_id", "eos_token_id", "pad_token_id", "dtype",
                        "torch_dtype", "transformers_version"})
MAX_SIZES = {"num_layers": 1024, "num_heads": 1024, "d_model": 65_536, "d_kv": 65_536, "d_ff": 1_048_576,
             "vocab_size": 4_194_304, "max_position_embeddings": 1 << 24}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of a decoder-only transformer (defaults: a small Llama-style model)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    d_model: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int | None = None  # None: as many as query heads (no grouping)
    d_kv: int | None = None  # None: d_model // num_heads
    d_ff: int = 1376
    max_position_embeddings: int = 2048
    norm_epsilon: float = 1e-6
    activation: str = "silu"
    rope_theta: float = 10000.0  # unused by GPT-2 (learned positions)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # Unknown config.json entries, kept verbatim (as JSON text) so a save writes them back.
    extra_hf_fields: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.d_kv is None and isinstance(self.num_heads, int) and self.num_heads > 0:
            object.__setattr__(self, "d_kv", self.d_model // self.num_heads)
        self.validate()

    # ----------------------------------------------------------------------------------------- derived
    @property
    def is_gpt2(self) -> bool:
        """GPT-2 layout: learned positions, LayerNorm, biased projections, fused c_attn."""
        return self.model_type == "gpt2"

    @property
    def num_decoder_layers(self) -> int:
        """The layers that predict the docid: all of them (the one stack is the model's decoder). The analyses
        that speak of decoder layers and stages (stage patching, automatic stages, the residual lens, the
        circuit) read this, as they read T5's ``num_decoder_layers``."""
        return self.num_layers

    @property
    def is_gated_act(self) -> bool:
        """Whether the MLP is gated (SwiGLU: ``act(gate x) * up x``), which adds the ``mlp.hook_pre_linear`` site."""
        return not self.is_gpt2

    def replace(self, **changes: Any) -> "DecoderConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def approx_parameter_count(self) -> int:
        d, h, kv, k, f = self.d_model, self.num_heads, self.num_kv_heads, self.d_kv, self.d_ff
        attention = d * k * (2 * h + 2 * kv)
        mlp = d * f * (3 if self.is_gated_act else 2)
        return self.vocab_size * d * (1 if self.tie_word_embeddings else 2) + self.num_layers * (attention + mlp)

    def validate(self, source: str = "DecoderConfig") -> None:
        """Raise `ConfigError` naming `source` and the field if a value is unusable."""
        if self.model_type not in DECODER_MODEL_TYPES:
            raise ConfigError(f"{source}: field 'model_type' = {self.model_type!r} is not a supported decoder-only "
                              f"model; expected one of {', '.join(DECODER_MODEL_TYPES)}")
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "d_kv", "d_ff",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
            if value > MAX_SIZES.get(name, value):
                raise ConfigError(f"{source}: field '{name}' = {value} exceeds genir-jax's bound {MAX_SIZES[name]}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={self.num_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_kv_heads} (grouped-query attention)")
        if not self.is_gpt2 and self.d_kv % 2:
            raise ConfigError(f"{source}: rotary positions need an even head_dim, got {self.d_kv}")
        if self.approx_parameter_count() > MAX_PARAMETERS:
            raise ConfigError(f"{source}: the architecture implies about {self.approx_parameter_count():,} "
                              f"parameters, beyond genir-jax's bound {MAX_PARAMETERS:,}")
        for name in ("norm_epsilon", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"{source}: field '{name}' must be > 0, got {value!r}")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{source}: activation {self.activation!r} is not supported; expected one of "
                              f"{', '.join(SUPPORTED_ACTIVATIONS)}")

    # ----------------------------------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> "DecoderConfig":
        """Build from the dict of a transformers GPT-2 / Llama / Qwen2 `config.json`; `source` names it in errors."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type")
        if model_type not in DECODER_MODEL_TYPES:
            raise ConfigError(f"{source}: field 'model_type' = {model_type!r} is not a supported decoder-only model; "
                              f"expected one of {', '.join(DECODER_MODEL_TYPES)}")
        kwargs = _gpt2_fields(data, source) if model_type == "gpt2" else _rope_fields(data, source)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = data.get(name)
            kwargs[name] = value[0] if isinstance(value, list) and value else (value if isinstance(value, int) else None)
        keys = _GPT2_KEYS if model_type == "gpt2" else _ROPE_KEYS
        kwargs["extra_hf_fields"] = tuple(sorted((k, json.dumps(v)) for k, v in data.items() if k not in keys))
        config = cls.__new__(cls)  # validation errors name `source`, not "DecoderConfig"
        for field in dataclasses.fields(cls):
            object.__setattr__(config, field.name, kwargs.get(field.name, field.default))
        config.validate(source)
        return config

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` dict from which transformers (4.x and 5.x) builds the same model."""
        data: dict[str, Any] = {key: json.loads(text) for key, text in self.extra_hf_fields}
        data.setdefault("architectures", [_ARCHITECTURES[self.model_type]])
        data.update(model_type=self.model_type, vocab_size=self.vocab_size,
                    tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
                    eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, dtype=dtype)
        if self.is_gpt2:
            data.update(n_embd=self.d_model, n_layer=self.num_layers, n_head=self.num_heads, n_inner=self.d_ff,
                        n_positions=self.max_position_embeddings, layer_norm_epsilon=self.norm_epsilon,
                        activation_function=self.activation)
            return data
        data.update(hidden_size=self.d_model, intermediate_size=self.d_ff, num_hidden_layers=self.num_layers,
                    num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads, head_dim=self.d_kv,
                    hidden_act=self.activation, rms_norm_eps=self.norm_epsilon, rope_theta=self.rope_theta,
                    rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                    max_position_embeddings=self.max_position_embeddings)
        if self.model_type == "llama":
            data.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        return data

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "DecoderConfig":
        path = os.fspath(path)
        return cls.from_hf_dict(read_config_json(path), source=path)

    def to_json_file(self, path: str | os.PathLike, dtype: str = "float32") -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_hf_dict(dtype), handle, indent=2, sort_keys=True)


def _require(data: Mapping[str, Any], name: str, source: str, default: Any = None) -> Any:
    value = data.get(name, default)
    if value is None:
        raise ConfigError(f"{source}: missing field '{name}'")
    return value


def _gpt2_fields(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """GPT2Config names -> ours; options that change the computation and are not implemented are refused."""
    for name, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                            ("add_cross_attention", False)):
        if data.get(name, supported) != supported:
            raise ConfigError(f"{source}: GPT-2 option '{name}' = {data[name]!r} is not supported (only {supported})")
    d_model = _require(data, "n_embd", source, 768)
    inner = data.get("n_inner")
    return dict(model_type="gpt2", vocab_size=_require(data, "vocab_size", source, 50257), d_model=d_model,
                num_layers=_require(data, "n_layer", source, 12), num_heads=_require(data, "n_head", source, 12),
                num_kv_heads=_require(data, "n_head", source, 12),
                d_kv=d_model // _require(data, "n_head", source, 12) if isinstance(d_model, int) else None,
                d_ff=inner if inner is not None else (4 * d_model if isinstance(d_model, int) else None),
                max_position_embeddings=_require(data, "n_positions", source, 1024),
                norm_epsilon=_require(data, "layer_norm_epsilon", source, 1e-5),
                activation=_require(data, "activation_function", source, "gelu_new"),
                tie_word_embeddings=_flag(data, "tie_word_embeddings", True, source),
                qkv_bias=True, out_bias=True, mlp_bias=True)


def _rope_fields(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """LlamaConfig / Qwen2Config names -> ours (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
    rope = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else None
    if scaling or rope_type != "default":
        raise ConfigError(f"{source}: only default rotary positions are supported (rope_scaling / rope_parameters "
                          f"with rope_type {scaling or rope_type!r} is not)")
    if data.get("use_sliding_window"):
        raise ConfigError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported")
    theta = rope.get("rope_theta", data.get("rope_theta", 10000.0)) if isinstance(rope, Mapping) else None
    d_model = _require(data, "hidden_size", source)
    heads = _require(data, "num_attention_heads", source)
    kv_heads = data.get("num_key_value_heads") or heads
    d_kv = data.get("head_dim") or (d_model // heads if isinstance(d_model, int) and isinstance(heads, int)
                                    and heads > 0 else None)
    qwen = data["model_type"] == "qwen2"
    attention_bias = _flag(data, "attention_bias", False, source)
    return dict(model_type=data["model_type"], vocab_size=_require(data, "vocab_size", source), d_model=d_model,
                num_layers=_require(data, "num_hidden_layers", source), num_heads=heads, num_kv_heads=kv_heads,
                d_kv=d_kv, d_ff=_require(data, "intermediate_size", source),
                max_position_embeddings=_require(data, "max_position_embeddings", source, 2048),
                norm_epsilon=_require(data, "rms_norm_eps", source, 1e-6), activation=data.get("hidden_act", "silu"),
                rope_theta=theta, tie_word_embeddings=_flag(data, "tie_word_embeddings", False, source),
                qkv_bias=True if qwen else attention_bias, out_bias=False if qwen else attention_bias,
                mlp_bias=False if qwen else _flag(data, "mlp_bias", False, source))


def _flag(data: Mapping[str, Any], name: str, default: bool, source: str) -> bool:
    value = data.get(name, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{source}: field '{name}' must be true or false, got {value!r}")
    return value


def gpt2_config(**overrides: Any) -> DecoderConfig:
    """A GPT-2-style config (learned positions, LayerNorm, GELU MLP, biases, tied); override any field."""
    return DecoderConfig(**{"model_type": "gpt2", "activation": "gelu_new", "norm_epsilon": 1e-5,
                            "tie_word_embeddings": True, "qkv_bias": True, "out_bias": True, "mlp_bias": True,
                            **overrides})
