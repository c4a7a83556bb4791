"""Bit packing of binary/ternary kernels: 1 bit (binary) or 2 bits (ternary) per weight
plus one float32 alpha per output channel, exactly invertible."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


@struct.dataclass
class PackedKernel:
  """A binary (1 bit) or ternary (2 bit) kernel, the packed record of one layer.

  ``bits``: uint8 (C_out, ceil(n * width / 8)), one row per output channel, the n =
  prod(shape) / C_out codes of the channel in row-major order of the kernel with the
  output axis moved first, little-endian within a byte; width 1 (binary: 0 -> -1,
  1 -> +1) or 2 (ternary: 00 -> 0, 01 -> +1, 11 -> -1). ``alpha``: float32 (C_out,) >= 0.
  Invariant: ``unpack(pk) == codes * alpha`` (per channel) is the kernel that was packed,
  bit for bit. ``shape``, ``out_axis`` (non-negative) and ``kind`` are static."""

  bits: Array
  alpha: Array
  shape: tuple[int, ...] = struct.field(pytree_node=False)
  out_axis: int = struct.field(pytree_node=False)
  kind: str = struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return int(self.bits.size * self.bits.dtype.itemsize + self.alpha.size * self.alpha.dtype.itemsize)


def _to_rows(w: Array, out_axis: int) -> Array:
  return jnp.moveaxis(w, out_axis, 0).reshape(w.shape[out_axis], -1)


def _from_rows(rows: Array, shape: tuple[int, ...], out_axis: int) -> Array:
  moved = (shape[out_axis], *[d for i, d in enumerate(shape) if i != out_axis % len(shape)])
  return jnp.moveaxis(rows.reshape(moved), 0, out_axis)


def _pack_fields(fields: np.ndarray, width: int) -> np.ndarray:
  """(O, n) unsigned fields of ``width`` bits -> (O, ceil(n * width / 8)) uint8 (numpy)."""
  per = 8 // width
  o, n = fields.shape
  fields = np.pad(fields.astype(np.uint8), ((0, 0), (0, -n % per))).reshape(o, -1, per)
  shifts = (np.arange(per) * width).astype(np.uint8)
  return np.bitwise_or.reduce(fields << shifts, axis=-1).astype(np.uint8)


def _unpack_fields(packed: Array, width: int, n: int) -> Array:
  per = 8 // width
  shifts = jnp.arange(per, dtype=jnp.uint8) * width
  fields = (packed[..., None] >> shifts) & jnp.uint8(2**width - 1)
  return fields.reshape(packed.shape[0], -1)[:, :n]


def pack(kernel: Array, kind: str, out_axis: int = -1) -> PackedKernel:
  """Packs an already quantized kernel (codes x alpha per output channel), in numpy.

  Raises ValueError if the kernel is not binary (|w| = alpha everywhere in a channel) or
  ternary (|w| in {0, alpha}).
  """
  if kind not in ("binary", "ternary"):
    raise ValueError(f"pack: kind must be 'binary' or 'ternary', got {kind!r}")
  k = np.asarray(kernel, np.float32)
  axis = out_axis % k.ndim
  rows = np.moveaxis(k, axis, 0).reshape(k.shape[axis], -1)
  mag = np.abs(rows)
  alpha = mag.max(axis=1)
  ok = (mag == alpha[:, None]) | (alpha[:, None] == 0)
  if kind == "ternary":
    ok |= mag == 0
  if not ok.all():
    raise ValueError(f"pack: kernel of shape {k.shape} is not {kind} per output channel")
  if kind == "binary":
    bits = _pack_fields(rows > 0, 1)
  else:
    bits = _pack_fields(np.where(rows > 0, 1, np.where(rows < 0, 3, 0)), 2)
  return PackedKernel(jnp.asarray(bits), jnp.asarray(alpha), k.shape, axis, kind)


def unpack_codes(pk: PackedKernel) -> Array:
  """The codes, in {-1, +1} (binary) or {-1, 0, +1} (ternary), float32, kernel-shaped."""
  n = int(np.prod(pk.shape)) // pk.shape[pk.out_axis]
  if pk.kind == "binary":
    codes = _unpack_fields(pk.bits, 1, n).astype(jnp.float32) * 2 - 1
  else:
    f = _unpack_fields(pk.bits, 2, n).astype(jnp.int8)
    codes = jnp.where(f >= 2, f - 4, f).astype(jnp.float32)
  return _from_rows(codes, pk.shape, pk.out_axis)


def unpack(pk: PackedKernel) -> Array:
  """The kernel, codes x alpha, bit-identical to the kernel that was packed."""
  shape = [1] * len(pk.shape)
  shape[pk.out_axis] = -1
  return unpack_codes(pk) * pk.alpha.reshape(shape)


def unpack_tree(tree: Any) -> Any:
  """Every ``PackedKernel`` in ``tree`` replaced by its float kernel."""
  return jax.tree.map(lambda v: unpack(v) if isinstance(v, PackedKernel) else v, tree,
                      is_leaf=lambda v: isinstance(v, PackedKernel))
