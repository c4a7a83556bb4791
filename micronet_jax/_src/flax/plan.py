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
from micronet_jax._src.flax.layers import LAYER_KIND, QuantConv, QuantConvTranspose, QuantDense
from micronet_jax._src.core.rules import QuantRule, first_match

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
  out_axis: int
  in_features: int
  groups: int
  use_bias: bool
  kernel_shape: tuple[int, ...] | None
  macs: int


def layer_macs(module: nn.Module, example_out_shape: tuple[int, ...], kernel_shape: tuple[int, ...]) -> int:
  """Multiply-accumulates of one call for one example (``example_out_shape``: the output
  without its batch axis, so a symbolic batch, as under ``jax.export``, never enters):
  every output element is one dot product over the kernel's input slice (per group); a
  transposed conv scatters each input element through the kernel instead."""
  contraction = int(np.prod(kernel_shape[:-1]))
  if isinstance(module, nn.ConvTranspose):
    contraction = int(np.prod(kernel_shape[:-2])) * kernel_shape[-2]
    return int(np.prod(example_out_shape)) * contraction // int(np.prod(module.strides or (1,)))
  return int(np.prod(example_out_shape)) * contraction


def float_fields(module: nn.Module) -> dict[str, Any]:
  """A module's constructor fields (to rebuild it, quantized or frozen, on its scope)."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(type(module))
          if f.init and f.name not in ("parent", "name")}


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


class _Recorder:
  """The interceptor of ``record``: notes facts, changes nothing."""

  def __init__(self):
    self.calls: dict[str, _Layer | ops.Add] = {}  # in first-call order
    self.batch_norms: dict[str, BatchNormPlan] = {}
    self._outputs: dict[int, tuple[str, Any]] = {}  # id(layer output) -> (path, output)

  def __call__(self, next_fun: Callable, args, kwargs, context) -> Any:
    m = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(m, nn.BatchNorm):
      x = args[0] if args else kwargs.get("x")
      hit = self._outputs.get(id(x))
      follows = hit[0] if hit is not None and hit[1] is x and m.axis in (-1, x.ndim - 1) else None
      path = seam.module_path(m)
      self.batch_norms.setdefault(path, BatchNormPlan(path, m.epsilon, m.use_scale, m.use_bias, follows))
      return call_batch_norm(next_fun, args, kwargs, m)
    if isinstance(m, ops.Add):
      self.calls.setdefault(seam.module_path(m), m)
      return next_fun(*args, **kwargs)
    if not isinstance(m, tuple(LAYER_KIND)):
      return next_fun(*args, **kwargs)
    out = next_fun(*args, **kwargs)
    path = seam.module_path(m)
    x = args[0] if args else kwargs.get("inputs")
    kernel = m.scope.get_variable("params", "kernel")
    kernel_shape = None if kernel is None else tuple(kernel.shape)
    macs = 0 if kernel is None else layer_macs(m, out.shape[1:] if x.ndim > 1 else out.shape, kernel_shape)
    if path in self.calls:
      self.calls[path].macs += macs
    else:
      transposed = isinstance(m, nn.ConvTranspose) and m.transpose_kernel
      groups = int(m.feature_group_count) if isinstance(m, nn.Conv) else 1
      self.calls[path] = _Layer(path, m, -2 if transposed else -1, int(x.shape[-1]), groups, bool(m.use_bias),
                                kernel_shape, macs)
    self._outputs[id(out)] = (path, out)
    return out


@dataclasses.dataclass(frozen=True)
class ModelGraph:
  """What ``record`` saw: layer facts and add modules in first-call order, BatchNorms."""

  calls: tuple[tuple[str, Any], ...]  # (path, _Layer, or the ops.Add module)
  batch_norms: tuple[BatchNormPlan, ...]


def record(fn: Callable[[], Any]) -> ModelGraph:
  """Traces ``fn`` abstractly (no FLOPs) and returns what it called."""
  rec = _Recorder()
  with nn.intercept_methods(rec):
    jax.eval_shape(fn)
  return ModelGraph(tuple(rec.calls.items()), tuple(rec.batch_norms.values()))


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
    elif type(m) not in LAYER_KIND:  # a user subclass of a float layer: its __call__ may differ
      base = next(b for b in LAYER_KIND if isinstance(m, b))
      fixed[path] = LayerPlan(path, LAYER_KIND[base], None, None, None,
                              f"skipped: {type(m).__name__} subclasses nn.{base.__name__}", **facts)
    rows.append((path, fixed[path].kind if path in fixed else LAYER_KIND[type(m)], layer))

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
    weight = None if kind == "add" else rule.weight  # an add has inputs, no weights
    plans.append(LayerPlan(path, kind, i, weight, rule.act, "BatchNorm folded" if folded else "", folded, **facts))
  used = {p.rule for p in plans}
  return ModelPlan(tuple(plans), graph.batch_norms, tuple(i for i in range(len(rules)) if i not in used))
