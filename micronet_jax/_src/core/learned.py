"""Learned quantizers: LSQ and LSQ+ step sizes and offsets, PACT clipping values.

Each is a quantizer of the protocol (``protocol.py``) whose state is trainable: ``init``
returns ``QState(params=...)``, which a layer stores as ``params/<layer>/<role>_<name>``
(``kernel_step``, ``input_step``, ``input_offset``, ``input_alpha``), so the optimizer
trains it with the weights and a float checkpoint still loads. ``init`` computes the
params from the tensor it is given, the float weights or the first batch passed to
``quantize_variables``, as the papers do. All of them have the ``AffineGrid``
capability: a learned step is just a scale at deploy time, so ``convert`` turns a
trained model into the same integer deploy as an IAO one.

* **LSQ** (Esser et al., "Learned Step Size Quantization", ICLR 2020): x_q = r(clip(x / s,
  -Qn, Qp)) s with a learned step s, initialised to 2 mean|x| / sqrt(Qp), whose gradient
  is scaled by g = 1 / sqrt(N Qp) (N: weights of the tensor, or features per example of
  an activation).
* **LSQ+** (Bhalgat et al., "LSQ+", CVPR workshops 2020): asymmetric activations with a
  learned offset beta as well, x_q = r(clip((x - beta) / s, n, p)) s + beta, initialised
  from the first batch's min and max. Integer kernels need an integer zero point, so the
  offset is used snapped to the grid, beta^ = s r(beta / s) (zero point -r(beta / s));
  the gradients are the paper's with beta^ in place of beta.
* **PACT** (Choi et al., "PACT", 2018): y = clip(x, 0, alpha), quantized on k bits with
  step alpha / (2^k - 1), alpha learned; d x_q / d alpha = 1 where x >= alpha, 0 elsewhere
  (the paper's straight-through estimate: the rounding is transparent and the step
  carries no gradient).

The forward codes are computed as the integer deploy computes them, r(x / s) + z clipped
to [qmin, qmax] (``deploy.integer._codes``), so the two agree to the last code.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax._src.core.protocol import QState
from micronet_jax._src.core.quantizers import EPS, _keepdims, affine_int_range, check_bits, reduce_axes
from micronet_jax._src.core.ste import round_half_away, round_ste

Array = jax.Array
sg = jax.lax.stop_gradient


def grad_scale(x: Array, g: float) -> Array:
  """x in the forward pass; the gradient flowing into ``x`` is multiplied by ``g``.

  LSQ's gradscale. The forward value is x + g (x - x) = x exactly (not x - gx + gx, which
  can round), so a scale used in training is bit-identical to the one deployed.
  """
  return sg(x) + g * (x - sg(x))


def lsq_fake_quant(x: Array, step: Array, qmin: int, qmax: int, g: float = 1.0,
                   offset: Array | None = None) -> Array:
  """LSQ (``offset`` None) or LSQ+ fake quantization with trainable ``step`` (and ``offset``).

  ``step`` and ``offset`` broadcast against ``x`` (scalars, or per-channel arrays shaped
  by ``_keepdims``). With s = max(step, eps), k = r(offset / s) (0 without an offset),
  beta^ = k s and t = (x - beta^) / s:

    forward:   q = clip(r(x / s) - k, qmin, qmax)   (the deploy's codes, zero point -k)
               x_q = q s + beta^                    (= r(clip(t, qmin, qmax)) s + beta^)
    gradients: d x_q / dx      = 1 if qmin <= t <= qmax else 0
               d x_q / d step  = g (r(t) - t) inside, g qmin below, g qmax above
               d x_q / d offset = 0 inside, g outside

  which are LSQ's equation (3) and LSQ+'s gradients, beta^ held fixed in s as the paper
  holds beta. ``g`` is the gradient scale of both step and offset.
  """
  s = grad_scale(jnp.maximum(step, EPS), g)
  s0 = sg(s)
  k = 0.0 if offset is None else round_ste(grad_scale(offset, g) / s0)
  # zero in value; in the gradient it makes dt/ds = -(x - k s0) / s^2, beta^ fixed in s
  fixed_offset = k * (s - s0) / s0
  t = x / s - k + fixed_offset  # the window only: its value may differ from r(x / s) - k by an ulp
  codes = round_ste(x / s) - k + fixed_offset  # exact: integers in float32
  inside = (t >= qmin) & (t <= qmax)
  q = jnp.where(inside, codes, sg(jnp.clip(codes, qmin, qmax)))
  return q * s + k * s0


def pact_activation(x: Array, alpha: Array, bits: int) -> Array:
  """PACT: y = clip(x, 0, alpha); x_q = r(y / s) s with s = alpha / (2^k - 1).

  Gradients (the paper's): d x_q / dx = 1 for 0 < x < alpha, else 0; d x_q / d alpha = 1
  for x >= alpha, else 0. The rounding is straight-through (``round_ste``) and the step
  carries no gradient, so alpha learns from the clipped inputs alone, as in the paper.
  """
  a = jnp.maximum(alpha, EPS)
  y = jnp.where(x >= a, a, jnp.where(x > 0, x, jnp.zeros_like(x)))
  s = sg(pact_step(a, bits))
  return round_ste(y / s) * s


def pact_step(alpha: Array, bits: int) -> Array:
  """alpha / (2^k - 1): the step of PACT's k-bit grid (alpha at least eps)."""
  return jnp.maximum(alpha, EPS) / np.float32(2**bits - 1)


def _per_example(x: Array) -> int:
  """Features per example of an activation (N of LSQ's g): every axis but the batch."""
  return max(1, math.prod(x.shape[1:]))


def _mean_abs(x: Array, axes) -> Array:
  return jnp.mean(jnp.abs(sg(x)), axis=axes).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class LsqWeight:
  """LSQ weights: signed codes [-2^(b-1), 2^(b-1) - 1], zero point 0, a learned step.

  ``per_channel``: one step per output channel (params ``kernel_step`` of shape (C,),
  N = weights per channel); the paper's is one per tensor (shape ()).
  """

  bits: int = 4
  per_channel: bool = False

  def __post_init__(self):
    check_bits("LsqWeight", self.bits)

  def int_range(self) -> tuple[int, int]:
    return affine_int_range(self.bits, symmetric=True)

  def _axis(self, channel_axis: int | None) -> int | None:
    return (-1 if channel_axis is None else channel_axis) if self.per_channel else None

  def init(self, x: Array, channel_axis: int | None) -> QState:
    """s = 2 mean|w| / sqrt(Qp) over the tensor (or each output channel)."""
    axes = reduce_axes(x.ndim, self._axis(channel_axis))
    return QState(params={"step": 2 * _mean_abs(x, axes) / np.float32(math.sqrt(self.int_range()[1]))})

  def grad_scale(self, x: Array, channel_axis: int | None) -> float:
    """g = 1 / sqrt(N Qp), N the number of weights sharing one step."""
    axis = self._axis(channel_axis)
    n = x.size if axis is None else x.size // x.shape[axis]
    return 1.0 / math.sqrt(n * self.int_range()[1])

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    axis = self._axis(channel_axis)
    step = qstate.params["step"]
    scale = jnp.maximum(step if axis is None else _keepdims(step, x.ndim, axis), EPS)
    return scale, jnp.zeros_like(scale)

  def apply(self, x: Array, qstate: QState, *, channel_axis: int | None, update: bool):
    del update  # nothing observed
    axis = self._axis(channel_axis)
    step = qstate.params["step"]
    step = step if axis is None else _keepdims(step, x.ndim, axis)
    return lsq_fake_quant(x, step, *self.int_range(), self.grad_scale(x, channel_axis)), qstate.stats


@dataclasses.dataclass(frozen=True)
class LsqActivation:
  """LSQ activations, per tensor: unsigned codes [0, 2^b - 1] (inputs after a ReLU), or
  signed [-2^(b-1), 2^(b-1) - 1]; zero point 0; a learned step ``input_step``."""

  bits: int = 4
  signed: bool = False

  def __post_init__(self):
    check_bits("LsqActivation", self.bits)

  def int_range(self) -> tuple[int, int]:
    return affine_int_range(self.bits, symmetric=self.signed)

  def init(self, x: Array, channel_axis: int | None) -> QState:
    """s = 2 mean|x| / sqrt(Qp) over the first batch."""
    return QState(params={"step": 2 * _mean_abs(x, None) / np.float32(math.sqrt(self.int_range()[1]))})

  def grad_scale(self, x: Array) -> float:
    """g = 1 / sqrt(N Qp), N the features per example."""
    return 1.0 / math.sqrt(_per_example(x) * self.int_range()[1])

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    scale = jnp.maximum(qstate.params["step"], EPS)
    return scale, jnp.zeros_like(scale)

  def apply(self, x: Array, qstate: QState, *, channel_axis: int | None, update: bool):
    del update
    return lsq_fake_quant(x, qstate.params["step"], *self.int_range(), self.grad_scale(x)), qstate.stats


@dataclasses.dataclass(frozen=True)
class LsqPlusActivation:
  """LSQ+ activations, per tensor: unsigned codes [0, 2^b - 1] with a learned step
  ``input_step`` and offset ``input_offset`` (the real value of code 0, snapped to the
  grid: zero point -r(offset / step)). For inputs of any sign (a normalised image)."""

  bits: int = 8

  def __post_init__(self):
    check_bits("LsqPlusActivation", self.bits)

  def int_range(self) -> tuple[int, int]:
    return affine_int_range(self.bits, symmetric=False)

  def init(self, x: Array, channel_axis: int | None) -> QState:
    """The paper's min/max start: s = (max - min) / (2^b - 1), beta = min, on the first batch."""
    lo, hi = jnp.min(sg(x)).astype(jnp.float32), jnp.max(sg(x)).astype(jnp.float32)
    qmin, qmax = self.int_range()
    step = jnp.maximum((hi - lo) / np.float32(qmax - qmin), EPS)
    return QState(params={"step": step, "offset": lo - qmin * step})

  def grad_scale(self, x: Array) -> float:
    return 1.0 / math.sqrt(_per_example(x) * self.int_range()[1])

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    scale = jnp.maximum(qstate.params["step"], EPS)
    return scale, -round_half_away(qstate.params["offset"] / scale)

  def apply(self, x: Array, qstate: QState, *, channel_axis: int | None, update: bool):
    del update
    p = qstate.params
    return lsq_fake_quant(x, p["step"], *self.int_range(), self.grad_scale(x), p["offset"]), qstate.stats


@dataclasses.dataclass(frozen=True)
class PactActivation:
  """PACT activations: codes [0, 2^b - 1] of step alpha / (2^b - 1), alpha learned
  (``input_alpha``). PACT replaces the ReLU in front of the layer (it clips at 0).

  ``alpha_init``: the start of alpha. The paper starts from a constant (10) and pulls it
  down with an L2 penalty over a long schedule; None (the default) starts where LSQ's
  step would, alpha = (2^b - 1) 2 mean|x| / sqrt(2^b - 1), on the first batch, which
  suits short schedules.
  """

  bits: int = 4
  alpha_init: float | None = None

  def __post_init__(self):
    check_bits("PactActivation", self.bits)
    if self.alpha_init is not None and not self.alpha_init > 0:
      raise ValueError(f"PactActivation.alpha_init must be > 0 or None, got {self.alpha_init!r}")

  def int_range(self) -> tuple[int, int]:
    return 0, 2**self.bits - 1

  def init(self, x: Array, channel_axis: int | None) -> QState:
    if self.alpha_init is not None:
      return QState(params={"alpha": jnp.asarray(self.alpha_init, jnp.float32)})
    return QState(params={"alpha": 2 * _mean_abs(x, None) * np.float32(math.sqrt(2**self.bits - 1))})

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    scale = pact_step(qstate.params["alpha"], self.bits)
    return scale, jnp.zeros_like(scale)

  def apply(self, x: Array, qstate: QState, *, channel_axis: int | None, update: bool):
    del update
    return pact_activation(x, qstate.params["alpha"], self.bits), qstate.stats
