"""Quantized NNX layers: NNX containers for the state, Linen's quantized layers for the maths.

``QuantLinear``, ``QuantConv`` and ``QuantConvTranspose`` subclass ``nnx.Linear``,
``nnx.Conv`` and ``nnx.ConvTranspose`` and are made *from* a float layer: they take its
attributes, its ``kernel`` and ``bias`` ``nnx.Param`` objects included, so the graph
state keeps its paths. They add

* the quantizer specs ``weight_quant``/``act_quant`` (static);
* the quantizers' trainable params as ``nnx.Param`` attributes ``<role>_<name>``
  (``kernel_step``), which ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains;
* their observed statistics as one ``QuantStats`` attribute, ``quant_stats``, holding
  ``{role: stats}`` (``{'input': RangeState}``);
* ``use_running_average``: as for ``nnx.BatchNorm``, True freezes the statistics, False
  (``model.train()``, the default) lets them move; ``model.eval()`` freezes them.

The forward is the Linen quantized layer (``QuantDense``/``QuantConv``/
``QuantConvTranspose``, ``bn_fold.folded_conv_bn``, ``ops.Add``) applied to the layer's
own variables: Linen's ``apply`` is a pure function of them, so the NNX model runs the
very code, hence the very numbers and gradients, of the quantized Linen model, and no
quantization logic is written twice.

BatchNorm folding: a conv that a rule folds returns its float output (the batch
statistics are those of conv(x)) and leaves its quantized input, kernel and bias, keyed
by the BatchNorm's path, for the ``FoldedBatchNorm`` that consumes that very array, as
Linen's transform hands them from the conv call to the BatchNorm call.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from micronet_jax._src.flax import ops
from micronet_jax._src.flax.bn_fold import folded_conv_bn
from micronet_jax._src.flax.layers import QUANTIZED_COUNTERPART, input_scale, quantize_input
from micronet_jax._src.nnx.bridge import QuantStats, linen_layer

Array = jax.Array
# BatchNorm path -> what its folded conv computed in this forward (one trace at a time)
_PENDING: dict[str, tuple] = {}


def adopt(new: nnx.Module, old: nnx.Module) -> None:
  """Gives ``new`` every attribute of ``old`` (the same Variable objects), keeping which
  are data and which are static."""
  nodes = dict(getattr(old, "_pytree__nodes", {}))
  for k, v in vars(old).items():
    if not k.startswith("_pytree__"):
      setattr(new, k, nnx.data(v) if nodes.get(k) and not isinstance(v, (nnx.Variable, nnx.Module)) else v)


def add_quant_state(m: nnx.Module, params: dict, stats: Any, float_names: tuple[str, ...]) -> None:
  """Quantizer params (every leaf of ``params`` not in ``float_names``) as ``nnx.Param``
  attributes, the statistics as the ``quant_stats`` ``QuantStats`` attribute."""
  m.quant_param_names = tuple(sorted(k for k in params if k not in float_names))
  for k in m.quant_param_names:
    setattr(m, k, nnx.Param(params[k]))
  if stats:
    m.quant_stats = QuantStats(stats)


def _variables(m: nnx.Module, names: tuple[str, ...]) -> dict:
  """The Linen variables of ``m``: ``params`` ``names`` (plus the quantizer params) and
  ``quant_stats``."""
  params = {k: getattr(m, k).get_value() for k in (*names, *m.quant_param_names)
            if isinstance(getattr(m, k, None), nnx.Variable)}
  out = {"params": params}
  if hasattr(m, "quant_stats"):
    out["quant_stats"] = m.quant_stats.get_value()
  return out


def _observing(m: nnx.Module) -> bool:
  return hasattr(m, "quant_stats") and not m.use_running_average


def _apply(m: nnx.Module, layer: nn.Module, variables: dict, *args, extra_mutable=()) -> Any:
  """``layer.apply(variables, *args)``; with ``m`` observing, the new statistics are
  written back to ``m.quant_stats`` and the updated collections returned too."""
  mutable = [*extra_mutable, *(["quant_stats"] if _observing(m) else [])]
  if not mutable:
    return layer.apply(variables, *args), {}
  out, upd = layer.apply(variables, *args, mutable=mutable)
  if "quant_stats" in upd and hasattr(m, "quant_stats"):
    m.quant_stats.set_value(upd["quant_stats"])
  return out, upd


class _FoldInput(nn.Conv):
  """A folded conv's own part: its quantized input (state under its path), the float
  output that the BatchNorm's batch statistics are taken from, and S_in."""

  act_quant: Any = None

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array | None]:
    x_q = quantize_input(self, x, self.act_quant)
    return x_q, super().__call__(x), input_scale(self, self.act_quant)


class _FoldBatchNorm(nn.BatchNorm):
  """The BatchNorm call that runs the folded, quantized conv (``folded_conv_bn``)."""

  weight_quant: Any = None
  calib: bool = False
  init_from_batch: bool = False

  @nn.compact
  def __call__(self, conv, x_q, z, s_in, use_running_average):  # type: ignore[override]
    return folded_conv_bn(conv, self, x_q, z, self.weight_quant, self.calib, use_running_average, s_in,
                          init_from_batch=self.init_from_batch)


