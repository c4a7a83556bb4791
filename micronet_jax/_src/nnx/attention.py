"""The activation x activation products of ``nnx.MultiHeadAttention``, quantized.

``nnx.MultiHeadAttention`` computes QK^T and PV inside its ``attention_fn`` (by default
``nnx.dot_product_attention``), which offers no hook for the two einsums. A quantized
attention (``QuantMultiHeadAttention``, or a subclass of the user's attention class made
the same way) is made from the float one as the quantized layers are (its attributes,
submodules and Params taken over) and adds two child modules, ``qk_product`` and
``pv_product`` (``QuantProduct``: ``jnp.einsum`` with both operands fake-quantized by the
rule's ``act``, roles ``lhs``/``rhs``). Its ``attention_fn`` is a method running
``product_attention``, NNX's ``dot_product_attention`` written with the two products
injected. So the products sit at the paths Linen's ``AttentionProduct`` children have,
``<attn>/qk_product`` and ``<attn>/pv_product``, with the same quantizer state names, and
the same rules (kind ``"attention"``) select them in both frameworks.

``product_attention`` computes exactly what Linen's ``nn.dot_product_attention`` computes
with the products injected (the scaled query and the key, then the softmax weights and
the value, are the operands), plus what NNX adds: grouped-query attention (fewer key/value
heads) and ``is_causal``. The twin (``twin.py``) runs the same function with the products
answered by Linen's ``AttentionProduct``, so planning and deployment see the products the
NNX model computes.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from micronet_jax._src.core import seam as core
from micronet_jax._src.flax.layers import PRODUCT_NAMES
from micronet_jax._src.nnx.layers import Quantized, add_quant_state, copy_layer, subclass_with
from micronet_jax._src.nnx.seam import NnxSeam

Array = jax.Array


class QuantProduct(Quantized, nnx.Module):
  """``jnp.einsum(subscripts, lhs, rhs)`` with both operands fake-quantized by
  ``act_quant`` (roles ``lhs``/``rhs``; None: float, no state), as Linen's
  ``AttentionProduct``.

  Args:
    act_quant: the operands' quantizer, or None.
    params: its Linen ``params`` subtree (the quantizer params; None: created on the first call).
    stats: its ``quant_stats`` subtree (None: created on the first call).
    path: its module path (``<attn>/qk_product``).
  """

  def __init__(self, act_quant: Any = None, params: dict | None = None, stats: Any = None, *, path: str = ""):
    self.act_quant, self.path = act_quant, path
    self.use_running_average = False
    add_quant_state(self, params, stats, ())

  def __call__(self, subscripts: str, lhs: Array, rhs: Array, **einsum_kwargs: Any) -> Array:
    seam = NnxSeam(self)
    lhs = core.apply_quantizer(seam, "lhs", self.act_quant, lhs, None)
    rhs = core.apply_quantizer(seam, "rhs", self.act_quant, rhs, None)
    return jnp.einsum(subscripts, lhs, rhs, **einsum_kwargs)


Product = Callable[..., Array]  # (subscripts, lhs, rhs, **einsum_kwargs) -> array


def product_attention(qk: Product, pv: Product, query: Array, key: Array, value: Array, bias: Array | None = None,
                      mask: Array | None = None, broadcast_dropout: bool = True, dropout_rng: Array | None = None,
                      dropout_rate: float = 0.0, deterministic: bool = False, dtype: Any = None,
                      precision: Any = None, module: nnx.Module | None = None,
                      promote_dtype: Callable = dtypes.promote_dtype, is_causal: bool = False) -> Array:
  """``nnx.dot_product_attention`` with QK^T computed by ``qk`` and PV by ``pv``.

  Args:
    qk: the QK^T product, called as ``qk(subscripts, query / sqrt(depth), key)``.
    pv: the PV product, called as ``pv(subscripts, weights, value)``.
    query, key, value, ...: as ``nnx.dot_product_attention`` (``[batch..., length,
      heads, depth]``; fewer key/value heads: grouped-query attention).

  Returns:
    ``[batch..., q_length, num_heads, v_depth]``.
  """
  query, key, value = promote_dtype((query, key, value), dtype=dtype)
  dtype = query.dtype
  kw = {} if precision is None else {"precision": precision}
  q_heads, kv_heads = query.shape[-2], key.shape[-2]
  if q_heads % kv_heads or q_heads % value.shape[-2]:
    raise ValueError(f"query heads ({q_heads}) must be a multiple of key/value heads ({kv_heads})")
  gqa = q_heads != kv_heads
  key_ndim = key.ndim
  if gqa:  # as NNX: the query's heads grouped per key head
    query = query.reshape(query.shape[:-2] + (kv_heads, q_heads // kv_heads, query.shape[-1]))
    key = jnp.expand_dims(key, axis=-2)
  query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
  weights = qk("...qhgd,...kh1d->...hgqk" if gqa else "...qhd,...khd->...hqk", query, key, **kw)
  if gqa:
    weights = weights.reshape(weights.shape[:-4] + (q_heads,) + weights.shape[-2:])
  if bias is not None:
    weights = weights + bias
  if mask is not None or is_causal:
    masks = [] if mask is None else [mask]
    if is_causal:
      causal = jnp.tril(jnp.ones(weights.shape[-2:], dtype=dtype))
      masks.append(jnp.broadcast_to(causal, mask.shape if mask is not None else weights.shape))
    weights = jnp.where(nnx.combine_masks(*masks, dtype=dtype), weights, jnp.finfo(dtype).min)
  weights = jax.nn.softmax(weights).astype(dtype)
  if module:
    module.sow(nnx.Intermediate, "attention_weights", weights)
  if not deterministic and dropout_rate > 0.0:
    keep_prob = 1.0 - dropout_rate
    shape = (1,) * (key_ndim - 2) + weights.shape[-2:] if broadcast_dropout else weights.shape
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))
  v_heads = value.shape[-2]
  if q_heads == v_heads:
    return pv("...hqk,...khd->...qhd", weights, value, **kw)
  weights = weights.reshape(weights.shape[:-3] + (v_heads, q_heads // v_heads) + weights.shape[-2:])
  out = pv("...hgqk,...kh1d->...qhgd", weights, jnp.expand_dims(value, axis=-2), **kw)
  return out.reshape(out.shape[:-3] + (q_heads, out.shape[-1]))


def exposes_products(m: nnx.MultiHeadAttention) -> bool:
  """Whether the attention computes with NNX's own ``dot_product_attention`` (its
  products can then be exposed); a user's ``attention_fn`` keeps them inside it."""
  fn = m.float_attention_fn if isinstance(m, ProductAttention) else m.attention_fn
  return fn is nnx.dot_product_attention


