"""Quantizer specs (frozen dataclasses) and the pure fake-quant functions behind them.

Two families of spec, one interface each:

* weight quantizers are stateless: ``spec.fake_quant(w, channel_axis) -> w_q``. Their
  ranges come from the weight tensor itself on every call (exact, nothing to keep in
  sync, and the integer converter recomputes the same numbers from the same weights);
* activation quantizers carry observer state: ``spec.init_state(x) -> state`` and
  ``spec.fake_quant(x, state, update=...) -> (x_q, new_state)``; ``state`` is None
  for the stateless ones (DoReFa).

All arithmetic is float32 in micronet's order of operations (divide by the step, round
half away from zero, multiply back), so results are bit-identical to micronet where the
formulas are the same. Where they differ on purpose it is said in the docstring.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax._src.core import observers as obs
from micronet_jax._src.core.protocol import ObservedActivation, QState, StatelessWeight
from micronet_jax._src.core.ste import clip_inclusive, clipped_round_ste, round_half_away, round_ste

Array = jax.Array

MIN_BITS, MAX_BITS = 2, 16
# float32 machine epsilon: the smallest step an affine quantizer may have (as micronet).
EPS = float(np.finfo(np.float32).eps)


def check_bits(owner: str, bits: Any) -> None:
  if not isinstance(bits, (int, np.integer)) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"{owner}.bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def reduce_axes(ndim: int, channel_axis: int | None) -> tuple[int, ...] | None:
  """Axes to reduce for per-tensor (channel_axis None -> all) or per-channel statistics."""
  if channel_axis is None:
    return None
  channel_axis %= ndim
  return tuple(a for a in range(ndim) if a != channel_axis)


def _keepdims(v: Array, ndim: int, channel_axis: int | None) -> Array:
  """Reshape a per-channel vector so it broadcasts against the tensor it came from."""
  if channel_axis is None:
    return v
  shape = [1] * ndim
  shape[channel_axis % ndim] = -1
  return jnp.reshape(v, shape)


class WeightQuantizer(Protocol):
  bits: int

  def fake_quant(self, w: Array, channel_axis: int) -> Array:
    ...


class ActivationQuantizer(Protocol):
  bits: int

  def init_state(self, x: Array) -> Any:
    ...

  def fake_quant(self, x: Array, state: Any, *, update: bool) -> tuple[Array, Any]:
    ...


# ----------------------------------------------------------------------------- DoReFa


def divide_by_constant(x: Array, c: np.float32) -> Array:
  """x / c, correctly rounded, also under jit.

  XLA rewrites a division by a broadcast constant into a multiplication by its
  reciprocal, which is not the same float32 number: 1.0 / float32(1/15) is 15 but
  1.0 * (1 / float32(1/15)) is 14.999999, and the tie then rounds the other way. The
  barrier hides the constant from that rewrite, so we keep micronet's exact results.
  """
  return x / jax.lax.optimization_barrier(jnp.full_like(x, c))


def dorefa_step(bits: int) -> np.float32:
  """s = 1 / (2^k - 1), rounded to float32 once, as micronet's Python scalar becomes."""
  return np.float32(1.0 / (2**bits - 1))


# Below this max|tanh w| a DoReFa weight tensor counts as all-zero (1 / m^2 stays finite above).
DOREFA_ZERO = 2.0**-60


def dorefa_weight(w: Array, bits: int) -> Array:
  """DoReFa weights: t = tanh(w); n = t / (2 max|t|) + 1/2; q = 2 r(n / s) s - 1.

  Per-tensor, values on the grid {2 i s - 1 : i = 0..2^k-1} within [-1, 1]. Gradients
  flow through tanh and through max|t| (into its argmax), with an identity STE on the
  rounding, exactly as micronet's autograd does.

  An all-zero tensor (max|t| = 0, where micronet divides 0 by 0 and gives NaN) quantizes
  to zeros with a zero gradient: the formula has no limit there (it is invariant to the
  scale of w), and zero is the value the tensor holds. So does a tensor with max|t| <=
  2^-60 (``DOREFA_ZERO``), whose gradient t / max|t|^2 would overflow float32.
  """
  s = dorefa_step(bits)
  t = jnp.tanh(w)
  m = jnp.max(jnp.abs(t))
  nonzero = m > DOREFA_ZERO
  # The safe divisor keeps the unused branch finite, so its (masked) gradient is 0, not NaN.
  n = t / 2 / jnp.where(nonzero, m, 1.0) + 0.5
  q = 2 * (round_ste(divide_by_constant(n, s)) * s) - 1
  return jnp.where(nonzero, q, jnp.zeros_like(q))


