"""JAX primitives -> ONNX nodes, for ``onnx_export``: each translation reproduces the
primitive's integer semantics exactly (XLA's wrapping int32 arithmetic, its arithmetic
shifts, C-style integer division and remainder).

A translation is ``fn(graph, inputs, in_avals, out_avals, **params) -> name``; an input is an
ONNX tensor name (str) or a numpy constant (written as an initializer when used).
Layouts: ``conv_general_dilated`` is transposed to ONNX's NCHW / OIHW around the
``ConvInteger``/``Conv``; ``dot_general`` is flattened to a 2-D ``MatMulInteger``/``MatMul``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INT32_MIN = -(2**31)


class Graph:
  """The nodes and initializers of the graph being written, with fresh names."""

  def __init__(self, onnx: Any):
    self.onnx, self.nodes, self.initializers, self.n = onnx, [], [], 0

  def fresh(self, hint: str = "t") -> str:
    self.n += 1
    return f"{hint}{self.n}"

  def name_of(self, x: Any) -> str:
    if isinstance(x, str):
      return x
    small = _compact(x)  # a folded broadcast is stored once and expanded in the graph
    name = self.fresh("c")
    self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(small), name))
    if small.shape != x.shape:
      out = self.fresh()
      self.nodes.append(self.onnx.helper.make_node("Expand", [name, self.name_of(_i64(x.shape))], [out]))
      return out
    return name

  def node(self, op: str, inputs: list[Any], **attrs: Any) -> str:
    out = self.fresh()
    self.nodes.append(self.onnx.helper.make_node(op, [self.name_of(i) for i in inputs], [out], **attrs))
    return out

  def identity(self, src: str, dst: str) -> str:
    self.nodes.append(self.onnx.helper.make_node("Identity", [src], [dst]))
    return dst

  def cast(self, x: Any, dtype: Any) -> str:
    return self.node("Cast", [x], to=self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

  def reshape(self, x: Any, shape: tuple[int, ...]) -> str:
    return self.node("Reshape", [x, np.asarray(shape, np.int64)])


def _i64(v: Any) -> np.ndarray:
  return np.asarray(v, np.int64)


def _compact(x: np.ndarray) -> np.ndarray:
  """``x`` with every axis along which it is constant reduced to size 1."""
  for axis in range(x.ndim):
    if x.shape[axis] > 1:
      first = np.take(x, [0], axis=axis)
      if np.array_equal(np.broadcast_to(first, x.shape), x):
        x = first
  return x


# ----------------------------------------------------------------------------- elementwise


def _binary(op: str):
  return lambda g, ins, ina, avals, **p: g.node(op, ins)


def _logical(bool_op: str, int_op: str):
  def fn(g, ins, ina, avals, **p):
    return g.node(bool_op if avals[0].dtype == np.bool_ else int_op, ins)
  return fn


def _not(g, ins, ina, avals, **p):
  return g.node("Not" if avals[0].dtype == np.bool_ else "BitwiseNot", ins)


def _ne(g, ins, ina, avals, **p):
  return g.node("Not", [g.node("Equal", ins)])


def _convert(g, ins, ina, avals, new_dtype, **p):
  return g.cast(ins[0], new_dtype)


def _select_n(g, ins, ina, avals, **p):
  pred, *cases = ins
  if len(cases) != 2:
    raise NotImplementedError("export_onnx: select_n with more than two cases")
  if isinstance(pred, np.ndarray) and pred.dtype == np.bool_ and (pred.all() or not pred.any()):
    return g.node("Identity", [cases[1] if pred.all() else cases[0]])  # a constant, uniform choice
  if not (isinstance(pred, np.ndarray) and pred.dtype == np.bool_):
    pred = g.cast(pred, np.bool_) if not isinstance(pred, np.ndarray) else pred.astype(np.bool_)
  return g.node("Where", [pred, cases[1], cases[0]])


def _clamp(g, ins, ina, avals, **p):
  lo, x, hi = ins
  return g.node("Max", [g.node("Min", [x, hi]), lo])


def _div(g, ins, ina, avals, **p):
  return g.node("Div", ins)  # integer Div truncates toward zero, as lax.div does


def _rem(g, ins, ina, avals, **p):
  return g.node("Mod", ins, fmod=1)  # the dividend's sign (C's %), as lax.rem


def _const_shift(k: Any, name: str) -> np.ndarray:
  if not isinstance(k, np.ndarray):
    raise NotImplementedError(f"export_onnx: {name} by a shift amount computed from activations")
  return k.astype(np.int64)


def _shift_left(g, ins, ina, avals, **p):
  """x << k (k constant) = x * 2^k, wrapping in int32 as XLA does; k outside [0, 31] -> 0."""
  x, k = ins
  k = _const_shift(k, "shift_left")
  dt = np.dtype(avals[0].dtype)
  bits = dt.itemsize * 8
  mult = np.where((k >= 0) & (k < bits), np.left_shift(np.uint64(1), np.clip(k, 0, bits - 1).astype(np.uint64)), 0)
  return g.node("Mul", [x, mult.astype(np.uint64).astype(dt.type)])  # 2^31 as int32 wraps to -2^31: the same product mod 2^32


def _shift_right_arithmetic(g, ins, ina, avals, **p):
  """x >> k (k constant) = floor(x / 2^k), exact as (x - Mod(x, 2^k)) / 2^k (Mod with
  fmod=0 has the divisor's sign); k outside [0, bits - 1] fills with the sign bit."""
  x, k = ins
  k = _const_shift(k, "shift_right_arithmetic")
  dt = np.dtype(avals[0].dtype)
  bits = dt.itemsize * 8
  k = np.where((k < 0) | (k >= bits), bits - 1, k)
  wide = int(k.max()) >= bits - 1  # 2^(bits-1) does not fit: compute in int64
  work = np.int64 if wide else dt.type
  d = np.left_shift(np.int64(1), k).astype(work)
  xx = g.cast(x, np.int64) if wide else x
  q = g.node("Div", [g.node("Sub", [xx, g.node("Mod", [xx, d], fmod=0)]), d])
  return g.cast(q, dt) if wide else q


# ----------------------------------------------------------------------------- shapes


def _broadcast_in_dim(g, ins, ina, avals, shape, broadcast_dimensions, **p):
  x = ins[0]
  # the operand's own dims at their places, ones elsewhere, then Expand to the full shape
  return g.node("Expand", [g.reshape(x, _placed(ina[0].shape, broadcast_dimensions, len(shape))),
                           _i64(shape)])


def _placed(operand_shape: tuple[int, ...], dims: tuple[int, ...], rank: int) -> tuple[int, ...]:
  out = [1] * rank
  for d, n in zip(dims, operand_shape):
    out[d] = n
  return tuple(out)


def _reshape(g, ins, ina, avals, new_sizes, **p):
  return g.reshape(ins[0], tuple(avals[0].shape))


def _squeeze(g, ins, ina, avals, **p):
  return g.reshape(ins[0], tuple(avals[0].shape))


def _transpose(g, ins, ina, avals, permutation, **p):
  return g.node("Transpose", [ins[0]], perm=list(permutation))


def _concatenate(g, ins, ina, avals, dimension, **p):
  return g.node("Concat", ins, axis=int(dimension))


def _interior(g, x: Any, shape: list[int], axis: int, n: int, value: np.ndarray) -> tuple[str, list[int]]:
  """``n`` copies of ``value`` between neighbours along ``axis`` (lax.pad's interior)."""
  size = shape[axis]
  fill = np.full([*shape[:axis + 1], n, *shape[axis + 1:]], value, value.dtype)
  stacked = g.node("Concat", [g.reshape(x, tuple([*shape[:axis + 1], 1, *shape[axis + 1:]])), fill], axis=axis + 1)
  new = [*shape[:axis], size * (n + 1), *shape[axis + 1:]]
  flat = g.reshape(stacked, tuple(new))
  new[axis] = size * (n + 1) - n  # no fill after the last element
  return g.node("Slice", [flat, _i64([0]), _i64([new[axis]]), _i64([axis])]), new


def _pad(g, ins, ina, avals, padding_config, **p):
  x, value = ins
  if not isinstance(value, np.ndarray):
    raise NotImplementedError("export_onnx: pad with a value computed from activations")
  shape = list(ina[0].shape)
  for axis, (_, _, interior) in enumerate(padding_config):
    if interior:
      x, shape = _interior(g, x, shape, axis, int(interior), value)
  pads = [lo for lo, _, _ in padding_config] + [hi for _, hi, _ in padding_config]
  if not any(pads):
    return g.node("Identity", [x])
  return g.node("Pad", [x, _i64(pads), value.reshape(())], mode="constant")


def _reduce(op: str):
  def fn(g, ins, ina, avals, axes, **p):
    return g.node(op, [ins[0], _i64(axes)], keepdims=0)
  return fn


def _reduce_window_max(g, ins, ina, avals, window_dimensions, window_strides, padding, base_dilation, window_dilation,
                       **p):
  """The max over each window as the Max of its strided slices, after padding with the
  dtype's minimum (reduce_window's identity)."""
  if any(d != 1 for d in (*base_dilation, *window_dilation)):
    raise NotImplementedError("export_onnx: dilated max-pooling")
  x = ins[0]
  dt = np.dtype(avals[0].dtype)
  low = np.iinfo(dt).min if np.issubdtype(dt, np.integer) else -np.inf
  if any(lo or hi for lo, hi in padding):
    pads = [lo for lo, _ in padding] + [hi for _, hi in padding]
    x = g.node("Pad", [x, _i64(pads), np.asarray(low, dt)], mode="constant")
  out = avals[0].shape
  slices = []
  for offset in np.ndindex(*window_dimensions):
    starts = list(offset)
    ends = [o + (n - 1) * s + 1 for o, n, s in zip(offset, out, window_strides)]
    slices.append(g.node("Slice", [x, _i64(starts), _i64(ends), _i64(range(len(out))), _i64(window_strides)]))
  return slices[0] if len(slices) == 1 else g.node("Max", slices)


# ----------------------------------------------------------------------------- linear


def _is_int8(dtype: Any) -> bool:
  return np.dtype(dtype) in (np.dtype(np.int8), np.dtype(np.uint8))


def _conv(g, ins, ina, avals, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count, **p):
  """lax.conv_general_dilated -> ConvInteger (int8 operands, exact int32) or Conv."""
  lhs, rhs = ins
  if any(d != 1 for d in lhs_dilation) or batch_group_count != 1:
    raise NotImplementedError("export_onnx: convolution with input dilation or batch groups")
  if any(lo < 0 or hi < 0 for lo, hi in padding):
    raise NotImplementedError("export_onnx: convolution with negative padding")
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  x = g.node("Transpose", [lhs], perm=list(lhs_spec))  # -> N, C, spatial
  w = np.transpose(rhs, rhs_spec) if isinstance(rhs, np.ndarray) else g.node("Transpose", [rhs], perm=list(rhs_spec))
  attrs = dict(strides=list(window_strides), dilations=list(rhs_dilation), group=int(feature_group_count),
               pads=[lo for lo, _ in padding] + [hi for _, hi in padding])
  integer = _is_int8(ina[0].dtype) and _is_int8(ina[1].dtype)
  y = g.node("ConvInteger" if integer else "Conv", [x, w], **attrs)
  if np.dtype(avals[0].dtype) != np.dtype(np.int32 if integer else np.float32):
    y = g.cast(y, avals[0].dtype)
  return g.node("Transpose", [y], perm=[int(i) for i in np.argsort(out_spec)])


def _dot_general(g, ins, ina, avals, dimension_numbers, **p):
  """lax.dot_general without batch dims -> a 2-D MatMulInteger (int8 operands) or MatMul."""
  (lc, rc), (lb, rb) = dimension_numbers
  if lb or rb:
    raise NotImplementedError("export_onnx: dot_general with batch dimensions")
  lhs, rhs = ins
  ls, rs = ina[0].shape, ina[1].shape
  lf = [d for d in range(len(ls)) if d not in lc]
  rf = [d for d in range(len(rs)) if d not in rc]
  k = int(np.prod([ls[d] for d in lc], dtype=np.int64))
  a = g.reshape(g.node("Transpose", [lhs], perm=[*lf, *lc]), (-1, k))
  if isinstance(rhs, np.ndarray):
    b = np.transpose(rhs, [*rc, *rf]).reshape(k, -1)
  else:
    b = g.reshape(g.node("Transpose", [rhs], perm=[*rc, *rf]), (k, -1))
  integer = _is_int8(ina[0].dtype) and _is_int8(ina[1].dtype)
  y = g.node("MatMulInteger" if integer else "MatMul", [a, b])
  if np.dtype(avals[0].dtype) != np.dtype(np.int32 if integer else np.float32):
    y = g.cast(y, avals[0].dtype)
  return g.reshape(y, tuple(avals[0].shape))


PRIMITIVES = {
    "add": _binary("Add"), "sub": _binary("Sub"), "mul": _binary("Mul"), "max": _binary("Max"),
    "min": _binary("Min"), "neg": _binary("Neg"), "abs": _binary("Abs"), "sign": _binary("Sign"),
    "eq": _binary("Equal"), "ne": _ne, "gt": _binary("Greater"), "ge": _binary("GreaterOrEqual"),
    "lt": _binary("Less"), "le": _binary("LessOrEqual"),
    "and": _logical("And", "BitwiseAnd"), "or": _logical("Or", "BitwiseOr"), "xor": _logical("Xor", "BitwiseXor"),
    "not": _not, "div": _div, "rem": _rem, "convert_element_type": _convert, "select_n": _select_n,
    "clamp": _clamp, "shift_left": _shift_left, "shift_right_arithmetic": _shift_right_arithmetic,
    "broadcast_in_dim": _broadcast_in_dim, "reshape": _reshape, "squeeze": _squeeze, "transpose": _transpose,
    "concatenate": _concatenate, "pad": _pad, "reduce_sum": _reduce("ReduceSum"), "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"), "reduce_window_max": _reduce_window_max, "conv_general_dilated": _conv,
    "dot_general": _dot_general, "copy": _binary("Identity"), "copy_p": _binary("Identity"),
}
