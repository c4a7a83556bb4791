"""Multiply-accumulates of a traced forward, attributed to the layers they ran in.

``jaxpr_products(jaxpr, layer_paths, batch)`` walks a jaxpr (and every jaxpr inside it:
jit, custom_vjp, remat, scan bodies times their length) and returns every
``dot_general`` and ``conv_general_dilated`` with its multiply-accumulates per example and
the layer that owns it: the deepest layer whose path contains the equation's name stack.
Flax names its modules' ops (``jax.named_scope``), so the name stack is the module path;
an op outside every layer (a ``jnp.dot`` in a model's own code) has no owner. This is
what ``summary`` reports, so nothing the model computes is left out of the shares.

Imports jax/numpy only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Product:
  """One matmul/conv of the traced forward: the module path it ran in (its name stack),
  the primitive, its multiply-accumulates per example, and the planned layer it belongs
  to (the deepest layer whose path contains it; None: it ran outside every layer)."""

  path: str
  primitive: str
  macs: int
  layer: str | None


def _size(shape: Sequence[Any]) -> int:
  """The number of elements, a symbolic dimension (a batch under ``jax.export``) counted
  as 1; ``batch_size`` is then 1 too, so the count stays per example."""
  return int(np.prod([d if isinstance(d, (int, np.integer)) else 1 for d in shape]))


def eqn_macs(eqn: Any) -> int:
  """Multiply-accumulates of one ``dot_general`` or ``conv_general_dilated`` equation
  (0 for any other): every output element is one dot product over the contracted
  operand slice; a transposed conv (input dilation) scatters each input element through
  the kernel, so its zero rows are not counted."""
  name = eqn.primitive.name
  out = _size(eqn.outvars[0].aval.shape)
  if name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return out * _size([lhs[a] for a in contract])
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    dilation = int(np.prod(eqn.params.get("lhs_dilation") or (1,)))
    return out * (_size(rhs) // _size([rhs[out_dim]])) // dilation
  return 0


def _sub_jaxprs(eqn: Any) -> Iterator[tuple[Any, int]]:
  """(inner jaxpr, how many times it runs) for every jaxpr in ``eqn``'s params (a scan
  body runs ``length`` times; any other once)."""
  times = int(eqn.params.get("length", 1)) if eqn.primitive.name == "scan" else 1
  for v in eqn.params.values():
    for j in (v if isinstance(v, (tuple, list)) else (v,)):
      inner = getattr(j, "jaxpr", j)
      if hasattr(inner, "eqns"):
        yield inner, times


def _module_path(stack: tuple[str, ...]) -> str:
  """The module path of a name stack: without the root module's name, the ``.method``
  suffixes (``Embed_0.attend``), and the repeat a rebuilt module (``rebind``) adds."""
  parts: list[str] = []
  for c in stack[1:]:
    c = c.split(".")[0]
    if not parts or parts[-1] != c:
      parts.append(c)
  return "/".join(parts)


def _products(jaxpr: Any, stack: tuple[str, ...] = (), times: int = 1) -> Iterator[tuple[str, str, int]]:
  for eqn in jaxpr.eqns:
    here = stack + tuple(str(eqn.source_info.name_stack).split("/")) if str(eqn.source_info.name_stack) else stack
    macs = eqn_macs(eqn)
    if macs:
      yield _module_path(here), eqn.primitive.name, macs * times
    for inner, n in _sub_jaxprs(eqn):
      yield from _products(inner, here, times * n)


def _owner(path: str, layers: Sequence[str]) -> str | None:
  best = None
  for p in layers:
    if (path == p or path.startswith(p + "/")) and (best is None or len(p) > len(best)):
      best = p
  return best


def batch_size(args: tuple) -> int:
  """The leading axis of the first array among a call's positional arguments (1 if it
  has none): MACs are counted per example."""
  for leaf in jax.tree.leaves(args):
    if getattr(leaf, "ndim", 0) > 1:
      return _size(leaf.shape[:1])
  return 1


def jaxpr_products(jaxpr: Any, layer_paths: Sequence[str], batch: int = 1) -> tuple[Product, ...]:
  """Every matmul/conv of ``jaxpr`` (see the module docstring), MACs divided by ``batch``."""
  return tuple(Product(path, prim, macs // batch, _owner(path, layer_paths))
               for path, prim, macs in _products(jaxpr))
