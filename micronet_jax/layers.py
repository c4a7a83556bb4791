"""Quantized Flax Linen layers: thin wirings of the pure fake-quant functions.

``QuantDense``, ``QuantConv`` and ``QuantConvTranspose`` are subclasses of ``nn.Dense``,
``nn.Conv`` and ``nn.ConvTranspose`` with two extra fields, ``weight_quant`` and
``act_quant`` (quantizer specs or None). Everything else, parameter names, shapes,
initialisers, padding and grouping included, is Flax's own code, so a float checkpoint
loads into a quantized model unchanged.

* The **input** is fake-quantized in front of the layer (micronet's placement). Observer
  state lives in the ``quant_stats`` collection under the layer's path, as
  ``quant_stats/<layer>/input``; it is updated only when ``quant_stats`` is mutable
  (``apply(..., mutable=['quant_stats'])``), so evaluation never moves a range.
* The **kernel** is fake-quantized when it is read (the ``param`` hook below), per
  output channel where the spec asks for it. The bias stays float, as in micronet.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

Array = jax.Array
INPUT_STATS = "input"


def quantize_input(module: nn.Module, x: Array, q: Any = None) -> Array:
  """Fake-quantizes a layer's input with ``q`` (default ``module.act_quant``), keeping the
  observer state in ``module``'s ``quant_stats``. Call it inside ``module``'s method."""
  q = module.act_quant if q is None else q
  if q is None:
    return x
  if q.init_state(x) is None:  # stateless (DoReFa): nothing to store
    return q.fake_quant(x, None, update=False)[0]
  stats = module.variable("quant_stats", INPUT_STATS, q.init_state, x)
  update = module.is_mutable_collection("quant_stats") and not module.is_initializing()
  x_q, new_state = q.fake_quant(x, stats.value, update=update)
  if update:
    stats.value = new_state
  return x_q


def quantize_kernel(module: nn.Module, name: str, value: Any, out_axis: int) -> Any:
  if name != "kernel" or module.weight_quant is None:
    return value
  return module.weight_quant.fake_quant(value, channel_axis=out_axis)


class QuantDense(nn.Dense):
  """``nn.Dense`` with a fake-quantized input and kernel (kernel shape (in, out))."""

  weight_quant: Any = None
  act_quant: Any = None

  def param(self, name, init_fn, *init_args, **kwargs):
    return quantize_kernel(self, name, super().param(name, init_fn, *init_args, **kwargs), -1)

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    return super().__call__(quantize_input(self, inputs))


class QuantConv(nn.Conv):
  """``nn.Conv`` with a fake-quantized input and kernel (kernel HWIO, output axis -1).

  Strides, padding, dilation, ``feature_group_count`` and ``use_bias`` behave exactly
  as in ``nn.Conv``.
  """

  weight_quant: Any = None
  act_quant: Any = None

  def param(self, name, init_fn, *init_args, **kwargs):
    return quantize_kernel(self, name, super().param(name, init_fn, *init_args, **kwargs), -1)

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    return super().__call__(quantize_input(self, inputs))


class QuantConvTranspose(nn.ConvTranspose):
  """``nn.ConvTranspose`` with a fake-quantized input and kernel.

  The output-channel axis of the kernel is -1, or -2 with ``transpose_kernel=True``.
  """

  weight_quant: Any = None
  act_quant: Any = None

  def param(self, name, init_fn, *init_args, **kwargs):
    out_axis = -2 if self.transpose_kernel else -1
    return quantize_kernel(self, name, super().param(name, init_fn, *init_args, **kwargs), out_axis)

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    return super().__call__(quantize_input(self, inputs))


# float layer type -> its quantized counterpart; the transform swaps exactly these.
QUANTIZED_COUNTERPART: dict[type, type] = {
    nn.Dense: QuantDense,
    nn.Conv: QuantConv,
    nn.ConvTranspose: QuantConvTranspose,
}
LAYER_KIND: dict[type, str] = {nn.Dense: "dense", nn.Conv: "conv", nn.ConvTranspose: "conv_transpose"}