def dorefa_activation(x: Array, bits: int, input_scale: float = 0.1) -> Array:
  """DoReFa activations: y = clamp(input_scale * x, 0, 1); q = r(y / s) s.

  The output lives in [0, 1], i.e. ``input_scale`` times the float activation: like
  micronet we do not scale it back. Gradient: ``input_scale * [0 <= input_scale x <= 1]``.
  """
  s = dorefa_step(bits)
  y = clip_inclusive(x * np.float32(input_scale), 0.0, 1.0)
  return round_ste(divide_by_constant(y, s)) * s


@dataclasses.dataclass(frozen=True)
class DoReFaWeight(StatelessWeight):
  """k-bit DoReFa weight quantizer (per tensor, stateless)."""

  bits: int = 8

  def __post_init__(self):
    check_bits("DoReFaWeight", self.bits)

  def fake_quant(self, w: Array, channel_axis: int = -1) -> Array:
    del channel_axis  # DoReFa normalises by the max over the whole tensor.
    return dorefa_weight(w, self.bits)


@dataclasses.dataclass(frozen=True)
class DoReFaActivation(ObservedActivation):
  """k-bit DoReFa activation quantizer: clamp(input_scale * x, 0, 1), then k bits."""

  bits: int = 8
  input_scale: float = 0.1

  def __post_init__(self):
    check_bits("DoReFaActivation", self.bits)
    scale = self.input_scale
    # nan and inf compare False / True against 0: name them (inf would clamp every x > 0 to 1).
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
        or not (math.isfinite(scale) and scale > 0):
      raise ValueError(f"DoReFaActivation.input_scale must be a finite number > 0, got {scale!r}")

  def init_state(self, x: Array) -> None:
    return None

  def fake_quant(self, x: Array, state: None, *, update: bool) -> tuple[Array, None]:
    del update
    return dorefa_activation(x, self.bits, self.input_scale), state


# ----------------------------------------------------------------------------- affine (IAO)


def affine_int_range(bits: int, symmetric: bool, narrow: bool = False) -> tuple[int, int]:
  """Integer grid [qmin, qmax]; ``narrow`` drops one code (micronet's weight grids).

  symmetric:  signed [-2^(b-1), 2^(b-1) - 1], or [-(2^(b-1) - 1), 2^(b-1) - 1] when
              ``narrow`` (so that -w quantizes to -q);
  asymmetric: unsigned [0, 2^b - 1], or [0, 2^b - 2] when ``narrow`` (2^b - 1 codes,
              as many as the narrow signed grid).
  """
  if symmetric:
    half = 2 ** (bits - 1)
    return (-(half - 1) if narrow else -half), half - 1
  return 0, 2**bits - (2 if narrow else 1)


def affine_qparams(
    lo: Array, hi: Array, qmin: int, qmax: int, symmetric: bool
) -> tuple[Array, Array]:
  """(scale, zero_point) for the real range [lo, hi] on the integer grid [qmin, qmax].

  symmetric:  scale = max(|lo|, |hi|) / qmax, zero_point = 0.
  asymmetric: the range is first widened to contain 0, then
              scale = (hi - lo) / (qmax - qmin), zero_point = clip(qmin - r(lo / scale)),
              so that real 0 is exactly the integer zero_point.
  The scale is at least float32 eps. Both are float32 arrays of the shape of lo/hi and
  carry no gradient.
  """
  lo = jax.lax.stop_gradient(jnp.asarray(lo, jnp.float32))
  hi = jax.lax.stop_gradient(jnp.asarray(hi, jnp.float32))
  if symmetric:
    scale = jnp.maximum(jnp.maximum(jnp.abs(lo), jnp.abs(hi)) / np.float32(qmax), EPS)
    return scale, jnp.zeros_like(scale)
  lo = jnp.minimum(lo, 0.0)
  hi = jnp.maximum(hi, 0.0)
  scale = jnp.maximum((hi - lo) / np.float32(qmax - qmin), EPS)
  zero_point = jnp.clip(qmin - round_half_away(lo / scale), qmin, qmax)
  return scale, zero_point


