"""Turn an unmodified Flax Linen model into a quantized one, and float variables into
QAT variables.

``quantize_model(model, rules)`` returns a ``QuantizedModel`` with ``init``/``apply``
like any Linen module. While it runs, ``nn.intercept_methods`` intercepts the
``__call__`` of every ``nn.Dense``, ``nn.Conv`` and ``nn.ConvTranspose``, wherever it is
nested (compact or setup submodules, lists of layers, ``nn.Sequential``, shared layers).
For a layer a rule quantizes, the interceptor runs ``QuantDense``/``QuantConv``/
``QuantConvTranspose`` with the same fields, bound to the *same scope*, so parameters
keep their paths and names and only the ``quant_stats`` collection is added. Nothing in
JAX or Flax is patched; outside ``init``/``apply`` the model is untouched.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

from micronet_jax import ops
from micronet_jax import quantizers as qz
from micronet_jax.bn_fold import folded_conv_bn
from micronet_jax.layers import (LAYER_KIND, QUANTIZED_COUNTERPART, QuantConv, QuantConvTranspose, QuantDense,
                                 input_scale, quantize_input)
from micronet_jax.rules import QuantRule, first_match
from micronet_jax.treeutil import shape_mismatches

_HAND_WRITTEN = {QuantDense: "dense", QuantConv: "conv", QuantConvTranspose: "conv_transpose"}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What the transform does with one layer (one row of ``summary``)."""

  path: str
  kind: str
  rule: int | None  # index of the deciding rule, None when no rule matched
  weight: Any
  act: Any
  note: str = ""
  folded_bn: str | None = None  # path of the BatchNorm folded into this conv

  @property
  def quantized(self) -> bool:
    return self.weight is not None or self.act is not None


def _float_fields(module: nn.Module) -> dict[str, Any]:
  return {
      f.name: getattr(module, f.name)
      for f in dataclasses.fields(type(module))
      if f.init and f.name not in ("parent", "name")
  }


