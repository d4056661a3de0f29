"""DSI training throughput: our training step against transformers' PyTorch T5 training loop, same work.

Workload: the `cpu` preset's DSI fine-tuning (genir_jax.training.presets.CPU): a T5 v1.0 with 2 encoder +
6 decoder layers, d_model 128, 4 heads, d_ff 512, dropout 0.1, T5's 32128 rows plus one docid token per
squad-dev document (2067; vocab 34195), batch 64, one target token (the atomic docid), and the preset's
batch mix: indexing examples padded to 128 tokens, retrieval queries padded to 32 (the plan of
`genir_jax.training.batching.BatchPlan` over 2067 indexing and 8456 retrieval examples; the timed steps
are the first 16 query and 4 indexing steps of that plan, in plan order: 80% 32-token, 20% 128-token).
Token ids are random (speed does not depend on them); the same numpy batches feed both sides.

- ours: `genir_jax.training.loop.make_train_step` (what `genir-jax train` runs: dropout, the preset's
  Adafactor with its schedule and unrolled layers, folded cross-attention, donated state,
  loss/accuracy/grad-norm metrics) on batches from the real `BatchPlan` / `ArraySource` / `put_batch`, so
  host-side batching is inside the timed loop; glibc keeps freed memory (`genir_jax.scale.host_memory`, as the
  `genir-jax` command sets it up; the process is shared, so PyTorch runs with it too; ``--host-memory
  default`` turns it off for both);
- torch: `T5ForConditionalGeneration` in train mode, loss from `labels`, `backward()`, transformers'
  `Adafactor` with the same settings (lr 2e-2, scale_parameter, clip 1.0, decay -0.8, no momentum,
  relative_step off) and `zero_grad(set_to_none=True)`; `torch.set_num_threads(os.cpu_count())`
  (``--torch-threads 1`` when other jobs share the cores: two OpenMP threads then wait on each other);
  ``--optimizer adamw`` runs both sides with AdamW (b 0.9/0.999, eps 1e-8, weight decay 0.01, clip 1.0);
- forward: eval-mode loss (no dropout, no gradient) of both (`make_eval_step` / `torch.inference_mode`).

Each side runs `--warmup` steps first (compilation for ours), then `--rounds` rounds alternate the sides,
each side doing the same 20 steps per round; reported are examples/s per side (median and min-max over
rounds) and the ratio ours/torch per round (median, min-max). `--profile` adds where our step's time goes:
separately jitted pieces (forward, forward+backward, the optimizer update alone, host batching alone),
XLA's cost analysis (FLOPs, bytes) of each, and the top ops of a `jax.profiler` trace.

    python benchmarks/bench_train.py [--rounds 5] [--torch-threads 1] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from genir_jax.scale.host_memory import keep_freed_host_memory
from genir_jax.training.batching import ArraySource, BatchPlan
from genir_jax.training.loop import (
    create_state,
    data_mesh,
    make_eval_step,
    make_train_step,
    put_batch,
    put_state,
    seq2seq_loss,
)
from genir_jax.training.optim import OptimizerSpec, make_optimizer
from genir_jax.training.presets import CPU

DOCUMENTS, QUERIES = 2067, 8456  # squad-dev: indexing examples (128 tokens) and retrieval queries (32)
INDEX_LENGTH, QUERY_LENGTH = CPU.dsi.index_max_length, CPU.dsi.query_max_length
STEPS_PER_ROUND = {1: 16, 0: 4}  # group -> steps per round (group 1: queries, group 0: indexing)
ADAMW = OptimizerSpec("adamw", 5e-4, "linear", 0, weight_decay=0.01)


# --------------------------------------------------------------------------------------------------
# The workload
# --------------------------------------------------------------------------------------------------

def workload(seed: int = 0):
    """(config, params, source, plan, steps): the preset's model with docids, random token data in the
    preset's two groups, the real batch plan, and the plan steps one round times."""
    from genir_jax.core.model import init_params

    config = CPU.model.config(vocab_size=32128 + DOCUMENTS)
    rng = np.random.default_rng(seed)

    def group(count, length):
        lengths = rng.integers(length // 2, length + 1, size=count)
        ids = rng.integers(3, 32100, size=(count, length)).astype(np.int32)
        positions = np.arange(length)[None]
        ids = np.where(positions < lengths[:, None] - 1, ids, np.where(positions == lengths[:, None] - 1, 1, 0))
        return {"input_ids": ids.astype(np.int32), "attention_mask": (positions < lengths[:, None]).astype(np.int32),
                "targets": rng.integers(32128, config.vocab_size, size=(count, 1)).astype(np.int32),
                "target_mask": np.ones((count, 1), np.int32)}

    source = ArraySource([group(DOCUMENTS, INDEX_LENGTH), group(QUERIES, QUERY_LENGTH)])
    plan = BatchPlan(source.group_sizes, CPU.dsi.run.batch_size, seed)
    wanted, steps, step = dict(STEPS_PER_ROUND), [], 0
    while any(wanted.values()):
        group_index = plan.at(step)[0]
        if wanted.get(group_index):
            steps.append(step)
            wanted[group_index] -= 1
        step += 1
    return config, init_params(config, seed), source, plan, steps


# --------------------------------------------------------------------------------------------------
# Ours, and the prototype
# --------------------------------------------------------------------------------------------------

class JaxTrainer:
    """A step function with its compiled executables per batch shape, over the real batching."""

    def __init__(self, config, params, source, plan, spec: OptimizerSpec, total_steps: int, make_step):
        self.source, self.plan = source, plan
        self.mesh = data_mesh(jax.devices()[:1])
        self.optimizer, schedule = make_optimizer(spec, total_steps)
        self.step_fn = make_step(config, self.optimizer, self.mesh, schedule=schedule, dropout=True,
                                 unroll_layers=CPU.dsi.run.unroll_layers)
        self.state = put_state(create_state(params, self.optimizer, 0), self.mesh)
        self.compiled = {}

    def batch(self, step):
        group, indices, epoch = self.plan.at(step)
        return put_batch(self.source.batch(group, indices, epoch), self.mesh)

    def run(self, steps) -> float:
        started = time.perf_counter()
        metrics = None
        for step in steps:
            batch = self.batch(step)
            shape = batch["input_ids"].shape
            if shape not in self.compiled:
                self.compiled[shape] = self.step_fn.lower(self.state, batch).compile()
            self.state, metrics = self.compiled[shape](self.state, batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - started


class JaxForward:
    def __init__(self, config, params, source, plan):
        self.source, self.plan, self.params = source, plan, jax.device_put(params)
        self.evaluate = make_eval_step(config)

    def run(self, steps) -> float:
        started = time.perf_counter()
        out = None
        for step in steps:
            group, indices, epoch = self.plan.at(step)
            out = self.evaluate(self.params, self.source.batch(group, indices, epoch))
        jax.block_until_ready(out)
        return time.perf_counter() - started


# --------------------------------------------------------------------------------------------------
# transformers' PyTorch T5
# --------------------------------------------------------------------------------------------------

class TorchTrainer:
    """transformers' T5 with a plain PyTorch training loop (what the HF Trainer's inner step does)."""

    def __init__(self, config, source, plan, optimizer: str):
        import torch
        from transformers import T5Config as HFConfig
        from transformers import T5ForConditionalGeneration

        torch.manual_seed(0)
        self.torch, self.source, self.plan = torch, source, plan
        self.model = T5ForConditionalGeneration(HFConfig(**config.to_hf_dict()))
        if optimizer == "adafactor":
            from transformers.optimization import Adafactor

            spec = CPU.dsi.run.optimizer
            self.optimizer = Adafactor(self.model.parameters(), lr=spec.learning_rate, clip_threshold=1.0,
                                       decay_rate=-spec.decay_rate, beta1=None, weight_decay=0.0,
                                       scale_parameter=spec.multiply_by_parameter_scale, relative_step=False,
                                       warmup_init=False)
            self.clip = None
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=ADAMW.learning_rate, betas=(0.9, 0.999),
                                               eps=1e-8, weight_decay=ADAMW.weight_decay)
            self.clip = ADAMW.clip_norm

    def tensors(self, step):
        group, indices, epoch = self.plan.at(step)
        batch = self.source.batch(group, indices, epoch)
        return {name: self.torch.as_tensor(batch[name], dtype=self.torch.long) for name in
                ("input_ids", "attention_mask", "targets")}

    def run(self, steps) -> float:
        self.model.train()
        started = time.perf_counter()
        for step in steps:
            batch = self.tensors(step)
            loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["targets"]).loss
            loss.backward()
            if self.clip:
                self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        float(loss.detach())
        return time.perf_counter() - started

    def forward(self, steps) -> float:
        self.model.eval()
        started = time.perf_counter()
        with self.torch.inference_mode():
            for step in steps:
                batch = self.tensors(step)
                loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["targets"]).loss
        float(loss)
        return time.perf_counter() - started