def affine_fake_quant(x: Array, scale: Array, zero_point: Array, qmin: int, qmax: int) -> Array:
  """x_q = (clip(r(x / scale) + zp, qmin, qmax) - zp) * scale.

  The integer ``r(x / scale) + zp`` is what the deploy path stores; rounding happens
  before the zero point is added, as in gemmlowp/TFLite. Gradient (clipped STE): 1 where
  qmin <= r(x / scale) + zp <= qmax (the clip does not bite), 0 elsewhere; none into
  scale or zero point.
  """
  scale = jax.lax.stop_gradient(scale)
  return clipped_round_ste(x / scale, qmin - zero_point, qmax - zero_point) * scale


def bias_fake_quant(bias: Array, scale: Array) -> Array:
  """The bias an integer kernel adds: r(b / scale) * scale, with scale = S_in * S_w.

  Integer inference stores the bias as int32 at the accumulator's scale; fake-quantizing
  it the same way during training and evaluation makes the fake-quant forward and the
  integer forward agree to the last code. Identity STE; no gradient into ``scale``.
  """
  scale = jax.lax.stop_gradient(scale)
  return round_ste(bias / scale) * scale


@dataclasses.dataclass(frozen=True)
class AffineWeight(StatelessWeight):
  """Affine (IAO) weight quantizer; ranges from the current weights (no state).

  Defaults are the usual int8 deploy choice: symmetric, narrow range
  [-(2^(b-1)-1), 2^(b-1)-1], one scale per output channel (the last kernel axis).
  Asymmetric weights use micronet's narrow unsigned grid [0, 2^b - 2] (0..254 at 8 bits):
  scale = (max - min) / (2^b - 2).
  """

  bits: int = 8
  symmetric: bool = True
  per_channel: bool = True

  def __post_init__(self):
    check_bits("AffineWeight", self.bits)

  def int_range(self) -> tuple[int, int]:
    return affine_int_range(self.bits, self.symmetric, narrow=True)

  def qparams(self, w: Array, channel_axis: int = -1) -> tuple[Array, Array]:
    """(scale, zero_point), shaped to broadcast against ``w``."""
    axis = channel_axis if self.per_channel else None
    lo, hi = obs.batch_range(w, reduce_axes(w.ndim, axis))
    qmin, qmax = self.int_range()
    scale, zp = affine_qparams(lo, hi, qmin, qmax, self.symmetric)
    return _keepdims(scale, w.ndim, axis), _keepdims(zp, w.ndim, axis)

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    return self.qparams(x, -1 if channel_axis is None else channel_axis)

  def fake_quant(self, w: Array, channel_axis: int = -1) -> Array:
    scale, zp = self.qparams(w, channel_axis)
    return affine_fake_quant(w, scale, zp, *self.int_range())


@dataclasses.dataclass(frozen=True)
class AffineActivation(ObservedActivation):
  """Affine (IAO) activation quantizer, per tensor, with an observer in ``quant_stats``.

  Default: asymmetric unsigned [0, 2^b - 1] (what int8 deploy formats use for
  activations) with a moving-average min/max observer of momentum 0.1 (micronet's).
  With ``update=True`` the observer sees the batch first and the batch is quantized
  with the updated range (micronet's order); with ``update=False`` the stored range is
  used, or the batch's own range if the observer has seen nothing yet.
  """

  bits: int = 8
  symmetric: bool = False
  observer: obs.Observer = obs.MovingAverageMinMax()

  def __post_init__(self):
    check_bits("AffineActivation", self.bits)

  def int_range(self) -> tuple[int, int]:
    return affine_int_range(self.bits, self.symmetric, narrow=False)

  def init_state(self, x: Array) -> obs.RangeState:
    return self.observer.init(())

  def qparams(self, state: obs.RangeState, x: Array | None = None) -> tuple[Array, Array]:
    if x is None:
      lo, hi = state.min, state.max
    else:
      lo, hi = obs.current_or_observed(state, x, None)
    qmin, qmax = self.int_range()
    return affine_qparams(lo, hi, qmin, qmax, self.symmetric)

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    return self.qparams(qstate.stats, x)

  def fake_quant(self, x: Array, state: obs.RangeState, *, update: bool) -> tuple[Array, obs.RangeState]:
    if update:
      state = self.observer.update(state, x, None)
    scale, zp = self.qparams(state, x)
    return affine_fake_quant(x, scale, zp, *self.int_range()), state


def describe(q: Any) -> str:
  """Short human-readable name of a quantizer spec, for tables ('-' for None)."""
  if q is None:
    return "-"
  fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name != "bits"}
  extra = ",".join(
      f"{k}={type(v).__name__ if dataclasses.is_dataclass(v) else v}" for k, v in fields.items()
  )
  return f"{type(q).__name__}({extra})" if extra else type(q).__name__
