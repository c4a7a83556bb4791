"""What both deploy paths read about a model: its plan, its variables by path, conv
geometry, and the BatchNorm folds the plan implies.

The graph is the model plan (``qmodel.plan(x, **kw)``, see ``_src/flax/plan.py``): layers
with their kind, output axis, bias and kernel shape, and BatchNorms with epsilon, scale,
bias and ``follows`` (the layer whose output a BN consumes). Nothing here traces a model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.linen.linear import canonicalize_padding

from micronet_jax._src.flax.bn_fold import fold_batch_norm
from micronet_jax._src.flax.plan import BatchNormPlan, ModelPlan

Array = jax.Array
Padding = str | tuple[tuple[int, int], ...]


def get_path(tree: Any, path: str, default: Any = None) -> Any:
  """``tree[a][b][c]`` for ``path`` 'a/b/c', or ``default`` where a key is missing."""
  for k in path.split("/"):
    if not hasattr(tree, "keys") or k not in tree:
      return default
    tree = tree[k]
  return tree


def set_path(tree: dict, path: str, value: Any) -> dict:
  """A copy of ``tree`` with ``path`` (a/b/c) set to ``value``; None deletes it (and any
  dict left empty above it)."""
  head, _, rest = path.partition("/")
  out = dict(tree)
  if rest:
    out[head] = set_path(tree.get(head, {}), rest, value)
    if not out[head]:
      del out[head]
  elif value is None:
    out.pop(head, None)
  else:
    out[head] = value
  return out


def per_dim(v: Any, rank: int) -> tuple[int, ...]:
  """A Flax stride/dilation field (None, an int or a sequence) as one int per spatial dim."""
  if v is None:
    return (1,) * rank
  return tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank


def conv_padding(padding: Any, rank: int) -> Padding:
  """A Flax padding field canonicalised: 'SAME', 'VALID' or explicit (lo, hi) per dim."""
  pad = canonicalize_padding(padding, rank)
  return pad if isinstance(pad, str) else tuple(tuple(int(p) for p in pair) for pair in pad)


def explicit_pads(padding: Padding, spatial: tuple[int, ...], window: tuple[int, ...],
                  strides: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """(lo, hi) per spatial dim of ``padding`` for an input of ``spatial`` size and a
  (dilated) ``window``: 'SAME'/'VALID' resolved as XLA resolves them."""
  if isinstance(padding, str):
    return tuple(jax.lax.padtype_to_pads(spatial, window, strides, padding))
  return padding


def conv_transpose_pads(padding: Padding, kernel: tuple[int, ...], strides: tuple[int, ...],
                        dilation: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """(lo, hi) per spatial dim that ``lax.conv_transpose`` pads its stride-dilated input
  with: 'SAME'/'VALID' from the dilated kernel size k and stride s (as lax derives them),
  explicit pads as given."""
  if not isinstance(padding, str):
    return padding
  out = []
  for k, s, d in zip(kernel, strides, dilation):
    k = (k - 1) * d + 1
    if padding == "SAME":
      total, lo = k + s - 2, (k - 1 if s > k - 1 else -(-(k + s - 2) // 2))
    elif padding == "VALID":
      total, lo = k + s - 2 + max(k - s, 0), k - 1
    else:
      raise ValueError(f"conv-transpose padding {padding!r} has no integer version")
    out.append((lo, total - lo))
  return tuple(out)


def batch_norm_fed_by(plan: ModelPlan) -> dict[str, BatchNormPlan]:
  """layer path -> the first BatchNorm that consumes its output (channels last)."""
  out: dict[str, BatchNormPlan] = {}
  for b in plan.batch_norms:
    if b.follows is not None:
      out.setdefault(b.follows, b)
  return out


def fold_into(kernel: Array, bias: Array | None, bn: BatchNormPlan, params: dict, batch_stats: dict,
              out_axis: int = -1, feeds_sign: bool = False) -> tuple[Array, Array]:
  """(kernel, bias) with BatchNorm ``bn`` folded in (``fold_batch_norm``), its gamma,
  beta, mean and variance read from the variables at its path (gamma 1 and beta 0 where
  the BN has no scale or bias)."""
  c = kernel.shape[out_axis]
  p = get_path(params, bn.path, {})
  gamma = p["scale"] if bn.use_scale else jnp.ones((c,), jnp.float32)
  beta = p["bias"] if bn.use_bias else jnp.zeros((c,), jnp.float32)
  s = get_path(batch_stats, bn.path)
  if s is None:
    raise ValueError(f"BatchNorm {bn.path} has no batch_stats (mean/var) to fold")
  return fold_batch_norm(jnp.asarray(kernel, jnp.float32), None if bias is None else jnp.asarray(bias), gamma, beta,
                         s["mean"], s["var"], bn.epsilon, out_axis=out_axis, feeds_sign=feeds_sign)
