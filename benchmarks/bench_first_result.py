"""Time to first result of `genir-jax patch-stages`, cold (empty compilation cache) and warm (second run).

    python benchmarks/bench_first_result.py [--queries 40] [--layers 24] [--d-model 128] [--repeat 3]

Builds a random 24+24-layer, d_model 128 T5 v1.0 with the real T5 tokenizer ($GENIR_JAX_DATA or
../shared/data/t5-tokenizer) and one docid token per query, 40 SQuAD dev questions as validation queries
and a correct_valid.json listing all of them, in a temporary directory. Then it runs, as subprocesses:

1. `genir-jax patch-stages` end to end (wall clock of the whole process), cold then warm;
2. the same command in an instrumented process, cold then warm, for the breakdown: imports (python start
   to the handler's modules imported), load (weights + tokenizer), tokenize (correct queries + their ids),
   the sweep split into compile (JAX tracing, lowering, XLA compile or persistent-cache load, from
   `jax.monitoring`) and compute (the rest of the sweep), and the rest (writing files, exit).

Each cold run gets its own empty cache directory (GENIR_JAX_CACHE), so nothing leaks between them.
The machine may be shared: every run is repeated `--repeat` times (cold, warm, cold, warm, ...), each
printed with the 1-minute load average at its start, and the table shows each column's minimum over the
repeats (the least disturbed value), with the median wall time next to it. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = pathlib.Path(os.environ.get("GENIR_JAX_DATA", ROOT.parent / "shared" / "data"))


def build_inputs(root: pathlib.Path, queries: int, layers: int, d_model: int) -> list[str]:
    """Checkpoint, validation queries and correct_valid.json under `root`; returns the command's arguments."""
    from transformers import AutoTokenizer

    import genir_jax as gj
    from genir_jax.core.config import t5_v1_0
    from genir_jax.checkpoints.hf import PretrainedModel

    data = json.loads((DATA / "squad-v1.1-dev" / "dev-v1.1.json").read_text(encoding="utf-8"))
    questions = [qa["question"] for article in data["data"] for paragraph in article["paragraphs"]
                 for qa in paragraph["qas"]][:queries]
    tokenizer = AutoTokenizer.from_pretrained(str(DATA / "t5-tokenizer"))
    config = t5_v1_0(vocab_size=32128, d_model=d_model, d_kv=d_model // 4, d_ff=4 * d_model, num_heads=4,
                     num_layers=layers, num_decoder_layers=layers)
    model = PretrainedModel(config=config, params=gj.init_params(config, 0), tokenizer=tokenizer)
    doc_ids = [f"d{i}" for i in range(len(questions))]
    model = gj.add_docid_tokens(model, doc_ids, mean_resizing=False)
    gj.save_pretrained(root / "dsi", model)
    val = [{"id": 1000 + i, "query": q, "relevant_docs": [doc_ids[i]]} for i, q in enumerate(questions)]
    (root / "val.json").write_text(json.dumps(val))
    (root / "correct_valid.json").write_text(json.dumps([[gj.docid_token(d), 1000 + i] for i, d in enumerate(doc_ids)]))
    return ["patch-stages", "--checkpoint", str(root / "dsi"), "--val-queries", str(root / "val.json"),
            "--correct-valid", str(root / "correct_valid.json"), "--no-progress", "--allow-incorrect"]


def child(argv: list[str], report: str) -> None:
    """Run the command in this process with timers around its stages; write them as JSON to `report`."""
    times: dict[str, float] = {}
    start = time.perf_counter()

    from genir_jax.cli.main import main  # noqa: E402  (what `genir-jax` imports first)

    import jax  # the modules the handler imports, timed here as imports
    import genir_jax.analysis.inputs as inputs
    import genir_jax.analysis.stage_patching as stage_patching
    import genir_jax.checkpoints.hf as hf
    import genir_jax.interp.patching  # noqa: F401

    times["imports"] = time.perf_counter() - start
    compile_events: dict[str, float] = {}

    def on_duration(event: str, seconds: float, **_: object) -> None:
        if event.startswith(("/jax/core/compile/", "/jax/compilation_cache/cache_retrieval")):
            compile_events[event] = compile_events.get(event, 0.0) + seconds

    jax.monitoring.register_event_duration_secs_listener(on_duration)

    def timed(module, name: str, key: str) -> None:
        original = getattr(module, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                times[key] = times.get(key, 0.0) + time.perf_counter() - t

        setattr(module, name, wrapper)

    timed(hf, "load_for_analysis", "load")
    timed(inputs, "load_correct_queries", "tokenize")
    timed(inputs, "tokenize_for_analysis", "tokenize")
    timed(stage_patching, "run_stage_patching", "sweep")
    code = main(argv)
    times["total"] = time.perf_counter() - start
    times["compile"] = sum(compile_events.values())
    times["compile_events"] = compile_events
    pathlib.Path(report).write_text(json.dumps({"code": code, **times}))


def run(command: list[str], cache: pathlib.Path) -> float:
    # This checkout's genir_jax, whatever an installed (editable) copy points at
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, GENIR_JAX_CACHE=str(cache), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               PYTHONPATH=path)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:3])} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return elapsed


