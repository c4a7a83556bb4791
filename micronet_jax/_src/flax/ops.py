"""Small marked ops that a quantized or integer network must see, for use in models.

Most ops between layers need nothing: ReLU, max-pooling, reshapes, channel shuffles
and dropout act on quantized values exactly as on float ones. Three do not, and a
model marks them with these helpers (in float they are exactly ``a + b``, ``relu6`` and a
mean):

* ``Add``: a residual add. Under quantization both inputs are fake-quantized on one
  shared scale (micronet's QuantAdd: one observer per input, the scale of the union of
  their ranges); in integer inference both are requantized to that scale and added in
  int32.
* ``ReLU6``: in integer inference the bound 6 is a clamp at round(6 / scale) on the
  int32 accumulator grid of the input's producer.
* ``global_avg_pool`` / ``avg_pool``: in integer inference the mean of int32
  accumulators is taken with integer rounding instead of a float division.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from micronet_jax._src.core import seam as core
from micronet_jax._src.flax import seam


Array = jax.Array
INPUT_STATS = "input"  # as layers.INPUT_STATS


class Add(nn.Module):
  """``a + b``; the transform quantizes both inputs on one scale when a rule of kind
  ``"add"`` matches.

  As micronet's QuantAdd (``observer_res``, ``observer_shortcut``): each input has its own
  observer, ``quant_stats/<path>/input_a`` and ``input_b``, and both inputs are quantized
  with the scale of the union of the two ranges, which is kept in
  ``quant_stats/<path>/input`` (what evaluation and the integer converter read). With
  a moving average per input, the shared range is
  ``[min(ma(min a), ma(min b)), max(ma(max a), ma(max b))]``, so the wider branch is
  never clipped to an average of the two. While nothing has been observed, the union of
  the batch's two ranges is used.
  """

  act_quant: Any = None

  @nn.compact
  def __call__(self, a: Array, b: Array) -> Array:
    return core.shared_scale_add(seam.LinenSeam(self), self.act_quant, a, b,
                                 create_inputs=seam.stats_mutable(self))


class ReLU6(nn.Module):
  """min(max(x, 0), 6), marked so that integer inference can see it: there the bound 6
  is a clamp on the integer grid of each input element's producer (its record holds
  round(6 / scale)); in float and under fake quantization it is ``jax.nn.relu6``."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"ops.ReLU6 {seam.module_path(self)} in integer inference needs its clamp record "
                       "(mj.convert writes one)")
    return jax.nn.relu6(x)


def _integer_mean(x: Array, axes: tuple[int, ...]) -> Array:
  n = 1
  for a in axes:
    n *= x.shape[a]
  s = jnp.sum(x, axis=axes, dtype=jnp.int32)
  return jnp.sign(s) * ((jnp.abs(s) + n // 2) // n)  # round half away from zero, in int32


def global_avg_pool(x: Array) -> Array:
  """Mean over the spatial axes of NHWC ``x`` -> (N, C); integer-exact rounding on ints."""
  if jnp.issubdtype(x.dtype, jnp.integer):
    return _integer_mean(x, (1, 2))
  return jnp.mean(x, axis=(1, 2))