# --------------------------------------------------------------------------------------------------
# Profile of our step
# --------------------------------------------------------------------------------------------------

def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"gflops": round(float(cost.get("flops", 0.0)) / 1e9, 3),
            "gbytes_accessed": round(float(cost.get("bytes accessed", 0.0)) / 1e9, 3)}


def _median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def profile(trainer: JaxTrainer, config, steps, repeats: int) -> dict:
    """Separately jitted pieces of our step on one batch of each length, their cost analysis, and the
    heaviest ops of a profiler trace of the whole step."""
    out = {}
    params = trainer.state.params
    opt_state = trainer.state.opt_state
    key = jax.random.PRNGKey(1)
    optimizer = trainer.optimizer

    def loss(p, b, k):
        return seq2seq_loss(config, p, b, dropout_rng=k, unroll_layers=CPU.dsi.run.unroll_layers)[0]

    pieces = {
        "forward (dropout)": (jax.jit(loss), lambda b: (params, b, key)),
        "forward (no dropout)": (jax.jit(lambda p, b: loss(p, b, None)), lambda b: (params, b)),
        "forward+backward (dropout)": (jax.jit(jax.grad(loss)), lambda b: (params, b, key)),
        "forward+backward (no dropout)": (jax.jit(jax.grad(lambda p, b: loss(p, b, None))), lambda b: (params, b)),
    }
    by_length = {}
    for step in steps:
        batch = trainer.batch(step)
        by_length.setdefault(batch["input_ids"].shape[1], batch)
    for length, batch in sorted(by_length.items()):
        rows = {}
        state = [trainer.state]
        compiled = trainer.compiled[batch["input_ids"].shape]

        def whole():
            state[0], metrics = compiled(state[0], batch)  # noqa: B023
            return metrics

        rows["whole step"] = {"ms": _median_ms(whole, repeats), **_cost(compiled)}
        trainer.state = state[0]
        params, opt_state = trainer.state.params, trainer.state.opt_state
        for name, (fn, args) in pieces.items():
            rows[name] = {"ms": _median_ms(lambda: fn(*args(batch)), repeats), **_cost(fn.lower(*args(batch)).compile())}  # noqa: B023
        grads = jax.jit(jax.grad(loss))(params, batch, key)
        update = jax.jit(lambda g, s, p: optax.apply_updates(p, optimizer.update(g, s, p)[0]))
        rows["optimizer update alone"] = {"ms": _median_ms(lambda: update(grads, opt_state, params), repeats),  # noqa: B023
                                          **_cost(update.lower(grads, opt_state, params).compile())}
        head = _loss_head(config)
        hidden = jnp.ones((batch["targets"].shape[0], 1, config.d_model), jnp.float32)
        rows["unembedding + cross-entropy, fwd+bwd"] = {
            "ms": _median_ms(lambda: head(params["shared"], hidden, batch["targets"]), repeats),  # noqa: B023
            **_cost(head.lower(params["shared"], hidden, batch["targets"]).compile())}
        plan_steps = iter(range(10 ** 9))
        rows["host batching alone (plan + gather + device_put)"] = {
            "ms": _median_ms(lambda: trainer.batch(next(plan_steps)), repeats * 5)}  # noqa: B023
        out[f"{length} tokens"] = rows
    out["top ops of the whole step (profiler trace)"] = trace_ops(trainer, by_length)
    return out


