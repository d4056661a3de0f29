"""Optimizers and learning-rate schedules: Adafactor as T5/DSI train, AdamW as the alternative.

- Adafactor (default): optax's implementation with T5's settings (factored second moments, decay rate
  0.8, update clipping at RMS 1.0, no momentum). `multiply_by_parameter_scale=True` (T5 and t5x's
  default) makes steps relative to each parameter's RMS, which is what lets T5 pre-train at lr 0.01;
  DSI and T5 fine-tuning recipes usually turn it off and use a constant lr of about 1e-3.
- AdamW: b1 0.9, b2 0.999, eps 1e-8, decoupled weight decay, gradients clipped to global norm 1.0
  (the defaults of the Hugging Face Trainer that the reference code uses).

Schedules (all start with a linear warmup; `step` counts updates from 0, and update 0 already uses
``peak / warmup_steps`` so no step is wasted at lr 0):

- ``constant``: peak after warmup (T5 fine-tuning);
- ``linear``: linear decay from peak at the end of warmup to ``end_fraction * peak`` at `total_steps`;
- ``cosine``: cosine decay over the same range;
- ``rsqrt``: ``peak * sqrt(warmup_steps / step)`` after warmup (T5 pre-training's inverse square root).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import optax

from genir_jax.base.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine", "rsqrt")
OPTIMIZERS = ("adafactor", "adamw")


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """What to optimize with; serialisable (a preset field and part of a run's recorded settings)."""

    name: str = "adafactor"
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    end_fraction: float = 0.0  # final lr as a fraction of the peak (linear / cosine)
    weight_decay: float = 0.0  # AdamW's decoupled decay; Adafactor's weight_decay_rate when > 0
    clip_norm: float | None = 1.0  # AdamW only: global gradient-norm clipping
    multiply_by_parameter_scale: bool = False  # Adafactor only
    decay_rate: float = 0.8  # Adafactor only: second-moment decay exponent

    def validate(self, source: str = "optimizer") -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"{source}: 'name' = {self.name!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{source}: 'schedule' = {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"{source}: 'learning_rate' must be > 0, got {self.learning_rate!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{source}: 'warmup_steps' must be >= 0, got {self.warmup_steps!r}")
        if not 0 <= self.end_fraction <= 1:
            raise ConfigError(f"{source}: 'end_fraction' must be in [0, 1], got {self.end_fraction!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"{source}: 'weight_decay' must be >= 0, got {self.weight_decay!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"{source}: 'clip_norm' must be > 0 or null, got {self.clip_norm!r}")

    def replace(self, **changes) -> "OptimizerSpec":
        return dataclasses.replace(self, **changes)


def learning_rate_schedule(kind: str, peak: float, warmup_steps: int, total_steps: int,
                           end_fraction: float = 0.0) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The learning rate as a function of the update count (see the module docstring)."""
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown schedule {kind!r}; expected one of {', '.join(SCHEDULES)}")
    warmup = max(int(warmup_steps), 0)
    decay_steps = max(int(total_steps) - warmup, 1)
    end = peak * end_fraction

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if kind == "constant":
            after = jnp.asarray(peak, jnp.float32)
        elif kind == "linear":
            after = peak + (end - peak) * progress
        elif kind == "cosine":
            after = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:  # rsqrt
            after = peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, max(warmup, 1)))
        return jnp.where(step < warmup, warm, after)

    return schedule


def make_optimizer(spec: OptimizerSpec, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    """(optax transformation, its schedule) for `spec` over `total_steps` updates."""
    spec.validate()
    schedule = learning_rate_schedule(spec.schedule, spec.learning_rate, spec.warmup_steps, total_steps,
                                      spec.end_fraction)
    if spec.name == "adafactor":
        optimizer = optax.adafactor(
            learning_rate=schedule,
            decay_rate=spec.decay_rate,
            clipping_threshold=1.0,
            multiply_by_parameter_scale=spec.multiply_by_parameter_scale,
            momentum=None,
            factored=True,
            weight_decay_rate=spec.weight_decay or None,
        )
    else:
        parts = [optax.clip_by_global_norm(spec.clip_norm)] if spec.clip_norm else []
        parts.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=spec.weight_decay))
        optimizer = optax.chain(*parts)
    return optimizer, schedule
