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
import inspect
import warnings
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np

from micronet_jax._src.flax import ops

from micronet_jax._src.flax import seam
from micronet_jax._src.core import quantizers as qz
from micronet_jax._src.flax.bn_fold import folded_conv_bn
from micronet_jax._src.flax.layers import (AttentionProduct, QuantOperands, exposes_products, input_scale,
                                           kernel_out_axes, quantize_input, with_products)
from micronet_jax._src.flax.plan import (HAND_WRITTEN, LAYER_METHODS, WEIGHT_NAME, LayerPlan, ModelPlan,
                                        call_batch_norm, decide, float_fields, kind_of, rebind, record,
                                        use_running_average)
from micronet_jax._src.core.rules import QuantRule
from micronet_jax._src.core.treeutil import shape_mismatches

_FLAX_CALL_KWARGS = ("rngs", "mutable", "capture_intermediates")  # not the model's own inputs


def eval_kwargs(model: nn.Module, kwargs: dict) -> dict:
  """``kwargs`` for an evaluation call of ``model`` (calibration, conversion): as given,
  plus ``train=False`` when the model's ``__call__`` has a ``train`` parameter that
  ``kwargs`` does not set. Nothing is added to a model without one (a language model, a
  VAE), so any call signature passes through."""
  try:
    takes_train = "train" in inspect.signature(model.__call__).parameters
  except (TypeError, ValueError):
    takes_train = False
  return {"train": False, **kwargs} if takes_train and "train" not in kwargs else dict(kwargs)


def _plan_key(args: tuple, kwargs: dict) -> tuple:
  """What a plan depends on: the model's inputs by tree structure, shape and dtype, and
  its static keyword arguments (``train=...``), not their values."""

  def leaf(v):
    if hasattr(v, "shape") and hasattr(v, "dtype"):
      return (tuple(v.shape), str(v.dtype))
    try:
      hash(v)
      return v
    except TypeError:
      return type(v).__name__

  leaves, tree = jax.tree.flatten((args, {k: v for k, v in kwargs.items() if k not in _FLAX_CALL_KWARGS}))
  return tree, tuple(leaf(v) for v in leaves)


def _already_quantized(module: nn.Module) -> bool:
  """Whether ``module`` is a layer the swap itself built (its call is the quantized one)."""
  if isinstance(module, AttentionProduct):
    return module.act_quant is not None
  return isinstance(getattr(module, "promote_dtype", None), QuantOperands)


