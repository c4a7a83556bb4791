"""The seam contract (``core/seam.py``) implemented on an NNX layer.

``NnxSeam(layer)`` answers the contract's four questions for one quantized NNX layer, so
that the quantized NNX layers run the very functions the Linen ones run
(``apply_quantizer``, ``quantize_weight``, ``quantize_bias``, ``shared_scale_add``,
``core.bn_fold.folded_conv_bn``) and get the same numbers:

* ``path``: the layer's ``path`` attribute, its Linen module path ('block/0/conv', the
  first graph path), set when the model is quantized; plans and rules key on it;
* ``param(name, init)``: the ``nnx.Param`` attribute ``name`` of the layer
  (``kernel_step``), created from ``init()`` if the layer has none, so
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains it; ``mjn.quantize`` creates every
  one up front (from ``quantize_variables``), so a jitted step only reads them;
* ``stat(name, init)``: the entry ``name`` of the layer's ``quant_stats`` attribute, a
  ``QuantStats`` variable holding ``{role: stats}`` as Linen's ``quant_stats/<layer>``
  does (so ``linen_variables`` and ``convert`` read it unchanged);
* ``stats_move``: not ``use_running_average`` (``model.train()`` moves the statistics,
  ``model.eval()`` freezes them), unless the call says otherwise (a BatchNorm's
  ``use_running_average`` argument);

and ``running(name, init)``, the extension BatchNorm folding needs
(``core.bn_fold.BatchNormSeam``): the layer's ``nnx.BatchStat`` attribute ``name``
(``mean``, ``var``).

Variables are read and written with ``get_value``/``set_value`` (``Variable.value`` is
deprecated). A seam is made per call and holds nothing but the layer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import nnx

from micronet_jax._src.core.seam import StatRef

Array = jax.Array


class QuantStats(nnx.Variable):
  """Observed quantizer statistics (ranges), never trained: a layer's ``quant_stats``
  attribute holds ``{role: stats}`` as Linen's ``quant_stats/<layer>`` does. Filter them
  with ``nnx.state(model, QuantStats)``."""


class NnxSeam:
  """The seam of one quantized NNX layer (see the module docstring).

  Args:
    layer: the layer; it has ``path`` and ``use_running_average`` attributes.
    stats_move: overrides ``not layer.use_running_average`` for this call (None: the
      layer's mode decides).
  """

  __slots__ = ("layer", "_move")

  def __init__(self, layer: nnx.Module, stats_move: bool | None = None):
    self.layer, self._move = layer, stats_move

  @property
  def path(self) -> str:
    return self.layer.path

  @property
  def stats_move(self) -> bool:
    return (not self.layer.use_running_average) if self._move is None else self._move

  def param(self, name: str, init: Callable[[], Array]) -> Array:
    var = getattr(self.layer, name, None)
    if not isinstance(var, nnx.Param):
      if var is not None:
        raise TypeError(f"{self.path}: the quantizer param {name} clashes with the layer's attribute of type "
                        f"{type(var).__name__}")
      var = nnx.Param(init())
      setattr(self.layer, name, var)
    return var.get_value()

  def stat(self, name: str, init: Callable[[], Any]) -> StatRef:
    stats = getattr(self.layer, "quant_stats", None)
    if stats is None:
      self.layer.quant_stats = QuantStats({name: init()})
    elif name not in stats.get_value():
      stats.set_value({**stats.get_value(), name: init()})
    return _QuantStat(self.layer.quant_stats, name)

  def running(self, name: str, init: Callable[[], Array]) -> StatRef:
    var = getattr(self.layer, name, None)
    if var is None:
      var = nnx.BatchStat(init())
      setattr(self.layer, name, var)
    return _VariableRef(var)


class _QuantStat:
  """The entry ``name`` of a ``QuantStats`` variable's ``{role: stats}`` dict."""

  __slots__ = ("var", "name")

  def __init__(self, var: QuantStats, name: str):
    self.var, self.name = var, name

  @property
  def value(self) -> Any:
    return self.var.get_value()[self.name]

  @value.setter
  def value(self, v: Any) -> None:
    self.var.set_value({**self.var.get_value(), self.name: v})


class _VariableRef:
  """An ``nnx.Variable`` as a ``StatRef`` (``value`` through ``get_value``/``set_value``)."""

  __slots__ = ("var",)

  def __init__(self, var: nnx.Variable):
    self.var = var

  @property
  def value(self) -> Any:
    return self.var.get_value()

  @value.setter
  def value(self, v: Any) -> None:
    self.var.set_value(v)
