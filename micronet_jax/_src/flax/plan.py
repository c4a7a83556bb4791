"""The model plan: every layer's facts and quantization decision, from one abstract trace.

``record(fn)`` runs ``fn`` (a float ``init``/``apply`` of the user's model) under
``jax.eval_shape`` with one interceptor that notes every ``nn.Dense``/``nn.Conv``/
``nn.ConvTranspose``/``ops.Add``/``nn.BatchNorm`` call: path, kind, geometry, shapes,
MACs, and which BatchNorm directly consumes which layer's output (the same array object).
``decide(graph, rules)`` turns those facts into a ``ModelPlan`` (pure: no tracing).

The plan is static data: the transform swaps layers by reading it, and ``convert``,
``fuse_bn``, ``model_stats``, ``summary`` and the centering projection read it instead of
walking the model themselves.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np

from micronet_jax._src.flax import ops

from micronet_jax._src.flax import seam
from micronet_jax._src.core.macs import Product, batch_size, jaxpr_products
from micronet_jax._src.core.rules import ACT_ONLY_KINDS, QuantRule, first_match
from micronet_jax._src.flax.layers import (AttentionProduct, QuantConv, QuantConvTranspose, QuantDense,
                                           exposes_products, with_products)

HAND_WRITTEN = {QuantDense: "dense", QuantConv: "conv", QuantConvTranspose: "conv_transpose"}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """One layer (one row of ``summary``): what the transform does with it, and its facts.

  ``rule`` is the index of the deciding rule (None: no rule matched, or the layer is
  hand-written or skipped, as ``note`` says). ``folded_bn`` is the path of the BatchNorm
  folded into this conv. ``out_axis`` is the kernel's output-channel axis (-2 for
  ``ConvTranspose(transpose_kernel=True)``), ``in_features`` the size of the input's last
  axis, ``macs`` the multiply-accumulates per example summed over every call.
  """

  path: str
  kind: str
  rule: int | None
  weight: Any
  act: Any
  note: str = ""
  folded_bn: str | None = None
  out_axis: int = -1
  in_features: int = 0
  groups: int = 1
  use_bias: bool = False
  kernel_shape: tuple[int, ...] | None = None
  macs: int = 0

  @property
  def quantized(self) -> bool:
    return self.weight is not None or self.act is not None


@dataclasses.dataclass(frozen=True)
class BatchNormPlan:
  """A BatchNorm call; ``follows``: the layer whose output it consumes directly (its
  normalised axis being the channels), or None."""

  path: str
  epsilon: float
  use_scale: bool
  use_bias: bool
  follows: str | None


@dataclasses.dataclass(frozen=True)
class ModelPlan:
  """Layers in first-call order, BatchNorms in call order, and the rules that matched
  no layer. Iterating yields the ``LayerPlan`` rows; ``plan[path]`` finds one."""

  layers: tuple[LayerPlan, ...]
  batch_norms: tuple[BatchNormPlan, ...] = ()
  unmatched_rules: tuple[int, ...] = ()
  products: tuple[Product, ...] = ()  # every matmul/conv of the forward (see ``record``)
  unexposed: tuple[tuple[str, str], ...] = ()  # (attention path, why its products stay float)
  params: int | None = None  # parameters of the float model (None: planned from an apply)

  def __iter__(self) -> Iterator[LayerPlan]:
    return iter(self.layers)

  def __len__(self) -> int:
    return len(self.layers)

  def __getitem__(self, key: int | str) -> LayerPlan:
    if isinstance(key, str):
      return self.by_path[key]
    return self.layers[key]

  @functools.cached_property
  def by_path(self) -> dict[str, LayerPlan]:
    return {p.path: p for p in self.layers}

  def get(self, path: str) -> LayerPlan | None:
    return self.by_path.get(path)

  @property
  def folded_bns(self) -> tuple[str, ...]:
    return tuple(p.folded_bn for p in self.layers if p.folded_bn)


# ----------------------------------------------------------------------------- recording


@dataclasses.dataclass
class _Layer:
  """Facts about one layer, accumulated over its calls."""

  path: str
  module: nn.Module
  kind: str
  out_axis: int
  in_features: int
  groups: int
  use_bias: bool
  kernel_shape: tuple[int, ...] | None
  macs: int = 0


# A layer's kind is that of the first base class it is an instance of (subclasses
# included: a ``class MyDense(nn.Dense)`` is a "dense" layer).
KIND_OF: tuple[tuple[type, str], ...] = (
    (AttentionProduct, "attention"),
    (nn.ConvTranspose, "conv_transpose"),
    (nn.Conv, "conv"),
    (nn.DenseGeneral, "dense_general"),
    (nn.Dense, "dense"),
    (nn.Einsum, "einsum"),
    (nn.Embed, "embed"),
)
WEIGHT_NAME = {"embed": "embedding"}  # the weight param of a kind, when it is not "kernel"
LAYER_METHODS = {"__call__", "attend"}  # the methods that compute (``attend``: Embed's matmul)


def kind_of(module: nn.Module) -> str | None:
  """The layer kind of ``module`` (see ``KIND_OF``), or None if it is no layer."""
  return next((k for base, k in KIND_OF if isinstance(module, base)), None)


def float_fields(module: nn.Module) -> dict[str, Any]:
  """A module's constructor fields (to rebuild it, quantized or frozen, on its scope)."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(type(module))
          if f.init and f.name not in ("parent", "name")}