class ProductAttention(Quantized):
  """The attention with its products as children (a mixin before the attention class).

  Args:
    layer: the float ``nnx.MultiHeadAttention`` (attributes, submodules, Params taken over).
    products: ``{"qk_product": module, "pv_product": module}`` (``QuantProduct``, or the
      twin's stand-ins).
    path: the attention's module path.
  """

  def __init__(self, layer: nnx.MultiHeadAttention, products: dict[str, nnx.Module], *, path: str = ""):
    if not exposes_products(layer):
      raise ValueError(f"{path}: its attention_fn is the user's, so its products cannot be quantized")
    copy_layer(self, layer, hooks=("attention_fn",))
    self.path = path
    for name in PRODUCT_NAMES:
      setattr(self, name, products[name])

  def attention_fn(self, query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
    return product_attention(self.qk_product, self.pv_product, query, key, value, **kwargs)


class QuantMultiHeadAttention(ProductAttention, nnx.MultiHeadAttention):
  """``nnx.MultiHeadAttention`` whose QK^T and PV are ``QuantProduct`` children (see the
  module docstring); its projections are quantized as layers of their own."""


def product_attention_type(cls: type, made: dict) -> type:
  """``QuantMultiHeadAttention`` for ``nnx.MultiHeadAttention``, else a subclass of the
  user's attention class made the same way (``made``: see ``layers.subclass_with``)."""
  if isinstance(cls, type) and issubclass(cls, ProductAttention):
    return cls
  if not issubclass(cls, nnx.MultiHeadAttention):
    raise TypeError(f"{cls.__name__} is no nnx.MultiHeadAttention")
  return QuantMultiHeadAttention if cls is nnx.MultiHeadAttention else subclass_with(ProductAttention, cls, made)
