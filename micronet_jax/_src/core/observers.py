"""Range observers: pure trackers of a tensor's min and max over a small state pytree.

An observer is a frozen spec with two pure functions:

* ``init(shape) -> RangeState``: an empty state (``initialized`` is False);
* ``update(state, x, axes) -> RangeState``: the state after seeing ``x``, reduced over
  ``axes`` (so the state has the shape of ``x`` with ``axes`` removed).

Layers keep the state in the ``quant_stats`` collection and call ``update`` only when
that collection is mutable (training or calibration), so evaluation never moves a range.
The ``initialized`` flag is part of the state and therefore of every checkpoint: unlike
micronet, a resumed run does not re-initialise its ranges on the first batch.

Non-finite values (nan, +-inf) are skipped: every observer takes its range from the
finite values of the batch only, and a batch (or, per channel, a slice) with no finite
value leaves the state as it was. So a stored range is always finite; one inf
activation cannot blow a range up to inf (or a NaN poison it) for the rest of training,
and the quantizer then clips the inf to the range's edge. Clamping to the float32 limits
was the alternative, but it ruins the range's resolution just the same.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from micronet_jax._src.core.ste import round_half_away

Array = jax.Array


@struct.dataclass
class RangeState:
  """Observed range. ``min``/``max`` have the reduced shape; ``initialized`` is a bool scalar."""

  min: Array
  max: Array
  initialized: Array


def empty_range(shape: Sequence[int] = ()) -> RangeState:
  return RangeState(
      min=jnp.zeros(shape, jnp.float32),
      max=jnp.zeros(shape, jnp.float32),
      initialized=jnp.zeros((), jnp.bool_),
  )


class Observer(Protocol):

  def init(self, shape: Sequence[int] = ()) -> RangeState:
    ...

  def update(self, state: RangeState, x: Array, axes: Sequence[int] | None) -> RangeState:
    ...


def finite_range(x: Array, axes: Sequence[int] | None) -> tuple[Array, Array, Array]:
  """(min, max, seen) of the finite values of ``x`` over ``axes`` (None: all axes), in
  float32, without gradient. ``seen`` (bool, the reduced shape) is False where there is no
  finite value; min and max are 0 there."""
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  finite = jnp.isfinite(x)
  seen = jnp.any(finite, axis=axes)
  lo = jnp.min(jnp.where(finite, x, jnp.inf), axis=axes)
  hi = jnp.max(jnp.where(finite, x, -jnp.inf), axis=axes)
  return jnp.where(seen, lo, 0.0), jnp.where(seen, hi, 0.0), seen


def batch_range(x: Array, axes: Sequence[int] | None) -> tuple[Array, Array]:
  """(min, max) of the finite values of ``x`` over ``axes`` (None: all axes), in float32,
  without gradient (0 where there is none)."""
  lo, hi, _ = finite_range(x, axes)
  return lo, hi


def _keep_unseen(state: RangeState, new: RangeState, seen: Array) -> RangeState:
  """``new`` where the batch had finite values, ``state`` elsewhere; initialised once any
  value was seen."""
  return RangeState(
      min=jnp.where(seen, new.min, state.min),
      max=jnp.where(seen, new.max, state.max),
      initialized=state.initialized | jnp.any(seen),
  )


@dataclasses.dataclass(frozen=True)
class MinMax:
  """Running extremes: the first batch sets the range, later batches only widen it."""

  def init(self, shape: Sequence[int] = ()) -> RangeState:
    return empty_range(shape)

  def update(self, state: RangeState, x: Array, axes: Sequence[int] | None) -> RangeState:
    lo, hi, seen = finite_range(x, axes)
    first = ~state.initialized
    new = RangeState(
        min=jnp.where(first, lo, jnp.minimum(state.min, lo)),
        max=jnp.where(first, hi, jnp.maximum(state.max, hi)),
        initialized=jnp.ones((), jnp.bool_),
    )
    return _keep_unseen(state, new, seen)


@dataclasses.dataclass(frozen=True)
class MovingAverageMinMax:
  """Exponential moving average of the batch min and max: v <- (1 - m) v + m cur.

  The first batch initialises the average (micronet's behaviour, momentum 0.1).
  """

  momentum: float = 0.1

  def __post_init__(self):
    if not 0.0 < self.momentum <= 1.0:
      raise ValueError(f"MovingAverageMinMax.momentum must be in (0, 1], got {self.momentum}")

  def init(self, shape: Sequence[int] = ()) -> RangeState:
    return empty_range(shape)

  def update(self, state: RangeState, x: Array, axes: Sequence[int] | None) -> RangeState:
    lo, hi, seen = finite_range(x, axes)
    return _keep_unseen(state, _moving(state, lo, hi, self.momentum), seen)


def current_or_observed(state: RangeState, x: Array, axes: Sequence[int] | None) -> tuple[Array, Array]:
  """The observed range, or the range of ``x`` itself while nothing has been observed.

  An observer that has never seen a training batch (a freshly initialised model in eval
  mode) quantizes with the batch's own range rather than with the empty [0, 0] range.
  """
  lo, hi = batch_range(x, axes)
  return (jnp.where(state.initialized, state.min, lo), jnp.where(state.initialized, state.max, hi))


def kth_abs(x: Array, p: float) -> Array:
  """micronet's percentile: the k-th smallest |x| with k = int(p * N) (1-indexed, k >= 1),
  over the N finite values of ``x`` (0 when there is none).

  With every value finite k is micronet's, computed on the host; otherwise from the
  finite count in float32 (the non-finite values sort last, as +inf)."""
  flat = jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32)).ravel()
  finite = jnp.isfinite(flat)
  n = jnp.sum(finite)
  k_all = max(int(p * flat.size), 1)
  k = jnp.where(n == flat.size, k_all, jnp.maximum(jnp.floor(np.float32(p) * n), 1).astype(jnp.int32))
  value = jnp.sort(jnp.where(finite, flat, jnp.inf))[k - 1]
  return jnp.where(n > 0, value, 0.0)


def _signed_range(x: Array, c: Array) -> tuple[Array, Array]:
  """[-c, c] when x has finite negative values, [0, c] otherwise (a ReLU output)."""
  x = jax.lax.stop_gradient(x)
  has_negative = jnp.min(jnp.where(jnp.isfinite(x), x, jnp.inf)) < 0
  return jnp.where(has_negative, -c, 0.0), c


def _any_finite(x: Array) -> Array:
  return jnp.any(jnp.isfinite(jax.lax.stop_gradient(x)))


def _moving(state: RangeState, lo: Array, hi: Array, momentum: float) -> RangeState:
  first = ~state.initialized
  return RangeState(
      min=jnp.where(first, lo, (1.0 - momentum) * state.min + momentum * lo),
      max=jnp.where(first, hi, (1.0 - momentum) * state.max + momentum * hi),
      initialized=jnp.ones((), jnp.bool_),
  )


@dataclasses.dataclass(frozen=True)
class Percentile:
  """Calibration observer: clip at the p-th percentile of |x| (micronet's PTQ, p = 0.999999),
  moving-averaged over batches. Per tensor only."""

  p: float = 0.999999
  momentum: float = 0.1

  def __post_init__(self):
    if not 0.0 < self.p <= 1.0:
      raise ValueError(f"Percentile.p must be in (0, 1], got {self.p}")

  def init(self, shape: Sequence[int] = ()) -> RangeState:
    return empty_range(shape)

  def update(self, state: RangeState, x: Array, axes: Sequence[int] | None) -> RangeState:
    if axes is not None:
      raise ValueError("Percentile observes whole tensors (per-tensor quantization only)")
    lo, hi = _signed_range(x, kth_abs(x, self.p))
    return _keep_unseen(state, _moving(state, lo, hi, self.momentum), _any_finite(x))


@dataclasses.dataclass(frozen=True)
class MSEClip:
  """Calibration observer: the clipping value c in {k/K * max|x|} that minimises the mean
  squared error of ``bits``-bit quantization of the batch, moving-averaged over batches.

  The grid is [0, c] with 2^b - 1 steps for non-negative tensors and [-c, c] otherwise,
  which matches the asymmetric quantizer on ReLU outputs and is close to it elsewhere.
  """

  bits: int = 8
  candidates: int = 64
  momentum: float = 0.1

  def init(self, shape: Sequence[int] = ()) -> RangeState:
    return empty_range(shape)

  def update(self, state: RangeState, x: Array, axes: Sequence[int] | None) -> RangeState:
    if axes is not None:
      raise ValueError("MSEClip observes whole tensors (per-tensor quantization only)")
    x = jax.lax.stop_gradient(x).astype(jnp.float32).ravel()
    finite = jnp.isfinite(x)
    count = jnp.maximum(jnp.sum(finite), 1)
    x = jnp.where(finite, x, 0.0)  # masked out of the error below; 0 moves neither min nor max|x|
    nonneg = jnp.min(jnp.where(finite, x, jnp.inf)) >= 0
    top = jnp.maximum(jnp.max(jnp.abs(x)), 1e-12)
    levels = 2.0**self.bits - 1

    def mse(c):
      step = jnp.where(nonneg, c / levels, 2 * c / levels)
      lo = jnp.where(nonneg, 0.0, -c)
      q = jnp.clip(round_half_away((x - lo) / step), 0, levels) * step + lo
      return jnp.sum(jnp.where(finite, jnp.square(q - x), 0.0)) / count

    cs = top * jnp.arange(1, self.candidates + 1, dtype=jnp.float32) / self.candidates
    best = cs[jnp.argmin(jax.lax.map(mse, cs))]
    new = _moving(state, jnp.where(nonneg, 0.0, -best), best, self.momentum)
    return _keep_unseen(state, new, jnp.any(finite))


OBSERVERS = {
    "minmax": MinMax,
    "moving_average": MovingAverageMinMax,
    "percentile": Percentile,
    "mse": MSEClip,
}