def _loss_head(config):
    """Unembedding (tied, rescaled) + cross-entropy, value and gradients w.r.t. the table and the hidden."""
    from genir_jax.training.loop import cross_entropy

    def head(table, hidden, targets):
        logits = jnp.einsum("btd,vd->btv", hidden * config.d_model ** -0.5, table)
        return cross_entropy(logits, targets, jnp.ones_like(targets))[0]

    return jax.jit(jax.grad(head, argnums=(0, 1)))


def trace_ops(trainer: JaxTrainer, by_length: dict, top: int = 12) -> dict:
    """The heaviest XLA ops (ms per step, with the op's source) of the compiled step, per batch length."""
    out = {}
    for length, batch in sorted(by_length.items()):
        compiled = trainer.compiled[batch["input_ids"].shape]
        names = {}
        for line in compiled.as_text().splitlines():
            parts = line.strip().removeprefix("ROOT ").split(" = ", 1)
            if len(parts) == 2 and parts[0].lstrip("%") not in names:
                op_name = parts[1].split('op_name="', 1)[1].split('"', 1)[0] if 'op_name="' in parts[1] else ""
                names[parts[0].lstrip("%")] = (parts[1].split(" ", 1)[0], op_name)
        with tempfile.TemporaryDirectory() as directory:
            state = trainer.state
            with jax.profiler.trace(directory, create_perfetto_trace=True):
                for _ in range(3):
                    state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
            trainer.state = state
            files = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
            if not files:
                return {"error": "no trace written"}
            with gzip.open(files[0], "rt") as handle:
                events = json.load(handle)
        events = events["traceEvents"] if isinstance(events, dict) else events
        totals = collections.Counter()
        for event in events:
            if event.get("ph") == "X" and event["name"] in names:
                totals[event["name"]] += event.get("dur", 0) / 1e3 / 3
        ops = sum(totals.values())
        out[f"{length} tokens"] = {"ops_ms_per_step": round(ops, 1), "top": [
            {"op": name, "ms": round(ms, 2), "shape": names[name][0], "source": names[name][1][-110:]}
            for name, ms in totals.most_common(top)]}
    return out


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------

