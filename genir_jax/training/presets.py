"""Named training presets: model shape, optimizer, steps, batch, lengths and ratio for both stages.

=========  =====================================================  ============================================
preset     model (T5 v1.0: ReLU MLP, tied, rescaled; vocab 32128)  what it is for
=========  =====================================================  ============================================
tiny       d_model 64, 2+3 layers, 4 heads, d_ff 256               tests and smoke runs: seconds to a few minutes
cpu        d_model 128, 2+6 layers, 4 heads, d_ff 512              the best squad-dev model 2 CPU cores train in
                                                                    <= 30 minutes (pretrain + DSI fine-tune)
t5-large   d_model 1024, 24+24 layers, 16 heads, d_ff 4096         the paper's model and DSI recipe, for GPU/TPU
=========  =====================================================  ============================================

Each preset has a `PretrainSettings` (span corruption on the corpus text, `genir-jax pretrain`) and a
`DSISettings` (indexing + retrieval fine-tuning, `genir-jax train`); both carry a `RunSpec` (steps,
batch, optimizer, validation and checkpoint intervals) that the command line can override. `tiny` and `cpu`
also have `decoder_dsi` settings for `genir-jax train --model-type decoder` (a GPT-2 / Llama / Qwen2 base), a
`decoder_model` (`DecoderShape`: Llama-style, RoPE, RMSNorm, SwiGLU, untied head) and
`decoder_pretrain` (`CausalPretrainSettings`) for `genir-jax pretrain --model-type decoder`, which builds that
base from scratch on the T5 vocabulary (the only tokenizer available offline).

The paper regime (`paper_regime`, ``train --paper-regime``) is a data regime, not a model: it applies to
any preset's `DSISettings` the paper's indexing:retrieval ratio 32 and 32-token inputs (documents and
queries), and goes with a prepared directory split the NQ10k way (``prepare-data --paper-regime``:
validation/test documents indexed only). It is a flag rather than preset variants (``cpu-paper``, ...)
because it is orthogonal to the model shape and run length: one flag covers every preset, present and
future, and the recorded settings say which regime a model was trained in. ``t5-large`` already is in it.
"""

from __future__ import annotations

import dataclasses

from genir_jax.core.config import T5Config, t5_v1_0
from genir_jax.core.decoder_config import DecoderConfig
from genir_jax.base.errors import ConfigError
from genir_jax.training.optim import OptimizerSpec
from genir_jax.training.trainer import RunSpec

T5_VOCAB_SIZE = 32128  # 32100 SentencePiece pieces + sentinels, padded to a multiple of 128 as T5 does
PAPER_RATIO = 32         # paper Sec. 3: "an indexing-to-retrieval ratio of 32"
PAPER_INPUT_LENGTH = 32  # paper Sec. 3: "direct indexing with a maximum token length of 32"; the reference's
                         # preprocess.py --max-length truncates every input (queries too) to it


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
class DecoderShape:
    """Architecture of a decoder-only model built from scratch: Llama-style (RoPE, RMSNorm, SwiGLU MLP, untied
    `lm_head`), so transformers' `LlamaForCausalLM` loads it."""

    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    max_position_embeddings: int = 512  # RoPE has no table; this only bounds what the config.json promises

    def config(self, vocab_size: int = T5_VOCAB_SIZE, *, eos_token_id: int | None = None,
               pad_token_id: int | None = None) -> DecoderConfig:
        return DecoderConfig(model_type="llama", vocab_size=vocab_size, d_model=self.d_model,
                             num_layers=self.num_layers, num_heads=self.num_heads, d_ff=self.d_ff,
                             max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=False,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id)


@dataclasses.dataclass(frozen=True)
class CausalPretrainSettings:
    """Causal language modelling (next-token loss) on the corpus, for a fresh decoder-only model: the texts
    (each followed by EOS) are concatenated and cut into `sequence_length`-token rows."""

    run: RunSpec
    sequence_length: int = 64
    include_train_queries: bool = True
    val_chunks: int = 256  # rows held out for the validation loss
    adamw: OptimizerSpec = OptimizerSpec("adamw", 1e-3, "linear", 0, weight_decay=0.01)


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
    dropout_rate: float | None = 0.1  # None: the base model's own (decoder-only models have no dropout)
    docid_init: str = "mean"  # new docid rows: "mean" (transformers' resizing) or "random" (see dsi.with_docids)
    adamw: OptimizerSpec = OptimizerSpec("adamw", 5e-4, "linear", 0, weight_decay=0.01)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: ModelShape
    pretrain: PretrainSettings
    dsi: DSISettings
    # `train --model-type decoder`: DSI fine-tuning of a given decoder-only base (GPT-2 / Llama / Qwen2; any docid
    # scheme). No shape: the base checkpoint brings it (tests build random ones with transformers). None: the
    # preset has no decoder-only settings.
    decoder_dsi: DSISettings | None = None
    # `pretrain --model-type decoder`: the shape of a fresh decoder-only model and its causal-LM pre-training
    # (None: the preset cannot build one; `train --model-type decoder` then needs an existing `--base`).
    decoder_model: DecoderShape | None = None
    decoder_pretrain: CausalPretrainSettings | None = None


