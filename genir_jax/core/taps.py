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

import jax
import jax.numpy as jnp

from genir_jax.core.sites import position_axis


class Patch(NamedTuple):
    """Replace a site's activation: ``out + mask * (value - out)``; both broadcast against the site."""

    mask: Any
    value: Any


class Shift(NamedTuple):
    """Add ``delta`` to a site's activation. A gradient probe, not a user intervention (`validate` refuses
    it): at ``delta = 0`` the forward pass is unchanged and the derivative w.r.t. ``delta`` is the gradient
    at the site, which attribution reads without first running a clean forward pass for the site's value."""

    delta: Any


def at_position(patch: Patch | Shift, local: str, position, length: int = 1) -> Patch | Shift:
    """`patch` of decoder site `local` as it applies at one decoder `position` (traced): every array with
    a position axis longer than 1 is cut to that position (kept as an axis of size 1), so a patch applies
    in a one-position decoding step exactly as at that position of a forward over the whole sequence.
    `length` > 1: the positions ``position .. position + length - 1`` (a decoder-only model's cached chunk)."""
    axis = position_axis(local)

    def cut(leaf):
        if axis is None or not hasattr(leaf, "shape") or len(leaf.shape) < -axis or leaf.shape[axis] == 1:
            return leaf
        return jax.lax.dynamic_slice_in_dim(jnp.asarray(leaf), position, length, axis=len(leaf.shape) + axis)

    return type(patch)(*(cut(leaf) for leaf in patch))


def apply_patch(x: jnp.ndarray, patch: Patch | Shift) -> jnp.ndarray:
    """The patched activation, in the activation's dtype."""
    if isinstance(patch, Shift):
        return x + jnp.asarray(patch.delta, dtype=x.dtype)
    mask = jnp.asarray(patch.mask, dtype=x.dtype)
    value = jnp.asarray(patch.value, dtype=x.dtype)
    return x + mask * (value - x)


def per_layer(patches, count: int):
    """Give every array of a layer site's patches a full leading layer axis, as `nn.scan` slices it
    (scalars and size-1 layer axes broadcast to all layers)."""
    def expand(leaf):
        leaf = jnp.asarray(leaf)
        return jnp.broadcast_to(leaf, (count,) + leaf.shape[1:] if leaf.ndim else (count,))

    return jax.tree_util.tree_map(expand, patches)


class SiteTap:
    """Applies the interventions of one scope (e.g. one decoder layer) and records requested sites.

    `interventions` maps local site names (e.g. ``"hook_mlp_out"``, ``"attn.hook_z"``) to a `Patch` or a
    tuple of them (applied in order);
    `cache_sites` is the static set of local names to record. After the forward, `cache` holds them.
    `position` (decoding mode, possibly traced): the activations are of that one decoder position, and
    patches are cut to it (`at_position`); `span` positions from it where a chunk of several is run.
    """

    def __init__(self, interventions: Mapping[str, Patch] | None, cache_sites: frozenset[str] | tuple = (),
                 position=None, span: int = 1):
        self.interventions = dict(interventions or {})
        self.cache_sites = frozenset(cache_sites)
        self.cache: dict[str, jnp.ndarray] = {}
        self.position = position
        self.span = span

    def __call__(self, name: str, x: jnp.ndarray) -> jnp.ndarray:
        patches = self.interventions.get(name)
        if isinstance(patches, Patch):
            patches = (patches,)
        for patch in patches or ():  # several patches of one site apply in order
            x = apply_patch(x, patch if self.position is None else at_position(patch, name, self.position, self.span))
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

