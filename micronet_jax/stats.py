"""Model statistics as micronet's results table reports them: parameters, MACs, size.

Size counts every parameter at the bits it is stored with: a quantized layer's kernel
at its weight bits, everything else (biases, BatchNorm, float layers) at 32 bits, and
MB = 10^6 bytes (micronet's table: 0.67 M float parameters = 2.68 MB).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from micronet_jax.layers import LAYER_KIND
from micronet_jax.transform import QuantizedModel


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


def _layer_macs(module: nn.Module, out: jax.Array, kernel_shape: tuple[int, ...], batch: int) -> int:
  # Every output element is one dot product over the kernel's input slice (per group).
  contraction = int(np.prod(kernel_shape[:-1]))
  if isinstance(module, nn.ConvTranspose):  # each input element scatters through the kernel
    contraction = int(np.prod(kernel_shape[:-2])) * kernel_shape[-2]
    return int(np.prod(out.shape)) // batch * contraction // int(np.prod(module.strides or (1,)))
  return int(np.prod(out.shape)) // batch * contraction


def model_stats(model: Any, variables: dict, x: jax.Array, **kwargs) -> ModelStats:
  """Parameters, MACs per example and size for ``model`` (float or ``QuantizedModel``).

  ``x`` is an example batch (its first axis is the batch); ``kwargs`` go to the model's
  ``__call__`` (e.g. ``train=False``).
  """
  base = model.model if isinstance(model, QuantizedModel) else model
  weight_bits: dict[str, int] = {}
  if isinstance(model, QuantizedModel):
    for p in model.plan(x, **kwargs):
      if p.weight is not None:
        weight_bits[p.path] = p.weight.bits
  calls: dict[str, int] = {}

  def recorder(next_fun, args, kw, context):
    out = next_fun(*args, **kw)
    m = context.module
    if context.method_name == "__call__" and isinstance(m, tuple(LAYER_KIND)):
      path = "/".join(m.scope.path)
      kernel = m.scope.get_variable("params", "kernel")
      calls[path] = calls.get(path, 0) + _layer_macs(m, out, kernel.shape, x.shape[0])
    return out

  with nn.intercept_methods(recorder):
    jax.eval_shape(lambda v, x: base.apply(v, x, **kwargs), variables, x)

  n_params, bits_total = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
    keys = [getattr(k, "key", str(k)) for k in path]
    size = int(np.prod(leaf.shape))
    n_params += size
    bits = weight_bits.get("/".join(keys[:-1]), 32) if keys[-1] == "kernel" else 32
    bits_total += size * bits
  return ModelStats(n_params, sum(calls.values()), bits_total / 8 / 1e6, n_params * 4 / 1e6)
