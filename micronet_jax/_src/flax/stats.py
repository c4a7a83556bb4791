"""Model statistics as micronet's results table reports them: parameters, MACs, size.

Size counts every parameter at the bits it is stored with: a quantized layer's kernel
at its weight bits, everything else (biases, BatchNorm, float layers) at 32 bits, and
MB = 10^6 bytes (micronet's table: 0.67 M float parameters = 2.68 MB).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from micronet_jax._src.flax.transform import QuantizedModel, quantize_model


@dataclasses.dataclass(frozen=True)
class ModelStats:
  params: int
  macs: int  # multiply-accumulates per example (conv, conv-transpose and dense layers)
  size_mb: float  # at the stored bit widths
  float_size_mb: float  # the same parameters at 32 bits

  @property
  def compression(self) -> float:
    """1 - size / float size (micronet's "compression" column, relative to itself)."""
    return 1.0 - self.size_mb / self.float_size_mb

  def row(self) -> dict[str, Any]:
    return {"params": self.params, "MMACs": self.macs / 1e6, "size_mb": self.size_mb,
            "compression": self.compression}


def model_stats(model: Any, variables: dict, x: jax.Array, **kwargs) -> ModelStats:
  """Parameters, MACs per example and size for ``model`` (float or ``QuantizedModel``).

  ``x`` is an example batch (its first axis is the batch); ``kwargs`` go to the model's
  ``__call__`` (e.g. ``train=False``). MACs and bits come from the model's plan.
  """
  qmodel = model if isinstance(model, QuantizedModel) else quantize_model(model, ())
  plan = qmodel.plan(x, **kwargs)
  weight_bits = {p.path: p.weight.bits for p in plan if p.weight is not None}
  n_params, bits_total = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
    keys = [getattr(k, "key", str(k)) for k in path]
    size = int(np.prod(leaf.shape))
    n_params += size
    bits = weight_bits.get("/".join(keys[:-1]), 32) if keys[-1] == "kernel" else 32
    bits_total += size * bits
  return ModelStats(n_params, sum(p.macs for p in plan), bits_total / 8 / 1e6, n_params * 4 / 1e6)
