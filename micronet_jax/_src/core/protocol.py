"""The quantizer protocol: what a quantizer is to the rest of the library.

A quantizer is a frozen spec with two pure functions over a named state, in the optax
style (``init`` makes the state, ``apply`` uses it and returns the new part):

* ``init(x, channel_axis) -> QState(params, stats)``: the state for a tensor like ``x``
  (``channel_axis`` is the kernel's output-channel axis for weights, None for inputs).
  ``params`` are trainable (a learned step size, a clipping value): the layer stores each
  leaf of that dict in its ``params`` collection as ``<role>_<name>`` (``kernel_step``,
  ``input_alpha``), next to ``kernel`` and ``bias``, so the optimizer trains them and a
  float checkpoint still loads. ``stats`` are observed, not trained (a range): the layer
  keeps them in ``quant_stats/<layer>/<role>``. Either may be None.
* ``apply(x, qstate, *, channel_axis, update) -> (x_q, new_stats)``: the fake-quantized
  tensor, differentiable in ``x`` and in ``qstate.params``. ``update`` says whether the
  statistics may move (training or calibration); with ``update=False``, ``new_stats``
  must equal ``qstate.stats``.

That is all a quantizer needs to train. What the layers, BN folding and ``convert``
need beyond it are *capabilities*, runtime-checkable protocols a spec opts into by
having the methods:

* ``AffineGrid``: the values lie on an integer grid, x_q = (q - zero_point) * scale with
  q in ``int_range()``; ``grid(x, qstate, channel_axis) -> (scale, zero_point)``, shaped
  to broadcast against ``x`` (``x`` may be None for an activation: then the stored
  statistics alone decide). Layers use it to round the bias onto the int32 accumulator
  grid, and ``convert`` to build the integer deploy; a quantizer without it trains and
  evaluates in fake-quant but cannot be converted to integers.

What ``convert`` asks of an ``AffineGrid`` quantizer (it reads the state from the stored
variables, ``seam.state_from``, and calls ``grid`` on it):

* weights: ``grid(W, qstate, -1)`` with zero point 0 (symmetric), a scale per tensor or
  per output channel, and ``int_range()`` within int8 [-128, 127]; the deploy stores the
  codes clip(r(W / scale), qmin, qmax) of the (BatchNorm-folded) kernel;
* inputs: ``grid(None, qstate, None)`` from the state alone (``x`` None: the params or
  statistics decide), one scale and one integer zero point per layer, ``int_range()``
  within uint8 or int8; the deploy computes clip(r(x / scale) + zero_point, qmin, qmax);
* both: ``apply``'s forward puts its values on exactly that grid, x_q = (q - zero_point)
  * scale with q computed as above from the same float32 scale, so that the fake-quant
  and the integer forwards agree to the last code.

A learned step (LSQ, PACT: ``learned.py``) is such a scale: ``grid`` returns the trained
param, and the deploy is the same as for an observed range.

Write your own quantizer by implementing ``init``/``apply`` (and ``grid``/``int_range``
if it is affine); no library code changes. ``tests/test_protocol.py`` has one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
from flax import struct

Array = jax.Array


@struct.dataclass
class QState:
  """A quantizer's state for one tensor: ``params`` (a dict name -> array, trained, or
  None) and ``stats`` (any pytree, observed, or None)."""

  params: Any = None
  stats: Any = None


@runtime_checkable
class Quantizer(Protocol):
  """A fake-quantizer (see the module docstring). ``bits`` is what summaries print."""

  bits: int

  def init(self, x: Array, channel_axis: int | None) -> QState:
    ...

  def apply(self, x: Array, qstate: QState, *, channel_axis: int | None, update: bool) -> tuple[Array, Any]:
    ...


@runtime_checkable
class AffineGrid(Protocol):
  """Capability: x_q = (q - zero_point) * scale, q integer in ``int_range()``."""

  def int_range(self) -> tuple[int, int]:
    ...

  def grid(self, x: Array | None, qstate: QState, channel_axis: int | None) -> tuple[Array, Array]:
    ...


@runtime_checkable
class RangeObserved(Protocol):
  """Capability: the statistics are a ``RangeState`` kept by ``observer`` (an observer
  spec, ``observers.py``), and ``fake_quant(x, state, update=False)`` quantizes on that
  range. ``ops.Add`` needs it to quantize two inputs on the union of their ranges."""

  observer: Any

  def init_state(self, x: Array) -> Any:
    ...

  def fake_quant(self, x: Array, state: Any, *, update: bool) -> tuple[Array, Any]:
    ...


class StatelessWeight:
  """Mixin: the protocol for a weight family whose spec has ``fake_quant(w, channel_axis)``
  and keeps no state (ranges come from the weights on every call)."""

  def init(self, x: Array, channel_axis: int | None) -> QState:
    return QState()

  def apply(self, x: Array, qstate: QState, *, channel_axis: int | None, update: bool) -> tuple[Array, Any]:
    del update
    return self.fake_quant(x, -1 if channel_axis is None else channel_axis), qstate.stats


class ObservedActivation:
  """Mixin: the protocol for an activation family whose spec has ``init_state(x)`` and
  ``fake_quant(x, state, update=...) -> (x_q, state)`` (state None when stateless)."""

  def init(self, x: Array, channel_axis: int | None) -> QState:
    return QState(stats=self.init_state(x))

  def apply(self, x: Array, qstate: QState, *, channel_axis: int | None, update: bool) -> tuple[Array, Any]:
    return self.fake_quant(x, qstate.stats, update=update)


def check_quantizer(owner: str, q: Any) -> None:
  """Raises a ValueError naming ``owner`` unless ``q`` is None or follows the protocol."""
  if q is not None and not isinstance(q, Quantizer):
    raise ValueError(f"{owner} must be a quantizer spec (init/apply: see micronet_jax.Quantizer) or None, got {q!r}")
