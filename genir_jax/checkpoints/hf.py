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
import re
import shutil
import tempfile
import warnings
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np

from genir_jax.core.config import T5Config
from genir_jax.base.errors import CheckpointError, ConfigError
from genir_jax.base.interrupts import raise_if_interrupted

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
_WEIGHT_FILE_NAMES = frozenset({SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME})
_SHARD_PATTERN = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")
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

@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One Hugging Face tensor: its name, its shape and how it maps onto our pytree.

    `path` is the location in our params; `layer` is the index along the stacked `layers` axis (None for
    unstacked parameters). `to_ours` / `to_hf` convert one tensor between the two layouts.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]
    layer: int | None
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layout: str = "identity"  # "identity" | "transpose" | "q" ([H*K, D] -> [D, H, K]) | "o" ([D, H*K] -> [H, K, D])


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


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

    specs = [TensorSpec("shared.weight", (v, d), ("shared",), None, _identity, _identity)]
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (v, d), ("lm_head",), None, _transpose, _transpose, "transpose"))

    mlp_names = ("wi_0", "wi_1", "wo") if config.is_gated_act else ("wi", "wo")
    for stack, num_layers in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
        specs.append(TensorSpec(
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (config.relative_attention_num_buckets, h), (stack, "relpos_bias", "embedding"), None,
            _identity, _identity,
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
                                        (stack, "layers", f"{our_attn}_norm", "scale"), layer, _identity, _identity))
            ff = len(sublayers)
            for name in mlp_names:
                shape = (d, f) if name == "wo" else (f, d)
                specs.append(TensorSpec(f"{prefix}.{ff}.DenseReluDense.{name}.weight", shape,
                                        (stack, "layers", "mlp", name), layer, _transpose, _transpose, "transpose"))
            specs.append(TensorSpec(f"{prefix}.{ff}.layer_norm.weight", (d,),
                                    (stack, "layers", "mlp_norm", "scale"), layer, _identity, _identity))
        specs.append(TensorSpec(f"{stack}.final_layer_norm.weight", (d,), (stack, "final_norm", "scale"), None,
                                _identity, _identity))
    return specs


# --------------------------------------------------------------------------------------------------
# Reading weight files
# --------------------------------------------------------------------------------------------------

class _WeightFiles:
    """Tensor name -> file, over one or several safetensors / torch files, read lazily."""

    def __init__(self, directory: str):
        self.directory = directory
        self.location: dict[str, str] = {}
        self._torch_cache: dict[str, dict] = {}
        self.listing = directory  # the file (or shard index) that lists the tensors; set by _discover
        self.kind = self._discover()

    def _discover(self) -> str:
        d = self.directory
        single_st, index_st = os.path.join(d, SAFETENSORS_NAME), os.path.join(d, SAFETENSORS_INDEX_NAME)
        single_pt, index_pt = os.path.join(d, TORCH_NAME), os.path.join(d, TORCH_INDEX_NAME)
        if os.path.isfile(single_st):
            self.listing = single_st
            self._index_safetensors(single_st)
            return "safetensors"
        if os.path.isfile(index_st):
            self.listing = index_st
            for name, file in self._read_index(index_st).items():
                self.location[name] = file
            for file in sorted(set(self.location.values())):
                self._check_safetensors_header(file)
            return "safetensors"
        if os.path.isfile(single_pt):
            self.listing = single_pt
            for name in self._torch_tensors(single_pt):
                self.location[name] = single_pt
            return "torch"
        if os.path.isfile(index_pt):
            self.listing = index_pt
            for name, file in self._read_index(index_pt).items():
                self.location[name] = file
            return "torch"
        raise CheckpointError(
            f"{d}: no weights found; expected one of {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
            f"{TORCH_NAME}, {TORCH_INDEX_NAME}"
        )

    def _read_index(self, index_path: str) -> dict[str, str]:
        try:
            with open(index_path, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: not a valid shard index (need a JSON 'weight_map'): {exc}") from exc
        resolved = {}
        for name, file in weight_map.items():
            path = os.path.join(self.directory, file)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index_path}: tensor '{name}' is mapped to missing shard file {path}")
            resolved[name] = path
        return resolved

    def _index_safetensors(self, path: str) -> None:
        for name in self._check_safetensors_header(path):
            self.location[name] = path

    @staticmethod
    def _check_safetensors_header(path: str) -> list[str]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="np") as handle:
                return list(handle.keys())
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc

    def _torch_tensors(self, path: str) -> dict:
        if path not in self._torch_cache:
            try:
                import torch
            except ImportError as exc:
                raise CheckpointError(
                    f"{path}: reading PyTorch .bin weights needs torch (pip install torch); "
                    "or convert the checkpoint to safetensors"
                ) from exc
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
                raise CheckpointError(f"{path}: cannot be read as a weights-only PyTorch state dict ({exc})") from exc
            if not isinstance(state, dict):
                raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
            self._torch_cache[path] = state
        return self._torch_cache[path]

    def names(self) -> set[str]:
        return set(self.location)

    def get(self, name: str) -> np.ndarray:
        path = self.location[name]
        if self.kind == "safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(path, framework="np") as handle:
                    return handle.get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read tensor '{name}' ({exc})") from exc
        tensor = self._torch_tensors(path)[name]
        return _torch_to_numpy(tensor)

    def source(self, name: str) -> str:
        """The file holding tensor `name`, or the file listing the tensors if it is absent."""
        return self.location.get(name, self.listing)

    def _handle(self, path: str):
        from safetensors import safe_open

        handles = self.__dict__.setdefault("_handles", {})
        if path not in handles:
            handles[path] = safe_open(path, framework="np")
        return handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        """A safetensors tensor's shape from the file header (nothing read)."""
        return tuple(self._handle(self.location[name]).get_slice(name).get_shape())

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """Only the part `index` (unit-step slices) of a safetensors tensor; recorded in `slices_read`."""
        from safetensors import SafetensorError

        path = self.location[name]
        try:
            array = np.asarray(self._handle(path).get_slice(name)[index])
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read tensor '{name}' ({exc})") from exc
        self.__dict__.setdefault("slices_read", []).append((name, tuple((s.start, s.stop) for s in index)))
        return array

    def close(self) -> None:
        self.__dict__.pop("_handles", None)


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


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