TINY = Preset(
    name="tiny",
    description="tests and smoke runs: a 2+3-layer d_model 64 T5 that memorises a 64-document corpus in minutes",
    model=ModelShape(d_model=64, num_layers=2, num_decoder_layers=3, num_heads=4, d_kv=16, d_ff=256,
                     dropout_rate=0.1),
    pretrain=PretrainSettings(
        run=RunSpec(steps=60, batch_size=16, seed=0, log_every=10, eval_every=30, checkpoint_every=30,
                    keep_checkpoints=2, unroll_layers=True,
                    optimizer=OptimizerSpec("adafactor", 1e-2, "rsqrt", 10, multiply_by_parameter_scale=True)),
        inputs_length=32, val_chunks=16),
    dsi=DSISettings(
        run=RunSpec(steps=400, batch_size=32, seed=0, log_every=50, eval_every=200, checkpoint_every=200,
                    keep_checkpoints=2, unroll_layers=True,
                    optimizer=OptimizerSpec("adafactor", 2e-2, "linear", 50, end_fraction=0.1,
                                            multiply_by_parameter_scale=True)),
        index_max_length=64, query_max_length=32, ratio=None, max_val_queries=64, docid_init="random"),
    decoder_dsi=DSISettings(  # no dropout (decoder-only models have none); AdamW as the reference's Trainer
        run=RunSpec(steps=400, batch_size=32, seed=0, log_every=50, eval_every=200, checkpoint_every=200,
                    keep_checkpoints=2, optimizer=OptimizerSpec("adamw", 3e-3, "linear", 20, end_fraction=0.1)),
        index_max_length=64, query_max_length=32, ratio=None, max_val_queries=64, dropout_rate=None,
        docid_init="random"),
    decoder_model=DecoderShape(d_model=64, num_layers=2, num_heads=4, d_ff=192),
    decoder_pretrain=CausalPretrainSettings(
        run=RunSpec(steps=60, batch_size=16, seed=0, log_every=10, eval_every=30, checkpoint_every=30,
                    keep_checkpoints=2, optimizer=OptimizerSpec("adamw", 3e-3, "linear", 10, end_fraction=0.1)),
        sequence_length=64, val_chunks=16),
)

CPU = Preset(
    name="cpu",
    description="the best squad-dev DSI model 2 CPU cores train in <= 30 minutes (pretrain + fine-tune)",
    model=ModelShape(d_model=128, num_layers=2, num_decoder_layers=6, num_heads=4, d_kv=32, d_ff=512,
                     dropout_rate=0.1),
    pretrain=PretrainSettings(
        run=RunSpec(steps=400, batch_size=64, seed=0, log_every=25, eval_every=100, checkpoint_every=100,
                    keep_checkpoints=2, unroll_layers=True,
                    optimizer=OptimizerSpec("adafactor", 1e-2, "rsqrt", 100, multiply_by_parameter_scale=True)),
        inputs_length=64, val_chunks=256),
    dsi=DSISettings(
        run=RunSpec(steps=4000, batch_size=64, seed=0, log_every=50, eval_every=500, checkpoint_every=500,
                    keep_checkpoints=2, unroll_layers=True,
                    optimizer=OptimizerSpec("adafactor", 2e-2, "linear", 200, end_fraction=0.1,
                                            multiply_by_parameter_scale=True)),
        index_max_length=128, query_max_length=32, ratio=None, max_val_queries=1024, docid_init="random"),
    # Decoder-only (a Llama-style model on the T5 vocabulary): pre-training computes every position's logits over
    # the 32128-token head, which dominates its cost (about 4.6 s per 32 x 128-token step on 2 shared cores at
    # load 5), so it reads about 1.3 epochs of the text; the DSI step computes the head only where a docid is
    # predicted (about 0.6 s per 64 examples, same load): about 9 epochs. Sized for 30 minutes from those step
    # times; the whole run is not timed yet.
    decoder_dsi=DSISettings(
        run=RunSpec(steps=1500, batch_size=64, seed=0, log_every=50, eval_every=200, checkpoint_every=200,
                    keep_checkpoints=2, optimizer=OptimizerSpec("adamw", 2e-3, "linear", 50, end_fraction=0.1)),
        index_max_length=64, query_max_length=32, ratio=None, max_val_queries=1024, dropout_rate=None,
        docid_init="random"),
    decoder_model=DecoderShape(d_model=128, num_layers=4, num_heads=4, d_ff=384),
    decoder_pretrain=CausalPretrainSettings(
        run=RunSpec(steps=150, batch_size=32, seed=0, log_every=25, eval_every=50, checkpoint_every=50,
                    keep_checkpoints=2, optimizer=OptimizerSpec("adamw", 2e-3, "linear", 15, end_fraction=0.1)),
        sequence_length=128, val_chunks=128),
)