def _breakdown(elapsed: float, times: dict) -> dict[str, float]:
    """One instrumented run's columns: imports, load, tokenize, compile, compute (sweep minus compile), rest."""
    sweep = times.get("sweep", 0.0)
    parts = {"imports": times["imports"], "load": times.get("load", 0.0), "tokenize": times.get("tokenize", 0.0),
             "compile": times["compile"], "compute": sweep - times["compile"]}
    parts["rest"] = elapsed - (parts["imports"] + parts["load"] + parts["tokenize"] + sweep)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=40)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind and phase; minimum reported")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.report)
        return

    work = pathlib.Path(tempfile.mkdtemp(prefix="genir-first-result-"))
    try:
        t = time.perf_counter()
        command = build_inputs(work, args.queries, args.layers, args.d_model)
        print(f"inputs: {args.layers}+{args.layers} layers, d_model {args.d_model}, {args.queries} queries "
              f"(built in {time.perf_counter() - t:.1f} s)")
        genir = shutil.which("genir-jax") or ""
        entry = [genir] if genir else [sys.executable, "-m", "genir_jax.cli.main"]
        runs: dict[tuple[str, str], list] = {}
        for repeat in range(max(1, args.repeat)):
            for name in ("end-to-end", "instrumented"):
                cache = work / f"cache-{name}-{repeat}"
                for phase in ("cold", "warm"):
                    out = work / f"out-{name}-{phase}-{repeat}"
                    report = work / f"report-{name}-{phase}-{repeat}.json"
                    load = os.getloadavg()[0]
                    if name == "end-to-end":
                        elapsed, times = run(entry + command + ["-o", str(out)], cache), None
                    else:
                        elapsed = run([sys.executable, __file__, "--report", str(report), "--child",
                                       *command, "-o", str(out)], cache)
                        times = json.loads(report.read_text())
                    runs.setdefault((name, phase), []).append((elapsed, times))
                    print(f"  run {repeat + 1}: {name:<13} {phase:<5} {elapsed:6.2f} s  (load average {load:.2f})",
                          flush=True)
        print(f"\n{'run':<13} {'phase':<5} {'wall':>6} {'median':>7} {'imports':>8} {'load':>6} {'tokenize':>9} "
              f"{'compile':>8} {'compute':>8} {'rest':>6}   (minimum over {max(1, args.repeat)} runs)")
        for (name, phase), items in runs.items():
            walls = [elapsed for elapsed, _ in items]
            line = f"{name:<13} {phase:<5} {min(walls):6.2f} {statistics.median(walls):7.2f}"
            if items[0][1] is None:
                print(line)
                continue
            columns = [_breakdown(elapsed, times) for elapsed, times in items]
            print(line + "".join(f" {min(c[key] for c in columns):{width}.2f}" for key, width in
                                 (("imports", 8), ("load", 6), ("tokenize", 9), ("compile", 8), ("compute", 8),
                                  ("rest", 6))))
        for (name, phase), items in runs.items():
            if items[0][1] is not None:
                best = min(items, key=lambda item: item[0])[1]
                events = ", ".join(f"{k.rsplit('/', 1)[-1]} {v:.2f}" for k, v in sorted(best["compile_events"].items()))
                print(f"  {phase} compile events (fastest run): {events}")
        print("\n(rest = python start-up and exit, writing the outputs, and anything outside the timed stages; "
              "load includes reading the tokenizer)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
