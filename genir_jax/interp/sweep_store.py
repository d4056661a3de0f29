"""A resumable chunk store for `genir_jax.interp.patching.run_sweep`: finished chunks kept on disk.

    store = DirectoryStore("out/.sweep-chunks", settings={"checkpoint": ..., "sites": [...], ...})
    result = run_sweep(..., store=store)   # a rerun after a kill computes only the missing chunks
    store.clear()                           # once the outputs are written

The store belongs to one set of settings (`settings.json` in the directory): reopening it with other
settings raises a `GenIRError` that names every differing key with both values, so results of different
runs are never mixed. Chunks are ``chunks/{key}.npz``, each written to a temporary name in the same
directory and renamed, so a kill never leaves a truncated chunk that a rerun would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

from genir_jax.base.errors import GenIRError
from genir_jax.base.runs import normalise_settings, settings_difference

SETTINGS = "settings.json"
CHUNKS = "chunks"


class StoreError(GenIRError, ValueError):
    """A chunk store that belongs to other settings (or cannot be used)."""


def _normalise(settings: Mapping[str, Any]) -> dict:
    """Settings as JSON gives them back (tuples -> lists, keys -> str), for comparison."""
    try:
        json.dumps(dict(settings))
    except TypeError as exc:
        raise StoreError(f"store settings must be JSON data: {exc}") from None
    return normalise_settings(settings)


class DirectoryStore:
    """``get(key)`` / ``put(key, arrays)`` over ``path/chunks/{key}.npz``; see the module docstring."""

    def __init__(self, path: str | os.PathLike, settings: Mapping[str, Any]):
        self.path = os.fspath(path)
        self.settings = _normalise(settings)
        settings_path = os.path.join(self.path, SETTINGS)
        if os.path.isfile(settings_path):
            try:
                with open(settings_path, encoding="utf-8") as handle:
                    stored = json.load(handle)
            except (OSError, json.JSONDecodeError) as exc:
                raise StoreError(f"{settings_path}: unreadable ({exc}); remove {self.path} to start over") from None
            difference = settings_difference(stored, self.settings)
            if difference:
                raise StoreError(f"{self.path} holds a partial run with other settings; resuming with other settings "
                                 f"is refused ({'; '.join(difference)}). Rerun with the stored settings to resume, "
                                 f"or remove {self.path} to start over")
        else:
            os.makedirs(self.path, exist_ok=True)
            self._write_atomic(settings_path, lambda temp: _write_json(temp, self.settings))
        os.makedirs(os.path.join(self.path, CHUNKS), exist_ok=True)
        self.puts = 0

    def _chunk_path(self, key: str) -> str:
        if not key or os.sep in key or key.startswith("."):
            raise StoreError(f"bad chunk key {key!r}")
        return os.path.join(self.path, CHUNKS, f"{key}.npz")

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        path = self._chunk_path(key)
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                return {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            # truncated or corrupt (a copy cut short, a full disk): recompute it rather than fail the resume
            warnings.warn(f"{path}: unreadable sweep chunk ({type(exc).__name__}: {exc}); recomputing it",
                          stacklevel=2)
            return None

    def put(self, key: str, arrays: Mapping[str, Any]) -> None:
        path = self._chunk_path(key)
        self._write_atomic(path, lambda temp: _write_npz(temp, arrays))
        self.puts += 1

    def keys(self) -> list[str]:
        directory = os.path.join(self.path, CHUNKS)
        if not os.path.isdir(directory):
            return []
        return sorted(name[:-4] for name in os.listdir(directory) if name.endswith(".npz") and not name.startswith("."))

    def __len__(self) -> int:
        return len(self.keys())

    def clear(self) -> None:
        """Remove the whole store (after the outputs are written, or to start over)."""
        shutil.rmtree(self.path, ignore_errors=True)

    complete = clear

    @staticmethod
    def _write_atomic(path: str, write) -> None:
        directory = os.path.dirname(path)
        handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        os.close(handle)
        try:
            write(temp)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temp)
            raise


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.write("\n")


def _write_npz(path: str, arrays: Mapping[str, Any]) -> None:
    with open(path, "wb") as handle:  # a file object: np.savez would append ".npz" to a name
        np.savez(handle, **{name: np.asarray(value) for name, value in arrays.items()})
