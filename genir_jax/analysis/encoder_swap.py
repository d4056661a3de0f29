"""Encoder swap (paper Sec. 4, Table 2): run the full model's decoder on another model's encoder output.

The "other" models were trained without some documents (their queries and indexing examples removed),
or are the pretrained T5. If the full model still ranks a removed document first when its encoder output
comes from a model that never saw that document, the document's identity is stored in the decoder.

As the reference (`swap_encoder.py`) does, the swapped site is the encoder's last residual stream BEFORE
its final norm, ``encoder.{L-1}.hook_resid_post`` (the full model's own final norm is then applied);
queries are tokenised without padding (masks give the same in a batch). Per other model:
- on all correct queries: mean and median rank of the relevant docid, the non-zero ranks and their count;
- on the correct queries of the removed documents: their ranks, mean, median, MRR and Hits@1.

Output ``swapped_encoder.json`` with the reference's keys: per model path ``"Mean Rank of prev. correct"``,
``"Median:"``, ``"Number of non 0 ranks"``, ``"Non 0 ranks"``, ``"missing_ranks"``,
``"Mean of Missing document ranks"``, ``"MRR:"``, ``"median"``; we add ``"Hits@1 (missing)"``,
``"missing_documents"`` and ``"missing_without_correct_query"``. Both "mean" keys are true means and both
medians follow torch.median (the lower middle value), as in the reference. The reference takes the FIRST
correct query of each removed document (and crashes if there is none): that is reference mode
(``summarize(..., reference=True)``, which refuses a removed document without a correct query, and
``as_reference_dict(reference=True)``, which writes only the reference's keys). By default we take all of
them (removed documents in the given order, each one's queries in correct_valid order, so a document with
two correct queries contributes two ranks), which is the same when each document has one correct query,
and list documents without one.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from genir_jax.analysis.inputs import CorrectQuery
from genir_jax.core.config import T5Config
from genir_jax.docids.tokens import docid_token, is_docid_token
from genir_jax.base.errors import GenIRError
from genir_jax.interp.interventions import FROM_SOURCE, encoder_swap
from genir_jax.interp.patching import Source, run_sweep
from genir_jax.interp.sweep import stack
from genir_jax.core.sites import site_name

RESULTS_JSON = "swapped_encoder.json"


def swap_site(config: T5Config) -> str:
    """The reference's swapped site: the encoder's last residual stream before the final norm."""
    return site_name("encoder", "hook_resid_post", config.num_layers - 1)


def encoder_swap_ranks(config: T5Config, params, other: Source, input_ids, attention_mask, target_ids, *,
                       query_chunk: int | None = None, progress: bool = True) -> np.ndarray:
    """Full-vocabulary rank of each target when the encoder output comes from `other` ([N] int)."""
    if other.config.num_layers != config.num_layers or other.config.d_model != config.d_model:
        raise GenIRError(
            f"encoder swap: the other model's encoder ({other.config.num_layers} layers, d_model "
            f"{other.config.d_model}) does not match the full model's ({config.num_layers}, {config.d_model})")
    configs = stack([encoder_swap(config, FROM_SOURCE, site=swap_site(config))], labels=[{"encoder": "swapped"}])
    result = run_sweep(config, params, input_ids, attention_mask, target_ids, configs, source=other,
                       query_chunk=query_chunk, progress=progress)
    return result.ranks[0]


def normalize_missing(documents: str | Sequence[str]) -> list[str]:
    """Removed documents as docid tokens, from "D1, D2" / a list, given as ids or as docid tokens."""
    items = documents.split(",") if isinstance(documents, str) else list(documents)
    tokens = []
    for item in items:
        item = str(item).strip()
        if item:
            tokens.append(item if is_docid_token(item) else docid_token(item))
    return tokens


@dataclasses.dataclass
class SwapSummary:
    """The reference's statistics for one swapped-in encoder."""

    ranks: np.ndarray
    missing_ranks: list[int]
    missing_documents: list[str]
    missing_without_correct_query: list[str]

    def as_reference_dict(self, reference: bool = False) -> dict:
        """The reference's keys (and, unless `reference`, ours); sums run in the reference's order."""
        ranks = self.ranks.astype(np.int64)
        out = {
            "Mean Rank of prev. correct": sum(int(r) for r in ranks) / len(ranks),
            "Median:": _torch_median(ranks.astype(np.float64)),
            "Number of non 0 ranks": int((ranks != 0).sum()),
            "Non 0 ranks": [int(r) for r in ranks if r != 0],
        }
        if self.missing_documents:
            missing = np.asarray(self.missing_ranks, dtype=np.float64)
            out["missing_ranks"] = [int(r) for r in self.missing_ranks]
            if not reference:
                out["missing_documents"] = self.missing_documents
                out["missing_without_correct_query"] = self.missing_without_correct_query
            if missing.size:
                out["Mean of Missing document ranks"] = sum(self.missing_ranks) / len(self.missing_ranks)
                reciprocal = 0.0
                for rank in self.missing_ranks:
                    reciprocal += 1 / (rank + 1)
                out["MRR:"] = reciprocal / len(self.missing_ranks)
                out["median"] = _torch_median(missing)
                if not reference:
                    out["Hits@1 (missing)"] = float(np.mean(missing == 0))
        return out


def _torch_median(values: np.ndarray) -> float:
    """torch.median's convention (the lower of the two middle values), which the reference uses for both
    medians; `Sequence` of floats, at least one."""
    ordered = np.sort(values)
    return float(ordered[(len(ordered) - 1) // 2])


def summarize(ranks: np.ndarray, queries: Sequence[CorrectQuery], missing: str | Sequence[str], *,
              reference: bool = False, source: str = "--missing-docs-for-model") -> SwapSummary:
    """Split the ranks into all correct queries and those whose relevant document was removed
    (`missing`: ids or docid tokens, see `normalize_missing`). Default: every correct query of each removed
    document; `reference`: only the first one (correct_valid order), and a removed document without a correct
    query is refused (`source` names the file in the error), as the reference fails on it."""
    missing = normalize_missing(missing)
    if reference:
        first = {}
        for r, q in zip(ranks, queries):
            first.setdefault(q.docid_token, int(r))
        absent = [d for d in missing if d not in first]
        if absent:
            raise GenIRError(f"{source}: removed document(s) {absent[:5]} have no correct query in correct_valid.json; "
                             "the reference's swap_encoder.py needs one per removed document (use the default mode)")
        missing_ranks = [first[document] for document in missing]
    else:
        missing_ranks = [int(r) for document in missing for r, q in zip(ranks, queries)
                         if q.docid_token == document]
    seen = {q.docid_token for q in queries}
    return SwapSummary(ranks=np.asarray(ranks), missing_ranks=missing_ranks, missing_documents=missing,
                       missing_without_correct_query=[d for d in missing if d not in seen])