class _QuantLayer:
  """The shared part of the three quantized layers (a mixin before the nnx class)."""

  def _setup(self, layer, weight_quant, act_quant, params, stats, fold_into):
    adopt(self, layer)
    self.weight_quant, self.act_quant, self.fold_into = weight_quant, act_quant, fold_into
    self.use_running_average = False
    add_quant_state(self, params, stats, ("kernel", "bias"))

  def __call__(self, inputs: Array) -> Array:
    cls, fields = linen_layer(self)
    variables = _variables(self, ("kernel", "bias"))
    if self.fold_into is None:
      layer = QUANTIZED_COUNTERPART[cls](**fields, weight_quant=self.weight_quant, act_quant=self.act_quant)
      return _apply(self, layer, variables, inputs)[0]
    (x_q, z, s_in), _ = _apply(self, _FoldInput(**fields, act_quant=self.act_quant), variables, inputs)
    _PENDING[self.fold_into] = (z, x_q, s_in, variables["params"], fields)
    return z


class QuantLinear(_QuantLayer, nnx.Linear):
  """``nnx.Linear`` with a fake-quantized input and kernel (kernel (in, out))."""

  def __init__(self, layer: nnx.Linear, weight_quant: Any, act_quant: Any, params: dict, stats: Any = None):
    self._setup(layer, weight_quant, act_quant, params, stats, None)


class QuantConv(_QuantLayer, nnx.Conv):
  """``nnx.Conv`` with a fake-quantized input and kernel (HWIO); ``fold_into``: the path
  of the BatchNorm folded into it, or None."""

  def __init__(self, layer: nnx.Conv, weight_quant: Any, act_quant: Any, params: dict, stats: Any = None,
               fold_into: str | None = None):
    self._setup(layer, weight_quant, act_quant, params, stats, fold_into)


class QuantConvTranspose(_QuantLayer, nnx.ConvTranspose):
  """``nnx.ConvTranspose`` with a fake-quantized input and kernel."""

  def __init__(self, layer: nnx.ConvTranspose, weight_quant: Any, act_quant: Any, params: dict, stats: Any = None):
    self._setup(layer, weight_quant, act_quant, params, stats, None)


class FoldedBatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` folded into the conv whose output it consumes (``conv_path``):
  it computes conv(Aq(x), Wq(W_fold)) + b_fold as ``bn_fold`` describes. The folded
  kernel's quantizer params live here, as in Linen (``kernel_<name>``), and so does the
  init-from-batch flag (``quant_stats``). Statistics move when ``use_running_average``
  is False."""

  def __init__(self, bn: nnx.BatchNorm, path: str, conv_path: str, weight_quant: Any, calib: bool,
               init_from_batch: bool, params: dict, stats: Any = None):
    adopt(self, bn)
    self.path, self.conv_path = path, conv_path
    self.weight_quant, self.calib, self.init_from_batch = weight_quant, calib, init_from_batch
    add_quant_state(self, params, stats, ("scale", "bias"))

  def __call__(self, x: Array, use_running_average: bool | None = None, *, mask=None) -> Array:
    pending = _PENDING.pop(self.path, None)
    if pending is None or pending[0] is not x:
      raise ValueError(f"BatchNorm {self.path} is folded into {self.conv_path} but is not called on that conv's "
                       "output: quantize the model with inputs that take the same path")
    z, x_q, s_in, conv_params, fields = pending
    ura = self.use_running_average if use_running_average is None else use_running_average
    _, bn_fields = linen_layer(self)
    bn = _FoldBatchNorm(**bn_fields, weight_quant=self.weight_quant, calib=self.calib,
                        init_from_batch=self.init_from_batch)
    conv = nn.Conv(**fields).bind({"params": conv_params})
    variables = {**_variables(self, ("scale", "bias")),
                 "batch_stats": {"mean": self.mean.get_value(), "var": self.var.get_value()}}
    if ura:  # running statistics: nothing moves (evaluation, calibration, QAFT)
      return bn.apply(variables, conv, x_q, z, s_in, ura)
    # training: the running statistics and the init-from-batch flag move with the BatchNorm's mode
    y, upd = bn.apply(variables, conv, x_q, z, s_in, ura, mutable=["batch_stats", "quant_stats"])
    self.mean.set_value(upd["batch_stats"]["mean"])
    self.var.set_value(upd["batch_stats"]["var"])
    if "quant_stats" in upd and hasattr(self, "quant_stats"):
      self.quant_stats.set_value(upd["quant_stats"])
    return y


class Add(nnx.Module):
  """``a + b``, marked for quantization as Linen's ``ops.Add``: a rule of kind ``"add"``
  makes it a ``QuantAdd`` (both inputs on one shared scale, integer add in deploy)."""

  def __call__(self, a: Array, b: Array) -> Array:
    return a + b


class QuantAdd(Add):
  """``Add`` with both inputs fake-quantized on the union of their ranges (``ops.Add``);
  statistics in ``quant_stats`` (``input``, ``input_a``, ``input_b``)."""

  def __init__(self, act_quant: Any, stats: Any):
    self.act_quant = act_quant
    self.use_running_average = False
    self.quant_param_names = ()
    self.quant_stats = QuantStats(stats)

  def __call__(self, a: Array, b: Array) -> Array:
    return _apply(self, ops.Add(act_quant=self.act_quant), _variables(self, ()), a, b)[0]
