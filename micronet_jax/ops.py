"""Small marked ops that a quantized or integer network must see, for use in models.

Most ops between layers need nothing: ReLU, max-pooling, reshapes, channel shuffles
and dropout act on quantized values exactly as on float ones. Two kinds do not, and a
model marks them with these helpers (in float they are exactly ``a + b`` and a mean):

* ``Add``: a residual add. Under quantization both inputs are fake-quantized on one
  shared scale (micronet's QuantAdd: one observer over the union of both ranges);
  in integer inference both are requantized to that scale and added in int32.
* ``global_avg_pool`` / ``avg_pool``: in integer inference the mean of int32
  accumulators is taken with integer rounding instead of a float division.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


Array = jax.Array


class Add(nn.Module):
  """``a + b``; the transform quantizes both inputs on one scale when a rule of kind
  ``"add"`` matches (the state lives in ``quant_stats/<path>/input``)."""

  act_quant: Any = None

  @nn.compact
  def __call__(self, a: Array, b: Array) -> Array:
    q = self.act_quant
    if q is None:
      return a + b
    stats = self.variable("quant_stats", "input", q.init_state, a)
    update = self.is_mutable_collection("quant_stats") and not self.is_initializing()
    state = stats.value
    if update:  # the observer sees both inputs (the union of their ranges)
      state = q.observer.update(q.observer.update(state, a, None), b, None)
      stats.value = state
    a_q, _ = q.fake_quant(a, state, update=False)
    b_q, _ = q.fake_quant(b, state, update=False)
    return a_q + b_q


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