def rebind(module: nn.Module) -> dict[str, Any]:
  """Constructor arguments that bind a rebuilt copy of ``module`` to its scope: the same
  variables, fresh name reservations (a ``setup`` module such as ``nn.Embed`` declares its
  params again), and the same name, so traces name its ops as the original's."""
  return {"parent": module.scope.rewound(), "name": module.name}


def use_running_average(module: nn.BatchNorm, args, kwargs) -> bool:
  """The ``use_running_average`` a BatchNorm call resolves to (field or call argument)."""
  call_ura = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
  return nn.merge_param("use_running_average", module.use_running_average, call_ura)


def call_batch_norm(next_fun: Callable, args, kwargs, module: nn.BatchNorm) -> Any:
  """A BatchNorm call; in training mode with ``batch_stats`` frozen (QAFT), it normalises
  with its running statistics instead of failing to update them."""
  if not use_running_average(module, args, kwargs) and not module.is_mutable_collection("batch_stats") and not module.is_initializing():
    x = args[0] if args else kwargs.get("x")
    frozen = nn.BatchNorm(**{**float_fields(module), "use_running_average": True}, parent=module.scope)
    return frozen(x, mask=kwargs.get("mask"))
  return next_fun(*args, **kwargs)


def first_input(args: tuple, kwargs: dict) -> Any:
  """The array a layer call computes on: its first positional argument, else its first
  keyword argument (``inputs=``, ``x=``, ``query=``)."""
  if args:
    return args[0]
  return next(iter(kwargs.values()), None)


class _Recorder:
  """The interceptor of ``record``: notes facts, changes no value."""

  def __init__(self):
    self.calls: dict[str, _Layer | ops.Add] = {}  # in first-call order
    self.batch_norms: dict[str, BatchNormPlan] = {}
    self.unexposed: dict[str, str] = {}  # attention path -> why its products stay inside it
    self._outputs: dict[int, tuple[str, Any]] = {}  # id(layer output) -> (path, output)

  def __call__(self, next_fun: Callable, args, kwargs, context) -> Any:
    m = context.module
    if context.method_name not in LAYER_METHODS:
      return next_fun(*args, **kwargs)
    if context.method_name == "attend" and not isinstance(m, nn.Embed):
      return next_fun(*args, **kwargs)
    if isinstance(m, nn.BatchNorm):
      x = first_input(args, kwargs)
      hit = self._outputs.get(id(x))
      follows = hit[0] if hit is not None and hit[1] is x and m.axis in (-1, x.ndim - 1) else None
      path = seam.module_path(m)
      self.batch_norms.setdefault(path, BatchNormPlan(path, m.epsilon, m.use_scale, m.use_bias, follows))
      return call_batch_norm(next_fun, args, kwargs, m)
    if isinstance(m, ops.Add):
      self.calls.setdefault(seam.module_path(m), m)
      return next_fun(*args, **kwargs)
    if isinstance(m, nn.MultiHeadDotProductAttention) and m.qk_attn_weights_einsum_cls is None:
      if exposes_products(m):
        return with_products(m)(*args, **kwargs)
      self.unexposed[seam.module_path(m)] = ("its attention_fn or precision is the user's: the products stay "
                                             "inside it")
      return next_fun(*args, **kwargs)
    kind = kind_of(m)
    if kind is None:
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    path = seam.module_path(m)
    if path not in self.calls:
      x = args[1] if kind == "attention" else first_input(args, kwargs)
      weight = m.scope.get_variable("params", WEIGHT_NAME.get(kind, "kernel"))
      kernel_shape = None if weight is None else tuple(nn.unbox(weight).shape)
      transposed = isinstance(m, nn.ConvTranspose) and m.transpose_kernel
      groups = int(m.feature_group_count) if isinstance(m, nn.Conv) else 1
      in_features = int(x.shape[-1]) if getattr(x, "ndim", 0) else 0
      self.calls[path] = _Layer(path, m, kind, -2 if transposed else -1, in_features, groups,
                                bool(getattr(m, "use_bias", False)), kernel_shape)
    self._outputs[id(out)] = (path, out)
    return out


