"""genir-jax: mechanistic interpretability of generative retrieval (DSI-style T5) models in JAX.

The functional core::

    import genir_jax as gj
    model = gj.load_pretrained(path_or_hub_id)       # .config, .params, .tokenizer
    logits = gj.forward(model.config, model.params, input_ids, attention_mask, decoder_input_ids)
    gj.save_pretrained(path, model)

``import genir_jax`` is light: the names below that need JAX (and the modules behind them) are imported on
first use, so the command line can parse its arguments without loading JAX. Nothing global is changed on
import (the persistent compilation cache is opt-in: `genir_jax.scale.compile_cache.enable_compilation_cache`).
"""

from __future__ import annotations

import importlib
from typing import Any

from genir_jax.base.errors import CheckpointError, ConfigError, GenIRError
from genir_jax.core.config import T5Config

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "GenIRError", "Patch", "PretrainedModel", "T5Config", "add_docid_tokens",
    "decode", "docid_token", "docid_token_ids", "docid_vocabulary", "encode", "expand_site_patterns", "forward",
    "forward_with_cache", "init_params", "load_pretrained", "logical_axes", "neuron_ablation", "param_shapes",
    "resize_token_embeddings", "save_pretrained", "site_name", "t5_v1_0", "t5_v1_1", "unembed",
]

# name -> module that defines it; imported on first attribute access (PEP 562)
_LAZY = {
    **dict.fromkeys(("add_docid_tokens", "docid_token", "docid_token_ids", "docid_vocabulary",
                     "resize_token_embeddings"), "genir_jax.docids.tokens"),
    **dict.fromkeys(("PretrainedModel", "load_pretrained", "save_pretrained"), "genir_jax.checkpoints.hf"),
    **dict.fromkeys(("forward", "forward_with_cache", "encode", "decode", "unembed", "init_params", "logical_axes",
                     "param_shapes"), "genir_jax.core.model"),
    **dict.fromkeys(("t5_v1_0", "t5_v1_1"), "genir_jax.core.config"),
    **dict.fromkeys(("expand_site_patterns", "site_name"), "genir_jax.core.sites"),
    "neuron_ablation": "genir_jax.interp.interventions",
    "Patch": "genir_jax.core.taps",
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