def _summary(times: list[float], examples: int) -> dict:
    rates = [examples / t for t in times]
    return {"examples_per_s": round(statistics.median(rates), 1), "min": round(min(rates), 1),
            "max": round(max(rates), 1), "rounds": [round(r, 1) for r in rates]}


def _ratios(a: list[float], b: list[float]) -> dict:
    ratios = [tb / ta for ta, tb in zip(a, b)]  # time of b / time of a = rate of a / rate of b
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per side first")
    parser.add_argument("--optimizer", choices=("adafactor", "adamw"), default="adafactor")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-forward", action="store_true", help="skip the forward-only comparison")
    parser.add_argument("--profile", action="store_true", help="also profile our step (pieces, cost, trace)")
    parser.add_argument("--repeats", type=int, default=10, help="timings per piece with --profile")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: os.cpu_count(), as the comparison asks)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--host-memory", choices=("keep", "default"), default="keep",
                        help="keep: glibc keeps freed memory, as `genir-jax` sets it up on the CPU "
                             "(genir_jax.scale.host_memory; both sides share the process); default: glibc's defaults")
    args = parser.parse_args()

    host_memory_kept = args.host_memory == "keep" and keep_freed_host_memory()
    threads = args.torch_threads or os.cpu_count() or 1
    load_before = os.getloadavg()
    config, params, source, plan, steps = workload()
    examples = len(steps) * plan.batch_size
    spec = CPU.dsi.run.optimizer if args.optimizer == "adafactor" else ADAMW
    total = CPU.dsi.run.steps
    sides = {"ours": JaxTrainer(config, params, source, plan, spec, total, make_train_step)}
    if not args.no_forward:
        sides["ours forward"] = JaxForward(config, params, source, plan)
    if not args.no_torch:
        import torch

        torch.set_num_threads(threads)
        trainer = TorchTrainer(config, source, plan, args.optimizer)
        sides["torch"] = trainer
        if not args.no_forward:
            sides["torch forward"] = type("TorchForward", (), {"run": staticmethod(trainer.forward)})()
    print(f"cpu preset DSI: vocab {config.vocab_size}, batch {plan.batch_size}, {len(steps)} steps per round "
          f"({STEPS_PER_ROUND[1]} x {QUERY_LENGTH} tokens, {STEPS_PER_ROUND[0]} x {INDEX_LENGTH} tokens), "
          f"optimizer {args.optimizer}, {threads} torch threads, host memory kept: {host_memory_kept}, "
          f"load {load_before[0]:.1f}, "
          f"jax {jax.__version__} {jax.devices()[0].platform}")
    times = {name: [] for name in sides}
    for round_index in range(args.warmup + args.rounds):
        for name, side in sides.items():
            seconds = side.run(steps)
            if round_index >= args.warmup:
                times[name].append(seconds)
        if round_index >= args.warmup:
            print(f"  round {round_index - args.warmup + 1}: " + ", ".join(
                f"{name} {examples / t[-1]:.0f}" for name, t in times.items()), flush=True)
    results = {"workload": {"vocab_size": config.vocab_size, "batch": plan.batch_size, "steps_per_round": len(steps),
                            "query_steps": STEPS_PER_ROUND[1], "index_steps": STEPS_PER_ROUND[0],
                            "optimizer": args.optimizer, "torch_threads": threads, "rounds": args.rounds,
                            "cpus": os.cpu_count(), "load_average_before_after": [load_before[0], os.getloadavg()[0]],
                            "host_memory_kept": host_memory_kept},
               "examples_per_s": {name: _summary(t, examples) for name, t in times.items()}, "ratios": {}}
    pairs = [("ours", "torch", "train: ours / torch"), ("ours forward", "torch forward", "forward: ours / torch")]
    for a, b, label in pairs:
        if a in times and b in times:
            results["ratios"][label] = _ratios(times[a], times[b])

    print(f"\n{'side':<16} {'examples/s':>11} {'min':>8} {'max':>8}")
    for name, row in results["examples_per_s"].items():
        print(f"{name:<16} {row['examples_per_s']:11.1f} {row['min']:8.1f} {row['max']:8.1f}")
    print(f"\n{'ratio (per round)':<24} {'median':>7} {'min':>7} {'max':>7}")
    for label, row in results["ratios"].items():
        print(f"{label:<24} {row['median']:7.3f} {row['min']:7.3f} {row['max']:7.3f}")
    if args.profile:
        results["profile"] = profile(sides["ours"], config, steps, args.repeats)
        for length, rows in results["profile"].items():
            print(f"\n{length}")
            if "tokens" in length and "top" not in next(iter(rows.values())):
                for name, row in rows.items():
                    cost = f"{row['gflops']:8.3f} GFLOP {row['gbytes_accessed']:7.3f} GB" if "gflops" in row else ""
                    print(f"  {name:<52} {row['ms']:8.2f} ms {cost}")
            else:
                for sub, block in rows.items():
                    print(f"  {sub}: ops {block.get('ops_ms_per_step')} ms per step")
                    for op in block.get("top", []):
                        print(f"    {op['ms']:7.2f} ms {op['op']:<28} {op['shape'][:40]:<40} {op['source']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
