"""genir-jax: mechanistic interpretability of generative retrieval (DSI-style T5) models in JAX.

The functional core::

    import genir_jax as gj
    model = gj.load_pretrained(path_or_hub_id)       # .config, .params, .tokenizer
    logits = gj.forward(model.config, model.params, input_ids, attention_mask, decoder_input_ids)
    gj.save_pretrained(path, model)
"""

from genir_jax.config import T5Config
from genir_jax.docids import add_docid_tokens, docid_token, docid_token_ids, resize_token_embeddings
from genir_jax.errors import CheckpointError, ConfigError, GenIRError
from genir_jax.hf import PretrainedModel, load_pretrained, save_pretrained
from genir_jax.model import forward, forward_with_cache, init_params, logical_axes, param_shapes
from genir_jax.taps import Patch

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "GenIRError", "Patch", "PretrainedModel", "T5Config", "add_docid_tokens",
    "docid_token", "docid_token_ids", "forward", "forward_with_cache", "init_params", "load_pretrained",
    "logical_axes", "param_shapes", "resize_token_embeddings", "save_pretrained",
]
