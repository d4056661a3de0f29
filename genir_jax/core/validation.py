"""Checking interventions against the model and the input shapes, before any forward pass runs.

In the core (not in `genir_jax.interp.interventions`, which re-exports it) because every forward of
`genir_jax.core.model` validates its interventions, and the core must not import the layers above it.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from genir_jax.base.errors import GenIRError
from genir_jax.core.config import T5Config
from genir_jax.core.sites import ALL_LAYERS, STACK_SITES, Site, num_layers, parse_site, site_name, site_shape, stacks
from genir_jax.core.taps import Patch

Interventions = Mapping[str, Mapping[str, Any]]


class InterventionError(GenIRError, ValueError):
    """An intervention that does not fit the model or the inputs (wrong shape, wrong axis)."""


def validate(config: T5Config, interventions: Interventions | None, batch: int, encoder_length: int,
             decoder_length: int, leading: tuple[int, ...] = ()) -> None:
    """Check every patch against the model and the input shapes; raise `InterventionError` naming the
    site and the expected shape. `leading` is the shape of extra leading axes on masks (a sweep's K).
    A decoder-only model (stack ``blocks``) passes its sequence length as both lengths."""
    known = stacks(config)
    for stack, sites in (interventions or {}).items():
        if stack not in known:
            raise InterventionError(f"interventions: unknown stack '{stack}' (expected "
                                    f"{' or '.join(repr(k) for k in known)})")
        length = encoder_length if stack == "encoder" else decoder_length
        for local, patches in sites.items():
            layer = None if local in STACK_SITES else 0
            site = Site(stack, local, layer)
            parse_site(config, site.name)  # unknown local names raise with a suggestion
            full = (batch,) + site_shape(config, site, length, encoder_length)
            if layer is not None:
                full = (num_layers(config, stack),) + full
            label = site.name if layer is None else site_name(stack, local, ALL_LAYERS)
            for patch in (patches,) if isinstance(patches, Patch) else patches:
                if not isinstance(patch, Patch):
                    raise InterventionError(f"interventions['{stack}']['{local}']: expected Patch(mask, value), "
                                            f"got {type(patch).__name__}")
                _check_broadcast(label, "mask", np.shape(patch.mask), leading + full, leading)
                if _is_array(patch.value):
                    _check_broadcast(label, "value", np.shape(patch.value), full, ())


def _is_array(value) -> bool:
    return isinstance(value, (np.ndarray, jax.Array, float, int, np.number))


def _check_broadcast(label: str, what: str, shape: tuple, expected: tuple, leading: tuple) -> None:
    if what == "value" and shape == ():
        return
    ok = len(shape) == len(expected) and all(s in (1, e) for s, e in zip(shape, expected))
    if leading and ok:
        ok = tuple(shape[: len(leading)]) == leading
    if not ok:
        axes = "[K, " if leading else "["
        layer_hint = "L, " if len(expected) - len(leading) > 0 else ""
        raise InterventionError(
            f"site '{label}': {what} has shape {tuple(shape)}, which does not broadcast to {tuple(expected)} "
            f"({axes}{layer_hint}B, ...site] with each axis of that size or 1)"
        )
