"""Fixed-point requantization in int32 arithmetic only: the multipliers an integer
kernel uses to move an int32 accumulator from one scale to another.

A real multiplier M > 0 is stored as an integer mantissa and a shift, M ~= m 2^-s, and
applied with rounding as floor((acc m + 2^(s-1)) / 2^s) without ever forming a 64-bit
product (every partial product fits in int32), so the same code runs on any integer
accelerator and in XLA on CPU/GPU/TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
MULT_BITS = 15  # requantization multipliers m in [2^14, 2^15)



def quantize_multiplier(real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """real > 0 -> (m, s) int32 with real ~= m * 2^-s, m in [2^14, 2^15) (relative error < 2^-15)."""
  real = np.asarray(real, np.float64)
  if np.any(real <= 0) or not np.all(np.isfinite(real)):
    raise ValueError("requantization multipliers must be positive and finite")
  exp = np.floor(np.log2(real)).astype(np.int64)
  s = (MULT_BITS - 1) - exp
  m = np.round(real * np.exp2(s)).astype(np.int64)
  top = m >= 2**MULT_BITS  # rounding reached 2^15
  m = np.where(top, m // 2, m)
  s = np.where(top, s - 1, s)
  if np.any(s < 0) or np.any(s > 62):
    raise ValueError(f"requantization multiplier out of range: {real.min():.3g}..{real.max():.3g}")
  return m.astype(np.int32), s.astype(np.int32)


def rounding_mul_shift(acc: Array, m: Array, s: Array) -> Array:
  """floor((acc * m + 2^(s-1)) / 2^s) in int32 arithmetic only, saturating near +-2^30.

  ``acc`` int32, ``m`` in [0, 2^15), ``s`` in [-15, 62] (broadcasting; a negative ``s``
  shifts left). The 47-bit product is split as acc = A 2^16 + B, so every partial
  product fits in int32.
  """
  acc, m, s = jnp.asarray(acc, jnp.int32), jnp.asarray(m, jnp.int32), jnp.asarray(s, jnp.int32)
  a_hi = acc >> 16
  b_lo = acc & 0xFFFF
  q = b_lo * m  # < 2^31
  t = a_hi * m + (q >> 16)  # acc * m = t 2^16 + (q & 0xFFFF)
  q_lo = q & 0xFFFF
  # s >= 16: floor((t 2^16 + q_lo + 2^(s-1)) / 2^s) = (t + [(q_lo + 2^(s-1)) >> 16]) >> (s - 16)
  s_hi = jnp.maximum(s - 16, 0)
  carry = jnp.where(s > 16, jnp.left_shift(1, jnp.clip(s - 17, 0, 30)), (q_lo + (1 << 15)) >> 16)
  big = jnp.right_shift(t + carry, jnp.minimum(s_hi, 31))
  # 0 <= s < 16: t 2^(16-s) + floor((q_lo + 2^(s-1)) / 2^s), with t saturated first
  s0 = jnp.maximum(s, 0)
  lim = jnp.left_shift(1, jnp.clip(14 + s0, 0, 30))
  half = jnp.where(s0 > 0, jnp.left_shift(1, jnp.clip(s0 - 1, 0, 30)), 0)
  small = (jnp.left_shift(jnp.clip(t, -lim, lim), jnp.clip(16 - s0, 0, 16))
           + jnp.right_shift(q_lo + half, jnp.clip(s0, 0, 15)))
  # s < 0: the s = 0 product, saturated, shifted left
  k = jnp.clip(-s, 0, 15)
  lim_neg = jnp.left_shift(1, 30 - k)
  left = jnp.left_shift(jnp.clip(small, -lim_neg, lim_neg), k)
  return jnp.where(s >= 16, big, jnp.where(s >= 0, small, left))


def precise_multiplier(real: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """real > 0 -> (m_hi, m_lo, s) int32 with real ~= (m_hi + m_lo 2^-15) 2^-s, a 30-bit
  multiplier (relative error < 2^-29) made of two Q15 halves for ``precise_mul_shift``."""
  real = np.asarray(real, np.float64)
  m_hi, s = quantize_multiplier(real)  # validates; fixes the exponent
  m30 = np.round(real * np.exp2(s.astype(np.int64) + 15)).astype(np.int64)
  top = m30 >= 2**30
  m30, s = np.where(top, m30 // 2, m30), np.where(top, s - 1, s)
  return (m30 >> 15).astype(np.int32), (m30 & 0x7FFF).astype(np.int32), s.astype(np.int32)


def precise_mul_shift(acc: Array, m_hi: Array, m_lo: Array, s: Array) -> Array:
  """round(acc * (m_hi + m_lo 2^-15) 2^-s) in int32 arithmetic, saturating.

  Both halves are computed with 15 extra fraction bits and summed before the final
  rounding, so the result is off by one only when the exact value lies within about
  2^-15 of a rounding tie (a single Q15 multiplier flips about 255 times more often).
  """
  hi = rounding_mul_shift(acc, m_hi, s - 15)  # value * 2^15
  lo = rounding_mul_shift(acc, m_lo, s)  # (m_lo part) * 2^15
  total = jnp.clip(hi, -(1 << 29), 1 << 29) + jnp.clip(lo, -(1 << 29), 1 << 29)
  return (total + (1 << 14)) >> 15
