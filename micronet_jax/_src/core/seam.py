"""The seam: the one contract between quantizers and a neural-network framework.

A quantizer needs four things from the layer that owns it, and nothing else:

* ``path``: the layer's path in the variable tree (``"encoder/layers_0/attn/query"``),
  what rules match and plans key on;
* ``param(name, init)``: get-or-create a trainable leaf of the layer (``params/<path>/<name>``
  in Linen, an ``nnx.Param`` attribute in NNX); ``init()`` is called only to create it;
* ``stat(name, init)``: get-or-create an observed statistic (``quant_stats/<path>/<name>``
  in Linen, a ``QuantStats`` variable in NNX), returned as a ``StatRef`` whose ``value``
  can be read and, when statistics move, written;
* ``stats_move``: whether statistics may move in this call (training or calibration,
  not evaluation, not Linen's ``init``).

``apply_quantizer`` (and the bias/accumulator wiring built on it) is written once against
this contract; ``_src/flax/seam.py`` implements it on a Linen scope and ``_src/nnx`` on an
NNX module, so the two frameworks run the same code and get the same numbers. (qwix's
``flax_util`` is the model: one seam, the framework decided inside it.)

Imports jax only: no framework here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from micronet_jax._src.core import observers as obs
from micronet_jax._src.core.protocol import AffineGrid, QState
from micronet_jax._src.core.protocol import RangeObserved
from micronet_jax._src.core.quantizers import bias_fake_quant

Array = jax.Array
STATS = "quant_stats"  # the collection (Linen) / variable type name (NNX) of observed statistics
INPUT_STATS = "input"  # the role of a layer's (first) input quantizer


@runtime_checkable
class StatRef(Protocol):
  """A statistic's storage: ``value`` to read, and to write when statistics move."""

  value: Any


@runtime_checkable
class Seam(Protocol):
  """See the module docstring."""

  @property
  def path(self) -> str:
    ...

  def param(self, name: str, init: Callable[[], Array]) -> Array:
    ...

  def stat(self, name: str, init: Callable[[], Any]) -> StatRef:
    ...

  @property
  def stats_move(self) -> bool:
    ...


def apply_quantizer(seam: Seam, role: str, q: Any, x: Array, channel_axis: int | None) -> Array:
  """Fake-quantizes ``x`` with the quantizer spec ``q`` (None: ``x`` as is), its state kept
  by ``seam``: trainable params as ``<role>_<name>``, statistics as ``<role>``.

  The state is created from ``q.init(x, channel_axis)`` the first time (only then is
  ``init`` evaluated; the structure is read abstractly), and moves only when
  ``seam.stats_move``. The maths runs in float32 (scales are float32); the result has
  ``x``'s dtype, the layer's choice.
  """
  if q is None:
    return x
  structure = jax.eval_shape(lambda v: q.init(v, channel_axis), x)
  init = functools.cache(lambda: q.init(x, channel_axis))
  params = None
  if structure.params is not None:
    params = {k: seam.param(f"{role}_{k}", lambda k=k: init().params[k]) for k in structure.params}
  ref = None if structure.stats is None else seam.stat(role, lambda: init().stats)
  update = ref is not None and seam.stats_move
  x_q, new_stats = q.apply(x, QState(params, None if ref is None else ref.value),
                           channel_axis=channel_axis, update=update)
  if update:
    ref.value = new_stats
  return x_q.astype(x.dtype)


def quantizer_state(seam: Seam, role: str, q: Any) -> QState:
  """The state of ``q`` in ``role`` as it stands now (after this call's update): what
  capabilities such as ``AffineGrid.grid`` read. Read-only: nothing is created that the
  quantizer does not already have (it must have been applied first)."""
  if q is None:
    return QState()
  structure = jax.eval_shape(lambda: q.init(jnp.zeros((1,), jnp.float32), None))
  params = None
  if structure.params is not None:
    params = {k: seam.param(f"{role}_{k}", _missing(seam, role)) for k in structure.params}
  stats = None if structure.stats is None else seam.stat(role, _missing(seam, role)).value
  return QState(params, stats)


def _missing(seam: Seam, role: str) -> Callable[[], Any]:
  def fail():
    raise ValueError(f"{seam.path}: the {role} quantizer's state is read before the quantizer ran")
  return fail