class _Planner:
  """Decides each layer once per trace and, when ``swap`` is set, swaps it.

  A discovery pass (``swap=False``) records the call order and which ``nn.BatchNorm``
  directly consumes which ``nn.Conv`` output (the same array object); the swapping pass
  uses both, for negative rule indices and for BatchNorm folding.
  """

  def __init__(self, rules: Sequence[QuantRule], order: Sequence[tuple[str, str]] | None, swap: bool,
               bn_pairs: dict[str, str] | None = None):
    self.rules = tuple(rules)
    self.swap = swap
    self.plans: dict[str, LayerPlan] = {}
    self.order: list[tuple[str, str]] = list(order or [])
    self.complete = order is not None
    self.bn_pairs: dict[str, str] = dict(bn_pairs or {})  # conv path -> BN path
    self._conv_outputs: dict[int, str] = {}  # discovery: id(conv output) -> conv path
    self._pending: dict[int, tuple] = {}  # swapping: id(float conv output) -> fold inputs
    self._own_calls = 0  # > 0 while the folded computation runs its own nn.Conv

  def _positions(self, path: str) -> tuple[dict, dict]:
    positions, counts = {}, {}
    for rule in self.rules:
      same_kind = [p for p, k in self.order if k in rule.kinds]
      positions[rule.kinds] = same_kind.index(path) if path in same_kind else None
      if self.complete:
        counts[rule.kinds] = len(same_kind)
    return positions, counts

  def _plan(self, path: str, module: nn.Module) -> LayerPlan:
    if type(module) in _HAND_WRITTEN or (isinstance(module, ops.Add) and module.act_quant is not None):
      kind = "add" if isinstance(module, ops.Add) else _HAND_WRITTEN[type(module)]
      return LayerPlan(path, kind, None, getattr(module, "weight_quant", None), module.act_quant,
                       "hand-written quantized layer")
    kind = "add" if isinstance(module, ops.Add) else LAYER_KIND.get(type(module))
    if kind is None:  # a user subclass of a float layer: its __call__ may differ, leave it
      base = next(b for b in LAYER_KIND if isinstance(module, b))
      return LayerPlan(path, LAYER_KIND[base], None, None, None,
                       f"skipped: {type(module).__name__} subclasses nn.{base.__name__}")
    if (path, kind) not in self.order:
      self.order.append((path, kind))
    positions, counts = self._positions(path)
    i = first_match(self.rules, path, kind, positions, counts)
    if i is None:
      return LayerPlan(path, kind, None, None, None, "no rule matched")
    rule = self.rules[i]
    folded = self.bn_pairs.get(path) if rule.fold_bn and kind == "conv" else None
    weight = None if kind == "add" else rule.weight  # an add has inputs, no weights
    return LayerPlan(path, kind, i, weight, rule.act, "BatchNorm folded" if folded else "", folded)

  def _add(self, next_fun: Callable, args, kwargs, module: ops.Add) -> Any:
    path = "/".join(module.scope.path)
    plan = self.plans.get(path)
    if plan is None:
      plan = self.plans[path] = self._plan(path, module)
    if not self.swap or plan.act is None or module.act_quant is not None:
      return next_fun(*args, **kwargs)
    return ops.Add(act_quant=plan.act, parent=module.scope)(*args, **kwargs)

  def _batch_norm(self, next_fun: Callable, args, kwargs, module: nn.BatchNorm) -> Any:
    x = args[0] if args else kwargs.get("x")
    call_ura = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
    ura = nn.merge_param("use_running_average", module.use_running_average, call_ura)
    pending = self._pending.pop(id(x), None) if self.swap else None
    if pending is None:
      if not ura and not module.is_mutable_collection("batch_stats") and not module.is_initializing():
        # Statistics frozen (QAFT): a BatchNorm in training mode normalises with its
        # running statistics instead of failing to update them.
        frozen = nn.BatchNorm(**{**_float_fields(module), "use_running_average": True}, parent=module.scope)
        return frozen(x, mask=kwargs.get("mask"))
      return next_fun(*args, **kwargs)
    conv, x_q, s_in, plan = pending
    self._own_calls += 1
    try:
      return folded_conv_bn(conv, module, x_q, x, plan.weight, self.rules[plan.rule].bn_calib, ura, s_in)
    finally:
      self._own_calls -= 1

  def __call__(self, next_fun: Callable, args, kwargs, context) -> Any:
    module = context.module
    if context.method_name != "__call__" or self._own_calls:
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm):
      if not self.swap:  # discovery: is the input a conv's output, as it is?
        x = args[0] if args else kwargs.get("x")
        conv_path = self._conv_outputs.get(id(x))
        if conv_path is not None and module.axis in (-1, x.ndim - 1):
          self.bn_pairs.setdefault(conv_path, "/".join(module.scope.path))
      return self._batch_norm(next_fun, args, kwargs, module)
    if isinstance(module, ops.Add):
      return self._add(next_fun, args, kwargs, module)
    if not isinstance(module, tuple(LAYER_KIND)):
      return next_fun(*args, **kwargs)
    path = "/".join(module.scope.path)
    plan = self.plans.get(path)
    if plan is None:
      plan = self.plans[path] = self._plan(path, module)
    if not self.swap:
      out = next_fun(*args, **kwargs)
      if type(module) is nn.Conv:
        self._conv_outputs[id(out)] = path
      return out
    if plan.folded_bn is None and (not plan.quantized or type(module) not in QUANTIZED_COUNTERPART):
      return next_fun(*args, **kwargs)
    if plan.folded_bn is not None:
      # Run the float conv (its output feeds the batch statistics) and leave the
      # quantized, folded computation to the BatchNorm call that consumes it.
      x_q = quantize_input(module, args[0], plan.act)
      z = next_fun(*args, **kwargs)
      self._pending[id(z)] = (module, x_q, input_scale(module, plan.act), plan)
      return z
    quant_cls = QUANTIZED_COUNTERPART[type(module)]
    layer = quant_cls(**_float_fields(module), weight_quant=plan.weight, act_quant=plan.act, parent=module.scope)
    return layer(*args, **kwargs)

  def unmatched_rules(self) -> list[int]:
    used = {p.rule for p in self.plans.values()}
    return [i for i in range(len(self.rules)) if i not in used]


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """A float Linen model plus quantization rules; ``init``/``apply`` as ``nn.Module``.

  The model is not modified: ``model.apply`` still runs in float, ``QuantizedModel.apply``
  runs the quantized version on the same variables (plus ``quant_stats``).
  """

  model: nn.Module
  rules: tuple[QuantRule, ...]

  def _needs_discovery(self) -> bool:
    return any((r.index is not None and r.index < 0) or r.fold_bn for r in self.rules)

  def _run(self, fn: Callable[[], Any], swap: bool = True, warn: bool = True) -> tuple[Any, _Planner]:
    order, pairs = None, None
    if self._needs_discovery():
      recorder = _Planner(self.rules, None, swap=False)
      with nn.intercept_methods(recorder):
        jax.eval_shape(fn)
      order, pairs = recorder.order, recorder.bn_pairs
    planner = _Planner(self.rules, order, swap=swap, bn_pairs=pairs)
    with nn.intercept_methods(planner):
      out = fn()
    for i in planner.unmatched_rules() if warn else ():
      warnings.warn(f"quantization rule {i} {self.rules[i]} matched no layer of {type(self.model).__name__}; "
                    f"layers: {[p for p in planner.plans]}", stacklevel=3)
    return out, planner

  def init(self, rngs, *args, **kwargs):
    return self._run(lambda: self.model.init(rngs, *args, **kwargs))[0]

  def init_with_output(self, rngs, *args, **kwargs):
    return self._run(lambda: self.model.init_with_output(rngs, *args, **kwargs))[0]

  def apply(self, variables, *args, **kwargs):
    return self._run(lambda: self.model.apply(variables, *args, **kwargs))[0]

  def plan(self, *args, **kwargs) -> list[LayerPlan]:
    """The per-layer decisions for inputs ``args`` (abstract evaluation, no FLOPs)."""
    _, planner = self._run(lambda: jax.eval_shape(lambda: self.model.init(jax.random.key(0), *args, **kwargs)),
                           swap=False, warn=False)
    return list(planner.plans.values())


