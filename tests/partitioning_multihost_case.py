"""Run by tests/scale/test_partitioning.py as two processes on localhost (2 simulated CPU devices each, gloo
collectives): a small sweep on a data=2,model=2 mesh spanning both processes; prints ``RESULT {json}``."""

from __future__ import annotations

import json
import sys

from genir_jax.scale.distributed import initialize, settings_from


def main(process_id: int, port: int) -> dict:
    initialize(settings_from(f"localhost:{port}", 2, process_id), timeout_s=120)
    import jax

    from genir_jax.scale.partitioning import Partitioner
    from genir_jax.interp.patching import run_sweep
    from tests.scale.test_partitioning import multihost_inputs

    config, params, ids, mask, targets, grid = multihost_inputs()
    result = run_sweep(config, params, ids, mask, targets, grid, partitioner=Partitioner("data=2,model=2"),
                       prefix_sharing=False, progress=False)
    return {"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "ranks": result.ranks.tolist(),
            "logits": result.values["logit"].tolist()}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(int(sys.argv[1]), int(sys.argv[2]))), flush=True)