def state_from(params: Any, stats: Any, role: str) -> QState:
  """The state of the quantizer in ``role`` ("input", "kernel") of one layer, from that
  layer's variable subtrees: ``params`` is ``params/<layer>`` (the quantizer's trainable
  leaves are stored there as ``<role>_<name>``) and ``stats`` is ``quant_stats/<layer>``
  (its observed state is ``stats[role]``). Either subtree may be None or lack the role;
  what the quantizer does not have is None in the result. Pure: no scope, no tracing."""
  prefix = f"{role}_"
  own = {k[len(prefix):]: v for k, v in (params or {}).items() if k.startswith(prefix)}
  observed = stats.get(role) if hasattr(stats, "get") else None
  return QState(own or None, observed)


def input_scale(seam: Seam, q: Any, role: str = INPUT_STATS) -> Array | None:
  """S_in of an affine input quantizer from its current state, or None (not affine)."""
  if not isinstance(q, AffineGrid):
    return None
  return q.grid(None, quantizer_state(seam, role, q), None)[0]


def accumulator_scale(weight_quant: Any, kernel: Array, s_in: Array | None, out_axis: int,
                      qstate: QState = QState()) -> Array | None:
  """S_in * S_w per output channel (a vector over ``kernel``'s ``out_axis``) or per
  tensor (a scalar); None when either quantizer is not affine."""
  if s_in is None or not isinstance(weight_quant, AffineGrid):
    return None
  s_w = weight_quant.grid(jax.lax.stop_gradient(kernel), qstate, out_axis)[0]
  return s_in * jnp.reshape(s_w, (-1,)) if s_w.size > 1 else s_in * jnp.reshape(s_w, ())


def quantize_bias(seam: Seam, bias: Array | None, weight_quant: Any, kernel: Array, act_quant: Any,
                  out_axis: int) -> Array | None:
  """The bias on the int32 accumulator grid S_in * S_w of integer inference when both the
  input and the weight quantizers are affine (so fake-quant and integer forwards agree);
  otherwise as is (micronet keeps it float). Call after both quantizers ran.

  ``bias`` has the layer's output-feature shape; a per-channel S_w (one value per output
  channel, flattened) is reshaped onto it.
  """
  if bias is None:
    return None
  scale = accumulator_scale(weight_quant, kernel, input_scale(seam, act_quant), out_axis,
                            quantizer_state(seam, "kernel", weight_quant))
  if scale is None:
    return bias
  if scale.ndim and scale.size == bias.size:
    scale = scale.reshape(bias.shape)
  return bias_fake_quant(bias, scale)


def channels_last(w: Array, out_axes: tuple[int, ...]) -> Array:
  """``w`` with its output-channel axes moved to the end and merged into one axis of size
  C = prod(out sizes): the one layout a per-channel weight quantizer needs. A kernel with
  a single output axis is returned as it is (its quantizer state keeps its own shape)."""
  if len(out_axes) == 1:
    return w
  out_axes = tuple(a % w.ndim for a in out_axes)
  rest = [a for a in range(w.ndim) if a not in out_axes]
  return jnp.transpose(w, (*rest, *out_axes)).reshape(*(w.shape[a] for a in rest), -1)


def quantize_weight(seam: Seam, role: str, q: Any, w: Array, out_axes: tuple[int, ...]) -> Array:
  """``apply_quantizer`` for a weight whose output channels lie on ``out_axes`` (several
  for ``DenseGeneral``/``Einsum`` kernels): per-channel quantizers see ``channels_last(w)``
  with its last axis as the channel axis, and the result is put back in ``w``'s layout."""
  if q is None:
    return w
  if len(out_axes) == 1:
    return apply_quantizer(seam, role, q, w, out_axes[0])
  out_axes = tuple(a % w.ndim for a in out_axes)
  rest = [a for a in range(w.ndim) if a not in out_axes]
  perm = (*rest, *out_axes)
  w_q = apply_quantizer(seam, role, q, channels_last(w, out_axes), -1)
  w_q = w_q.reshape(tuple(w.shape[a] for a in perm))
  return jnp.transpose(w_q, tuple(perm.index(a) for a in range(w.ndim)))


