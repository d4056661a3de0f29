"""The plan table of docs/meshes-and-pods.md: t5-large / t5-xl / t5-xxl x forward / sweep / train on v5e-16, v4-64, 8 x H100.

Each cell is one ``genir-jax plan --devices N --json`` run (a fresh process with N simulated CPU devices);
finished cells are kept in `--out` and not computed again. Prints the markdown table.

    python benchmarks/plan_table.py [--out /tmp/plan/table] [--tasks train]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# slice -> (accelerator, devices (JAX devices = chips), mesh per shape)
SLICES = {
    "v5e-16": ("tpu-v5e", 16, {"t5-large": "data=16", "t5-xl": "data=4,model=4", "t5-xxl": "data=1,model=16"}),
    "v4-64": ("tpu-v4", 32, {"t5-large": "data=32", "t5-xl": "data=8,model=4", "t5-xxl": "data=4,model=8"}),
    "h100x8": ("h100", 8, {"t5-large": "data=8", "t5-xl": "data=2,model=4", "t5-xxl": "data=1,model=8"}),
}
TASKS = {
    "forward": ["--batch", "512"],
    "sweep": ["--batch", "64", "--configs", "64", "--total-queries", "1024"],
    "train": ["--batch", "128"],
}
SHAPES = ("t5-large", "t5-xl", "t5-xxl")


def cell(out: str, name: str, shape: str, task: str) -> str:
    accelerator, devices, meshes = SLICES[name]
    path = os.path.join(out, f"{name}_{shape}_{task}.json")
    if not os.path.exists(path):
        command = ["genir-jax", "plan", "--shape", shape, "--mesh", meshes[shape], "--devices", str(devices),
                   "--task", task, *TASKS[task], "--accelerators", accelerator, "--json", path]
        print(" ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=False)
    return path


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1e3:.1f} ms"
    return f"{value:.1f} s" if value < 60 else f"{value / 60:.0f} min" if value < 3600 else f"{value / 3600:.1f} h"


def describe(path: str, accelerator: str) -> str:
    if not os.path.exists(path):
        return "(failed)"
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    device = data["per_device"]
    projection = next(p for p in data["projections"] if p["accelerator"] == accelerator)
    mesh = ",".join(f"{k}={v}" for k, v in data["mesh"].items() if v > 1)
    total = f" (all {data['steps']:,} steps {_seconds(projection['total_seconds'])})" if data["steps"] > 1 else ""
    verdict = (f"fits, {100 * projection['hbm_fraction']:.0f}%" if projection["fits"]
               else f"**does not fit: {projection['hbm_fraction']:.1f}x HBM**")
    gib = 2 ** 30
    return (f"{mesh}: {device['parameter_bytes'] / gib:.1f} + {device['temp_bytes'] / gib:.1f} = "
            f"{device['total_bytes'] / gib:.1f} GiB; {_seconds(projection['step_seconds'])}{total}; {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/plan/table")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help="comma-separated rows to plan and print (default: all: forward,sweep,train)")
    args = parser.parse_args()
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        parser.error(f"--tasks: expected some of {', '.join(TASKS)}, got {args.tasks!r}")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for shape in SHAPES:
        for task in tasks:
            cells = [describe(cell(args.out, name, shape, task), SLICES[name][0]) for name in SLICES]
            rows.append(f"| {shape} | {task} | " + " | ".join(cells) + " |")
    header = " | ".join(f"{name} ({SLICES[name][0]}, {SLICES[name][1]} chips)" for name in SLICES)
    print(f"| shape | task | {header} |")
    print("|---|---|" + "---|" * len(SLICES))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
