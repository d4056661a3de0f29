"""The PyTorch loops a capable user would write for a neuron zero-ablation sweep, to measure genir-jax against.

Three loops over transformers' PyTorch T5 (the same checkpoint), each zeroing one decoder MLP neuron per
configuration (a forward pre-hook on the layer's ``wo``, i.e. TransformerLens' ``mlp.hook_post``) and ranking
each query's target token over the whole vocabulary (ties: lower id first, as genir-jax):

- ``batched``: all queries in one masked batch per configuration (encoder run for every configuration);
- ``encoder_cached``: the encoder run once, its output reused for every configuration (``encoder_outputs=``);
- ``configs_batched``: the encoder run once and C configurations of one layer in one batch of C x Q rows, the
  hook zeroing a different neuron in each block of Q rows (the smartest loop of the three).

Run as a script in its own interpreter so torch's threads never share the process with JAX's:

    python benchmarks/torch_baselines.py SPEC.json OUT.json

SPEC: ``{"checkpoint", "ids" [[...]], "mask" [[...]], "targets" [...], "pairs" [[layer, neuron], ...],
"threads", "loops" [...], "configs_per_batch"}``. OUT: per loop ``{"seconds", "config_queries_per_s", "ranks"}``
plus the torch version and the thread count. `machine_is_idle` is the load check the benchmarks use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

LOOPS = ("batched", "encoder_cached", "configs_batched")


def loadavg() -> str:
    """/proc/loadavg's line (the 1, 5 and 15 minute load averages ...)."""
    with open("/proc/loadavg") as handle:
        return handle.read().strip()


def log(message: str) -> None:
    """A timestamped progress line with the current 1-minute load average."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}  (load {loadavg().split()[0]})", flush=True)


def machine_is_idle(max_load_per_core: float = 0.25, seconds: float = 2.0) -> tuple[bool, str]:
    """Whether other processes use the CPUs: the share of busy CPU time over `seconds` (from /proc/stat) minus
    nothing of ours (call it when this process is idle). Returns (idle, a line that says what was measured)."""
    def busy_total():
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    busy0, total0 = busy_total()
    time.sleep(seconds)
    busy1, total1 = busy_total()
    share = (busy1 - busy0) / max(1, total1 - total0)
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[0]
    line = f"CPU busy {share:.0%} over {seconds:.0f} s with this process idle, load average {load}, {os.cpu_count()} cores"
    return share <= max_load_per_core, line


def run_baselines(spec: dict, python: str = sys.executable) -> dict:
    """Run the loops of `spec` in a fresh interpreter and return their results."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as handle:
            json.dump(spec, handle)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        result = subprocess.run([python, os.path.abspath(__file__), spec_path, out_path], capture_output=True,
                                text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"torch baselines failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        with open(out_path) as handle:
            return json.load(handle)


def _child(spec_path: str, out_path: str) -> None:
    import torch
    from transformers import T5ForConditionalGeneration

    with open(spec_path) as handle:
        spec = json.load(handle)
    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.set_grad_enabled(False)
    model = T5ForConditionalGeneration.from_pretrained(spec["checkpoint"]).eval()
    ids = torch.tensor(spec["ids"], dtype=torch.long)
    mask = torch.tensor(spec["mask"], dtype=torch.long)
    targets = torch.tensor(spec["targets"], dtype=torch.long)
    pairs = [tuple(p) for p in spec["pairs"]]
    queries = len(ids)
    vocab = torch.arange(model.config.vocab_size)
    start = torch.full((queries, 1), model.config.decoder_start_token_id, dtype=torch.long)
    blocks = model.decoder.block

    def ranks_of(logits, rows_targets):  # logits [N, V]
        target = logits.gather(1, rows_targets[:, None])
        ahead = (logits > target) | ((logits == target) & (vocab[None, :] < rows_targets[:, None]))
        return ahead.sum(1)

    def zero_hook(neurons_by_row):
        def hook(module, inputs):
            hidden = inputs[0].clone()
            hidden[torch.arange(hidden.shape[0]), :, neurons_by_row] = 0.0
            return (hidden,)
        return hook

    def with_hook(layer, neurons_by_row, run):
        handle = blocks[layer].layer[2].DenseReluDense.wo.register_forward_pre_hook(zero_hook(neurons_by_row))
        try:
            return run()
        finally:
            handle.remove()

    def one_config_per_forward(pairs, encoded=None):
        """Each configuration in its own forward over all queries; the encoder rerun unless `encoded`."""
        inputs = {"input_ids": ids} if encoded is None else {"encoder_outputs": encoded}
        out = []
        for layer, neuron in pairs:
            logits = with_hook(layer, torch.full((queries,), neuron), lambda: model(
                attention_mask=mask, decoder_input_ids=start, **inputs).logits[:, 0])
            out.append(ranks_of(logits, targets).tolist())
        return out

    def batched(pairs):
        return one_config_per_forward(pairs)

    def encoder_cached(pairs):
        return one_config_per_forward(pairs, model.encoder(input_ids=ids, attention_mask=mask))

    def configs_batched(pairs):
        per_batch = int(spec.get("configs_per_batch", 16))
        encoded = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        out = {}
        by_layer: dict[int, list[int]] = {}
        for index, (layer, _) in enumerate(pairs):
            by_layer.setdefault(layer, []).append(index)
        for layer, indices in by_layer.items():
            for first in range(0, len(indices), per_batch):
                chunk = indices[first:first + per_batch]
                count = len(chunk)
                neurons = torch.tensor([pairs[i][1] for i in chunk]).repeat_interleave(queries)
                rows = (encoded.repeat(count, 1, 1), mask.repeat(count, 1), start.repeat(count, 1))
                logits = with_hook(layer, neurons, lambda: model(
                    encoder_outputs=(rows[0],), attention_mask=rows[1], decoder_input_ids=rows[2]).logits[:, 0])
                ranks = ranks_of(logits, targets.repeat(count)).reshape(count, queries)
                for i, row in zip(chunk, ranks.tolist()):
                    out[i] = row
        return [out[i] for i in range(len(pairs))]

    loops = {"batched": batched, "encoder_cached": encoder_cached, "configs_batched": configs_batched}
    results = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    for name in spec.get("loops", LOOPS):
        loops[name](pairs[:2])  # warm-up (one-off allocations)
        began = time.perf_counter()
        ranks = loops[name](pairs)
        seconds = time.perf_counter() - began
        results[name] = {"seconds": seconds, "config_queries_per_s": len(pairs) * queries / seconds, "ranks": ranks}
    with open(out_path, "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
