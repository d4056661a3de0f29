"""Where interventions are applied and activations recorded: the one place a site value can change.

Every named site of the model (e.g. a decoder layer's `hook_mlp_out`) passes its activation through a
`SiteTap`. The tap does two things, both decided by explicit arguments rather than hooks or global state:

- if an intervention is given for the site, it returns ``x + mask * (value - x)``: mask 0 keeps the clean
  activation, mask 1 replaces it by ``value`` (zero ablation: value 0; mean ablation: value = a mean;
  activation patching: value = another run's activation). Fractional masks interpolate.
- if the site is among the requested cache sites, it records the (post-intervention) activation.

Inside a layer the tap sees per-layer slices: `jax.lax.scan` over layers slices each intervention's
leading layer axis and stacks the recorded activations along a new leading layer axis.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax.numpy as jnp


class Patch(NamedTuple):
    """Replace a site's activation: ``out + mask * (value - out)``; both broadcast against the site."""

    mask: Any
    value: Any


class Shift(NamedTuple):
    """Add ``delta`` to a site's activation. A gradient probe, not a user intervention (`validate` refuses
    it): at ``delta = 0`` the forward pass is unchanged and the derivative w.r.t. ``delta`` is the gradient
    at the site, which attribution reads without first running a clean forward pass for the site's value."""

    delta: Any


def apply_patch(x: jnp.ndarray, patch: Patch | Shift) -> jnp.ndarray:
    """The patched activation, in the activation's dtype."""
    if isinstance(patch, Shift):
        return x + jnp.asarray(patch.delta, dtype=x.dtype)
    mask = jnp.asarray(patch.mask, dtype=x.dtype)
    value = jnp.asarray(patch.value, dtype=x.dtype)
    return x + mask * (value - x)


class SiteTap:
    """Applies the interventions of one scope (e.g. one decoder layer) and records requested sites.

    `interventions` maps local site names (e.g. ``"hook_mlp_out"``, ``"attn.hook_z"``) to a `Patch` or a
    tuple of them (applied in order);
    `cache_sites` is the static set of local names to record. After the forward, `cache` holds them.
    """

    def __init__(self, interventions: Mapping[str, Patch] | None, cache_sites: frozenset[str] | tuple = ()):
        self.interventions = dict(interventions or {})
        self.cache_sites = frozenset(cache_sites)
        self.cache: dict[str, jnp.ndarray] = {}

    def __call__(self, name: str, x: jnp.ndarray) -> jnp.ndarray:
        patches = self.interventions.get(name)
        if isinstance(patches, Patch):
            patches = (patches,)
        for patch in patches or ():  # several patches of one site apply in order
            x = apply_patch(x, patch)
        if name in self.cache_sites:
            self.cache[name] = x
        return x

    def wants(self, name: str) -> bool:
        """Whether the site is patched or recorded (lets callers skip building an expensive value)."""
        return name in self.interventions or name in self.cache_sites

    def scoped(self, prefix: str) -> "ScopedTap":
        """A view of this tap whose site names are prefixed, e.g. ``attn.`` for the attention's sites."""
        return ScopedTap(self, prefix)


class ScopedTap:
    """`SiteTap` seen from a sub-component: names are prefixed before lookup."""

    def __init__(self, parent: SiteTap, prefix: str):
        self.parent = parent
        self.prefix = prefix

    def __call__(self, name: str, x: jnp.ndarray) -> jnp.ndarray:
        return self.parent(self.prefix + name, x)

    def wants(self, name: str) -> bool:
        """Whether the site is patched or recorded (lets callers skip building an expensive value)."""
        full = self.prefix + name
        return full in self.parent.interventions or full in self.parent.cache_sites

