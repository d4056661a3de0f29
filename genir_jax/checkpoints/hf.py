"""Hugging Face T5 checkpoints <-> our parameter pytree, in both directions.

Reads a checkpoint directory (`config.json` plus `model.safetensors`, sharded safetensors with an index,
or `pytorch_model.bin` read with ``torch.load(weights_only=True)``, never unpickling arbitrary objects)
or a hub id already in the local Hugging Face cache, with its tokenizer when present. Writes a directory
that `transformers.AutoModelForSeq2SeqLM.from_pretrained` loads with the same logits.

The tensor-name table (`hf_tensor_specs`) is the single place that knows Hugging Face's layout; every
tensor is checked against the shape that `config.json` implies and errors name the file and the tensor.
With a `genir_jax.scale.partitioning.Partitioner`, safetensors weights are read slice by slice straight into
sharded arrays (`sharded_params_from_safetensors`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from typing import Any, Callable, Iterator

import jax
import numpy as np

from genir_jax.base.errors import CheckpointError, ConfigError, GenIRError
from genir_jax.checkpoints.weights import (
    CONFIG_NAME, TensorSpec, WeightFiles, assemble_params, checked_finite, dtype_name, identity, tensors_from_specs,
    transpose, write_checkpoint,
)
from genir_jax.core.config import T5Config
from genir_jax.core.decoder_config import DECODER_MODEL_TYPES

TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")

# Tensors transformers itself ignores or re-creates by tying; accepted and dropped on load.
_IGNORED_TENSORS = frozenset(
    {
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
    }
)


@dataclasses.dataclass
class PretrainedModel:
    """A loaded T5: its `config`, its `params` (plain pytree) and its `tokenizer` (or None)."""

    config: T5Config
    params: dict
    tokenizer: Any = None
    path: str | None = None

    def replace(self, **changes: Any) -> "PretrainedModel":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# The name/shape/layout table
# --------------------------------------------------------------------------------------------------

def hf_tensor_specs(config: T5Config) -> list[TensorSpec]:
    """Every tensor of a Hugging Face `T5ForConditionalGeneration` with this config, in a fixed order."""
    d, h, k, f, v = config.d_model, config.num_heads, config.d_kv, config.d_ff, config.vocab_size

    def q_in(x):  # [H*K, D] -> [D, H, K]
        return np.ascontiguousarray(x.T.reshape(d, h, k))

    def q_out(x):
        return np.ascontiguousarray(x.reshape(d, h * k).T)

    def o_in(x):  # [D, H*K] -> [H, K, D]
        return np.ascontiguousarray(x.T.reshape(h, k, d))

    def o_out(x):
        return np.ascontiguousarray(x.reshape(h * k, d).T)

    specs = [TensorSpec("shared.weight", (v, d), ("shared",), None, identity, identity)]
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, d), ("lm_head",), None, transpose, transpose, "transpose"))

    mlp_names = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
    for stack, num_layers in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        specs.append(TensorSpec(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (config.relative_attention_num_buckets, h), (stack, "relpos_bias", "embedding"), None,
            identity, identity,
        ))
        sublayers = [("SelfAttention", "self_attn")]
        if stack == "decoder":
            sublayers.append(("EncDecAttention", "cross_attn"))
        for layer in range(num_layers):
            prefix = f"{stack}.block.{layer}.layer"
            for index, (hf_attn, our_attn) in enumerate(sublayers):
                for proj, ours in (("q", "query"), ("k", "key"), ("v", "value")):
                    specs.append(TensorSpec(f"{prefix}.{index}.{hf_attn}.{proj}.weight", (h * k, d),
                                            (stack, "layers", our_attn, ours), layer, q_in, q_out, "q"))
                specs.append(TensorSpec(f"{prefix}.{index}.{hf_attn}.o.weight", (d, h * k),
                                        (stack, "layers", our_attn, "out"), layer, o_in, o_out, "o"))
                specs.append(TensorSpec(f"{prefix}.{index}.layer_norm.weight", (d,),
                                        (stack, "layers", f"{our_attn}_norm", "scale"), layer, identity, identity))
            ff = len(sublayers)
            for name in mlp_names:
                shape = (d, f) if name == "wo" else (f, d)
                specs.append(TensorSpec(f"{prefix}.{ff}.DenseReluDense.{name}.weight", shape,
                                        (stack, "layers", "mlp", name), layer, transpose, transpose, "transpose"))
            specs.append(TensorSpec(f"{prefix}.{ff}.layer_norm.weight", (d,),
                                    (stack, "layers", "mlp_norm", "scale"), layer, identity, identity))
        specs.append(TensorSpec(f"{stack}.final_layer_norm.weight", (d,), (stack, "final_norm", "scale"), None,
                                identity, identity))
    return specs


# --------------------------------------------------------------------------------------------------
# Reading weight files
# --------------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------------
# HF -> ours
# --------------------------------------------------------------------------------------------------

def _resolve_directory(path_or_hub_id: str | os.PathLike, allow_download: bool, cache_dir: str | None) -> str:
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if looks_like_hub_id:
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(path, local_files_only=not allow_download, cache_dir=cache_dir)
        except Exception as exc:  # not in cache, offline, bad id ...
            raise CheckpointError(
                f"{path}: no such directory, and not a hub id in the local Hugging Face cache "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    raise CheckpointError(f"{path}: checkpoint directory does not exist")


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike, cache_dir: str | None = None) -> str:
    """The directory of a checkpoint given as a directory or a hub id in the local Hugging Face cache
    (never downloaded); `CheckpointError` otherwise."""
    return _resolve_directory(path_or_hub_id, False, cache_dir)


def params_from_hf_tensors(
    config: T5Config,
    get_tensor: Callable[[str], np.ndarray],
    available: set[str],
    source_of: Callable[[str], str],
    dtype="float32",
) -> tuple[T5Config, dict]:
    """Our params from Hugging Face tensors; returns the config with the tying decided from the weights.

    Tying follows transformers: an `lm_head.weight` equal to `shared.weight` (or absent, when the config
    says tied) is tied; one that differs is a separate output layer whatever the config says.
    """
    config = _decide_tying(config, get_tensor, available, source_of)
    specs = _checked_specs(config, available, source_of)
    return config, assemble_params(specs, get_tensor, source_of, dtype, _describe_dims(config))


def _decide_tying(config: T5Config, get_tensor, available: set[str], source_of) -> T5Config:
    tied = config.tie_word_embeddings
    if "lm_head.weight" in available:
        if tied:
            lm_head = get_tensor("lm_head.weight")
            shared = get_tensor("shared.weight") if "shared.weight" in available else None
            tied = shared is not None and lm_head.shape == shared.shape and np.array_equal(lm_head, shared)
    elif not tied:
        raise CheckpointError(
            f"{source_of('lm_head.weight')}: missing tensor 'lm_head.weight' (config.json has "
            "tie_word_embeddings=false, so the output layer must be stored)"
        )
    return config.replace(tie_word_embeddings=tied)


def _checked_specs(config: T5Config, available: set[str], source_of) -> list[TensorSpec]:
    """The tensor specs of `config`; every one must be available (unknown extra tensors are warned about)."""
    specs = hf_tensor_specs(config)
    missing = [s.hf_name for s in specs if s.hf_name not in available]
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{source_of(missing[0])}: missing tensor(s) {shown} required by config.json")
    known = {s.hf_name for s in specs} | _IGNORED_TENSORS | {"lm_head.weight"}
    unknown = sorted(available - known)
    if unknown:
        warnings.warn(f"ignoring {len(unknown)} unexpected tensor(s) in the checkpoint: {unknown[:5]}", stacklevel=4)
    return specs


def _hf_region(spec: TensorSpec, region: tuple[slice, ...], config: T5Config) -> tuple[tuple[slice, ...], Callable]:
    """The part of HF tensor `spec` that holds `region` (slices of our unstacked layout), and how to turn it
    into our layout. Attention kernels: a slice of heads is a contiguous block of HF rows (q/k/v) or
    columns (o)."""
    k = config.d_kv
    if spec.layout == "identity":
        return region, identity
    if spec.layout == "transpose":
        return (region[1], region[0]), transpose
    if spec.layout == "q":  # ours [D, H, K] <- hf [H*K, D]
        d, h, kv = region
        rows = slice(h.start * k, h.stop * k)
        return (rows, d), lambda x: np.ascontiguousarray(x.T.reshape(d.stop - d.start, h.stop - h.start, k)[:, :, kv])
    if spec.layout == "o":  # ours [H, K, D] <- hf [D, H*K]
        h, kv, d = region
        cols = slice(h.start * k, h.stop * k)
        return (d, cols), lambda x: np.ascontiguousarray(x.T.reshape(h.stop - h.start, k, d.stop - d.start)[:, kv, :])
    raise ValueError(f"unknown tensor layout {spec.layout!r}")


def sharded_params_from_safetensors(config: T5Config, files: "WeightFiles", partitioner, dtype="float32"
                                    ) -> tuple[T5Config, dict]:
    """Our params as arrays placed by `partitioner` (a `genir_jax.scale.partitioning.Partitioner`), each device's
    shard read from the safetensors files slice by slice (`jax.make_array_from_callback`): no host ever
    holds a whole sharded parameter. Same checks and values as `params_from_hf_tensors`."""
    available, source_of = files.names(), files.source
    config = _decide_tying(config, files.get, available, source_of)
    specs = _checked_specs(config, available, source_of)
    for spec in specs:
        shape = files.shape(spec.hf_name)
        if shape != spec.hf_shape:
            raise CheckpointError(
                f"{source_of(spec.hf_name)}: tensor '{spec.hf_name}' has shape {shape} but config.json "
                f"implies {spec.hf_shape} ({_describe_dims(config)})")
    by_path: dict[tuple[str, ...], dict] = {}
    for spec in specs:
        by_path.setdefault(spec.path, {})[spec.layer] = spec
    from genir_jax.core.model import logical_axes, param_shapes

    shapes = param_shapes(config)
    shardings = partitioner.param_shardings(logical_axes(config), shapes)

    def lookup(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    params: dict = {}
    for path, layers in by_path.items():
        shape = tuple(lookup(shapes, path).shape)
        stacked = None not in layers
        out_dtype = None if dtype == "auto" else np.dtype(dtype)
        cache: dict = {}

        def read(index, path=path, layers=layers, shape=shape, stacked=stacked, out_dtype=out_dtype, cache=cache):
            index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape)) + tuple(
                slice(0, n) for n in shape[len(index):])
            key = tuple((s.start, s.stop) for s in index)
            if key not in cache:  # replicas of one shard are read once
                parts = []
                for layer in (range(index[0].start, index[0].stop) if stacked else [None]):
                    spec = layers[layer]
                    region = index[1:] if stacked else index
                    hf_index, convert = _hf_region(spec, region, config)
                    part = convert(files.read_slice(spec.hf_name, hf_index))
                    part = part if out_dtype is None else part.astype(out_dtype)
                    where = ", ".join(f"{r.start}:{r.stop}" for r in hf_index)
                    parts.append(checked_finite(part, spec.hf_name, source_of, f" in the slice [{where}] read"))
                cache[key] = np.stack(parts) if stacked else parts[0]
            return cache[key]

        array = jax.make_array_from_callback(shape, lookup(shardings, path), read)
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = array
    return config, params


def _describe_dims(config: T5Config) -> str:
    return (f"vocab_size={config.vocab_size}, d_model={config.d_model}, d_kv={config.d_kv}, d_ff={config.d_ff}, "
            f"num_heads={config.num_heads}, relative_attention_num_buckets={config.relative_attention_num_buckets}")


def load_pretrained(
    path_or_hub_id: str | os.PathLike,
    *,
    dtype: str = "float32",
    load_tokenizer: bool = True,
    allow_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
    fast_tokenizer: bool = False,
    partitioner=None,
) -> PretrainedModel:
    """Load a Hugging Face T5/mT5 checkpoint (directory or locally cached hub id).

    `dtype`: parameter dtype ("float32", "bfloat16", or "auto" to keep the stored dtype).
    `allow_download`: let a hub id be fetched if it is not in the local cache (off: never touch the network).
    `cache_dir`: the Hugging Face hub cache to look in (default: the standard one, `$HF_HUB_CACHE`).
    `fast_tokenizer`: a read-only `genir_jax.checkpoints.tokenizer.T5FastTokenizer` (same ids, no transformers import;
    what the analyses use) where it is equivalent, else transformers' tokenizer. Off (default): always
    transformers' tokenizer, which `add_docid_tokens` and training need.
    `partitioner` (`genir_jax.scale.partitioning.Partitioner`; default: a command's ``--mesh``, see
    `genir_jax.scale.partitioning.current`): parameters placed as its rules say; from safetensors each device's
    shard is read slice by slice (`sharded_params_from_safetensors`), never a whole host copy.
    """
    directory = _resolve_directory(path_or_hub_id, allow_download,
                                   None if cache_dir is None else os.fspath(cache_dir))
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise ConfigError(f"{config_path}: config file not found in checkpoint directory {directory}")
    config = _t5_config(config_path)
    files = WeightFiles(directory)
    from genir_jax.scale.partitioning import current

    partitioner = partitioner if partitioner is not None else current()
    if partitioner is not None and files.kind == "safetensors":
        try:
            config, params = sharded_params_from_safetensors(config, files, partitioner, dtype=dtype)
        finally:
            files.close()
    else:
        try:
            config, params = params_from_hf_tensors(config, files.get, files.names(), files.source, dtype=dtype)
        finally:
            files.close()
        if partitioner is not None:
            from genir_jax.core.model import logical_axes

            params = partitioner.shard_params(params, logical_axes(config))
    tokenizer = load_tokenizer_from(directory, fast=fast_tokenizer) if load_tokenizer else None
    if tokenizer is not None and len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{directory}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{config.vocab_size} (config.json); tokenizer and weights come from different vocabularies"
        )
    return PretrainedModel(config=config, params=params, tokenizer=tokenizer, path=directory)


def _t5_config(config_path: str) -> T5Config:
    """The T5 config of `config_path`; a decoder-only model's is refused with where to load it instead."""
    try:
        return T5Config.from_json_file(config_path)
    except ConfigError:
        try:
            with open(config_path, encoding="utf-8") as handle:
                model_type = json.load(handle).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if model_type in DECODER_MODEL_TYPES:
            raise ConfigError(f"{config_path}: model_type {model_type!r} is a decoder-only model, not a T5; load it "
                              "with genir_jax.checkpoints.decoder_hf.load_decoder_only") from None
        raise


