"""Who reads from whom (paper Sec. 5.3, Fig. 5): what earlier components MLP neurons and cross-attention
heads of the decoder read from.

Readers and their readings, per query (the decoder runs one step, position 0):
- MLP neuron i of layer l, if positively activated (``mlp.hook_post > 0``): t(c) = sim(W_in[:, i], c) for
  every earlier component output c (``wi``; ``wi_0``, the activation's input, for gated MLPs);
- cross-attention head h of layer l, with i_hat = argmax of its attention scores over encoder positions:
  t(c) = sim(k_i_hat, c @ W_Q[h]) with k the head's cached keys.
sim is the dot product or the cosine (eps 1e-8 per norm, as torch). The vectors c are RAW residual-stream
components (before any RMS norm), exactly those the reference scripts (`eval_neuron_reading.py`,
`eval_cr_attn_reading.py`) compare with, in their key order. For a neuron of layer l: for every layer p < l
``decoder.p.hook_{resid_pre, attn_out}``, per head ``decoder.p.attn.head{h}`` (z_h @ W_O[h]),
``decoder.p.hook_cross_attn_out``, ``decoder.p.cross_attn.head{h}``,
``decoder.p.hook_{resid_mid_cross, mlp_out, resid_post}``, then ``decoder.l.hook_{resid_pre, attn_out,
cross_attn_out, resid_mid_cross}``. For a head of layer l: the six residual sites of every p < l (no heads),
then ``decoder.l.hook_{resid_pre, attn_out}``. With dot products, the readings of the embedding
(``decoder.0.hook_resid_pre``) and of every attn / cross_attn / mlp output before the reader sum to
W_in[:, i] . r (r = ``hook_resid_mid_cross`` of layer l) for a neuron and to (r @ W_Q[h]) . k_i_hat
(r = ``hook_resid_mid`` of layer l) for a head.

Aggregation (the reference's `get_topk_neuron_readings.py`, and its notebook for heads): per reader and
query keep the positive readings of the embedding and of the attn / cross_attn / mlp outputs, take the top
k (or all), divide by their sum; average per reader over the queries (for neurons: the queries that
activate it); renormalise each reader's average and average over the readers of a layer. Result per
layer: ``[[component, proportion], ...]``. The stage buckets (the notebook's, Fig. 5) sum a layer's
proportions per component type and stage; the embedding is its own bucket.

Output files (CLI ``neuron-reading`` / ``crattn-reading``):
- ``all_queries_neuron_similarities_{sim}_{i}.json`` / ``all_queries_crattn_similarities_{sim}_{i}.json``:
  the reference's entries, a JSON list each, queries in correct_valid.json order. Neuron entries:
  ``{"actviation" (sic, rounded to 2 decimals), "sim_type", "value": {component: reading}, "layer", "q_id",
  "position" (neuron index)}``; head entries: ``{"sim_type", "value", "layer", "head", "q_id",
  "enc_position"}``. Every file holds up to 50 queries (``--queries-per-file``); ``i`` is the index of
  its first query (the reference names a chunk by the index at which it dumps it; readers glob the prefix).
- ``neuron_ratio_of_top_k_layers-{sim}-{k}.json`` / ``crattn_ratio_of_top_k_layers-{sim}-{k}.json``
  (k an integer or ``all``): ``{"layer": [[component, proportion], ...]}``, the reference's format.
- ``neuron_reading_summary.json`` / ``crattn_reading_summary.json``, schema::

    {"analysis": "neuron_reading" | "crattn_reading",
     "sim_type": "dot" | "cosine", "queries": int, "stages": [[layer, ...], ...],
     "reader_layers": [layer, ...],
     "results": {k: {"per_layer": {"<layer>": {"readers": int,           # neurons / heads averaged
                                               "embedding": float,       # decoder.0.hook_resid_pre
                                               "attn": [float per stage],
                                               "cross_attn": [float per stage],
                                               "mlp": [float per stage]}},
                     "mean": {"embedding": float, "attn": [...], "cross_attn": [...], "mlp": [...]}}}}

  ``k`` is ``"all"`` or the top-k as a string; ``mean`` is the unweighted mean over the layers in
  ``per_layer``. A layer's proportions sum to 1 unless some of its readers had no positive reading.

Modules: `genir_jax.analysis.reading_sites` (the catalogue of readers and components, output names, layer
and top-k options), `genir_jax.analysis.reading_compute` (jitted readings, aggregation, whole runs) and this
one (the reference's per-entry file format and the output files); the public names of all three are
importable from here.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import numpy as np

from genir_jax.analysis.inputs import query_batches  # noqa: F401 (importable from here)
from genir_jax.analysis.reading_compute import *  # noqa: F401,F403 (importable from here)
from genir_jax.analysis.reading_compute import LayerReadings, ReadingResult
from genir_jax.analysis.reading_sites import *  # noqa: F401,F403 (importable from here)
from genir_jax.analysis.reading_sites import RAW_PREFIX, SUMMARY_FILE
from genir_jax.base.errors import GenIRError

# --------------------------------------------------------------------------------------------------
# Reference-format per-entry files
# --------------------------------------------------------------------------------------------------

def _round2(values: np.ndarray) -> np.ndarray:
    """torch.round(x, decimals=2) in float32: rint(x * 100) / 100."""
    values = np.asarray(values, np.float32)
    return np.rint(values * np.float32(100)) / np.float32(100)


def format_entries(reader: str, sim_type: str, query_id, readings: Sequence[LayerReadings], row: int) -> list[str]:
    """The reference's JSON entries of one query (batch row `row`), in its order."""
    out = []
    for reading in readings:
        valid = reading.valid[row]
        readers = reading.readers[row][valid].tolist()
        values = reading.values[row][valid].tolist()
        if reader == "mlp":
            acts = _round2(reading.extra[row][valid]).tolist()
            for neuron, act, vals in zip(readers, acts, values):
                out.append(json.dumps({"actviation": act, "sim_type": sim_type, "value": dict(zip(reading.names, vals)),
                                       "layer": reading.layer, "q_id": query_id, "position": neuron}))
        else:
            positions = reading.extra[row][valid].tolist()
            for head, position, vals in zip(readers, positions, values):
                out.append(json.dumps({"sim_type": sim_type, "value": dict(zip(reading.names, vals)),
                                       "layer": reading.layer, "head": head, "q_id": query_id,
                                       "enc_position": position}))
    return out


