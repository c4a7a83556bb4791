"""Which producer channel feeds every element of each integer layer's input.

The float-shaped model runs once on "tag" tensors: the network input and every
quantized layer emit tag = producer * TAG + channel + 1 (exact in float32), folded
BatchNorms pass their input through, and the ops in between (ReLU, max-pooling,
reshapes, concatenation, channel shuffles, a global average) carry tags to the
consumer unchanged. A consumer whose input is not a valid tag (a float multiply, an
unfolded BatchNorm, a zero-padded average) is reported by name. Layer facts come from
the model plan; the tracer notes only what the plan does not hold: each consumer's
decoded input, the conv geometry and the Add output shapes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from micronet_jax._src.deploy.graph import conv_padding, conv_transpose_pads, per_dim
from micronet_jax._src.flax import ops, seam
from micronet_jax._src.flax.plan import ModelPlan

Array = jax.Array
TAG = 4096  # tag = producer * TAG + channel + 1: exact in float32 up to 4096 producers/channels


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """A conv's geometry; a conv-transpose's is that of the stride-1 conv over its input
  dilated by ``input_dilation`` with explicit pads (as ``lax.conv_transpose`` runs it),
  its kernel flipped and its in/out axes swapped first when ``transpose_kernel``."""

  strides: tuple[int, ...]
  padding: Any
  dilation: tuple[int, ...]
  groups: int
  input_dilation: tuple[int, ...] = ()
  transpose_kernel: bool = False


@dataclasses.dataclass
class Trace:
  """``producers``: '<input>' then the layers in output order; ``inputs[path]``: per
  input, int64 (*example shape, 2) of (producer index, channel); ``geometry`` of convs;
  ``out_shapes`` of every producer (batch 1); ``output``: the decoded network output;
  ``clamps[path]``: the decoded input of every ``ops.ReLU6``."""

  producers: list[str]
  inputs: dict[str, list[np.ndarray]]
  geometry: dict[str, ConvGeometry]
  out_shapes: dict[str, tuple[int, ...]]
  output: np.ndarray
  clamps: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class _TagTracer:

  def __init__(self, plan: ModelPlan):
    self.plan = plan
    self.skip_bn = set(plan.folded_bns)
    self.trace = Trace(["<input>"], {}, {}, {}, np.zeros((0, 2), np.int64))

  def decode(self, x: Array, path: str) -> np.ndarray:
    t = np.asarray(x[0], np.float64) - 1
    prod, chan = np.floor_divide(t, TAG), np.mod(t, TAG)
    if np.any(t < 0) or np.any(t != np.round(t)) or np.any(prod >= len(self.trace.producers)):
      raise ValueError(f"the input of {path} is not a quantized tensor carried unchanged from a layer: an op "
                       "between layers is not integer-exact (e.g. a BatchNorm that is not folded: use "
                       "iao_rules(fold_bn=True); a float multiply; a zero-padded average: use micronet_jax._src.flax.ops "
                       "helpers)")
    return np.stack([prod, chan], -1).astype(np.int64)

  def _emit(self, path: str, shape: tuple[int, ...]) -> Array:
    k = len(self.trace.producers)
    self.trace.producers.append(path)
    self.trace.out_shapes[path] = tuple(shape)
    return jnp.broadcast_to(jnp.arange(shape[-1], dtype=jnp.float32) + k * TAG + 1, shape)

  def __call__(self, next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = seam.module_path(m)
    if isinstance(m, nn.BatchNorm) and path in self.skip_bn:
      return args[0]
    if isinstance(m, ops.ReLU6):  # a clamp on its producers' grids: tags pass
      self.trace.clamps[path] = self.decode(args[0], path)
      return args[0]
    is_add = isinstance(m, ops.Add)
    if not is_add and not isinstance(m, (nn.Dense, nn.Conv, nn.ConvTranspose)):
      return next_fun(*args, **kwargs)
    lp = self.plan.get(path)
    if lp is None or lp.act is None or (not is_add and lp.weight is None):
      raise ValueError(f"layer {path} is not fully quantized; integer conversion needs weights and inputs "
                       "of every layer quantized")
    if isinstance(m, nn.ConvTranspose):
      rank = len(lp.kernel_shape) - 2
      if canonicalize_padding(m.padding, rank) == "CIRCULAR":
        raise ValueError(f"integer conversion does not support circular padding ({path})")
      strides, dilation = per_dim(m.strides, rank), per_dim(m.kernel_dilation, rank)
      pads = conv_transpose_pads(conv_padding(m.padding, rank), tuple(lp.kernel_shape[:rank]), strides, dilation)
      self.trace.geometry[path] = ConvGeometry((1,) * rank, pads, dilation, 1, strides, bool(m.transpose_kernel))
    if isinstance(m, nn.Conv):
      rank = len(lp.kernel_shape) - 2
      self.trace.geometry[path] = ConvGeometry(per_dim(m.strides, rank), conv_padding(m.padding, rank),
                                               per_dim(m.kernel_dilation, rank), int(m.feature_group_count))
    self.trace.inputs[path] = [self.decode(a, path) for a in (args if is_add else args[:1])]
    out = args[0] if is_add else next_fun(*args, **kwargs)
    return self._emit(path, out.shape)


def trace_tags(model: nn.Module, plan: ModelPlan, variables: dict, x: Array, **apply_kwargs: Any) -> Trace:
  """Runs ``model`` (the float model) on tags shaped as one example of ``x``."""
  tracer = _TagTracer(plan)
  x_tag = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.float32) + 1, (1, *x.shape[1:]))
  with nn.intercept_methods(tracer):
    out = model.apply(variables, x_tag, **apply_kwargs)
  tracer.trace.output = tracer.decode(out, "the output")
  return tracer.trace
