"""genir-jax: mechanistic interpretability of generative retrieval (DSI-style T5) models in JAX.

The functional core::

    import genir_jax as gj
    model = gj.load_pretrained(path_or_hub_id)       # .config, .params, .tokenizer
    logits = gj.forward(model.config, model.params, input_ids, attention_mask, decoder_input_ids)
    gj.save_pretrained(path, model)

``import genir_jax`` is light: the names below that need JAX (and the modules behind them) are imported on
first use, so the command line can parse its arguments without loading JAX. Nothing global is changed on
import (the persistent compilation cache is opt-in: `genir_jax.compile_cache.enable_compilation_cache`).
"""

from __future__ import annotations

import importlib
from typing import Any

from genir_jax.config import T5Config
from genir_jax.errors import CheckpointError, ConfigError, GenIRError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "GenIRError", "Patch", "PretrainedModel", "T5Config", "add_docid_tokens",
    "docid_token", "docid_token_ids", "forward", "forward_with_cache", "init_params", "load_pretrained",
    "logical_axes", "param_shapes", "resize_token_embeddings", "save_pretrained",
]

# name -> module that defines it; imported on first attribute access (PEP 562)
_LAZY = {
    "add_docid_tokens": "genir_jax.docids", "docid_token": "genir_jax.docids",
    "docid_token_ids": "genir_jax.docids", "resize_token_embeddings": "genir_jax.docids",
    "PretrainedModel": "genir_jax.hf", "load_pretrained": "genir_jax.hf", "save_pretrained": "genir_jax.hf",
    "forward": "genir_jax.model", "forward_with_cache": "genir_jax.model", "init_params": "genir_jax.model",
    "logical_axes": "genir_jax.model", "param_shapes": "genir_jax.model",
    "Patch": "genir_jax.taps",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'genir_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