def quantize_model(model: nn.Module, rules: Sequence[QuantRule]) -> QuantizedModel:
  """Wraps an unmodified Linen model so its dense/conv layers are quantized by ``rules``."""
  if not isinstance(model, nn.Module):
    raise TypeError(f"quantize_model expects a flax.linen Module, got {type(model).__name__}")
  rules = tuple(rules)
  for r in rules:
    if not isinstance(r, QuantRule):
      raise TypeError(f"rules must be QuantRule instances, got {r!r}")
  return QuantizedModel(model, rules)


def quantize_variables(qmodel: QuantizedModel, float_variables: dict, *args, **kwargs) -> dict:
  """Float variables -> QAT variables for ``qmodel``.

  The float collections (``params``, ``batch_stats``, ...) are returned as they are,
  after checking that every path and shape matches the quantized model; a fresh
  ``quant_stats`` collection (empty observers) is added. ``args``/``kwargs`` are example
  inputs for the model's ``__call__``, as for ``init``.

  Raises:
    ValueError: listing every path that is missing, extra or of the wrong shape.
  """
  init = lambda: qmodel.init(jax.random.key(0), *args, **kwargs)
  shapes = jax.eval_shape(init)
  problems = []
  for col, tree in shapes.items():
    if col == "quant_stats":
      continue
    problems += shape_mismatches(tree, float_variables.get(col, {}), prefix=col)
  if problems:
    raise ValueError(f"float variables do not fit {type(qmodel.model).__name__}:\n  " + "\n  ".join(problems))
  out = dict(float_variables)
  if "quant_stats" in shapes:
    out["quant_stats"] = jax.jit(lambda: init()["quant_stats"])()
  return out


def summary(qmodel: QuantizedModel, *args, print_fn: Callable[[str], Any] | None = print, **kwargs) -> str:
  """Table of every dense/conv layer: path, kind, float or quantized, quantizers, bits.

  Returns the table and prints it (``print_fn=None`` to only return it).
  """
  plans = qmodel.plan(*args, **kwargs)
  rows = [("layer", "kind", "mode", "weight quantizer", "w bits", "act quantizer", "a bits", "rule")]
  for p in plans:
    mode = "quantized" if p.quantized else "float"
    rows.append((
        p.path, p.kind, mode,
        qz.describe(p.weight), str(p.weight.bits) if p.weight is not None else "32",
        qz.describe(p.act), str(p.act.bits) if p.act is not None else "32",
        ": ".join(str(part) for part in (p.rule, p.note) if part not in (None, "")) or "-",
    ))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  fmt = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
  lines = [fmt(rows[0]), "-+-".join("-" * w for w in widths), *map(fmt, rows[1:])]
  used = {p.rule for p in plans}
  lines += [f"rule {i} matched no layer: {r}" for i, r in enumerate(qmodel.rules) if i not in used]
  n_q = sum(p.quantized for p in plans)
  lines.append(f"{n_q} of {len(plans)} layers quantized")
  text = "\n".join(lines)
  if print_fn is not None:
    print_fn(text)
  return text
