"""Training: span-corruption pre-training of a base T5 and DSI fine-tuning, with optax and orbax.

One idea per module:

- `span_corruption`: T5's noise masks, sentinels and packing (numpy, seeded);
- `optim`: Adafactor (default) / AdamW and warmup + decay schedules;
- `batching`: the data order, a pure function of (seed, step);
- `loop`: the jitted, data-parallel seq2seq train step (masked cross-entropy, optional bfloat16);
- `checkpointing`: orbax checkpoints (every K steps, keep N, atomic) and the best parameters;
- `trainer`: the driver (metrics.jsonl, validation, tqdm, exact resume);
- `presets`: tiny / cpu / t5-large;
- `pretrain` and `dsi`: the two stages end to end (data -> train -> Hugging Face export);
- `decoder_dsi`: DSI examples for decoder-only models (text + prompt + docid token(s), `dsi` with a decoder base).
"""

from genir_jax.training.optim import OptimizerSpec, learning_rate_schedule, make_optimizer
from genir_jax.training.presets import PRESETS, DSISettings, ModelShape, PretrainSettings, Preset, get_preset
from genir_jax.training.trainer import RunSpec, TrainResult, train_loop

__all__ = [
    "DSISettings", "ModelShape", "OptimizerSpec", "PRESETS", "Preset", "PretrainSettings", "RunSpec",
    "TrainResult", "get_preset", "learning_rate_schedule", "make_optimizer", "train_loop",
]
