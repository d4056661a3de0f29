"""Hugging Face weight files, model-independent: reading, the name/layout table type, checks and writing.

Shared by every checkpoint family (`genir_jax.checkpoints.hf` for T5, `genir_jax.checkpoints.decoder_hf` for
GPT-2 / Llama / Qwen2): a family describes its tensors as a list of `TensorSpec`; `WeightFiles` reads
`model.safetensors`, sharded safetensors with an index, or `pytorch_model.bin` (``weights_only``);
`assemble_params` turns the tensors into our parameter pytree (every tensor checked for its shape and for
non-finite values); `tensors_from_specs` and `write_checkpoint` write them back atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Iterator

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np

from genir_jax.base.interrupts import raise_if_interrupted
from genir_jax.base.errors import CheckpointError

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
WEIGHT_FILE_NAMES = frozenset({SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME})
SHARD_PATTERN = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


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


def identity(x: np.ndarray) -> np.ndarray:
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


class WeightFiles:
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
            from safetensors import SafetensorError

            try:  # one open handle per file: opening parses the whole header, once per tensor was O(tensors^2)
                return self._handle(path).get_tensor(name)
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: cannot read tensor '{name}' ({exc})") from exc
        tensor = self._torch_tensors(path)[name]
        return torch_to_numpy(tensor)

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


def torch_to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def convert_dtype(array: np.ndarray, dtype) -> np.ndarray:
    if dtype == "auto":
        return array
    return np.asarray(array, dtype=np.dtype(dtype))


def checked_finite(array: np.ndarray, name: str, source_of, part: str = "") -> np.ndarray:
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


def shard_tensors(tensors: dict[str, np.ndarray], max_shard_bytes: int | None) -> list[dict[str, np.ndarray]]:
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


def assemble_params(specs: list[TensorSpec], get_tensor: Callable[[str], np.ndarray], source_of: Callable[[str], str],
                    dtype="float32", dims: str = "") -> dict:
    """Our parameter pytree from the HF tensors of `specs`: each converted to our layout and `dtype`, refused
    with the file and tensor named if its shape is not the spec's (`dims` describes the config in that
    message) or it holds a non-finite value; per-layer tensors are stacked along the leading layer axis."""
    stacked: dict[tuple[str, ...], list] = {}
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for spec in specs:
        tensor = get_tensor(spec.hf_name)
        if tuple(tensor.shape) != spec.hf_shape:
            raise CheckpointError(
                f"{source_of(spec.hf_name)}: tensor '{spec.hf_name}' has shape {tuple(tensor.shape)} but config.json "
                f"implies {spec.hf_shape} ({dims})"
            )
        ours = checked_finite(convert_dtype(spec.to_ours(np.asarray(tensor)), dtype), spec.hf_name, source_of)
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
        node[path[-1]] = jax.device_put(array)  # jnp.asarray would lower and compile a copy per shape
    return params


def tensors_from_specs(specs: list[TensorSpec], params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(name, tensor) pairs of the Hugging Face layout, in `specs` order."""
    host = jax.device_get(params)
    for spec in specs:
        node = host
        for key in spec.path:
            node = node[key]
        array = np.asarray(node if spec.layer is None else node[spec.layer])
        tensor = spec.to_hf(array)
        if tuple(tensor.shape) != spec.hf_shape:
            raise ValueError(f"params at {'/'.join(spec.path)} give {spec.hf_name} shape {tensor.shape}, "
                             f"expected {spec.hf_shape}")
        yield spec.hf_name, np.ascontiguousarray(tensor)


def dtype_name(dtype: np.dtype) -> str:
    """The name transformers writes in `config.json` for a numpy dtype (bfloat16 included)."""
    return "bfloat16" if dtype == ml_dtypes.bfloat16 else np.dtype(dtype).name


def write_checkpoint(path: str | os.PathLike, tensors: dict[str, np.ndarray], write_config: Callable[[str], None],
                     max_shard_bytes: int | None = None, write_extra: Callable[[str], None] | None = None) -> str:
    """Write a checkpoint directory: `write_config(directory)`, the tensors as safetensors (split into shards
    with an index above `max_shard_bytes`, as transformers does), then `write_extra(directory)` (a tokenizer).

    Everything is written to a temporary directory next to `path` and then moved into place, so an error
    never leaves a half-written checkpoint; weight files of an earlier save in `path` are removed.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".genir-save-", dir=parent)
    try:
        write_config(staging)
        shards = shard_tensors(tensors, max_shard_bytes)
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
        if write_extra is not None:
            write_extra(staging)
        raise_if_interrupted()  # an interrupt some handler swallowed still stops the commit
        os.makedirs(path, exist_ok=True)
        for existing in os.listdir(path):  # weights of an earlier save must not mix with these
            if existing in WEIGHT_FILE_NAMES or SHARD_PATTERN.fullmatch(existing):
                os.remove(os.path.join(path, existing))
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(path, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
