"""`T5Config`: the architecture hyper-parameters of every T5 variant used for GenIR.

One frozen (hashable) dataclass, so it can be a static argument of `jax.jit`. It reads and writes the
Hugging Face `config.json` of `t5` and `mt5` models:

- T5 v1.0 (`t5-small` ... `t5-11b`, the paper's DSI models): ReLU MLP, embeddings tied to the output
  layer and the decoder output rescaled by `d_model ** -0.5` before the unembedding.
- T5 v1.1, Flan-T5, mT5: gated-GELU MLP, separate `lm_head`, no rescale.
- Encoder and decoder of different depth (`num_decoder_layers`), any relative-attention bucket count and
  maximum distance.

Two flags that Hugging Face conflates are kept apart here: `tie_word_embeddings` (the output layer *is*
the input embedding) and `scale_decoder_outputs` (multiply by `d_model ** -0.5` before it). transformers 4.x
derives both from `tie_word_embeddings`; 5.x keeps a separate `scale_decoder_outputs` in `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from genir_jax.base.errors import ConfigError

# Activation names of transformers' ACT2FN that T5 checkpoints use; the MLP implements exactly these.
SUPPORTED_ACTIVATIONS = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "silu", "swish")
SUPPORTED_MODEL_TYPES = ("t5", "mt5")

# config.json keys that we interpret; everything else is carried through unchanged on save.
_INTERPRETED_KEYS = frozenset(
    {
        "model_type", "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
        "num_heads", "relative_attention_num_buckets", "relative_attention_max_distance",
        "layer_norm_epsilon", "feed_forward_proj", "dropout_rate", "initializer_factor",
        "tie_word_embeddings", "scale_decoder_outputs", "pad_token_id", "eos_token_id",
        "decoder_start_token_id", "dense_act_fn", "is_gated_act", "dtype", "torch_dtype",
        "transformers_version",
    }
)


# Bounds on a configuration (docs/index.md): a config.json beyond them is refused with a ConfigError
# before any parameter, name or mask is enumerated or allocated. Real T5s: t5-11b has 24+24 layers, 128 heads,
# d_model 1024, d_kv 128, d_ff 65536; mT5's vocabulary is 250,112; every T5 uses 32 buckets, distance 128.
MAX_SIZES = {
    "num_layers": 256, "num_decoder_layers": 256, "num_heads": 1024, "d_model": 65_536, "d_kv": 65_536,
    "num_heads*d_kv": 1_048_576, "d_ff": 1_048_576, "vocab_size": 4_194_304,
    "relative_attention_num_buckets": 4096, "relative_attention_max_distance": 1_048_576,
}
MAX_PARAMETERS = 2 ** 36  # about 68.7 billion (t5-11b: 11 billion)


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 encoder-decoder. Defaults are those of `t5-small` (T5 v1.0)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int | None = None  # None: same as num_layers
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dropout_rate: float = 0.1
    initializer_factor: float = 1.0
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    model_type: str = "t5"
    # Unknown config.json entries, kept verbatim (as JSON text) so a save writes them back.
    extra_hf_fields: tuple[tuple[str, str], ...] = dataclasses.field(default=(), compare=False, repr=False)

    def __post_init__(self):
        if self.num_decoder_layers is None:
            object.__setattr__(self, "num_decoder_layers", self.num_layers)
        self.validate()

    # ----------------------------------------------------------------------------------------- derived
    @property
    def is_gated_act(self) -> bool:
        """True for `gated-*` MLPs (two input projections multiplied; v1.1, Flan-T5, mT5)."""
        return self.feed_forward_proj.split("-")[0] == "gated"

    @property
    def dense_act_fn(self) -> str:
        """The activation name as transformers' ACT2FN spells it (`gated-gelu` means `gelu_new`)."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated attention heads, `num_heads * d_kv`."""
        return self.num_heads * self.d_kv

    def replace(self, **changes: Any) -> "T5Config":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def approx_parameter_count(self) -> int:
        """Parameters the architecture implies (embeddings, attention, MLPs; norms and biases left out)."""
        d, inner, ff = self.d_model, self.num_heads * self.d_kv, self.d_ff * (3 if self.is_gated_act else 2)
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        encoder = self.num_layers * (4 * d * inner + d * ff)
        return embeddings + encoder + self.num_decoder_layers * (8 * d * inner + d * ff)

    # ----------------------------------------------------------------------------------------- checks
    def validate(self, source: str = "T5Config") -> None:
        """Raise `ConfigError` naming `source` and the field if a value is unusable or beyond `MAX_SIZES`."""
        positive_ints = (
            "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
            "relative_attention_num_buckets", "relative_attention_max_distance",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
        for name, limit in MAX_SIZES.items():
            value = self.num_heads * self.d_kv if name == "num_heads*d_kv" else getattr(self, name)
            if value > limit:
                raise ConfigError(f"{source}: field '{name}' = {value} exceeds genir-jax's bound {limit} (refused "
                                  "before anything is allocated; the largest real T5 checkpoints are far below it)")
        if self.approx_parameter_count() > MAX_PARAMETERS:
            raise ConfigError(f"{source}: the architecture implies about {self.approx_parameter_count():,} parameters, "
                              f"beyond genir-jax's bound {MAX_PARAMETERS:,}")
        if self.relative_attention_num_buckets < 4:
            raise ConfigError(
                f"{source}: field 'relative_attention_num_buckets' must be >= 4 (half the buckets are exact, "
                f"half logarithmic, per direction), got {self.relative_attention_num_buckets}"
            )
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"{source}: field 'layer_norm_epsilon' must be > 0, got {self.layer_norm_epsilon!r}")
        if not (isinstance(self.dropout_rate, (int, float)) and 0 <= self.dropout_rate < 1):
            raise ConfigError(f"{source}: field 'dropout_rate' must be in [0, 1), got {self.dropout_rate!r}")
        parts = self.feed_forward_proj.split("-") if isinstance(self.feed_forward_proj, str) else []
        valid_shape = len(parts) == 1 or (len(parts) == 2 and parts[0] == "gated")
        if not valid_shape or parts[-1] not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"{source}: field 'feed_forward_proj' = {self.feed_forward_proj!r} is not supported; expected "
                f"'<act>' or 'gated-<act>' with <act> one of {', '.join(SUPPORTED_ACTIVATIONS)} "
                "(e.g. 'relu' for T5 v1.0, 'gated-gelu' for T5 v1.1 / Flan-T5 / mT5)"
            )
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: field 'model_type' = {self.model_type!r} is not supported; expected one of "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (UMT5 / LongT5 / Switch use other architectures)"
            )
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ConfigError(
                    f"{source}: field '{name}' must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}"
                )

    # ----------------------------------------------------------------------------------------- HF I/O
    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> "T5Config":
        """Build from the dict of a Hugging Face T5/mT5 `config.json`; `source` names it in errors."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        model_type = data.get("model_type", "t5")
        defaults = cls.__dataclass_fields__
        kwargs: dict[str, Any] = {}
        for name in (
            "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
            "relative_attention_max_distance", "layer_norm_epsilon", "feed_forward_proj", "dropout_rate",
            "initializer_factor", "pad_token_id",
        ):
            if name in data and data[name] is not None:
                kwargs[name] = data[name]
        kwargs["num_decoder_layers"] = data.get("num_decoder_layers")
        eos = data.get("eos_token_id", defaults["eos_token_id"].default)
        if isinstance(eos, list):  # generation configs sometimes list several; the first is T5's </s>
            if not eos:
                raise ConfigError(f"{source}: field 'eos_token_id' is an empty list")
            eos = eos[0]
        kwargs["eos_token_id"] = eos if eos is not None else defaults["eos_token_id"].default
        start = data.get("decoder_start_token_id")
        kwargs["decoder_start_token_id"] = start if start is not None else kwargs.get("pad_token_id", 0)
        # transformers 4.x: one flag `tie_word_embeddings` means "tied and rescaled" (default true).
        # transformers 5.x: `scale_decoder_outputs` is written separately and takes precedence.
        tie = data.get("tie_word_embeddings", True)
        scale = data.get("scale_decoder_outputs", tie)
        for name, value in (("tie_word_embeddings", tie), ("scale_decoder_outputs", scale)):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: field '{name}' must be true or false, got {value!r}")
        kwargs["tie_word_embeddings"] = tie
        kwargs["scale_decoder_outputs"] = scale
        kwargs["model_type"] = model_type
        extra = tuple(sorted((k, json.dumps(v)) for k, v in data.items() if k not in _INTERPRETED_KEYS))
        kwargs["extra_hf_fields"] = extra
        # Built without __post_init__ so that validation errors name `source` rather than "T5Config".
        config = cls.__new__(cls)
        for field in dataclasses.fields(cls):
            object.__setattr__(config, field.name, kwargs.get(field.name, field.default))
        if config.num_decoder_layers is None:
            object.__setattr__(config, "num_decoder_layers", config.num_layers)
        config.validate(source)
        return config

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """The `config.json` dict that transformers (4.x and 5.x) loads as the same model.

        `tie_word_embeddings` is written as our tying flag and `scale_decoder_outputs` explicitly, so
        transformers 5.x reproduces every combination. transformers 4.x derives both from
        `tie_word_embeddings`, which covers the real variants (v1.0: tied and scaled; v1.1: neither).
        """
        data: dict[str, Any] = {json_key: json.loads(text) for json_key, text in self.extra_hf_fields}
        data.setdefault("architectures", ["T5ForConditionalGeneration"] if self.model_type == "t5"
                        else ["MT5ForConditionalGeneration"])
        data.update(
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            d_model=self.d_model,
            d_kv=self.d_kv,
            d_ff=self.d_ff,
            num_layers=self.num_layers,
            num_decoder_layers=self.num_decoder_layers,
            num_heads=self.num_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            layer_norm_epsilon=self.layer_norm_epsilon,
            feed_forward_proj=self.feed_forward_proj,
            dense_act_fn=self.dense_act_fn,
            is_gated_act=self.is_gated_act,
            dropout_rate=self.dropout_rate,
            initializer_factor=self.initializer_factor,
            tie_word_embeddings=self.tie_word_embeddings,
            scale_decoder_outputs=self.scale_decoder_outputs,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            decoder_start_token_id=self.decoder_start_token_id,
            is_encoder_decoder=True,
            dtype=dtype,
        )
        return dict(sorted(data.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "T5Config":
        """Read a Hugging Face `config.json`; errors name the file."""
        path = os.fspath(path)
        return cls.from_hf_dict(read_config_json(path), source=path)

    def to_json_file(self, path: str | os.PathLike, dtype: str = "float32") -> None:
        """Write the Hugging Face `config.json`."""
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_hf_dict(dtype=dtype), handle, indent=2)
            handle.write("\n")


# Named presets for models built from scratch (tests, benchmarks, training).
def t5_v1_0(**overrides: Any) -> T5Config:
    """A T5 v1.0-style config (ReLU, tied, rescaled); override any field."""
    return T5Config(**{"feed_forward_proj": "relu", "tie_word_embeddings": True, "scale_decoder_outputs": True,
                       **overrides})


def t5_v1_1(**overrides: Any) -> T5Config:
    """A T5 v1.1 / Flan-T5-style config (gated-GELU, untied, not rescaled); override any field."""
    return T5Config(**{"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                       "scale_decoder_outputs": False, **overrides})


def read_config_json(path: str) -> dict:
    """The JSON object of a Hugging Face `config.json`; a missing file or bad JSON is a `ConfigError` naming it."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
