"""Run by tests/training/test_multihost_training.py: `train_loop` for 20 steps on a data=2,model=2 mesh, either as one
of two processes on localhost (2 simulated CPU devices each, gloo collectives) or as one process (4 devices).
Writes to the JSON file named last on its command line: the per-step losses, the final parameters (as lists)
and, per step, the number of batch rows this process loaded (a file, not stdout: a full pipe that nobody
reads would block one process while the other waits for it at shutdown)."""

from __future__ import annotations

import json
import sys

import numpy as np

from genir_jax.scale.distributed import initialize, settings_from

STEPS = 20
BATCH = 8


def model_and_data():
    """A tiny T5 and two groups of random examples (different widths), the same in every process."""
    import genir_jax as gj

    config = gj.t5_v1_0(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1,
                               num_heads=2, dropout_rate=0.1)
    rng = np.random.default_rng(0)
    groups = []
    for size, width in ((20, 8), (12, 4)):
        ids = rng.integers(2, config.vocab_size, (size, width)).astype(np.int32)
        groups.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                       "targets": rng.integers(2, config.vocab_size, (size, 1)).astype(np.int32),
                       "target_mask": np.ones((size, 1), np.int32)})
    return config, gj.init_params(config, 1), groups


class RecordingSource:
    """An `ArraySource` that remembers how many rows of each batch it was asked for."""

    def __init__(self, groups):
        from genir_jax.training.batching import ArraySource

        self.inner = ArraySource(groups)
        self.group_sizes = self.inner.group_sizes
        self.requested: list[int] = []

    def batch(self, group, indices, epoch):
        self.requested.append(len(indices))
        return self.inner.batch(group, indices, epoch)

    def fingerprint(self):
        return self.inner.fingerprint()


def train(run_dir: str) -> dict:
    """20 Adafactor steps with dropout; the losses, final parameters and rows loaded per step."""
    import jax

    from genir_jax.scale.partitioning import Partitioner, fetch
    from genir_jax.training.trainer import MetricsLog, RunSpec, train_loop

    config, params, groups = model_and_data()
    source = RecordingSource(groups)
    spec = RunSpec(steps=STEPS, batch_size=BATCH, seed=3, log_every=1, checkpoint_every=10)
    result = train_loop(config, params, source, spec, run_dir, progress=False,
                        partitioner=Partitioner("data=2,model=2"))
    losses = [r["loss"] for r in MetricsLog(f"{run_dir}/metrics.jsonl").records() if r["event"] == "train"]
    final = fetch(result.last_params)
    return {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
            "losses": losses, "rows_loaded": source.requested[-STEPS:],
            "params": {jax.tree_util.keystr(path): np.asarray(leaf).tolist()
                       for path, leaf in jax.tree_util.tree_flatten_with_path(final)[0]}}


def main(process_id: int, port: int, run_dir: str) -> dict:
    initialize(settings_from(f"localhost:{port}", 2, process_id), timeout_s=120)
    return train(run_dir)


if __name__ == "__main__":
    result = main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    with open(sys.argv[4], "w", encoding="utf-8") as handle:
        json.dump(result, handle)
