"""Decoder stages as one value: which layers each stage holds, how they were obtained, and their stages.json.

A stage specification (the analysis commands' ``--stages``, an experiment's ``Config.stages``, reproduce's
``--stages``) is one of ``auto`` (stages fitted to the model's per-layer curves, `genir_jax.analysis.auto_stages`),
``thirds`` (three near-equal blocks), ``paper`` (0-6,7-17,18-23, 24-layer decoders), layer ranges such as
``0-7,8-15,16-23``, or nothing (the paper's for a 24-layer decoder, otherwise auto). `resolve_stages` turns
it into a `Stages`; `Stages.record` is what stages.json holds and `Stages.from_record` reads it back.

Held-out fitting: ``auto`` fits on a seeded random half of the correct queries (`split_queries`) and every
analysis that uses the stages reports on the other half only (`Stages.held_out_rows`, `report_inputs`), so
no table reports effects on the queries whose effects placed the boundaries. The fit chooses k in 2..5 (a
penalised cost, `genir_jax.analysis.auto_stages.choose_k`) and records the boundaries' bootstrap stability; stages.json holds
the split (seed, sizes, query ids), the criterion values and the stability.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from genir_jax.analysis.stage_patching import describe_stages, stage_names  # noqa: F401 (importable from here)
from genir_jax.base.errors import GenIRError

STAGES_JSON = "stages.json"
METHODS = ("paper", "thirds", "auto", "explicit")
SPLIT_SEED = 0  # seed of the fit / held-out split of automatic stages and of their bootstrap


def split_queries(count: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(fit rows, held-out rows) of `count` queries: a seeded random half (count // 2) to fit automatic stages
    on, the rest to report on; each list ascending. Needs at least 2 queries (one per half)."""
    if count < 2:
        raise GenIRError(f"automatic stages need at least 2 correct queries (half to fit them, half to report on), "
                         f"got {count}; give fixed stages (--stages thirds or layer ranges)")
    order = np.random.default_rng(seed).permutation(count)
    return sorted(int(r) for r in order[:count // 2]), sorted(int(r) for r in order[count // 2:])


def parse_spec(spec: str | None, num_decoder_layers: int) -> tuple[str, str]:
    """(method, spec) of a stage specification: method one of `METHODS`; no specification means paper for
    24 decoder layers, else auto. A specification given but empty is refused (not read as no specification)."""
    if spec is not None and not spec.strip():
        raise GenIRError(f"--stages: empty stage specification {spec!r}; give ranges such as '0-6,7-17,18-23', "
                         "or 'paper', 'thirds' or 'auto', or leave the option out")
    spec = (spec or "").strip()
    if spec.lower() in ("auto", "thirds", "paper"):
        return spec.lower(), spec
    if spec:
        return "explicit", spec
    return ("paper" if num_decoder_layers == 24 else "auto"), spec


def check_spec(spec: str) -> str:
    """A stage specification checked before the model is known (method words, layer-range syntax; the layers
    themselves are checked against the decoder when the stages are resolved), normalised: ``auto``, ``thirds``,
    ``paper`` or the ranges without spaces."""
    from genir_jax.analysis.stage_patching import describe_stages as describe, parse_stages

    method, spec = parse_spec(spec, 0)
    if method != "explicit":
        return method
    try:
        return describe(parse_stages(spec, 1 << 30))
    except GenIRError as error:
        message = str(error)
        raise GenIRError(message if message.startswith("--stages") else f"--stages: {message}") from None


@dataclasses.dataclass(frozen=True)
class Stages:
    """The decoder layers of each stage and how they were obtained (`method`: paper / thirds / auto /
    explicit; `spec` the explicit ranges as given; `fit` the automatic fit's record entries: k, per-layer
    features, cost, and e.g. ``auto_target``)."""

    layers: tuple[tuple[int, ...], ...]
    method: str
    num_decoder_layers: int
    spec: str | None = None
    fit: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise GenIRError(f"unknown stage method {self.method!r}; expected one of {', '.join(METHODS)}")
        object.__setattr__(self, "layers", tuple(tuple(int(layer) for layer in stage) for stage in self.layers))

    def __len__(self) -> int:
        return len(self.layers)

    def as_lists(self) -> list[list[int]]:
        """The stages as lists of layers, as the analyses take them."""
        return [list(stage) for stage in self.layers]

    def describe(self, *, named: bool = False) -> str:
        return describe_stages(self.layers, named=named)

    def held_out_rows(self, count: int) -> np.ndarray:
        """The rows of the `count` queries the stages were resolved on that analyses report on: the held-out
        half of an automatic fit (`split_queries`), else all of them."""
        split = self.fit.get("split")
        if split is None:
            return np.arange(count)
        total = split["fit_queries"] + split["held_out_queries"]
        if total != count:
            raise GenIRError(f"these stages were fitted with {total} queries split in two; {count} queries given")
        return np.asarray(split["held_out_rows"], dtype=np.int64)

    def describe_fit(self) -> str:
        """One sentence on how the stages were obtained: for automatic stages the split, k and its criterion,
        and the boundaries' bootstrap stability."""
        text = self.describe(named=True)
        how = {"paper": "the paper's stages", "thirds": "equal thirds", "explicit": "given as layer ranges",
               "auto": "fitted automatically"}[self.method]
        if self.method != "auto" or "split" not in self.fit:
            return f"Stages {text}: {how}."
        split, selection = self.fit["split"], self.fit.get("k_selection", {})
        values = ", ".join(f"k={k}: {v:.1f}" for k, v in selection.get("values", {}).items())
        chosen = values and "fixed_k" not in selection
        sentence = (f"Stages {text}: fitted on {split['fit_queries']} of the correct queries (seed {split['seed']}); "
                    f"every table that uses them reports the other {split['held_out_queries']} only. k = {len(self)}"
                    + (f" chosen by a penalised cost (BIC, penalty doubled: {values}; least wins)." if chosen
                       else " fixed."))
        stability = self.fit.get("stability") or {}
        if stability.get("resamples"):
            parts = [f"layer {b['layer']} (first of stage {stage_names(len(self))[b['first_layer_of_stage'] - 1]}) in "
                     f"{100 * b['agreement']:.0f}%" for b in stability["boundaries"]]
            sentence += (f" Bootstrap stability over {stability['resamples']} resamples of the fit queries: "
                         + ("; ".join(parts) or "no boundaries")
                         + f"; all boundaries the same in {100 * stability['all_boundaries_agree']:.0f}%; k chosen "
                         + ", ".join(f"{k} in {c}" for k, c in stability["k_distribution"].items()) + ".")
        return sentence

    def record(self) -> dict:
        """What stages.json holds: method, stages (and their text where they are runs of layers), the fit of
        automatic stages, the explicit spec, the decoder depth."""
        record = {"method": self.method}
        fit = dict(self.fit)
        if "k" in fit:
            record["k"] = fit.pop("k")
        record["stages"] = self.as_lists()
        try:
            record["stages_text"] = self.describe()
        except GenIRError:
            pass  # explicit stages need not be runs of consecutive layers
        for key in ("features", "cost"):
            if key in fit:
                record[key] = fit.pop(key)
        if self.method == "explicit":
            record["spec"] = self.spec
        record["num_decoder_layers"] = self.num_decoder_layers
        record.update(fit)
        return record

    @classmethod
    def from_record(cls, record: dict) -> "Stages":
        """The inverse of `record`."""
        known = {"method", "stages", "stages_text", "spec", "num_decoder_layers"}
        layers = record["stages"]
        depth = record.get("num_decoder_layers", max((max(stage) for stage in layers if stage), default=-1) + 1)
        return cls(layers=tuple(tuple(stage) for stage in layers), method=record.get("method", "explicit"),
                   num_decoder_layers=int(depth), spec=record.get("spec"),
                   fit={key: value for key, value in record.items() if key not in known})

    def write(self, directory: str | os.PathLike) -> None:
        """stages.json in an output directory."""
        write_stages(directory, self.record())

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Stages":
        with open(os.path.join(directory, STAGES_JSON), encoding="utf-8") as handle:
            return cls.from_record(json.load(handle))


def fixed_stages(spec: str | None, num_decoder_layers: int) -> Stages | None:
    """The stages `spec` names when they need no model (paper, thirds, explicit ranges); None for auto."""
    from genir_jax.analysis.stage_patching import PAPER_STAGES_24, equal_stages, parse_stages

    method, spec = parse_spec(spec, num_decoder_layers)
    if method == "auto":
        return None
    if method == "paper":
        if num_decoder_layers != 24:
            raise GenIRError(f"stages 'paper': the paper's stages need a 24-layer decoder, the model has "
                             f"{num_decoder_layers}")
        layers = PAPER_STAGES_24
    elif method == "thirds":
        layers = equal_stages(num_decoder_layers)
    else:
        layers = parse_stages(spec, num_decoder_layers)
    return Stages(tuple(tuple(stage) for stage in layers), method, num_decoder_layers,
                  spec=spec if method == "explicit" else None)


def resolve_stages(spec: str | None, config, params, input_ids, attention_mask, target_ids, *,
                   query_ids=None, seed: int = SPLIT_SEED, resamples: int | None = None,
                   batch_size: int | None = None, progress: bool = False) -> Stages:
    """The `Stages` a specification names for this model. ``auto`` splits the given queries [N, S] in two
    (`split_queries`, `seed`), fits stages (`genir_jax.analysis.auto_stages.auto_stages`, k chosen, `resamples`
    bootstrap resamples, default `BOOTSTRAP_RESAMPLES`) on the fit half only and records the split (rows and,
    given, `query_ids`); analyses then report on `Stages.held_out_rows`. Targets: token ids [N], or [N, T]
    docid sequences, whose first token (the first decoding step) is used and recorded as ``auto_target``. The
    other methods need no model (`fixed_stages`)."""
    layers = config.num_decoder_layers
    stages = fixed_stages(spec, layers)
    if stages is not None:
        return stages
    from genir_jax.analysis.auto_stages import BOOTSTRAP_RESAMPLES, auto_stages

    targets = np.asarray(target_ids)
    fit_rows, held_rows = split_queries(len(targets), seed)
    rows = np.asarray(fit_rows)
    found = auto_stages(config, params, np.asarray(input_ids)[rows], np.asarray(attention_mask)[rows],
                        (targets if targets.ndim == 1 else targets[:, 0])[rows], k=None,
                        resamples=BOOTSTRAP_RESAMPLES if resamples is None else resamples, seed=seed,
                        batch_size=batch_size, progress=progress)
    fit = {"k": len(found.stages), **{key: value for key, value in found.as_json().items()
                                      if key in ("features", "cost", "k_selection", "stability")}}
    split = {"seed": int(seed), "fit_queries": len(fit_rows), "held_out_queries": len(held_rows),
             "fit_rows": fit_rows, "held_out_rows": held_rows}
    if query_ids is not None:
        ids = [str(query_id) for query_id in query_ids]
        split.update(fit_query_ids=[ids[r] for r in fit_rows], held_out_query_ids=[ids[r] for r in held_rows])
    fit["split"] = split
    if targets.ndim == 2:
        fit["auto_target"] = "the first docid token (first decoding step)"
    return Stages(tuple(tuple(stage) for stage in found.stages), "auto", layers, fit=fit)


def resolve_for_inputs(spec: str | None, inputs, *, batch_size: int | None = None, progress: bool = False
                       ) -> tuple[Stages, object]:
    """`resolve_stages` on analysis inputs (`genir_jax.analysis.inputs.AnalysisInputs`, their query ids
    recorded), and the inputs the analyses report on (`report_inputs`)."""
    stages = resolve_stages(spec, inputs.model.config, inputs.model.params, inputs.input_ids, inputs.attention_mask,
                            inputs.targets, query_ids=[q.query_id for q in inputs.queries], batch_size=batch_size,
                            progress=progress)
    return stages, report_inputs(stages, inputs)


def report_inputs(stages: Stages, inputs):
    """The analysis inputs restricted to the queries `stages` let analyses report on (`Stages.held_out_rows`:
    the held-out half of an automatic fit; all otherwise)."""
    rows = stages.held_out_rows(len(inputs.queries))
    return inputs if len(rows) == len(inputs.queries) else inputs.subset(rows)


def write_stages(directory: str | os.PathLike, stages) -> None:
    """stages.json (a `Stages` or its record) in an output directory."""
    from genir_jax.base.io import write_json

    record = stages.record() if isinstance(stages, Stages) else stages
    write_json(os.path.join(directory, STAGES_JSON), record, indent=2)
