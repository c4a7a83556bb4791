"""A Linen view of an NNX model, for everything that reads a model through Linen.

``twin(model)`` returns a Linen module that runs the NNX model's own ``__call__`` with
every layer with a weight, BatchNorm and marked ``Add`` answered by the Linen layer
(``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``, ``nn.Embed`` and its ``attend``,
``nn.Conv``, ``nn.ConvTranspose``, ``nn.BatchNorm``, ``ops.Add``) bound at the Linen path
of the NNX graph path ('block/0/conv'). An ``nnx.MultiHeadAttention`` that computes with
NNX's own ``dot_product_attention`` runs ``attention.product_attention`` (NNX's attention
maths with its two products injected) with QK^T and PV answered by Linen's
``AttentionProduct`` at ``<attn>/qk_product`` and ``<attn>/pv_product``, the paths Linen's
``MultiHeadDotProductAttention`` gives them; its projections are ``LinearGeneral`` layers
answered as such. (Mapping the whole attention onto ``nn.MultiHeadDotProductAttention``
would lose what NNX's attention has and Linen's has not: grouped-query heads,
``is_causal``, its call signature.) Its variables are ``bridge.linen_variables(model)``
restricted to those layers. So the
plan (``record``/``decide``), ``summary``, ``quantize_variables``, ``convert``,
``integer_apply`` and the tag trace, all written against Linen's interceptors, run on
the NNX model's code unchanged. The twin is only ever evaluated (its NNX copy in
``eval()`` mode, see ``LinenTwin``); training runs the NNX model itself, with no Linen.

Each call of the twin merges its own NNX copy and hands its stand-ins that call's root
scope (a ``_TwinCall``, through ``set_attributes``), so nothing is kept between calls
or shared between twins.

A user subclass of one of these layers is answered by its base's Linen layer, as the
plan quantizes a Linen subclass like its base (whatever its own ``__call__`` adds around
the base's computation is not seen by the plan). The state of every other module
(``nnx.LayerNorm``, a bare ``nnx.Param``) is a constant of the twin.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from micronet_jax._src.deploy.graph import get_path, set_path
from micronet_jax._src.flax import ops
from micronet_jax._src.flax.layers import PRODUCT_NAMES, AttentionProduct
from micronet_jax._src.nnx import layers
from micronet_jax._src.nnx.attention import ProductAttention, QuantProduct, exposes_products, product_attention_type
from micronet_jax._src.nnx.bridge import linen_layer, linen_variables, module_paths, set_node

# answered by a Linen layer: these and their subclasses (the quantized layers included)
ANSWERED = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Embed, nnx.Conv, nnx.ConvTranspose, nnx.BatchNorm,
            layers.Add, QuantProduct)


def answered(m: Any) -> bool:
  """Whether the twin answers ``m`` with a Linen layer."""
  return isinstance(m, ANSWERED)


class _Fields:
  """Constructor fields, static in the NNX graph (hashed by identity: a conv mask is an array)."""

  def __init__(self, cls: type, fields: dict):
    self.cls, self.fields = cls, fields


class _TwinCall:
  """One call of a ``LinenTwin``: its bound root module and the Linen layers bound under
  it so far (one per path, so that a shared layer is one module called twice)."""

  def __init__(self, root: nn.Module):
    self.root, self.bound = root, {}

  def layer(self, path: str, spec: _Fields, extra: dict) -> nn.Module:
    layer = self.bound.get(path)
    if layer is None:
      scope = self.root.scope
      for name in path.split("/") if path else ():
        scope = scope.push(name, reuse=True)
      layer = self.bound[path] = spec.cls(**spec.fields, **extra, parent=scope)
    return layer


class _ToLinen(nnx.Module):
  """Stands for a layer in the twin's NNX copy: calls the Linen layer at ``path`` of the
  twin call it is handed (``call``, set on the copy that each call merges)."""

  def __init__(self, path: str, cls: type, fields: dict):
    self.path, self.spec = path, _Fields(cls, {k: v for k, v in fields.items() if k != "use_running_average"})
    self.call: _TwinCall | None = None
    if cls is nn.BatchNorm:
      self.use_running_average = fields["use_running_average"]  # set by eval()/train()

  def _layer(self) -> nn.Module:
    if self.call is None:
      raise RuntimeError(f"{self.path}: a LinenTwin stand-in runs only inside the twin's call")
    extra = {"use_running_average": self.use_running_average} if self.spec.cls is nn.BatchNorm else {}
    return self.call.layer(self.path, self.spec, extra)

  # Each call runs under the layer's path as a name scope: the Linen layer is bound to a
  # scope, not called from Linen parents, so this is what names its ops by its path (the
  # plan attributes every matmul/conv to a layer by its name stack: ``core.macs``).
  def __call__(self, *args, **kwargs):
    with jax.named_scope(self.path):
      return self._layer()(*args, **_linen_kwargs(kwargs))

  def attend(self, *args, **kwargs):  # nnx.Embed.attend
    with jax.named_scope(self.path):
      return self._layer().attend(*args, **_linen_kwargs(kwargs))


def _linen_kwargs(kwargs: dict) -> dict:
  """An NNX layer call's keyword arguments for its Linen layer: ``out_sharding`` (which
  NNX layers take and Linen's do not; it places the output, it changes no value) dropped."""
  return {k: v for k, v in kwargs.items() if k != "out_sharding"}


