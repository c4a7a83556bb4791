"""The one deploy runtime: an interceptor that answers a layer's call by its record.

``Runtime(records)`` is a Flax method interceptor. For a module whose path has a record
it calls the handler of the record's type (``HANDLERS``); every other call runs the
model's own code. ``strict=True`` (integer inference) makes a Dense/Conv/ConvTranspose
without a record an error naming it, since it would compute in float.

Handlers: integer ``IntDense``/``IntConv`` (requantize, int8 x int8 -> int32, subtract the
zero point's share, add the int32 bias), ``IntAdd``, ``IntClamp``, ``FoldedBatchNorm``, and the binary
``Xnor`` (XNOR/popcount on the layer's packed kernel).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from micronet_jax._src.core.fixed_point import precise_mul_shift
from micronet_jax._src.deploy.graph import conv_padding, explicit_pads, per_dim
from micronet_jax._src.deploy.packing import PackedKernel, unpack_codes
from micronet_jax._src.deploy.records import (FoldedBatchNorm, InputGrid, IntAdd, IntClamp, IntConv, IntDense,
                                              Requant, Xnor, XnorConv)
from micronet_jax._src.flax import seam

Array = jax.Array
LAYERS = (nn.Dense, nn.Conv, nn.ConvTranspose)


# ----------------------------------------------------------------------------- integer


def is_int(x: Any) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer)


def check_int(x: Array, path: str) -> None:
  if not is_int(x):
    raise ValueError(f"layer {path} receives a {jnp.asarray(x).dtype} tensor in integer inference: an op "
                     "before it is float-only (use micronet_jax._src.flax.ops helpers for averages and residual adds)")


def check_input(x_q: Any, int_range: tuple[int, int], input_shape: tuple[int, ...] | None = None) -> None:
  """What ``integer_apply`` accepts: the codes of ``quantize_input``, i.e. uint8 for an
  input grid [lo, hi] with lo >= 0 (else int8), of shape (batch >= 1, *input_shape).

  Checks the static dtype and shape only, so it holds under ``jit`` and ``jax.export``
  (a symbolic batch is >= 1); a ValueError says what was expected and what came."""
  want = jnp.uint8 if int_range[0] >= 0 else jnp.int8
  dtype = jnp.result_type(x_q)
  if dtype != want:
    raise ValueError(f"integer_apply expects the {jnp.dtype(want).name} codes of deploy.quantize_input(x) (uint8/int8 "
                     f"as the input grid, here [{int_range[0]}, {int_range[1]}]), got {jnp.dtype(dtype).name}")
  shape = tuple(jnp.shape(x_q))
  if len(shape) < 2 or (input_shape is not None and shape[1:] != tuple(input_shape)):
    want_shape = "(batch, " + (", ".join(map(str, input_shape)) if input_shape is not None else "...") + ")"
    raise ValueError(f"integer_apply expects input of shape {want_shape}, got {shape}")
  if shape[0] == 0:
    raise ValueError(f"integer_apply got an empty batch (input shape {shape})")


def requantize(acc: Array, r: Requant, g: InputGrid) -> Array:
  """int32 accumulators -> int8 codes (q - offset) on the grid ``g``."""
  q = jnp.clip(precise_mul_shift(acc, r.m_hi, r.m_lo, r.shift) + g.zero_point, g.qmin, g.qmax)
  return (q - g.offset).astype(jnp.int8)


def input_codes(acc: Array, r: Requant, g: InputGrid) -> Array:
  """The codes q in [qmin, qmax] (int32) that a layer reads: what ``capture`` records."""
  return requantize(acc, r, g).astype(jnp.int32) + g.offset


def _zero_share(rec: IntDense | IntConv, acc: Array) -> Array:
  zp8 = (rec.grid.zero_point - rec.grid.offset).astype(jnp.int32)
  return acc - zp8 * rec.w_sum + rec.bias


def int_dense(rec: IntDense, x_acc: Array) -> Array:
  q8 = requantize(x_acc, rec.requant, rec.grid)
  acc = jax.lax.dot_general(q8, rec.w, (((q8.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  return _zero_share(rec, acc)


def int_conv(rec: IntConv, x_acc: Array) -> Array:
  q8 = requantize(x_acc, rec.requant, rec.grid)
  rank = rec.w.ndim - 2
  window = tuple((k - 1) * d + 1 for k, d in zip(rec.w.shape[:rank], rec.dilation))
  pads = explicit_pads(rec.padding, q8.shape[1:1 + rank], window, rec.strides)
  zp8 = (rec.grid.zero_point - rec.grid.offset).astype(jnp.int8)
  if rec.input_dilation:  # a conv-transpose: zero points (real 0) between the inputs too
    q8 = jax.lax.pad(q8, zp8, [(0, 0, 0), *((lo, hi, s - 1) for (lo, hi), s in zip(pads, rec.input_dilation)),
                               (0, 0, 0)])
  else:
    q8 = jnp.pad(q8, [(0, 0), *pads, (0, 0)], constant_values=zp8)  # real zero, as the float conv pads
  nd = q8.ndim
  spatial = tuple(range(1, nd - 1))
  dn = jax.lax.ConvDimensionNumbers((0, nd - 1, *spatial), (nd - 1, nd - 2, *range(nd - 2)), (0, nd - 1, *spatial))
  acc = jax.lax.conv_general_dilated(q8, rec.w, rec.strides, "VALID", rhs_dilation=rec.dilation,
                                     dimension_numbers=dn, feature_group_count=rec.groups,
                                     preferred_element_type=jnp.int32)
  return _zero_share(rec, acc)


def int_add(rec: IntAdd, a: Array, b: Array) -> Array:
  zp8 = rec.grid.zero_point - rec.grid.offset
  qa = requantize(a, rec.requant_a, rec.grid).astype(jnp.int32) - zp8
  qb = requantize(b, rec.requant_b, rec.grid).astype(jnp.int32) - zp8
  return (qa + qb) << rec.fraction_bits


# ----------------------------------------------------------------------------- binary


def _pack32(bits: Array) -> Array:
  """(..., n) booleans -> (..., ceil(n / 32)) uint32 words, little-endian."""
  n = bits.shape[-1]
  bits = jnp.pad(bits.astype(jnp.uint32), [(0, 0)] * (bits.ndim - 1) + [(0, -n % 32)])
  bits = bits.reshape(*bits.shape[:-1], -1, 32)
  return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _popcount(words: Array) -> Array:
  return jnp.sum(jax.lax.population_count(words).astype(jnp.int32), axis=-1)


def xnor_dense(x: Array, pk: PackedKernel) -> Array:
  """sign+(x) @ (codes * alpha) for binary weights, by XNOR and popcount (no bias)."""
  n = x.shape[-1]
  xw = _pack32(x >= 0)  # (..., words)
  ww = _pack32(jnp.moveaxis(unpack_codes(pk), -1, 0) > 0)  # (out, words)
  mism = _popcount(jnp.bitwise_xor(xw[..., None, :], ww))
  return (n - 2 * mism).astype(jnp.float32) * pk.alpha


def xnor_conv(x: Array, pk: PackedKernel, geometry: XnorConv | nn.Conv) -> Array:
  """conv(sign+(x), codes * alpha) for binary HWIO weights by XNOR and popcount (no bias).

  The conv's zero padding is masked out (it is neither +1 nor -1); ``geometry`` is an
  ``XnorConv`` record or the ``nn.Conv`` it was made from.
  """
  g = geometry if isinstance(geometry, XnorConv) else xnor_conv_record(geometry)
  kh, kw, _, o = pk.shape
  kwargs = dict(filter_shape=(kh, kw), window_strides=g.strides, padding=g.padding, lhs_dilation=g.input_dilation,
                rhs_dilation=g.dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  xb = jax.lax.conv_general_dilated_patches((x >= 0).astype(jnp.float32), **kwargs)
  valid = jax.lax.conv_general_dilated_patches(jnp.ones((1, *x.shape[1:]), jnp.float32), **kwargs)
  lead = xb.shape[:-1]
  xw = _pack32(xb.reshape(*lead, g.groups, -1) > 0.5)  # (N, H, W, G, words)
  vw = _pack32(valid.reshape(*valid.shape[:-1], g.groups, -1) > 0.5)  # (1, H, W, G, words)
  codes = jnp.transpose(unpack_codes(pk), (3, 2, 0, 1)).reshape(g.groups, o // g.groups, -1)  # (G, Og, cg*kh*kw)
  ww = _pack32(codes > 0)  # (G, Og, words)
  mism = _popcount(jnp.bitwise_xor(xw[..., None, :], ww) & vw[..., None, :])  # (N, H, W, G, Og)
  n_valid = _popcount(vw)[..., None]  # (1, H, W, G, 1)
  dot = (n_valid - 2 * mism).reshape(*lead, o)
  return dot.astype(jnp.float32) * pk.alpha


def xnor_conv_record(m: nn.Conv) -> XnorConv:
  """The static geometry of a 2-D conv for ``xnor_conv``."""
  padding = conv_padding(m.padding, 2)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise NotImplementedError(f"xnor_conv: padding {padding!r}")
  return XnorConv(per_dim(m.strides, 2), padding, per_dim(m.input_dilation, 2), per_dim(m.kernel_dilation, 2),
                  int(m.feature_group_count))


# ----------------------------------------------------------------------------- dispatch


def _packed_kernel(m: nn.Module, path: str) -> PackedKernel:
  pk = m.get_variable("params", "kernel")
  if not isinstance(pk, PackedKernel):
    raise ValueError(f"xnor=True needs packed variables (pack_variables); {path}'s kernel is not packed")
  return pk


def _xnor(m: nn.Module, path: str, x: Array) -> Array:
  pk = _packed_kernel(m, path)
  y = xnor_conv(x, pk, xnor_conv_record(m)) if isinstance(m, nn.Conv) else xnor_dense(x, pk)
  return y + m.get_variable("params", "bias") if m.use_bias else y


def _folded_bn(rec: FoldedBatchNorm, m: nn.Module, x: Array) -> Array:
  return x + m.get_variable("params", "bias") if rec.adds_bias else x


Handler = Callable[[Any, nn.Module, str, tuple, dict], Array]
HANDLERS: dict[type, Handler] = {
    IntDense: lambda r, m, p, a, kw: int_dense(r, a[0]),
    IntConv: lambda r, m, p, a, kw: int_conv(r, a[0]),
    IntAdd: lambda r, m, p, a, kw: int_add(r, *a),
    IntClamp: lambda r, m, p, a, kw: jnp.clip(a[0] if a else kw["x"], 0, r.hi),
    FoldedBatchNorm: lambda r, m, p, a, kw: _folded_bn(r, m, a[0] if a else kw["x"]),
    Xnor: lambda r, m, p, a, kw: _xnor(m, p, a[0] if a else kw["inputs"]),
}
INTEGER = (IntDense, IntConv, IntAdd, IntClamp)


class Runtime:
  """The deploy interceptor: ``records`` by module path; see the module docstring.

  ``capture`` (a dict): every integer conv/dense layer's input codes, by path.
  """

  def __init__(self, records: dict[str, Any], strict: bool = False, capture: dict | None = None):
    self.records, self.strict, self.capture = records, strict, capture

  def __call__(self, next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = seam.module_path(m)
    rec = self.records.get(path)
    if rec is None:
      if self.strict and isinstance(m, LAYERS):
        raise ValueError(f"layer {path} has no integer version (it is float in the quantized model)")
      return next_fun(*args, **kwargs)
    if isinstance(rec, INTEGER):
      for v in args:
        check_int(v, path)
      if self.capture is not None and isinstance(rec, (IntDense, IntConv)):
        self.capture[path] = input_codes(args[0], rec.requant, rec.grid)
    return HANDLERS[type(rec)](rec, m, path, args, kwargs)
