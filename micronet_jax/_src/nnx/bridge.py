"""What the NNX side needs to know about Flax: graph paths, swapping a node, each NNX
layer's Linen equivalent, and an NNX model's state as Linen variables.

NNX and Linen name the same layer the same way: ``nnx.Linear``/``nnx.LinearGeneral``/
``nnx.Einsum``/``nnx.Conv``/``nnx.ConvTranspose`` hold ``kernel`` and ``bias`` (of the
same shapes), ``nnx.Embed`` holds ``embedding``, ``nnx.BatchNorm`` holds ``scale``,
``bias``, ``mean`` and ``var``, exactly the names of ``nn.Dense``/``nn.DenseGeneral``/
``nn.Einsum``/``nn.Conv``/``nn.ConvTranspose``/``nn.Embed``/``nn.BatchNorm``. So an NNX layer at graph path ('block', 0,
'conv') is the Linen layer at module path 'block/0/conv', and the NNX model's state is
the Linen variables ``{'params', 'batch_stats', 'quant_stats'}`` with the same paths
(``linen_variables``). That correspondence is the whole bridge: the plan, ``summary``,
``quantize_variables`` and ``convert`` run on a Linen view of the NNX model (``twin.py``)
and their results map back onto it by path. Training never comes here: the quantized
NNX layers compute through the core on ``NnxSeam`` (``layers.py``, ``seam.py``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from micronet_jax._src.nnx.seam import QuantStats

Array = jax.Array
Path = tuple[Any, ...]


def path_str(path: Path) -> str:
  """('block', 0, 'conv') -> 'block/0/conv': the Linen module path of an NNX node."""
  return "/".join(str(k) for k in path)


def module_paths(model: nnx.Module) -> dict[str, tuple[nnx.Module, list[Path]]]:
  """Linen path (of the first graph path) -> (module, every graph path it is reachable
  at), for every module of ``model``; a shared module is one entry with several paths."""
  by_id: dict[int, tuple[nnx.Module, list[Path]]] = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      by_id.setdefault(id(node), (node, []))[1].append(tuple(path))
  return {path_str(paths[0]): (node, paths) for node, paths in by_id.values()}


def set_node(root: nnx.Module, path: Path, new: Any) -> None:
  """Puts ``new`` at graph ``path`` of ``root`` (an attribute, or an item of an
  ``nnx.List``/dict)."""
  attr = lambda parent, k: isinstance(k, str) and hasattr(parent, k)  # noqa: E731
  parent = root
  for k in path[:-1]:
    parent = getattr(parent, k) if attr(parent, k) else parent[k]
  if attr(parent, path[-1]):
    setattr(parent, path[-1], new)
  else:
    parent[path[-1]] = new


# ----------------------------------------------------------------------------- Linen fields

_COMMON = ("use_bias", "dtype", "param_dtype", "precision")


def _check(m: nnx.Module, path: str) -> None:
  """Options the Linen layers cannot reproduce fail here, by name, instead of computing
  something else."""
  if getattr(m, "preferred_element_type", None) is not None:
    raise NotImplementedError(f"{path} ({type(m).__name__}): preferred_element_type is not supported by "
                              "the quantized layers")
  if isinstance(m, nnx.Einsum) and m.einsum_op is not jnp.einsum:
    raise NotImplementedError(f"{path} ({type(m).__name__}): a custom einsum_op is not supported")
  # a quantized layer keeps the float layer's promote_dtype as float_promote_dtype
  promote = getattr(m, "float_promote_dtype", getattr(m, "promote_dtype", dtypes.promote_dtype))
  if promote is not dtypes.promote_dtype:
    raise NotImplementedError(f"{path} ({type(m).__name__}): a custom promote_dtype is not supported")


def linen_layer(m: nnx.Module, path: str = "") -> tuple[type, dict[str, Any]]:
  """(Linen class, constructor fields) of the Linen layer that computes what ``m`` does
  on the same ``kernel``/``bias`` (or BatchNorm variables)."""
  if isinstance(m, nnx.BatchNorm):
    return nn.BatchNorm, dict(
        use_running_average=m.use_running_average, axis=m.axis, momentum=m.momentum, epsilon=m.epsilon,
        dtype=m.dtype, param_dtype=m.param_dtype, use_bias=m.use_bias, use_scale=m.use_scale,
        axis_name=m.axis_name, axis_index_groups=m.axis_index_groups, use_fast_variance=m.use_fast_variance)
  _check(m, path)
  if isinstance(m, nnx.Embed):
    return nn.Embed, dict(num_embeddings=m.num_embeddings, features=m.features, dtype=m.dtype,
                          param_dtype=m.param_dtype)
  if isinstance(m, nnx.Einsum):
    return EinsumWithBias, dict(shape=tuple(m.kernel_shape), einsum_str=m.einsum_str, use_bias=m.bias is not None,
                                bias_shape=None if m.bias_shape is None else tuple(m.bias_shape), dtype=m.dtype,
                                param_dtype=m.param_dtype, precision=m.precision)
  fields = {k: getattr(m, k) for k in _COMMON}
  if isinstance(m, nnx.LinearGeneral):
    extra = {k: getattr(m, k) for k in ("dot_general", "dot_general_cls") if getattr(m, k) is not None}
    return nn.DenseGeneral, dict(features=m.out_features, axis=m.axis, batch_dims=tuple(m.batch_axis), **extra,
                                 **fields)
  if isinstance(m, nnx.Linear):
    if m.dot_general is not jax.lax.dot_general:
      fields["dot_general"] = m.dot_general
    return nn.Dense, dict(features=m.out_features, **fields)
  if isinstance(m, nnx.Conv):
    if m.conv_general_dilated is not jax.lax.conv_general_dilated:
      fields["conv_general_dilated"] = m.conv_general_dilated
    return nn.Conv, dict(features=m.out_features, kernel_size=m.kernel_size, strides=m.strides, padding=m.padding,
                         input_dilation=m.input_dilation, kernel_dilation=m.kernel_dilation,
                         feature_group_count=m.feature_group_count, mask=m.mask, **fields)
  if isinstance(m, nnx.ConvTranspose):
    return nn.ConvTranspose, dict(features=m.out_features, kernel_size=m.kernel_size, strides=m.strides,
                                  padding=m.padding, kernel_dilation=m.kernel_dilation, mask=m.mask,
                                  transpose_kernel=m.transpose_kernel, **fields)
  raise TypeError(f"{path}: no Linen equivalent for {type(m).__name__}")


class EinsumWithBias(nn.Einsum):
  """``nn.Einsum`` whose bias has the shape the NNX layer declared (``bias_shape``; None:
  Linen's, the kernel axes the output keeps), broadcast onto the output as NNX does."""

  bias_shape: tuple[int, ...] | None = None

  def _get_bias_shape(self, einsum_str: str, lhs: Array, rhs: Array):
    shape, broadcast = super()._get_bias_shape(einsum_str, lhs, rhs)
    return (shape if self.bias_shape is None else self.bias_shape), broadcast


# ----------------------------------------------------------------------------- variables

COLLECTIONS = ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats"), (QuantStats, "quant_stats"))


def _nest(tree: dict, path: Path, value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(str(k), {})
  tree[str(path[-1])] = value


def linen_variables(model: nnx.Module) -> dict[str, dict]:
  """The NNX model's state as Linen variables: ``params`` (``nnx.Param``), ``batch_stats``
  (``nnx.BatchStat``) and ``quant_stats`` (``QuantStats``, whose ``{role: stats}`` value
  becomes ``quant_stats/<layer>``), with the graph paths as module paths."""
  out: dict[str, dict] = {}
  for var_type, col in COLLECTIONS:
    flat = nnx.to_flat_state(nnx.state(model, var_type))
    for path, var in flat:
      if col == "quant_stats":  # the attribute is the collection: its dict is the layer's subtree
        path = path[:-1]
      _nest(out.setdefault(col, {}), path, var.get_value() if hasattr(var, "get_value") else var.value)
  return out
