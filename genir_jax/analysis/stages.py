"""Decoder stages as one value: which layers each stage holds, how they were obtained, and their stages.json.

A stage specification (the analysis commands' ``--stages``, an experiment's ``Config.stages``) is one of
``auto`` (three stages fitted to the model's per-layer curves, `genir_jax.analysis.auto_stages`), ``thirds``
(three near-equal blocks), ``paper`` (0-6,7-17,18-23, 24-layer decoders), layer ranges such as
``0-7,8-15,16-23``, or nothing (the paper's for a 24-layer decoder, otherwise auto). `resolve_stages` turns
it into a `Stages`; `Stages.record` is what stages.json holds and `Stages.from_record` reads it back.
"""

from __future__ import annotations

import dataclasses
import json
import os

from genir_jax.analysis.stage_patching import describe_stages, stage_names  # noqa: F401 (importable from here)
from genir_jax.base.errors import GenIRError

STAGES_JSON = "stages.json"
METHODS = ("paper", "thirds", "auto", "explicit")


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
                   batch_size: int | None = None, progress: bool = False) -> Stages:
    """The `Stages` a specification names for this model. ``auto`` fits 3 stages
    (`genir_jax.analysis.auto_stages.auto_stages`) on the given queries [N, S] and their target token ids:
    [N], or [N, T] docid sequences, whose first token (the first decoding step) is used and recorded as
    ``auto_target``. The other methods need no model (`fixed_stages`)."""
    layers = config.num_decoder_layers
    stages = fixed_stages(spec, layers)
    if stages is not None:
        return stages
    from genir_jax.analysis.auto_stages import auto_stages

    import numpy as np

    targets = np.asarray(target_ids)
    found = auto_stages(config, params, input_ids, attention_mask, targets if targets.ndim == 1 else targets[:, 0],
                        k=3, batch_size=batch_size, progress=progress)
    fit = {"k": len(found.stages), **{key: value for key, value in found.as_json().items()
                                      if key in ("features", "cost")}}
    if targets.ndim == 2:
        fit["auto_target"] = "the first docid token (first decoding step)"
    return Stages(tuple(tuple(stage) for stage in found.stages), "auto", layers, fit=fit)


def write_stages(directory: str | os.PathLike, stages) -> None:
    """stages.json (a `Stages` or its record) in an output directory."""
    from genir_jax.base.io import write_json

    record = stages.record() if isinstance(stages, Stages) else stages
    write_json(os.path.join(directory, STAGES_JSON), record, indent=2)
