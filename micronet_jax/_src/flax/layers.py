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
  output channel where the spec asks for it.
* With affine (IAO) input and weight quantizers the **bias** is rounded to the int32 grid
  of scale S_in * S_w that integer inference uses (``quantizers.bias_fake_quant``), so
  the fake-quant and integer forwards agree; otherwise it stays float, as in micronet.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from micronet_jax._src.flax import seam
from micronet_jax._src.core.protocol import AffineGrid, QState
from micronet_jax._src.core.quantizers import bias_fake_quant

Array = jax.Array
INPUT_STATS = "input"


def quantize_input(module: nn.Module, x: Array, q: Any) -> Array:
  """Fake-quantizes a layer's input with the activation quantizer ``q`` (None: as is),
  keeping its state under the role ``input`` of ``module``. Call it inside ``module``'s
  method."""
  return seam.apply_quantizer(module, INPUT_STATS, q, x, None)


def input_scale(module: nn.Module, q: Any) -> Array | None:
  """S_in of an affine input quantizer from the stored (this call's) state, or None."""
  if not isinstance(q, AffineGrid):
    return None
  state = seam.quantizer_state(module, INPUT_STATS, q)
  if state.stats is None and state.params is None:
    return None
  return q.grid(None, state, None)[0]


def accumulator_scale(weight_quant: Any, kernel: Array, s_in: Array | None, out_axis: int,
                      qstate: QState = QState()) -> Array | None:
  """S_in * S_w per output channel (broadcasting against the bias), or None when either
  quantizer is not affine."""
  if s_in is None or not isinstance(weight_quant, AffineGrid):
    return None
  s_w = weight_quant.grid(jax.lax.stop_gradient(kernel), qstate, out_axis)[0]
  return s_in * jnp.reshape(s_w, (-1,)) if s_w.size > 1 else s_in * jnp.reshape(s_w, ())


def quantize_kernel(module: nn.Module, name: str, value: Any, out_axis: int) -> Any:
  if name == "bias":
    scale = accumulator_scale(module.weight_quant, module.get_variable("params", "kernel"),
                              input_scale(module, module.act_quant), out_axis,
                              seam.quantizer_state(module, "kernel", module.weight_quant))
    return value if scale is None else bias_fake_quant(value, scale)
  if name != "kernel":
    return value
  return seam.apply_quantizer(module, "kernel", module.weight_quant, value, out_axis)


class QuantDense(nn.Dense):
  """``nn.Dense`` with a fake-quantized input and kernel (kernel shape (in, out))."""

  weight_quant: Any = None
  act_quant: Any = None

  def param(self, name, init_fn, *init_args, **kwargs):
    return quantize_kernel(self, name, super().param(name, init_fn, *init_args, **kwargs), -1)

  @nn.compact
  def __call__(self, inputs: Array) -> Array:
    return super().__call__(quantize_input(self, inputs, self.act_quant))


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
    return super().__call__(quantize_input(self, inputs, self.act_quant))


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
    return super().__call__(quantize_input(self, inputs, self.act_quant))


# float layer type -> its quantized counterpart; the transform swaps exactly these.
QUANTIZED_COUNTERPART: dict[type, type] = {
    nn.Dense: QuantDense,
    nn.Conv: QuantConv,
    nn.ConvTranspose: QuantConvTranspose,
}
LAYER_KIND: dict[type, str] = {nn.Dense: "dense", nn.Conv: "conv", nn.ConvTranspose: "conv_transpose"}