def _convert_dtype(array: np.ndarray, dtype) -> np.ndarray:
    if dtype == "auto":
        return array
    return np.asarray(array, dtype=np.dtype(dtype))


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

    stacked: dict[tuple[str, ...], list] = {}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for spec in specs:
        tensor = get_tensor(spec.hf_name)
        if tuple(tensor.shape) != spec.hf_shape:
            raise CheckpointError(
                f"{source_of(spec.hf_name)}: tensor '{spec.hf_name}' has shape {tuple(tensor.shape)} but config.json "
                f"implies {spec.hf_shape} ({_describe_dims(config)})"
            )
        ours = _checked_finite(_convert_dtype(spec.to_ours(np.asarray(tensor)), dtype), spec.hf_name, source_of)
        if spec.layer is None:
            flat[spec.path] = ours
        else:
            stacked.setdefault(spec.path, []).append(ours)
    for path, layers in stacked.items():
        flat[path] = np.stack(layers)

    params: dict = {}
    for path, array in flat.items():
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(array)
    return config, params


def _checked_finite(array: np.ndarray, name: str, source_of, part: str = "") -> np.ndarray:
    """`array` (HF tensor `name`, as loaded), refused if it holds a NaN or an infinity: such a weight makes
    every logit NaN, which would otherwise pass silently as empty runs and rank-0 sweeps."""
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return array
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        raise CheckpointError(f"{source_of(name)}: tensor '{name}' holds {bad} non-finite value(s) (NaN or inf){part}; "
                              "the checkpoint is corrupt or was saved after training diverged")
    return array


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
        return region, _identity
    if spec.layout == "transpose":
        return (region[1], region[0]), _transpose
    if spec.layout == "q":  # ours [D, H, K] <- hf [H*K, D]
        d, h, kv = region
        rows = slice(h.start * k, h.stop * k)
        return (rows, d), lambda x: np.ascontiguousarray(x.T.reshape(d.stop - d.start, h.stop - h.start, k)[:, :, kv])
    if spec.layout == "o":  # ours [H, K, D] <- hf [D, H*K]
        h, kv, d = region
        cols = slice(h.start * k, h.stop * k)
        return (d, cols), lambda x: np.ascontiguousarray(x.T.reshape(h.stop - h.start, k, d.stop - d.start)[:, kv, :])
    raise ValueError(f"unknown tensor layout {spec.layout!r}")


def sharded_params_from_safetensors(config: T5Config, files: "_WeightFiles", partitioner, dtype="float32"
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
                    parts.append(_checked_finite(part, spec.hf_name, source_of, f" in the slice [{where}] read"))
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
    config = T5Config.from_json_file(config_path)
    files = _WeightFiles(directory)
    from genir_jax.scale.partitioning import current

    partitioner = partitioner if partitioner is not None else current()
    if partitioner is not None and files.kind == "safetensors":
        try:
            config, params = sharded_params_from_safetensors(config, files, partitioner, dtype=dtype)
        finally:
            files.close()
    else:
        config, params = params_from_hf_tensors(config, files.get, files.names(), files.source, dtype=dtype)
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
    host = jax.device_get(params)
    for spec in hf_tensor_specs(config):
        node = host
        for key in spec.path:
            node = node[key]
        array = np.asarray(node if spec.layer is None else node[spec.layer])
        tensor = spec.to_hf(array)
        if tuple(tensor.shape) != spec.hf_shape:
            raise ValueError(f"params at {'/'.join(spec.path)} give {spec.hf_name} shape {tensor.shape}, "
                             f"expected {spec.hf_shape}")
        yield spec.hf_name, np.ascontiguousarray(tensor)


def _dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else np.dtype(dtype).name


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
    from safetensors.numpy import save_file

    path = os.fspath(path)
    config = model.config
    tensors = dict(hf_tensors_from_params(config, model.params))
    if dtype is not None:
        tensors = {name: np.asarray(t, dtype=np.dtype(dtype)) for name, t in tensors.items()}
    stored_dtype = _dtype_name(tensors["shared.weight"].dtype)

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".genir-save-", dir=parent)
    try:
        config.to_json_file(os.path.join(staging, CONFIG_NAME), dtype=stored_dtype)
        shards = _shard(tensors, max_shard_bytes)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], os.path.join(staging, SAFETENSORS_NAME), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(staging, name), metadata=metadata)
                weight_map.update({tensor: name for tensor in shard})
            total = int(sum(t.nbytes for t in tensors.values()))
            with open(os.path.join(staging, SAFETENSORS_INDEX_NAME), "w", encoding="utf-8") as handle:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
        if model.tokenizer is not None:
            save_tokenizer(model.tokenizer, staging)
        raise_if_interrupted()  # an interrupt some handler swallowed still stops the commit
        os.makedirs(path, exist_ok=True)
        for existing in os.listdir(path):  # weights of an earlier save must not mix with these
            if existing in _WEIGHT_FILE_NAMES or _SHARD_PATTERN.fullmatch(existing):
                os.remove(os.path.join(path, existing))
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(path, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


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


def _shard(tensors: dict[str, np.ndarray], max_shard_bytes: int | None) -> list[dict[str, np.ndarray]]:
    if not max_shard_bytes:
        return [tensors]
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    return shards
