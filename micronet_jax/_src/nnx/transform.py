"""Quantize an unmodified NNX model with the Linen rules and quantizer specs.

``quantize(model, rules, x)`` plans the model exactly as ``quantize_model`` plans a
Linen one (the same ``record``/``decide``, run on its Linen twin, ``twin.py``), builds
the quantizer state with ``quantize_variables`` (empty observers, learned step sizes
initialised from the float weights), and returns a copy of the model in which every
layer the plan quantizes is swapped, at each of its graph paths, for its quantized NNX
counterpart (``layers.py``). The float model is not changed. Only quantizing reads the
model through Linen: the quantized layers compute through the core on their own NNX
variables, so training and evaluation run no Linen code.

Everything after that reads the quantized NNX model through the same twin: ``plan``,
``summary``, ``convert`` (the integer ``Deploy`` that ``mj.integer_apply`` runs) work on
``bridge.linen_variables(model)``, the NNX state under Linen's collection names.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from flax import nnx

from micronet_jax._src.core.rules import QuantRule
from micronet_jax._src.deploy.graph import get_path
from micronet_jax._src.deploy.integer import Deploy
from micronet_jax._src.deploy.integer import convert as linen_convert
from micronet_jax._src.flax.plan import ModelPlan
from micronet_jax._src.flax.transform import QuantizedModel, quantize_variables
from micronet_jax._src.flax.transform import summary as linen_summary
from micronet_jax._src.nnx import layers
from micronet_jax._src.nnx.bridge import module_paths, set_node
from micronet_jax._src.nnx.twin import QUANTIZED, twin, twin_variables

OBSERVING = (layers.QuantLinear, layers.QuantConv, layers.QuantConvTranspose, layers.QuantAdd)
# float layer type -> its quantized counterpart (pairs: nothing at module level is mutable)
_SWAP = ((nnx.Linear, layers.QuantLinear), (nnx.Conv, layers.QuantConv), (nnx.ConvTranspose, layers.QuantConvTranspose))


def _quantized_type(node: nnx.Module) -> type:
  for float_type, quant_type in _SWAP:
    if type(node) is float_type:
      return quant_type
  raise TypeError(f"no quantized NNX layer for {type(node).__name__}")


def _rules(model: nnx.Module) -> tuple[QuantRule, ...]:
  rules = getattr(model, "quant_rules", None)
  if rules is None:
    raise ValueError(f"{type(model).__name__} is not quantized: use micronet_jax.nnx.quantize(model, rules, x)")
  return rules


def _linen(model: nnx.Module) -> QuantizedModel:
  return QuantizedModel(twin(model), _rules(model))


def quantize(model: nnx.Module, rules: Sequence[QuantRule], *args: Any, **kwargs: Any) -> nnx.Module:
  """A quantized copy of ``model``: see the module docstring. ``args``/``kwargs`` are
  example inputs of ``model(...)`` (a batch; the plan is keyed on their shapes)."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"micronet_jax.nnx.quantize expects an nnx.Module, got {type(model).__name__}")
  rules = tuple(rules)
  for r in rules:
    if not isinstance(r, QuantRule):
      raise TypeError(f"rules must be QuantRule instances, got {r!r}")
  model = nnx.clone(model)
  nodes = module_paths(model)
  done = [p for p, (n, _) in nodes.items() if isinstance(n, QUANTIZED)]
  if done:
    raise ValueError(f"the model is already quantized (e.g. {done[0]}): quantize its float version")
  tw = twin(model)
  qlinen = QuantizedModel(tw, rules)
  plan = qlinen.plan(*args, **kwargs)
  qvars = quantize_variables(qlinen, twin_variables(model, tw), *args, **kwargs)

  def state(path: str) -> tuple[dict, Any]:
    return get_path(qvars["params"], path, {}), get_path(qvars.get("quant_stats", {}), path)

  for lp in plan:
    if not lp.quantized or lp.note.startswith(("skipped", "hand-written")):
      continue
    node, paths = nodes[lp.path]
    if lp.kind == "add":
      new = layers.QuantAdd(lp.act, state(lp.path)[1], path=lp.path)
    elif lp.folded_bn:
      rule = rules[lp.rule]
      bn, bn_paths = nodes[lp.folded_bn]
      folded = layers.FoldedBatchNorm(bn, lp.folded_bn, lp.path, lp.weight, rule.bn_calib, rule.bn_init_from_batch,
                                      *state(lp.folded_bn))
      for p in bn_paths:
        set_node(model, p, folded)
      new = layers.QuantConv(node, lp.weight, lp.act, *state(lp.path), path=lp.path, fold_into=lp.folded_bn,
                             fold_link=folded.fold_link)
    else:
      new = _quantized_type(node)(node, lp.weight, lp.act, *state(lp.path), path=lp.path)
    for p in paths:
      set_node(model, p, new)
  model.quant_rules = rules
  return model


def plan(model: nnx.Module, *args: Any, **kwargs: Any) -> ModelPlan:
  """The model plan of a quantized NNX model for inputs ``args`` (as ``QuantizedModel.plan``)."""
  return _linen(model).plan(*args, **kwargs)


def summary(model: nnx.Module, *args: Any, **kwargs: Any) -> str:
  """``micronet_jax.summary`` of a quantized NNX model (example inputs ``args``)."""
  return linen_summary(_linen(model), *args, **kwargs)


def convert(model: nnx.Module, x: Any) -> Deploy:
  """The integer ``Deploy`` of a trained or calibrated quantized NNX model (``x``: an
  example batch); run it with ``micronet_jax.integer_apply``."""
  qlinen = _linen(model)
  return linen_convert(qlinen, twin_variables(model, qlinen.model), x)


def calibrate(model: nnx.Module, batches: Iterable[Any], num_batches: int | None = None) -> nnx.Module:
  """PTQ: feeds ``batches`` through ``model`` in evaluation mode (BatchNorm statistics
  and dropout frozen) with only the observers moving, in place; returns ``model``, left
  in ``eval()`` mode."""
  model.eval()
  model.set_attributes(*OBSERVING, use_running_average=False, raise_if_not_found=False)
  step = nnx.jit(lambda m, x: m(x))
  seen = 0
  for x in batches:
    if num_batches is not None and seen >= num_batches:
      break
    step(model, x)
    seen += 1
  model.eval()
  if seen == 0:
    raise ValueError("calibration needs at least one batch")
  return model
