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
  the gradients are the paper's with beta^ in place of beta. ``start="lsq"`` starts it
  as LSQ instead, signed or unsigned as the first batch is (``LsqPlusActivation``):
  ``lsq_rules``' choice for hidden inputs, whose sign a rule cannot know in advance.
* **PACT** (Choi et al., "PACT", 2018): y = clip(x, 0, alpha), quantized on k bits with
  step alpha / (2^k - 1), alpha learned; d x_q / d alpha = 1 where x >= alpha, 0 elsewhere
  (the paper's straight-through estimate: the rounding is transparent and the step
  carries no gradient).

Two rules keep the learned params trainable on any tensor (a zero-initialised head, an
all-zero first batch):

* **No degenerate start.** Where a paper's rule gives a step below eps (float32's, the
  floor every forward clamps to: a zero tensor, or a constant one for LSQ+'s min/max),
  the rule is applied to the scale the tensor would have at a standard initialisation: mean|x| of a
  standard normal, sqrt(2 / pi), for an input; for a kernel its own mean|w| over the
  whole tensor (a zero channel of a per-channel step), else LeCun-normal's,
  sqrt(2 / pi) / sqrt(fan_in). Every step starts at eps or above.
* **The floor passes the gradient.** s = max(step, eps) is taken with a straight-through
  gradient (``_positive``): max's own gradient is 0 below eps, which froze a step (or a
  PACT alpha) that started at 0.

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

# mean|x| of a standard normal x: the scale a tensor with no scale of its own (all zero)
# is given, that of a unit-variance input (times 1 / sqrt(fan_in) for a kernel)
UNIT_MEAN_ABS = math.sqrt(2 / math.pi)


def _positive(v: Array) -> Array:
  """max(v, eps) in value, with ``v``'s own gradient (1) everywhere.

  ``jnp.maximum(v, eps)`` has gradient 0 wherever v < eps, so a step that started at 0 (a
  zero tensor's) or fell below eps could never move again. sg(max(v, eps)) + (v - sg(v))
  has exactly the value max(v, eps) (v - v is 0), so the grid is the deploy's.
  """
  return sg(jnp.maximum(v, EPS)) + (v - sg(v))


