"""Named training presets: model shape, optimizer, steps, batch, lengths and ratio for both stages.

=========  =====================================================  ============================================
preset     model (T5 v1.0: ReLU MLP, tied, rescaled; vocab 32128)  what it is for
=========  =====================================================  ============================================
tiny       d_model 64, 2+3 layers, 4 heads, d_ff 256               tests and smoke runs: seconds to a few minutes
cpu        d_model 128, 2+6 layers, 4 heads, d_ff 512              the best squad-dev model 2 CPU cores train in
                                                                    <= 30 minutes (pretrain + DSI fine-tune)
t5-large   d_model 1024, 24+24 layers, 16 heads, d_ff 4096         the paper's shape, for GPU/TPU (not tuned here)
=========  =====================================================  ============================================

Each preset has a `PretrainSettings` (span corruption on the corpus text, `genir-jax pretrain`) and a
`DSISettings` (indexing + retrieval fine-tuning, `genir-jax train`); both carry a `RunSpec` (steps,
batch, optimizer, validation and checkpoint intervals) that the command line can override.
"""

from __future__ import annotations

import dataclasses

from genir_jax.config import T5Config, t5_v1_0
from genir_jax.errors import ConfigError
from genir_jax.training.optim import OptimizerSpec
from genir_jax.training.trainer import RunSpec

T5_VOCAB_SIZE = 32128  # 32100 SentencePiece pieces + sentinels, padded to a multiple of 128 as T5 does


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Architecture of a T5 built from scratch (T5 v1.0 style)."""

    d_model: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    d_kv: int
    d_ff: int
    dropout_rate: float = 0.1
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128

    def config(self, vocab_size: int = T5_VOCAB_SIZE) -> T5Config:
        return t5_v1_0(vocab_size=vocab_size, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class PretrainSettings:
    """Span corruption on the corpus (documents and training queries)."""

    run: RunSpec
    inputs_length: int = 64  # encoder length of a corrupted chunk (sentinels and EOS included)
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    include_train_queries: bool = True
    val_chunks: int = 256  # chunks held out for the validation loss
    adamw: OptimizerSpec = OptimizerSpec("adamw", 1e-3, "linear", 0, weight_decay=0.01)


@dataclasses.dataclass(frozen=True)
class DSISettings:
    """DSI fine-tuning: indexing examples (document -> docid) and retrieval examples (query -> docid)."""

    run: RunSpec
    index_max_length: int = 32  # document tokens per indexing example (the paper: 32)
    query_max_length: int = 32
    ratio: int | None = None  # indexing : retrieval examples (the reference's -r); None keeps both as they are
    max_val_queries: int = 1024  # the reference validates on at most 1024 queries
    dropout_rate: float = 0.1
    docid_init: str = "mean"  # new docid rows: "mean" (transformers' resizing) or "random" (see dsi.with_docids)
    adamw: OptimizerSpec = OptimizerSpec("adamw", 5e-4, "linear", 0, weight_decay=0.01)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: ModelShape
    pretrain: PretrainSettings
    dsi: DSISettings


TINY = Preset(
    name="tiny",
    description="tests and smoke runs: a 2+3-layer d_model 64 T5 that memorises a 64-document corpus in minutes",
    model=ModelShape(d_model=64, num_layers=2, num_decoder_layers=3, num_heads=4, d_kv=16, d_ff=256,
                     dropout_rate=0.1),
    pretrain=PretrainSettings(
        run=RunSpec(steps=60, batch_size=16, seed=0, log_every=10, eval_every=30, checkpoint_every=30,
                    keep_checkpoints=2,
                    optimizer=OptimizerSpec("adafactor", 1e-2, "rsqrt", 10, multiply_by_parameter_scale=True)),
        inputs_length=32, val_chunks=16),
    dsi=DSISettings(
        run=RunSpec(steps=400, batch_size=32, seed=0, log_every=50, eval_every=200, checkpoint_every=200,
                    keep_checkpoints=2,
                    optimizer=OptimizerSpec("adafactor", 2e-2, "linear", 50, end_fraction=0.1,
                                            multiply_by_parameter_scale=True)),
        index_max_length=64, query_max_length=32, ratio=None, max_val_queries=64, docid_init="random"),
)

CPU = Preset(
    name="cpu",
    description="the best squad-dev DSI model 2 CPU cores train in <= 30 minutes (pretrain + fine-tune)",
    model=ModelShape(d_model=128, num_layers=2, num_decoder_layers=6, num_heads=4, d_kv=32, d_ff=512,
                     dropout_rate=0.1),
    pretrain=PretrainSettings(
        run=RunSpec(steps=400, batch_size=64, seed=0, log_every=25, eval_every=100, checkpoint_every=100,
                    keep_checkpoints=2,
                    optimizer=OptimizerSpec("adafactor", 1e-2, "rsqrt", 100, multiply_by_parameter_scale=True)),
        inputs_length=64, val_chunks=256),
    dsi=DSISettings(
        run=RunSpec(steps=4000, batch_size=64, seed=0, log_every=50, eval_every=500, checkpoint_every=500,
                    keep_checkpoints=2,
                    optimizer=OptimizerSpec("adafactor", 2e-2, "linear", 200, end_fraction=0.1,
                                            multiply_by_parameter_scale=True)),
        index_max_length=128, query_max_length=32, ratio=None, max_val_queries=1024, docid_init="random"),
)

T5_LARGE = Preset(
    name="t5-large",
    description="the paper's shape (T5-large) for GPU/TPU; DSI settings after the paper / DSI recipes (untuned)",
    model=ModelShape(d_model=1024, num_layers=24, num_decoder_layers=24, num_heads=16, d_kv=64, d_ff=4096,
                     dropout_rate=0.1),
    pretrain=PretrainSettings(
        run=RunSpec(steps=100_000, batch_size=128, seed=0, log_every=100, eval_every=5000, checkpoint_every=5000,
                    keep_checkpoints=3, bf16=True,
                    optimizer=OptimizerSpec("adafactor", 1e-2, "rsqrt", 10_000, multiply_by_parameter_scale=True)),
        inputs_length=512, val_chunks=1024),
    dsi=DSISettings(
        run=RunSpec(steps=50_000, batch_size=128, seed=0, log_every=100, eval_every=2000, checkpoint_every=2000,
                    keep_checkpoints=3, bf16=True, optimizer=OptimizerSpec("adafactor", 1e-3, "constant", 1000)),
        index_max_length=32, query_max_length=32, ratio=32, max_val_queries=1024),
)

PRESETS = {preset.name: preset for preset in (TINY, CPU, T5_LARGE)}


def get_preset(name: str) -> Preset:
    """The preset called `name`; a `ConfigError` lists the known ones otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