class RawEntryWriter:
    """Writes the per-entry files into `directory` (a staging directory), `per_file` queries each, in
    query order, as the queries' batches complete (batches may complete out of order within a file)."""

    def __init__(self, directory: str | os.PathLike, reader: str, sim_type: str, query_ids: Sequence,
                 per_file: int = 50, *, reference_numbering: bool = False):
        """Default numbering: a file is named by its first query's index (``_0`` holds queries 0..49, ``_50``
        the next 50). `reference_numbering`: as eval_neuron_reading.py / eval_cr_attn_reading.py number them:
        ``_0`` is an empty list, each full block is named by the index of the query after it (queries 0..49 in
        ``_50``), the last block by its last query's index (``_{N-1}``); where that name is taken (a last block
        of one query) the reference overwrites the earlier block, and so do we (`overwritten` lists it)."""
        if per_file < 1:
            raise GenIRError("--queries-per-file must be >= 1")
        self.directory, self.reader, self.sim_type = os.fspath(directory), reader, sim_type
        self.query_ids, self.per_file = list(query_ids), per_file
        self.reference_numbering = reference_numbering
        self._pending: dict[int, list[str]] = {}
        self._next_file = 0
        self.files: list[str] = []
        self.overwritten: list[str] = []
        if reference_numbering:
            self._write(f"{RAW_PREFIX[reader]}_{sim_type}_0.json", [])

    def __call__(self, rows: np.ndarray, readings: list[LayerReadings]) -> None:
        for b, row in enumerate(rows.tolist()):
            self._pending[row] = format_entries(self.reader, self.sim_type, self.query_ids[row], readings, b)
        self._flush()

    def _flush(self) -> None:
        count = len(self.query_ids)
        while self._next_file < count:
            rows = range(self._next_file, min(self._next_file + self.per_file, count))
            if any(r not in self._pending for r in rows):
                return
            number = self._next_file
            if self.reference_numbering:
                number = count - 1 if rows.stop == count else rows.stop
            name = f"{RAW_PREFIX[self.reader]}_{self.sim_type}_{number}.json"
            if name in self.files and self.reference_numbering and number != 0:
                self.overwritten.append(name)
            self._write(name, [entry for r in rows for entry in self._pending.pop(r)])
            self._next_file = rows.stop

    def _write(self, name: str, entries: list[str]) -> None:
        with open(os.path.join(self.directory, name), "w", encoding="utf-8") as handle:
            handle.write("[" + ", ".join(entries) + "]")
        if name not in self.files:
            self.files.append(name)

    def close(self) -> None:
        self._flush()
        if self._next_file < len(self.query_ids):  # pragma: no cover - a batch went missing (a bug)
            raise RuntimeError(f"raw entries missing for query {self._next_file}")


def stale_raw_files(directory: str | os.PathLike, reader: str, sim_type: str, keep: Sequence[str]) -> list[str]:
    """Per-entry files of the same reader and similarity left in `directory` by an earlier run (the
    reference's readers glob the prefix, so old chunks would be mixed in)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    prefix = f"{RAW_PREFIX[reader]}_{sim_type}_"
    return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
            if n.startswith(prefix) and n.endswith(".json") and n not in keep]


def write_reading_outputs(directory: str | os.PathLike, result: ReadingResult, summary: bool = True) -> None:
    """The proportion files and (unless not `summary`) the summary into `directory` (use inside
    `genir_jax.base.io.atomic_directory`)."""
    directory = os.fspath(directory)
    for name, data in result.ratio_files().items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
            json.dump(data, handle)
    if summary:
        with open(os.path.join(directory, SUMMARY_FILE[result.reader]), "w", encoding="utf-8") as handle:
            json.dump(result.summary(), handle, indent=1)


def iter_raw_entries(directory: str | os.PathLike, reader: str, sim_type: str) -> Iterator[dict]:
    """Entries of the per-entry files in `directory`, files in index order (for checks and reports)."""
    directory = os.fspath(directory)
    prefix = f"{RAW_PREFIX[reader]}_{sim_type}_"
    files = [n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".json")]
    for name in sorted(files, key=lambda n: int(n[len(prefix):-5])):
        with open(os.path.join(directory, name), encoding="utf-8") as handle:
            yield from json.load(handle)
