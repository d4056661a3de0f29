"""What the training and evaluation commands print: labelled lines for people, JSON lines with ``--json``.

Retrieval metrics (names with ``@``: Hits@1, MRR@10, ...) are printed as percentages with two decimals, other
values (losses) with four, counts as integers (``(n=86 queries)``), so one line reads the same wherever it
appears (`genir-jax train`, `pretrain`, `evaluate`, `bm25` and `reproduce`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

# How a split is named in printed lines.
SPLIT_LABELS = {"train": "training", "val": "validation", "test": "test"}
# Entries of a metrics dict that are not metrics: counts and bookkeeping.
_NOT_METRICS = ("queries", "queries_per_s", "step", "event", "best", "epoch")


def split_label(split: str) -> str:
    """``val`` -> ``validation``; other splits keep their name."""
    return SPLIT_LABELS.get(split, split)


def _value(name: str, value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if "@" in name:
        return f"{100 * float(value):.2f}"
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.4f}"


def evaluation_label(split: str, queries: str | os.PathLike | None = None) -> str:
    """What an evaluation's line is labelled with: the queries file given, else the split's name."""
    return os.path.basename(os.fspath(queries)) if queries else split_label(split)


def metrics_line(label: str, metrics: Mapping[str, Any]) -> str:
    """``validation: Hits@1 12.34 Hits@10 56.78 ... (n=86 queries, 120.5 queries/s)``."""
    shown = " ".join(f"{name} {_value(name, value)}" for name, value in metrics.items()
                     if name not in _NOT_METRICS)
    notes = []
    if metrics.get("queries") is not None:
        notes.append(f"n={int(metrics['queries'])} queries")
    if metrics.get("queries_per_s") is not None:
        notes.append(f"{float(metrics['queries_per_s']):.1f} queries/s")
    return f"{label}: {shown}" + (f" ({', '.join(notes)})" if notes else "")


def training_lines(summary: Mapping[str, Any], output: str | os.PathLike | None = None) -> list[str]:
    """The end of a `train` / `pretrain` run for people: the best validation, the final metrics of each
    split, the throughput and where the model went (entries a summary lacks, or holds as None, are left out)."""
    lines = []
    best = summary.get("best")
    if best:
        lines.append(metrics_line(f"best validation (step {int(best['step'])})", best))
    for split, metrics in (summary.get("final") or {}).items():
        lines.append(metrics_line(split_label(split), metrics))
    timing = []
    if summary.get("train_seconds") is not None:
        timing.append(f"{float(summary['train_seconds']):.1f} s in steps")
        if summary.get("examples_per_s"):
            timing[-1] += f" ({float(summary['examples_per_s']):.1f} examples/s)"
    if summary.get("wall_seconds") is not None:
        timing.append(f"{float(summary['wall_seconds']):.1f} s in all")
    if timing:
        lines.append("training: " + ", ".join(timing))
    if output is not None:
        lines.append(f"model: {os.fspath(output)}")
    return lines


def json_line(record: Mapping[str, Any]) -> str:
    """One JSON object on one line (what ``--json`` prints)."""
    return json.dumps(dict(record))