# ----------------------------------------------------------------------------- the residual add


def union_range(a: Any, b: Any) -> Any:
  """The smallest ``RangeState`` covering both: [min(a.min, b.min), max(a.max, b.max)],
  initialised only when both are (micronet's QuantAdd takes the union of its two
  observers' ranges before every quantization)."""
  return obs.RangeState(min=jnp.minimum(a.min, b.min), max=jnp.maximum(a.max, b.max),
                        initialized=jnp.logical_and(a.initialized, b.initialized))


def shared_scale_add(seam: Seam, q: Any, a: Array, b: Array, create_inputs: bool | None = None) -> Array:
  """``a + b`` with both inputs fake-quantized on one shared scale (micronet's QuantAdd).

  Each input has its own observer, statistics ``input_a`` and ``input_b``, moved when
  ``seam.stats_move``; both inputs are quantized with the scale of the union of the two
  ranges, kept as ``input`` (what evaluation and the integer converter read). With a
  moving average per input the shared range is [min(ma(min a), ma(min b)),
  max(ma(max a), ma(max b))], so the wider branch is never clipped to an average of the
  two. While nothing has been observed, the union of the batch's two ranges is used.

  Args:
    seam: the add's seam.
    q: an activation quantizer with a range observer (``RangeObserved``), or None
      (float: exactly ``a + b``).
    a: one input.
    b: the other input, shaped as ``a``.
    create_inputs: whether the per-input statistics exist in this call (None: when
      statistics move). Linen creates them whenever ``quant_stats`` is mutable, ``init``
      included, so that the variables' structure never changes after ``init``.

  Returns:
    q(a) + q(b) on the shared scale.

  Raises:
    ValueError: ``q`` has no range observer (naming the layer).
  """
  if q is None:
    return a + b
  if not isinstance(q, RangeObserved):
    raise ValueError(f"Add {seam.path}: the shared input scale needs an activation quantizer with a range "
                     f"observer (e.g. AffineActivation), got {type(q).__name__}")
  union = seam.stat(INPUT_STATS, lambda: q.init_state(a))
  if seam.stats_move if create_inputs is None else create_inputs:  # needed only to update
    stats_a = seam.stat(INPUT_STATS + "_a", lambda: q.init_state(a))
    stats_b = seam.stat(INPUT_STATS + "_b", lambda: q.init_state(b))
  if seam.stats_move:
    stats_a.value = q.observer.update(stats_a.value, a, None)
    stats_b.value = q.observer.update(stats_b.value, b, None)
    union.value = union_range(stats_a.value, stats_b.value)
  state = union.value
  batch = union_range(*(obs.MinMax().update(obs.empty_range(), x, None) for x in (a, b)))
  state = jax.tree.map(lambda s, n: jnp.where(state.initialized, s, n), state, batch)
  a_q, _ = q.fake_quant(a, state, update=False)
  b_q, _ = q.fake_quant(b, state, update=False)
  return a_q + b_q


def quantize_operands(seam: Seam, operands: tuple, weight_quant: Any, act_quant: Any, out_axes: tuple[int, ...],
                      weight_role: str = "kernel") -> tuple:
  """The operands a layer with a weight hands its ``promote_dtype``, quantized: the rule
  both adapters apply (Linen's ``QuantOperands``, NNX's quantized layers).

  ``(table,)`` (an embedding lookup) -> the table by ``weight_quant``; ``(x, w)`` or
  ``(x, w, bias)`` -> the input by ``act_quant`` (role ``input``), the weight by
  ``weight_quant`` (role ``weight_role``) per output channel on ``out_axes``, the bias
  onto the int32 accumulator grid (``quantize_bias``).
  """
  if len(operands) == 1:
    return (quantize_weight(seam, weight_role, weight_quant, operands[0], out_axes),)
  x, w, *bias = operands
  x = apply_quantizer(seam, INPUT_STATS, act_quant, x, None)
  w_q = quantize_weight(seam, weight_role, weight_quant, w, out_axes)
  if bias:
    bias = [quantize_bias(seam, bias[0], weight_quant, channels_last(w, out_axes), act_quant,
                          -1 if len(out_axes) > 1 else out_axes[0])]
  return (x, w_q, *bias)
