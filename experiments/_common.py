"""Small helpers the experiment entries share (reading a reproduction's files)."""

from __future__ import annotations

from genir_jax.analysis.stage_patching import default_stages
from genir_jax.config import T5Config


def full_config(layout) -> T5Config:
    return T5Config.from_json_file(layout.full / "config.json")


def stages_of(layout) -> list[list[int]]:
    layers = full_config(layout).num_decoder_layers
    return default_stages(layers)