def checkpoint_is_decoder_only(path_or_hub_id: str | os.PathLike) -> bool:
    """Whether a checkpoint is of the decoder-only family (GPT-2, Llama, Qwen2: its config.json's ``model_type``
    is one of `genir_jax.core.decoder_config.DECODER_MODEL_TYPES`) rather than a T5: how the analyses tell
    which loader and which inputs a checkpoint takes, without a --model-type flag. A directory without a
    readable config.json is not decoder-only (the T5 loader then names what is missing)."""
    try:
        directory = resolve_checkpoint_dir(path_or_hub_id)
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as handle:
            found = json.load(handle)
    except (GenIRError, OSError, ValueError):
        return False
    return isinstance(found, dict) and found.get("model_type") in DECODER_MODEL_TYPES


def load_for_analysis(path_or_hub_id: str | os.PathLike, **options: Any) -> PretrainedModel:
    """`load_pretrained` with ``fast_tokenizer=True``: what the analysis commands load (read-only tokenizer)."""
    options.setdefault("fast_tokenizer", True)
    return load_pretrained(path_or_hub_id, **options)


def load_tokenizer_from(directory: str, *, fast: bool = False):
    """The tokenizer saved in `directory`, or None if it holds no tokenizer files.

    `fast`: a `genir_jax.checkpoints.tokenizer.T5FastTokenizer` where it is equivalent (see `genir_jax.checkpoints.tokenizer`),
    else (and by default) transformers' ``AutoTokenizer``."""
    if not any(os.path.isfile(os.path.join(directory, name)) for name in TOKENIZER_FILES):
        return None
    from genir_jax.checkpoints.tokenizer import load_tokenizer

    return load_tokenizer(directory, fast=fast)


