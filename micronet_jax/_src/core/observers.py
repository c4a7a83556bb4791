"""Range observers: pure trackers of a tensor's min and max over a small state pytree.

An observer is a frozen spec with two pure functions:

* ``init(shape) -> RangeState``: an empty state (``initialized`` is False);
* ``update(state, x, axes) -> RangeState``: the state after seeing ``x``, reduced over
  ``axes`` (so the state has the shape of ``x`` with ``axes`` removed).

Layers keep the state in the ``quant_stats`` collection and call ``update`` only when
that collection is mutable (training or calibration), so evaluation never moves a range.
The ``initialized`` flag is part of the state and therefore of every checkpoint: unlike
micronet, a resumed run does not re-initialise its ranges on the first batch.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
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


def batch_range(x: Array, axes: Sequence[int] | None) -> tuple[Array, Array]:
  """(min, max) of ``x`` over ``axes`` (None: all axes), in float32, without gradient."""
  x = jax.lax.stop_gradient(x).astype(jnp.float32)
  return jnp.min(x, axis=axes), jnp.max(x, axis=axes)


@dataclasses.dataclass(frozen=True)
class MinMax:
  """Running extremes: the first batch sets the range, later batches only widen it."""

  def init(self, shape: Sequence[int] = ()) -> RangeState:
    return empty_range(shape)

  def update(self, state: RangeState, x: Array, axes: Sequence[int] | None) -> RangeState:
    lo, hi = batch_range(x, axes)
    first = ~state.initialized
    return RangeState(
        min=jnp.where(first, lo, jnp.minimum(state.min, lo)),
        max=jnp.where(first, hi, jnp.maximum(state.max, hi)),
        initialized=jnp.ones((), jnp.bool_),
    )


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
    lo, hi = batch_range(x, axes)
    return _moving(state, lo, hi, self.momentum)


def current_or_observed(state: RangeState, x: Array, axes: Sequence[int] | None) -> tuple[Array, Array]:
  """The observed range, or the range of ``x`` itself while nothing has been observed.

  An observer that has never seen a training batch (a freshly initialised model in eval
  mode) quantizes with the batch's own range rather than with the empty [0, 0] range.
  """
  lo, hi = batch_range(x, axes)
  return (jnp.where(state.initialized, state.min, lo), jnp.where(state.initialized, state.max, hi))


def kth_abs(x: Array, p: float) -> Array:
  """micronet's percentile: the k-th smallest |x| with k = int(p * N) (1-indexed, k >= 1)."""
  flat = jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32)).ravel()
  k = max(int(p * flat.size), 1)
  return jnp.sort(flat)[k - 1]


def _signed_range(x: Array, c: Array) -> tuple[Array, Array]:
  """[-c, c] when x has negative values, [0, c] otherwise (a ReLU output)."""
  has_negative = jnp.min(jax.lax.stop_gradient(x)) < 0
  return jnp.where(has_negative, -c, 0.0), c


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
    return _moving(state, lo, hi, self.momentum)


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
    nonneg = jnp.min(x) >= 0
    top = jnp.maximum(jnp.max(jnp.abs(x)), 1e-12)
    levels = 2.0**self.bits - 1

    def mse(c):
      step = jnp.where(nonneg, c / levels, 2 * c / levels)
      lo = jnp.where(nonneg, 0.0, -c)
      q = jnp.clip(round_half_away((x - lo) / step), 0, levels) * step + lo
      return jnp.mean(jnp.square(q - x))

    cs = top * jnp.arange(1, self.candidates + 1, dtype=jnp.float32) / self.candidates
    best = cs[jnp.argmin(jax.lax.map(mse, cs))]
    return _moving(state, jnp.where(nonneg, 0.0, -best), best, self.momentum)


OBSERVERS = {
    "minmax": MinMax,
    "moving_average": MovingAverageMinMax,
    "percentile": Percentile,
    "mse": MSEClip,
}