@dataclasses.dataclass(frozen=True)
class ModelGraph:
  """What ``record`` saw: layer facts and add modules in first-call order, BatchNorms,
  every matmul/conv of the forward."""

  calls: tuple[tuple[str, Any], ...]  # (path, _Layer, or the ops.Add module)
  batch_norms: tuple[BatchNormPlan, ...]
  products: tuple[Product, ...] = ()
  unexposed: tuple[tuple[str, str], ...] = ()
  params: int | None = None  # parameters of the float model (None: traced from an apply)


def record(fn: Callable[[], Any], args: tuple = ()) -> ModelGraph:
  """Traces ``fn`` (a float ``init`` of the model, called with the inputs ``args``) once
  to a jaxpr (no FLOPs) and returns what it called: layers, BatchNorms, and every
  matmul/conv with its per-example MACs attributed to the layer it ran in."""
  rec = _Recorder()
  with nn.intercept_methods(rec), nn.override_named_call(True):  # name stacks attribute every op
    closed, out = jax.make_jaxpr(fn, return_shape=True)()
  layer_paths = [p for p, layer in rec.calls.items() if isinstance(layer, _Layer)]
  products = jaxpr_products(closed.jaxpr, layer_paths, batch_size(args))
  for prod in products:
    if prod.layer is not None:
      rec.calls[prod.layer].macs += prod.macs
  return ModelGraph(tuple(rec.calls.items()), tuple(rec.batch_norms.values()), products,
                    tuple(rec.unexposed.items()), _param_count(out))


def _param_count(out: Any) -> int | None:
  """Parameters in what an ``init`` returned (variables, or (output, variables)); None
  when ``fn`` was an ``apply``, which returns none."""
  for tree in (out, *(out if isinstance(out, tuple) else ())):
    if hasattr(tree, "keys") and "params" in tree:
      return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree["params"])))
  return None


# ----------------------------------------------------------------------------- decisions


def _facts(layer: _Layer | ops.Add) -> dict[str, Any]:
  if isinstance(layer, ops.Add):
    return {}
  return dict(out_axis=layer.out_axis, in_features=layer.in_features, groups=layer.groups,
              use_bias=layer.use_bias, kernel_shape=layer.kernel_shape, macs=layer.macs)


def decide(graph: ModelGraph, rules: Sequence[QuantRule]) -> ModelPlan:
  """The plan of ``rules`` over ``graph``: first matching rule per layer, by path, kind and
  position among the layers of the rule's kinds in call order (see ``QuantRule``)."""
  rows: list[tuple[str, str, Any]] = []  # path, kind, facts
  fixed: dict[str, LayerPlan] = {}  # hand-written and skipped layers: no rule applies
  for path, layer in graph.calls:
    if isinstance(layer, ops.Add):
      if layer.act_quant is not None:
        fixed[path] = LayerPlan(path, "add", None, None, layer.act_quant, "hand-written quantized layer")
      rows.append((path, "add", layer))
      continue
    m = layer.module
    facts = _facts(layer)
    if type(m) in HAND_WRITTEN:
      fixed[path] = LayerPlan(path, HAND_WRITTEN[type(m)], None, m.weight_quant, m.act_quant,
                              "hand-written quantized layer", **facts)
    rows.append((path, fixed[path].kind if path in fixed else layer.kind, layer))

  order = [(p, k) for p, k, _ in rows if p not in fixed]
  follows: dict[str, str] = {}  # layer path -> the first BatchNorm that consumes its output
  for b in graph.batch_norms:
    if b.follows is not None:
      follows.setdefault(b.follows, b.path)
  plans = []
  for path, kind, layer in rows:
    if path in fixed:
      plans.append(fixed[path])
      continue
    facts = _facts(layer)
    positions, counts = {}, {}
    for rule in rules:
      same_kind = [p for p, k in order if k in rule.kinds]
      positions[rule.kinds] = same_kind.index(path) if path in same_kind else None
      counts[rule.kinds] = len(same_kind)
    i = first_match(rules, path, kind, positions, counts)
    if i is None:
      plans.append(LayerPlan(path, kind, None, None, None, "no rule matched", **facts))
      continue
    rule = rules[i]
    folded = follows.get(path) if rule.fold_bn and kind == "conv" else None
    weight = None if kind in ACT_ONLY_KINDS else rule.weight  # adds and products have inputs, no weights
    plans.append(LayerPlan(path, kind, i, weight, rule.act, "BatchNorm folded" if folded else "", folded, **facts))
  used = {p.rule for p in plans}
  return ModelPlan(tuple(plans), graph.batch_norms, tuple(i for i in range(len(rules)) if i not in used),
                   graph.products, graph.unexposed, graph.params)
