"""A Linen view of an NNX model, for everything that reads a model through Linen.

``twin(model)`` returns a Linen module that runs the NNX model's own ``__call__`` with
every dense/conv/conv-transpose layer, BatchNorm and marked ``Add`` answered by the
Linen layer (``nn.Dense``, ``nn.Conv``, ``nn.ConvTranspose``, ``nn.BatchNorm``,
``ops.Add``) bound at the Linen path of the NNX graph path ('block/0/conv'). Its
variables are ``bridge.linen_variables(model)`` restricted to those layers. So the
plan (``record``/``decide``), ``summary``, ``quantize_variables``, ``convert``,
``integer_apply`` and the tag trace, all written against Linen's interceptors, run on
the NNX model's code unchanged. The twin is only ever evaluated (``train=False`` puts
the NNX copy in ``eval()`` mode); training runs the NNX model itself, with no Linen.

Each call of the twin merges its own NNX copy and hands its stand-ins that call's root
scope (a ``_TwinCall``, through ``set_attributes``), so nothing is kept between calls
or shared between twins.

Only layers of exactly these types (or the quantized ones of ``layers.py``) are answered
by Linen; a user subclass of ``nnx.Linear`` runs its own code and stays float, as a
subclassed Linen layer does (``plan.decide``). The state of every other module
(``nnx.LayerNorm``, a bare ``nnx.Param``) is a constant of the twin.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx

from micronet_jax._src.deploy.graph import get_path, set_path
from micronet_jax._src.flax import ops
from micronet_jax._src.nnx import layers
from micronet_jax._src.nnx.bridge import linen_layer, linen_variables, module_paths, set_node

FLOAT = (nnx.Linear, nnx.Conv, nnx.ConvTranspose, nnx.BatchNorm, layers.Add)
QUANTIZED = (layers.QuantLinear, layers.QuantConv, layers.QuantConvTranspose, layers.FoldedBatchNorm,
             layers.QuantAdd)


def answered(m: Any) -> bool:
  """Whether the twin answers ``m`` with a Linen layer."""
  return type(m) in FLOAT or type(m) in QUANTIZED


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

  def __call__(self, *args, **kwargs):
    if self.call is None:
      raise RuntimeError(f"{self.path}: a LinenTwin stand-in runs only inside the twin's call")
    extra = {"use_running_average": self.use_running_average} if self.spec.cls is nn.BatchNorm else {}
    return self.call.layer(self.path, self.spec, extra)(*args, **kwargs)


class _Box:
  """The twin's constant NNX state (arrays: hashed by identity)."""

  def __init__(self, state: Any):
    self.state = state


class LinenTwin(nn.Module):
  """See the module docstring. ``train`` (default False) is the NNX copy's mode."""

  graphdef: Any
  rest: _Box
  paths: tuple[str, ...]

  @nn.compact
  def __call__(self, *args, train: bool = False, **kwargs):
    model = nnx.merge(self.graphdef, self.rest.state)  # a fresh copy per call: the call state is its own
    model.train() if train else model.eval()
    model.set_attributes(_ToLinen, call=_TwinCall(self), raise_if_not_found=False)
    return model(*args, **kwargs)


def _linen_of(m: nnx.Module, path: str) -> tuple[type, dict]:
  if isinstance(m, layers.Add):
    return ops.Add, {}
  return linen_layer(m, path)


def twin(model: nnx.Module) -> LinenTwin:
  """The Linen view of ``model`` (which is not changed)."""
  copy = nnx.merge(*nnx.split(model))
  answered_nodes = {p: np for p, np in module_paths(copy).items() if answered(np[0])}
  if "" in answered_nodes:
    raise TypeError(f"the model is a bare {type(model).__name__}: wrap it in an nnx.Module")
  for path, (node, paths) in answered_nodes.items():
    stand_in = _ToLinen(path, *_linen_of(node, path))
    for p in paths:
      set_node(copy, p, stand_in)
  graphdef, rest = nnx.split(copy)
  return LinenTwin(graphdef, _Box(rest), tuple(sorted(answered_nodes)))


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

