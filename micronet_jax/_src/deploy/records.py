"""Typed per-layer deploy records: what the runtime executes for one layer.

Every record is a ``flax.struct`` pytree: its arrays are leaves (so an artifact is a jit
argument and ``nbytes`` counts it), its geometry is static metadata
(``pytree_node=False``, hashed into the jit cache key). The runtime
(``runtime.Runtime``) dispatches on the record's type.

Integer records (``convert``): an int32 accumulator ``acc`` has a real value
``scale * acc`` with real 0 = acc 0, per channel (or per element) of its producer.

* ``Requant``: acc -> code on a consumer's grid, q = clip(round(acc * M) + Z, qmin, qmax),
  with M = (m_hi + m_lo 2^-15) 2^-shift (a 30-bit fixed-point multiplier, int32 only,
  ``fixed_point.precise_mul_shift``); M = S_producer / S_consumer. The three arrays are
  (C,) when M varies only along channels, else shaped as one example of the input
  (no batch axis).
* ``InputGrid``: a layer's affine input grid, real = S (q - zero_point), q in
  [qmin, qmax]; ``offset`` (128 for a uint8 grid, else 0) moves codes to int8 for the
  int8 x int8 -> int32 kernels. All int32 scalars (leaves: deploys of one model share a
  compilation).
* ``IntDense`` / ``IntConv``: ``w`` int8 (kernel layout of the float layer, output
  channels last), symmetric (weight zero point 0); ``w_sum`` int32 (C_out,) = sum of w
  over every axis but the last; ``bias`` int32 (C_out,) on the accumulator grid
  S_in * S_w. Output: acc = (q - Z) * w + bias = q8 * w - (Z - offset) w_sum + bias.
  A conv-transpose is an ``IntConv`` with ``input_dilation`` (its strides): the stride-1
  conv, kernel HWIO, over its input with ``input_dilation - 1`` zero points between
  neighbours and the explicit ``padding`` of ``lax.conv_transpose``.
* ``IntClamp``: ``ops.ReLU6``, clip(acc, 0, round(6 / scale)) on its input's grid.
* ``IntAdd``: both inputs requantized to one shared grid and added,
  acc = ((q_a - Z) + (q_b - Z)) 2^fraction_bits, so its scale is S / 2^fraction_bits
  and a following average keeps ``fraction_bits`` of fraction.
* ``FoldedBatchNorm``: a BatchNorm folded into the layer before it: the identity, or,
  with ``adds_bias``, x + the BN's own ``bias`` param (a bias-free conv's fused bias).

Binary records (``fuse_bn``): ``packing.PackedKernel`` (the packed kernel itself, in the
variables), ``FoldedBatchNorm`` and ``Xnor``: a layer with binary weights and a binary
input run by XNOR/popcount on its packed kernel (``XnorConv``: a conv's static geometry).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct

from micronet_jax._src.deploy.graph import Padding
from micronet_jax._src.deploy.packing import PackedKernel

Array = jax.Array


@struct.dataclass
class Requant:
  """int32 multiplier M = (m_hi + m_lo 2^-15) 2^-shift; m_hi in [2^14, 2^15), m_lo in
  [0, 2^15), int32, (C,) or one example's input shape."""

  m_hi: Array
  m_lo: Array
  shift: Array


@struct.dataclass
class InputGrid:
  """real = S (q - zero_point), q in [qmin, qmax]; int8 code = q - offset. int32 scalars."""

  zero_point: Array
  qmin: Array
  qmax: Array
  offset: Array


@struct.dataclass
class IntDense:
  """int8 ``w`` (in, out), int32 ``bias``/``w_sum`` (out,), the input's requantization
  and grid (see the module docstring)."""

  w: Array
  bias: Array
  w_sum: Array
  requant: Requant
  grid: InputGrid


@struct.dataclass
class IntConv:
  """int8 ``w`` (*window, in / groups, out), int32 ``bias``/``w_sum`` (out,), the input's
  requantization and grid; the padding is filled with the zero point (real 0)."""

  w: Array
  bias: Array
  w_sum: Array
  requant: Requant
  grid: InputGrid
  strides: tuple[int, ...] = struct.field(pytree_node=False)
  padding: Padding = struct.field(pytree_node=False)
  dilation: tuple[int, ...] = struct.field(pytree_node=False)
  groups: int = struct.field(pytree_node=False, default=1)
  input_dilation: tuple[int, ...] = struct.field(pytree_node=False, default=())


@struct.dataclass
class IntClamp:
  """``ops.ReLU6`` on int32 accumulators: clip(acc, 0, hi), hi = round(6 / scale) (int32,
  (C,) or one example's input shape)."""

  hi: Array


@struct.dataclass
class IntAdd:
  """A residual add on one shared grid: acc = ((q_a - Z) + (q_b - Z)) << fraction_bits."""

  requant_a: Requant
  requant_b: Requant
  grid: InputGrid
  fraction_bits: int = struct.field(pytree_node=False)


@struct.dataclass
class FoldedBatchNorm:
  """A BatchNorm folded into its producer: identity, or x + its ``bias`` param."""

  adds_bias: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class Xnor:
  """A dense/conv layer with binary weights and a binary input, run by XNOR/popcount on
  its packed kernel: alpha (n_valid - 2 popcount((x XOR w) AND valid)) + bias; a conv's
  geometry is its module's own (``XnorConv``)."""


@struct.dataclass
class XnorConv:
  """The geometry of an XNOR/popcount conv over patches (zero padding is masked out: it
  is neither +1 nor -1); ``padding`` 'SAME', 'VALID' or (lo, hi) per spatial dim."""

  strides: tuple[int, ...] = struct.field(pytree_node=False)
  padding: Padding = struct.field(pytree_node=False)
  input_dilation: tuple[int, ...] = struct.field(pytree_node=False)
  dilation: tuple[int, ...] = struct.field(pytree_node=False)
  groups: int = struct.field(pytree_node=False, default=1)


def _is_packed(v: Any) -> bool:
  return isinstance(v, PackedKernel)


def nbytes(artifact: Any) -> int:
  """Bytes of every array in a deploy artifact (a ``Deploy``, records, or variables with
  ``PackedKernel`` leaves, counted at their packed size)."""
  leaves = jax.tree.leaves(artifact, is_leaf=_is_packed)
  return sum(v.nbytes if _is_packed(v) else int(np.asarray(v).nbytes) for v in leaves)
