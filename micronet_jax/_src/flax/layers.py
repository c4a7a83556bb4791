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

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from micronet_jax._src.core import seam as core
from micronet_jax._src.core.seam import INPUT_STATS, accumulator_scale, quantize_operands  # noqa: F401  (re-exported)
from micronet_jax._src.flax.seam import LinenSeam

Array = jax.Array


def quantize_input(module: nn.Module, x: Array, q: Any) -> Array:
  """Fake-quantizes a layer's input with the activation quantizer ``q`` (None: as is),
  keeping its state under the role ``input`` of ``module``. Call it inside ``module``'s
  method."""
  return core.apply_quantizer(LinenSeam(module), INPUT_STATS, q, x, None)


def input_scale(module: nn.Module, q: Any) -> Array | None:
  """S_in of an affine input quantizer from the stored (this call's) state, or None."""
  return core.input_scale(LinenSeam(module), q)


def quantize_kernel(module: nn.Module, name: str, value: Any, out_axis: int) -> Any:
  if name == "bias":
    return core.quantize_bias(LinenSeam(module), value, module.weight_quant, module.get_variable("params", "kernel"),
                              module.act_quant, out_axis)
  if name != "kernel":
    return value
  return core.apply_quantizer(LinenSeam(module), "kernel", module.weight_quant, value, out_axis)


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


# float layer type -> its quantized counterpart (hand-written layers).
QUANTIZED_COUNTERPART: dict[type, type] = {
    nn.Dense: QuantDense,
    nn.Conv: QuantConv,
    nn.ConvTranspose: QuantConvTranspose,
}

# ----------------------------------------------------------------------------- any layer, by its operands


class AttentionProduct(nn.Module):
  """An activation x activation product, ``jnp.einsum(subscripts, lhs, rhs)``, with both
  operands fake-quantized by ``act_quant`` (roles ``lhs`` and ``rhs``; None: float).

  ``MultiHeadDotProductAttention`` builds its QK^T and PV einsums from the factories
  ``qk_attn_weights_einsum_cls``/``attn_weights_value_einsum_cls`` (the fields Flax keeps
  for quantized einsums); the transform sets them to this module, named ``qk_product``
  and ``pv_product``, so the products are layers a rule can select (kind ``"attention"``).
  Float, it creates no variables and computes exactly ``jnp.einsum``.
  """

  act_quant: Any = None

  @nn.compact
  def __call__(self, subscripts: str, lhs: Array, rhs: Array, **einsum_kwargs: Any) -> Array:
    seam = LinenSeam(self)
    lhs = core.apply_quantizer(seam, "lhs", self.act_quant, lhs, None)
    rhs = core.apply_quantizer(seam, "rhs", self.act_quant, rhs, None)
    return jnp.einsum(subscripts, lhs, rhs, **einsum_kwargs)


PRODUCT_NAMES = ("qk_product", "pv_product")  # the children that expose an attention's two products


def exposes_products(module: nn.MultiHeadDotProductAttention) -> bool:
  """Whether the attention's products can be exposed as ``AttentionProduct`` children:
  Flax's own ``dot_product_attention`` with no einsum factories or precision of the
  user's (``dot_product_attention`` refuses a precision next to custom einsums)."""
  return (module.attention_fn is nn.dot_product_attention and module.qk_attn_weights_einsum_cls is None
          and module.attn_weights_value_einsum_cls is None and module.precision is None)


def with_products(module: nn.MultiHeadDotProductAttention) -> nn.Module:
  """The attention ``module`` rebuilt on its own scope with its QK^T and PV einsums as
  float ``AttentionProduct`` children (see ``AttentionProduct``); same variables."""
  from micronet_jax._src.flax.plan import float_fields, rebind  # the plan owns field copying

  qk, pv = (functools.partial(AttentionProduct, name=n) for n in PRODUCT_NAMES)
  return type(module)(**{**float_fields(module), "qk_attn_weights_einsum_cls": qk,
                         "attn_weights_value_einsum_cls": pv}, **rebind(module))


def einsum_kernel_out_axes(subscripts: str, kernel_ndim: int) -> tuple[int, ...]:
  """Kernel axes of an ``nn.Einsum`` that reach the output (its output channels, and
  any batch axis it shares with the input)."""
  inputs, out = subscripts.replace(" ", "").split("->")
  kernel = inputs.split(",")[1].replace("...", "")
  axes = tuple(i for i, c in enumerate(kernel) if c in out)
  return axes or (kernel_ndim - 1,)


def kernel_out_axes(module: nn.Module, kernel_ndim: int, call_args: tuple = (), call_kwargs: dict | None = None
                    ) -> tuple[int, ...]:
  """The output-channel axes of ``module``'s weight (a per-channel quantizer keeps one
  scale per output channel): -1 for Dense/Conv, -2 for ``ConvTranspose(transpose_kernel=
  True)``, every feature (and batch) axis of a ``DenseGeneral``, the kernel axes an
  ``Einsum`` keeps, and the rows (tokens) of an ``Embed`` table."""
  if isinstance(module, nn.Embed):
    return (0,)
  if isinstance(module, nn.ConvTranspose):
    return (-2,) if module.transpose_kernel else (-1,)
  if isinstance(module, nn.DenseGeneral):
    n_features = len(module.features) if isinstance(module.features, (tuple, list)) else 1
    n_batch = len(module.batch_dims) if isinstance(module.batch_dims, (tuple, list)) else 1
    return tuple(range(n_batch)) + tuple(range(kernel_ndim - n_features, kernel_ndim))
  if isinstance(module, nn.Einsum):
    kwargs = call_kwargs or {}
    subscripts = kwargs.get("einsum_str", call_args[1] if len(call_args) > 1 else None) or module.einsum_str
    return einsum_kernel_out_axes(subscripts, kernel_ndim)
  return (-1,)


class QuantOperands:
  """A ``promote_dtype`` that fake-quantizes the operands a Flax layer hands it.

  Every Flax layer with a weight (``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv``,
  ``ConvTranspose``, ``Embed``) passes its operands through its ``promote_dtype`` field
  right before the matmul/conv: ``(inputs, kernel, bias)``, or ``(embedding,)`` for a
  lookup and ``(query, embedding)`` for ``Embed.attend``. The transform rebuilds a layer a
  rule quantizes, user subclasses included, with this object in that field (bound to the
  rebuilt layer by ``bind``), so the layer's own code runs on quantized operands: the
  input by ``act_quant`` (role ``input``), the weight by ``weight_quant`` (role = its param
  name) per output channel on ``out_axes``, the bias onto the int32 accumulator grid. Then
  the layer's own ``promote_dtype`` runs.
  """

  def __init__(self, inner: Callable, weight_quant: Any, act_quant: Any, out_axes: tuple[int, ...],
               weight_role: str = "kernel"):
    self.inner, self.weight_quant, self.act_quant = inner, weight_quant, act_quant
    self.out_axes, self.weight_role = out_axes, weight_role
    self.module: nn.Module | None = None

  def bind(self, module: nn.Module) -> nn.Module:
    self.module = module
    return module

  def __call__(self, *operands: Any, **kwargs: Any) -> Any:
    return self.inner(*core.quantize_operands(LinenSeam(self.module), operands, self.weight_quant, self.act_quant,
                                              self.out_axes, self.weight_role), **kwargs)