# --------------------------------------------------------------------------------------------------
# Ours -> HF
# --------------------------------------------------------------------------------------------------

def hf_tensors_from_params(config: T5Config, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(name, tensor) pairs of the Hugging Face layout, in `hf_tensor_specs` order."""
    return tensors_from_specs(hf_tensor_specs(config), params)


def save_pretrained(
    path: str | os.PathLike,
    model: PretrainedModel,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> str:
    """Write a Hugging Face checkpoint directory (config.json, safetensors, tokenizer if any).

    Files are written to a temporary directory next to `path` and then moved into place, so an error
    never leaves a half-written checkpoint. `max_shard_bytes` splits the weights into several
    safetensors files with an index, as transformers does for large models.
    """
    config = model.config
    tensors = dict(hf_tensors_from_params(config, model.params))
    if dtype is not None:
        tensors = {name: np.asarray(t, dtype=np.dtype(dtype)) for name, t in tensors.items()}
    stored_dtype = dtype_name(tensors["shared.weight"].dtype)
    tokenizer = model.tokenizer
    return write_checkpoint(
        path, tensors, lambda directory: config.to_json_file(os.path.join(directory, CONFIG_NAME), dtype=stored_dtype),
        max_shard_bytes, None if tokenizer is None else (lambda directory: save_tokenizer(tokenizer, directory)))


def save_tokenizer(tokenizer, directory: str) -> None:
    """Save a tokenizer so that transformers 4.x (the reference's TransformerLens scripts) loads it too.

    transformers 5.x writes only `tokenizer.json` and lists special tokens as `extra_special_tokens`;
    4.x wants the SentencePiece model (`spiece.model`) to build a T5 tokenizer with `add_prefix_space` and
    reads that list as `additional_special_tokens`. Both versions then give the same ids, docids included.
    A read-only `genir_jax.checkpoints.tokenizer.T5FastTokenizer` is saved by copying the files it was loaded from.
    """
    from genir_jax.checkpoints.tokenizer import T5FastTokenizer

    if isinstance(tokenizer, T5FastTokenizer):
        for name in (*TOKENIZER_FILES, "special_tokens_map.json"):
            source = os.path.join(tokenizer.directory, name)
            if os.path.isfile(source):
                shutil.copyfile(source, os.path.join(directory, name))
        return
    tokenizer.save_pretrained(directory)
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if vocab_file and os.path.isfile(vocab_file) and not os.path.exists(os.path.join(directory, "spiece.model")):
        shutil.copyfile(vocab_file, os.path.join(directory, "spiece.model"))
    config_path = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as handle:
            data = json.load(handle)
        extra = data.get("extra_special_tokens")
        if isinstance(extra, list):
            data.pop("extra_special_tokens")
            data.setdefault("additional_special_tokens", extra)
            with open(config_path, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, ensure_ascii=False)