class _Swapper:
  """Runs the quantized version of every layer the plan quantizes, on the layer's scope.

  A conv with a folded BatchNorm runs in float (its output feeds the batch statistics)
  and leaves the quantized, folded computation to the BatchNorm call that consumes it.
  """

  def __init__(self, plan: ModelPlan, rules: Sequence[QuantRule]):
    self.plan = plan.by_path
    self.rules = tuple(rules)
    self._pending: dict[int, tuple] = {}  # id(float conv output) -> fold inputs
    self._own_calls = 0  # > 0 while the folded computation runs its own nn.Conv

  def _layer_plan(self, module: nn.Module) -> LayerPlan:
    path = seam.module_path(module)
    plan = self.plan.get(path)
    if plan is None:
      raise ValueError(f"layer {path} ({type(module).__name__}) was not called when the model was planned: does "
                       "the model take a different path for these inputs? (plans are keyed on the input shapes "
                       "and the static keyword arguments)")
    return plan

  def _batch_norm(self, next_fun: Callable, args, kwargs, module: nn.BatchNorm) -> Any:
    x = args[0] if args else kwargs.get("x")
    pending = self._pending.pop(id(x), None)
    if pending is None:
      return call_batch_norm(next_fun, args, kwargs, module)
    ura = use_running_average(module, args, kwargs)
    conv, x_q, s_in, plan = pending
    self._own_calls += 1
    try:
      return folded_conv_bn(conv, module, x_q, x, plan.weight, self.rules[plan.rule].bn_calib, ura, s_in,
                            init_from_batch=self.rules[plan.rule].bn_init_from_batch)
    finally:
      self._own_calls -= 1

  def __call__(self, next_fun: Callable, args, kwargs, context) -> Any:
    module = context.module
    if context.method_name not in LAYER_METHODS or self._own_calls:
      return next_fun(*args, **kwargs)
    if context.method_name == "attend" and not isinstance(module, nn.Embed):
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm):
      return self._batch_norm(next_fun, args, kwargs, module)
    if isinstance(module, ops.Add):
      plan = self._layer_plan(module)
      if plan.act is None or module.act_quant is not None:
        return next_fun(*args, **kwargs)
      return ops.Add(act_quant=plan.act, parent=module.scope)(*args, **kwargs)
    if isinstance(module, nn.MultiHeadDotProductAttention) and module.qk_attn_weights_einsum_cls is None:
      if exposes_products(module):  # as the plan saw it: its products are layers
        return with_products(module)(*args, **kwargs)
      return next_fun(*args, **kwargs)
    kind = kind_of(module)
    if kind is None or _already_quantized(module):
      return next_fun(*args, **kwargs)
    plan = self._layer_plan(module)
    if plan.folded_bn is not None:
      x_q = quantize_input(module, args[0], plan.act)
      z = next_fun(*args, **kwargs)
      self._pending[id(z)] = (module, x_q, input_scale(module, plan.act), plan)
      return z
    if not plan.quantized or type(module) in HAND_WRITTEN:
      return next_fun(*args, **kwargs)
    if kind == "attention":
      return AttentionProduct(act_quant=plan.act, parent=module.scope)(*args, **kwargs)
    out_axes = kernel_out_axes(module, len(plan.kernel_shape or ()), args, kwargs)
    hook = QuantOperands(module.promote_dtype, plan.weight, plan.act, out_axes, WEIGHT_NAME.get(kind, "kernel"))
    layer = hook.bind(type(module)(**{**float_fields(module), "promote_dtype": hook}, **rebind(module)))
    return getattr(layer, context.method_name)(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class QuantizedModel:
  """A float Linen model plus quantization rules; ``init``/``apply`` as ``nn.Module``.

  The model is not modified: ``model.apply`` still runs in float, ``QuantizedModel.apply``
  runs the quantized version on the same variables (plus ``quant_stats``). The plan (which
  layer gets what) is traced once per input signature and kept (``plan``), so a jitted
  step traces the model once for the plan and once for itself.
  """

  model: nn.Module
  rules: tuple[QuantRule, ...]
  _plans: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  def _plan(self, key: tuple, fn: Callable[[], Any], warn: bool, args: tuple = ()) -> ModelPlan:
    plan = self._plans.get(key)
    if plan is None:
      plan = self._plans[key] = decide(record(fn, args), self.rules)
      kinds = {p.kind for p in plan}
      # A rule for kinds the model does not have (a preset's attention rule on a CNN) is
      # not a mistake worth a warning; summary still lists it.
      for i in (i for i in plan.unmatched_rules if kinds & set(self.rules[i].kinds)) if warn else ():
        warnings.warn(f"quantization rule {i} {self.rules[i]} matched no layer of "
                      f"{getattr(self.model, 'nnx_model_name', type(self.model).__name__)}; "
                      f"layers: {[p.path for p in plan]}", stacklevel=4)
    return plan

  def _run(self, fn: Callable[[], Any], args: tuple, kwargs: dict) -> Any:
    plan = self._plan(_plan_key(args, kwargs), fn, warn=True, args=args)
    with nn.intercept_methods(_Swapper(plan, self.rules)):
      return fn()

  def init(self, rngs, *args, **kwargs):
    return self._run(lambda: self.model.init(rngs, *args, **kwargs), args, kwargs)

  def init_with_output(self, rngs, *args, **kwargs):
    return self._run(lambda: self.model.init_with_output(rngs, *args, **kwargs), args, kwargs)

  def apply(self, variables, *args, **kwargs):
    return self._run(lambda: self.model.apply(variables, *args, **kwargs), args, kwargs)

  def plan(self, *args, **kwargs) -> ModelPlan:
    """The per-layer decisions and facts for inputs ``args`` (abstract evaluation, no FLOPs;
    traced once per input signature)."""
    return self._plan(_plan_key(args, kwargs), lambda: self.model.init(jax.random.key(0), *args, **kwargs),
                      warn=False, args=args)


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
  after checking that every path and shape matches the float model; a fresh
  ``quant_stats`` collection (empty observers) is added, and the trainable params of
  quantizers that have them (``params/<layer>/<role>_<name>``) are initialised by the
  quantizers from the float weights (and, for inputs, from the example inputs).
  ``args``/``kwargs`` are example inputs for the model's ``__call__``, as for ``init``;
  pass a training batch in training mode (e.g. ``train=True``) so that learned input
  steps start from the activations training will see (``rngs=`` is passed on).

  Raises:
    ValueError: listing every path that is missing, extra or of the wrong shape.
  """
  key = jax.random.key(0)
  # Random streams a training-mode pass draws from (dropout), unless the caller gives its own.
  rngs = {"params": key, "dropout": key, **(kwargs.pop("rngs", None) or {})}
  float_shapes = jax.eval_shape(lambda: qmodel.model.init(rngs, *args, **kwargs))
  problems = []
  for col, tree in float_shapes.items():
    problems += shape_mismatches(tree, float_variables.get(col, {}), prefix=col)
  if problems:
    raise ValueError(f"float variables do not fit {type(qmodel.model).__name__}:\n  " + "\n  ".join(problems))
  shapes = jax.eval_shape(lambda: qmodel.init(rngs, *args, **kwargs))
  out = dict(float_variables)
  if "quant_stats" in shapes:
    out["quant_stats"] = jax.jit(lambda: qmodel.init(rngs, *args, **kwargs)["quant_stats"])()
  if len(jax.tree.leaves(shapes.get("params", {}))) > len(jax.tree.leaves(float_shapes.get("params", {}))):
    # Quantizer params: created by apply from the float values it reads (statistics stay
    # empty). Called with train=True this is a training-mode pass: BatchNorm normalises with
    # the batch's statistics, as in the first training step (a fresh model's running
    # statistics would give steps 2-1000x too small); its statistic updates are dropped.
    mutable = ["params", *(["batch_stats"] if "batch_stats" in out else [])]
    _, new = jax.jit(lambda v: qmodel.apply(v, *args, rngs=rngs, mutable=mutable, **kwargs))(out)
    out["params"] = new["params"]
  return out


def _share(part: float, whole: float) -> str:
  return f"{100.0 * part / whole:.1f}%" if whole else "-"


def summary(qmodel: QuantizedModel, *args, **kwargs) -> str:
  """A table of every layer and every matmul/conv of the traced forward, and the totals.

  One row per layer (path, kind, float or quantized, quantizers, bits, its share of the
  model's multiply-accumulates, the deciding rule or why it stays float), then one row
  per matmul/conv that ran outside every layer (e.g. a ``jnp.dot`` in the model's own
  code, or the products of an attention whose ``attention_fn`` is the user's), then the
  rules that matched nothing and the line "quantized: N% of MACs, M% of parameters".
  MACs are counted from the jaxpr of the forward (``dot_general`` and
  ``conv_general_dilated``), so nothing the model computes is left out; a layer counts
  as quantized when its rule gives it a weight or an input quantizer (the bit columns
  say which). ``args``/``kwargs``: example model inputs, as for ``init``.
  """
  plans = qmodel.plan(*args, **kwargs)
  total_macs = sum(p.macs for p in plans.products)
  total_params = plans.params
  if total_params is None:  # planned from an apply: count them from the float init's shapes
    shapes = jax.eval_shape(lambda: qmodel.model.init(jax.random.key(0), *args, **kwargs))
    total_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes.get("params", {}))))
  rows = [("layer", "kind", "mode", "weight quantizer", "w bits", "act quantizer", "a bits", "MACs", "rule / why")]
  for p in plans:
    mode = "quantized" if p.quantized else "float"
    rows.append((
        p.path, p.kind, mode,
        qz.describe(p.weight), str(p.weight.bits) if p.weight is not None else "32",
        qz.describe(p.act), str(p.act.bits) if p.act is not None else "32",
        _share(p.macs, total_macs),
        ": ".join(str(part) for part in (p.rule, p.note) if part not in (None, "")) or "-",
    ))
  unexposed = dict(plans.unexposed)
  outside: dict[tuple[str, str], int] = {}
  for prod in plans.products:
    if prod.layer is None:
      outside[(prod.path, prod.primitive)] = outside.get((prod.path, prod.primitive), 0) + prod.macs
  for (path, prim), macs in outside.items():
    why = next((f"inside attention {a}: {w}" for a, w in unexposed.items() if path == a or path.startswith(a + "/")),
               "not a Flax layer micronet-jax quantizes")
    rows.append((path or "(model)", prim, "float", "-", "32", "-", "32", _share(macs, total_macs), why))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  fmt = lambda r: " | ".join(c.ljust(w) for c, w in zip(r, widths))
  lines = [fmt(rows[0]), "-+-".join("-" * w for w in widths), *map(fmt, rows[1:])]
  lines += [f"rule {i} matched no layer: {qmodel.rules[i]}" for i in plans.unmatched_rules]
  q_macs = sum(p.macs for p in plans if p.quantized)
  q_params = sum(int(np.prod(p.kernel_shape)) for p in plans if p.weight is not None and p.kernel_shape)
  lines.append(f"{sum(p.quantized for p in plans)} of {len(plans)} layers quantized; "
               f"quantized: {_share(q_macs, total_macs)} of MACs, {_share(q_params, total_params)} of parameters")
  return "\n".join(lines)
