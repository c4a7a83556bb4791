"""Straight-through estimators as `jax.custom_vjp` functions.

Each estimator has a forward value that is piecewise constant (zero gradient almost
everywhere) and a hand-written backward pass that lets the upstream gradient through
where the quantizer is "transparent". The windows follow micronet exactly (see
`shared/reference/micronet.md`, sections 1, 4.3 and 6.4):

* `round_half_away`: r(x) = sign(x) * floor(|x| + 0.5), the rounding micronet uses
  everywhere. `jnp.round` rounds half to even and differs at every .5 tie.
* `round_ste`: r(x) forward, identity backward.
* `clipped_round_ste`: clip(r(x), lo, hi) forward; backward passes g where the clip
  does nothing, lo <= r(x) <= hi (inclusive at both ends, like `torch.clamp`; the
  window is on the rounded value, as in PyTorch's `fake_quantize_per_tensor_affine`,
  so the largest weight of a channel, whose x/scale can land one ulp above qmax,
  still gets its gradient).
* `sign_ste`: sign with sign(0) = +1 forward; backward passes g where |x| < 1 (strict).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def round_half_away(x: Array) -> Array:
  """Rounds half away from zero: r(x) = sign(x) * floor(|x| + 0.5). No gradient rule."""
  return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


@jax.custom_vjp
def round_ste(x: Array) -> Array:
  """r(x) (half away from zero) with an identity straight-through gradient."""
  return round_half_away(x)


def _round_ste_fwd(x):
  return round_half_away(x), None


def _round_ste_bwd(_, g):
  return (g,)


round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


@jax.custom_vjp
def clipped_round_ste(x: Array, lo: Array, hi: Array) -> Array:
  """clip(r(x), lo, hi); the gradient w.r.t. x is g * [lo <= r(x) <= hi].

  `lo` and `hi` broadcast against `x` (scalars, or per-channel arrays). They receive
  no gradient: in this library ranges come from observers or from the weights
  themselves, never from this estimator.
  """
  return jnp.clip(round_half_away(x), lo, hi)


def _clipped_round_fwd(x, lo, hi):
  r = round_half_away(x)
  inside = (r >= lo) & (r <= hi)
  return jnp.clip(r, lo, hi), (inside, lo, hi)


def _clipped_round_bwd(res, g):
  inside, lo, hi = res
  return (jnp.where(inside, g, jnp.zeros_like(g)), jnp.zeros_like(lo), jnp.zeros_like(hi))


clipped_round_ste.defvjp(_clipped_round_fwd, _clipped_round_bwd)


def sign_plus(x: Array) -> Array:
  """sign(x) with sign(0) = +1 (values in {-1, +1}). No gradient rule."""
  return jnp.where(x >= 0, jnp.ones_like(x), -jnp.ones_like(x))


@jax.custom_vjp
def sign_ste(x: Array) -> Array:
  """sign(x) with sign(0) = +1; gradient g * [|x| < 1] (micronet's saturating STE)."""
  return sign_plus(x)


def _sign_fwd(x):
  return sign_plus(x), jnp.abs(x) < 1


def _sign_bwd(inside, g):
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


sign_ste.defvjp(_sign_fwd, _sign_bwd)


def clip_inclusive(x: Array, lo: Array, hi: Array) -> Array:
  """clip(x, lo, hi) whose gradient is 1 on the closed interval [lo, hi], 0 outside.

  `jnp.clip` is built from min/max, whose gradient is 1/2 at the boundaries; micronet's
  `torch.clamp` passes the full gradient there, and so do we.
  """
  inside = (x >= lo) & (x <= hi)
  return jnp.where(inside, x, jax.lax.stop_gradient(jnp.clip(x, lo, hi)))