# The paper's DSI fine-tuning recipe. Sources: [P] the paper (Reusch & Belinkov 2025), Sec. 3; [R] the reference
# code technion-cs-nlp/re-gen-ir (code/preprocess.py, code/train.py, code/requirements.txt), which trains with
# the Hugging Face Seq2SeqTrainer and takes every other hyperparameter from its command line (not published);
# [DSI] "We set all hyperparameters according to the ones reported in [30]" [P], [30] = DSI (Tay et al. 2022),
# values as in the DSI reproduction ArvinZhuang/DSI-transformers train.py (T5-large, NQ10k, HF Trainer):
# lr 5e-4, 10k warmup steps, batch 128, at most 1M steps. [HF] the Trainer's defaults for what neither sets:
# AdamW b1 0.9 / b2 0.999 / eps 1e-8, weight decay 0, gradient clipping at norm 1.0, linear decay to 0, fp32.
T5_LARGE_DSI_OPTIMIZER = OptimizerSpec(
    "adamw",              # [HF] Seq2SeqTrainer's default optimizer ([R] passes no --optim)
    5e-4,                 # [DSI] learning rate
    "linear",             # [HF] lr_scheduler_type "linear": linear decay to 0 after the warmup
    10_000,               # [DSI] linear warmup steps
    end_fraction=0.0,     # [HF] decays to 0 at the last step
    weight_decay=0.0,     # [HF] default (the DSI reproduction leaves it commented out)
    clip_norm=1.0,        # [HF] max_grad_norm
)

T5_LARGE = Preset(
    name="t5-large",
    description="the paper's model (T5-large) and DSI fine-tuning recipe, for GPU/TPU (sources in presets.py)",
    # [P] "We fine-tune T5-large models": 24+24 layers, d_model 1024, 16 heads of 64, ReLU d_ff 4096, dropout 0.1
    # (the public t5-large config, whose dropout the Trainer keeps while fine-tuning).
    model=ModelShape(d_model=1024, num_layers=24, num_decoder_layers=24, num_heads=16, d_kv=64, d_ff=4096,
                     dropout_rate=0.1),
    # Not part of the paper's recipe: the paper fine-tunes the public pretrained t5-large (pass it as --base).
    # These settings only build a corpus-only stand-in when no pretrained T5 is given (T5's own pre-training
    # optimizer: Adafactor, inverse square root schedule, 10k warmup).
    pretrain=PretrainSettings(
        run=RunSpec(steps=100_000, batch_size=128, seed=0, log_every=100, eval_every=5000, checkpoint_every=5000,
                    keep_checkpoints=3, bf16=True,
                    optimizer=OptimizerSpec("adafactor", 1e-2, "rsqrt", 10_000, multiply_by_parameter_scale=True)),
        inputs_length=512, val_chunks=1024),
    dsi=DSISettings(
        # [DSI] batch 128 and at most 1M steps (the best validation Hits@1 is kept, as [R]'s
        # load_best_model_at_end); [HF] fp32. Validation / checkpoint / log intervals are ours, not the recipe's.
        run=RunSpec(steps=1_000_000, batch_size=128, seed=0, log_every=100, eval_every=5000, checkpoint_every=5000,
                    keep_checkpoints=3, bf16=False, optimizer=T5_LARGE_DSI_OPTIMIZER),
        index_max_length=PAPER_INPUT_LENGTH,  # [P] 32 tokens of each document
        query_max_length=PAPER_INPUT_LENGTH,  # [R] preprocess.py --max-length applies to queries too
        ratio=PAPER_RATIO,                    # [P] indexing:retrieval 32, reached as [R] create_dataset does
        max_val_queries=1024,                 # [R] train.py validates on min(1024, len(valid)) queries
        dropout_rate=0.1,                     # the t5-large config's dropout (see the model shape)
        docid_init="random",                  # [R] pins transformers 4.44.0, whose resize_token_embeddings draws
                                              # the new docid rows fresh (mean resizing only came in 4.46)
        adamw=T5_LARGE_DSI_OPTIMIZER),
)

PRESETS = {preset.name: preset for preset in (TINY, CPU, T5_LARGE)}


def paper_regime(settings: DSISettings) -> DSISettings:
    """`settings` in the paper's data regime: indexing:retrieval ratio `PAPER_RATIO` and documents and queries
    truncated to `PAPER_INPUT_LENGTH` tokens; model, optimizer and run length stay the preset's."""
    return dataclasses.replace(settings, ratio=PAPER_RATIO, index_max_length=PAPER_INPUT_LENGTH,
                               query_max_length=PAPER_INPUT_LENGTH)


def is_paper_regime(settings: DSISettings) -> bool:
    """Whether `settings` train in the paper's data regime (ratio 32, 32-token inputs)."""
    return paper_regime(settings) == settings


def get_preset(name: str) -> Preset:
    """The preset called `name`; a `ConfigError` lists the known ones otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