class _Box:
  """The twin's constant NNX state (arrays: hashed by identity)."""

  def __init__(self, state: Any):
    self.state = state


class LinenTwin(nn.Module):
  """See the module docstring.

  Called as ``twin(*args, nnx_rest=(), nnx_kwargs=None, batch_norm_train=False)``, it
  calls the NNX model as ``model(*args, *nnx_rest, **nnx_kwargs)``: the NNX call's keyword
  arguments travel in one dict, so that none of them (``rngs``, ``train``, ``mutable``)
  is taken by Linen's ``apply``/``init`` or by the twin itself (``call_kwargs``). The NNX
  copy is in ``eval()`` mode, or with ``batch_norm_train`` its BatchNorms normalise with
  the batch's statistics (as in a training step) and everything else stays in evaluation
  mode (dropout off): the pass that learned step sizes start from.
  """

  graphdef: Any
  rest: _Box
  paths: tuple[str, ...]
  nnx_model_name: str = "LinenTwin"  # the NNX model's class name, for messages

  @nn.compact
  def __call__(self, *args, nnx_rest: tuple = (), nnx_kwargs: dict | None = None, batch_norm_train: bool = False):
    model = nnx.merge(self.graphdef, self.rest.state)  # a fresh copy per call: the call state is its own
    model.eval()
    if batch_norm_train:
      model.set_attributes(use_running_average=False, raise_if_not_found=False)
    model.set_attributes(_ToLinen, call=_TwinCall(self), raise_if_not_found=False)
    return model(*args, *nnx_rest, **(nnx_kwargs or {}))


def call_kwargs(kwargs: dict, rest: tuple = ()) -> dict:
  """The twin's keyword arguments for an NNX call ``model(*args, *rest, **kwargs)``."""
  return {**({"nnx_rest": tuple(rest)} if rest else {}), **({"nnx_kwargs": dict(kwargs)} if kwargs else {})}


def _linen_of(m: nnx.Module, path: str) -> tuple[type, dict]:
  if isinstance(m, layers.Add):
    return ops.Add, {}
  if isinstance(m, QuantProduct):
    return AttentionProduct, {}
  return linen_layer(m, path)


def _expose_products(copy: nnx.Module) -> None:
  """Every float ``nnx.MultiHeadAttention`` of ``copy`` that computes with NNX's own
  attention becomes one with float ``QuantProduct`` children (``attention.py``), which
  the twin then answers as layers."""
  made: dict = {}
  for path, (node, paths) in module_paths(copy).items():
    if isinstance(node, nnx.MultiHeadAttention) and exposes_products(node) and not isinstance(node, ProductAttention):
      products = {n: QuantProduct(path=f"{path}/{n}" if path else n) for n in PRODUCT_NAMES}
      new = product_attention_type(type(node), made)(node, products, path=path)
      for p in paths:
        set_node(copy, p, new)


def twin(model: nnx.Module) -> LinenTwin:
  """The Linen view of ``model`` (which is not changed)."""
  copy = nnx.merge(*nnx.split(model))
  _expose_products(copy)
  answered_nodes = {p: np for p, np in module_paths(copy).items() if answered(np[0])}
  if "" in answered_nodes:
    raise TypeError(f"the model is a bare {type(model).__name__}: wrap it in an nnx.Module")
  for path, (node, paths) in answered_nodes.items():
    stand_in = _ToLinen(path, *_linen_of(node, path))
    for p in paths:
      set_node(copy, p, stand_in)
  graphdef, rest = nnx.split(copy)
  return LinenTwin(graphdef, _Box(rest), tuple(sorted(answered_nodes)), type(model).__name__)


def twin_variables(model: nnx.Module, tw: LinenTwin) -> dict:
  """``linen_variables(model)`` restricted to the layers the twin answers."""
  full = linen_variables(model)
  out: dict[str, dict] = {}
  for col, tree in full.items():
    for p in tw.paths:
      sub = get_path(tree, p)
      if sub is not None:
        out[col] = set_path(out.get(col, {}), p, sub)
  return out