def lsq_step(mean_abs: Array, qp: int, fallback_mean_abs: Array | float) -> Array:
  """LSQ's start s = 2 mean|x| / sqrt(Qp); where that is below eps (a zero or near-zero
  tensor), the same rule on ``fallback_mean_abs`` (which must give at least eps).

  Args:
    mean_abs: mean|x| per step (any shape: () per tensor, (C,) per channel).
    qp: the grid's top code Qp.
    fallback_mean_abs: broadcasts against ``mean_abs``.
  Returns:
    float32 steps shaped like ``mean_abs``, each at least eps.
  """
  root = np.float32(math.sqrt(qp))
  s = 2 * mean_abs / root
  return jnp.where(s >= EPS, s, 2 * jnp.asarray(fallback_mean_abs, jnp.float32) / root).astype(jnp.float32)


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
  by ``_keepdims``). With s = max(step, eps) (its gradient that of step, even below eps:
  ``_positive``), k = r(offset / s) (0 without an offset),
  beta^ = k s and t = (x - beta^) / s:

    forward:   q = clip(r(x / s) - k, qmin, qmax)   (the deploy's codes, zero point -k)
               x_q = q s + beta^                    (= r(clip(t, qmin, qmax)) s + beta^)
    gradients: d x_q / dx      = 1 if qmin <= t <= qmax else 0
               d x_q / d step  = g (r(t) - t) inside, g qmin below, g qmax above
               d x_q / d offset = 0 inside, g outside

  which are LSQ's equation (3) and LSQ+'s gradients, beta^ held fixed in s as the paper
  holds beta. ``g`` is the gradient scale of both step and offset.
  """
  s = grad_scale(_positive(step), g)
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
  alpha is floored at eps with its gradient kept (``_positive``), so alpha 0 still learns.
  """
  a = _positive(alpha)
  y = jnp.where(x >= a, a, jnp.where(x > 0, x, jnp.zeros_like(x)))
  s = sg(pact_step(a, bits))
  return round_ste(y / s) * s


def pact_step(alpha: Array, bits: int) -> Array:
  """alpha / (2^k - 1): the step of PACT's k-bit grid (alpha at least eps)."""
  return _positive(alpha) / np.float32(2**bits - 1)


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
    """s = 2 mean|w| / sqrt(Qp) over the tensor (or each output channel).

    A step that rule puts below eps falls back (``lsq_step``): a zero channel of a
    per-channel step takes the whole tensor's mean|w|; an all-zero tensor (a
    zero-initialised head) LeCun-normal's, sqrt(2 / pi) / sqrt(fan_in) with fan_in the
    weights per output channel (axis ``channel_axis``, the last when None), the scale
    its weights will grow on.
    """
    out = -1 if channel_axis is None else channel_axis
    fan_in = max(1, x.size // x.shape[out]) if x.ndim else 1
    qp = self.int_range()[1]
    whole = _mean_abs(x, None)
    fallback = jnp.where(lsq_step(whole, qp, 0.0) >= EPS, whole, np.float32(UNIT_MEAN_ABS / math.sqrt(fan_in)))
    axes = reduce_axes(x.ndim, self._axis(channel_axis))
    return QState(params={"step": lsq_step(_mean_abs(x, axes), qp, fallback)})

  def grad_scale(self, x: Array, channel_axis: int | None) -> float:
    """g = 1 / sqrt(N Qp), N the number of weights sharing one step."""
    axis = self._axis(channel_axis)
    n = x.size if axis is None else x.size // x.shape[axis]
    return 1.0 / math.sqrt(n * self.int_range()[1])

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    axis = self._axis(channel_axis)
    step = qstate.params["step"]
    scale = _positive(step if axis is None else _keepdims(step, x.ndim, axis))
    return scale, jnp.zeros_like(scale)

  def apply(self, x: Array, qstate: QState, *, channel_axis: int | None, update: bool):
    del update  # nothing observed
    axis = self._axis(channel_axis)
    step = qstate.params["step"]
    step = step if axis is None else _keepdims(step, x.ndim, axis)
    return lsq_fake_quant(x, step, *self.int_range(), self.grad_scale(x, channel_axis)), qstate.stats


@dataclasses.dataclass(frozen=True)
class LsqActivation:
  """LSQ activations, per tensor, on a grid fixed by the spec: unsigned codes
  [0, 2^b - 1] (``signed=False``: inputs known to follow a ReLU) or signed
  [-2^(b-1), 2^(b-1) - 1]; zero point 0; a learned step ``input_step``.

  An unsigned grid clips every negative input to 0 (and gives those inputs no gradient):
  for inputs whose sign is not known in advance (after a linear bottleneck, a residual
  add, a LayerNorm) use ``LsqPlusActivation(bits, start="lsq")``, which picks the grid
  from the first batch (``lsq_rules`` does).
  """

  bits: int = 4
  signed: bool = False

  def __post_init__(self):
    check_bits("LsqActivation", self.bits)

  def int_range(self) -> tuple[int, int]:
    return affine_int_range(self.bits, symmetric=self.signed)

  def init(self, x: Array, channel_axis: int | None) -> QState:
    """s = 2 mean|x| / sqrt(Qp) over the first batch; an all-zero batch (s below eps)
    gets that of a standard normal input, 2 sqrt(2 / pi) / sqrt(Qp)."""
    return QState(params={"step": lsq_step(_mean_abs(x, None), self.int_range()[1], UNIT_MEAN_ABS)})

  def grad_scale(self, x: Array) -> float:
    """g = 1 / sqrt(N Qp), N the features per example."""
    return 1.0 / math.sqrt(_per_example(x) * self.int_range()[1])

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    scale = _positive(qstate.params["step"])
    return scale, jnp.zeros_like(scale)

  def apply(self, x: Array, qstate: QState, *, channel_axis: int | None, update: bool):
    del update
    return lsq_fake_quant(x, qstate.params["step"], *self.int_range(), self.grad_scale(x)), qstate.stats


LSQ_PLUS_STARTS = ("minmax", "lsq")  # LsqPlusActivation(start=...)


@dataclasses.dataclass(frozen=True)
class LsqPlusActivation:
  """LSQ+ activations, per tensor: unsigned codes [0, 2^b - 1] with a learned step
  ``input_step`` and offset ``input_offset`` (the real value of code 0, snapped to the
  grid: zero point -r(offset / step)). For inputs of any sign.

  ``start``, how ``init`` sets (s, beta) from the first batch x:

  * ``"minmax"`` (the LSQ+ paper's): s = (max x - min x) / (2^b - 1), beta = min x; the
    whole batch is on the grid (the image input of ``lsq_rules``).
  * ``"lsq"``: LSQ's start on the grid the batch's sign calls for. A batch with no
    negative value and some positive one (after a ReLU) gets LSQ's unsigned grid,
    beta = 0 (codes [0, 2^b - 1]), s = 2 mean|x| / sqrt(2^b - 1); any other batch (a
    negative value: after a linear bottleneck, a residual add, a LayerNorm; or all zero:
    after a zero-initialised layer, whose later inputs will have both signs) LSQ's signed
    grid, beta = -2^(b-1) s (zero point 2^(b-1): codes [-2^(b-1), 2^(b-1) - 1] around
    0), s = 2 mean|x| / sqrt(2^(b-1) - 1). At the start the forward is
    ``LsqActivation(bits, signed=...)``'s; then the offset trains as LSQ+'s.

  A batch that gives a step below eps (all zero, or constant for ``"minmax"``) starts
  from the ``"lsq"`` rule with mean|x| of a standard normal, sqrt(2 / pi), in place of
  a zero mean|x| (``lsq_step``), so that the step and offset are trainable.
  """

  bits: int = 8
  start: str = "minmax"

  def __post_init__(self):
    check_bits("LsqPlusActivation", self.bits)
    if self.start not in LSQ_PLUS_STARTS:
      raise ValueError(f"LsqPlusActivation.start must be one of {LSQ_PLUS_STARTS}, got {self.start!r}")

  def int_range(self) -> tuple[int, int]:
    return affine_int_range(self.bits, symmetric=False)

  def _lsq_start(self, x: Array) -> tuple[Array, Array]:
    """(step, offset) of the ``"lsq"`` start (see the class docstring)."""
    half = 2 ** (self.bits - 1)
    unsigned = (jnp.min(sg(x)) >= 0) & (jnp.max(sg(x)) > 0)
    m = _mean_abs(x, None)
    step = jnp.where(unsigned, lsq_step(m, 2**self.bits - 1, UNIT_MEAN_ABS), lsq_step(m, half - 1, UNIT_MEAN_ABS))
    # -2^(b-1) s is exact (a power of 2 times s), so r(offset / s) is exactly -2^(b-1)
    return step, jnp.where(unsigned, jnp.float32(0), -np.float32(half) * step)

  def init(self, x: Array, channel_axis: int | None) -> QState:
    """(s, beta) from the first batch by ``start`` (see the class docstring)."""
    step, offset = self._lsq_start(x)
    if self.start == "minmax":
      lo, hi = jnp.min(sg(x)).astype(jnp.float32), jnp.max(sg(x)).astype(jnp.float32)
      qmin, qmax = self.int_range()
      span = (hi - lo) / np.float32(qmax - qmin)
      usable = span >= EPS
      step, offset = jnp.where(usable, span, step), jnp.where(usable, lo - qmin * span, offset)
    return QState(params={"step": step, "offset": offset})

  def grad_scale(self, x: Array) -> float:
    return 1.0 / math.sqrt(_per_example(x) * self.int_range()[1])

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    scale = _positive(qstate.params["step"])
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
  step would, alpha = (2^b - 1) 2 mean|x| / sqrt(2^b - 1), on the first batch (an
  all-zero batch: mean|x| of a standard normal, as ``LsqActivation``), which suits
  short schedules.
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
    qp = 2**self.bits - 1
    return QState(params={"alpha": np.float32(qp) * lsq_step(_mean_abs(x, None), qp, UNIT_MEAN_ABS)})

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    scale = pact_step(qstate.params["alpha"], self.bits)
    return scale, jnp.zeros_like(scale)

  def apply(self, x: Array, qstate: QState, *, channel_axis: int | None, update: bool):
    del update
    return pact_activation(x, qstate.params["alpha"], self.bits), qstate.stats
