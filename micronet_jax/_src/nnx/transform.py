"""Quantize an unmodified NNX model with the Linen rules and quantizer specs.

``quantize(model, rules, *args, **kwargs)`` plans the model exactly as ``quantize_model``
plans a Linen one (the same ``record``/``decide``, run on its Linen twin, ``twin.py``),
builds the quantizer state with ``quantize_variables`` (empty observers; learned step
sizes initialised from the float weights and from a pass over the example inputs with
the BatchNorms on the batch's statistics, as in a first training step), and returns a
copy of the model in which every layer the plan quantizes is swapped, at each of its
graph paths, for its quantized NNX counterpart (``layers.py``; the attention products:
``attention.py``). The float model is not changed. Only quantizing reads the model
through Linen: the quantized layers compute through the core on their own NNX
variables, so training and evaluation run no Linen code.

Everything after that reads the quantized NNX model through the same twin: ``plan``,
``summary``, ``convert`` (the integer ``Deploy`` that ``mj.integer_apply`` runs) work on
``bridge.linen_variables(model)``, the NNX state under Linen's collection names.

Every function takes the model's own call: positional arguments, keyword arguments and
``rngs`` reach ``model(...)`` unchanged (``calibrate``: a batch is an array or a tuple of
positional arguments). ``quantize_model`` is the one entry point for both frameworks.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from micronet_jax._src.core.rules import QuantRule
from micronet_jax._src.deploy.graph import get_path
from micronet_jax._src.deploy.integer import Deploy
from micronet_jax._src.deploy.integer import convert as linen_convert
from micronet_jax._src.flax.plan import ModelPlan
from micronet_jax._src.flax.layers import PRODUCT_NAMES
from micronet_jax._src.flax.transform import QuantizedModel, quantize_variables
from micronet_jax._src.flax.transform import quantize_model as linen_quantize_model
from micronet_jax._src.flax.transform import summary as linen_summary
from micronet_jax._src.nnx import layers
from micronet_jax._src.nnx.attention import QuantProduct, product_attention_type
from micronet_jax._src.nnx.bridge import module_paths, set_node
from micronet_jax._src.nnx.twin import call_kwargs, twin, twin_variables

# the modules whose observers calibration moves (a FoldedBatchNorm's statistics stay frozen)
OBSERVING = nnx.Any(*(nnx.OfType(t) for t in (layers.QuantOperands, layers.QuantAdd, QuantProduct)))


def _rules(model: nnx.Module) -> tuple[QuantRule, ...]:
  rules = getattr(model, "quant_rules", None)
  if rules is None:
    raise ValueError(f"{type(model).__name__} is not quantized: use micronet_jax.quantize_model(model, rules, x)")
  return rules


def _linen(model: nnx.Module) -> QuantizedModel:
  return QuantizedModel(twin(model), _rules(model))


def quantize(model: nnx.Module, rules: Sequence[QuantRule], *args: Any, **kwargs: Any) -> nnx.Module:
  """A quantized copy of ``model``: see the module docstring. ``args``/``kwargs`` are an
  example call ``model(*args, **kwargs)`` (a batch; keyword arguments and ``rngs`` reach
  the model unchanged; the plan is keyed on their shapes)."""
  if not isinstance(model, nnx.Module):
    raise TypeError(f"micronet_jax.nnx.quantize expects an nnx.Module, got {type(model).__name__}")
  rules = tuple(rules)
  for r in rules:
    if not isinstance(r, QuantRule):
      raise TypeError(f"rules must be QuantRule instances, got {r!r}")
  model = nnx.clone(model)
  nodes = module_paths(model)
  done = [p for p, (n, _) in nodes.items() if isinstance(n, layers.Quantized)]
  if done:
    raise ValueError(f"the model is already quantized (e.g. {done[0]}): quantize its float version")
  tw = twin(model)
  qlinen = QuantizedModel(tw, rules)
  plan = qlinen.plan(*args, **call_kwargs(kwargs))
  qvars = quantize_variables(qlinen, twin_variables(model, tw), *args, batch_norm_train=True, **call_kwargs(kwargs))

  def state(path: str) -> tuple[dict, Any]:
    return get_path(qvars["params"], path, {}), get_path(qvars.get("quant_stats", {}), path)

  made: dict = {}  # (mixin, user class) -> the quantized subclass, made once per call
  products: dict[str, dict] = {}  # attention path -> {product name: its plan}
  for lp in plan:
    if not lp.quantized or lp.note.startswith(("skipped", "hand-written")):
      continue
    if lp.kind == "attention":
      attn, _, name = lp.path.rpartition("/")
      products.setdefault(attn, {})[name] = lp
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
      new = layers.quantized_type(type(node), made)(node, lp.weight, lp.act, *state(lp.path), path=lp.path,
                                                    fold_into=lp.folded_bn, fold_link=folded.fold_link)
    else:
      new = layers.quantized_type(type(node), made)(node, lp.weight, lp.act, *state(lp.path), path=lp.path)
    for p in paths:
      set_node(model, p, new)
  for attn, plans in products.items():  # after its projections: the attention takes them over
    node, paths = nodes[attn]
    qps = {n: QuantProduct(plans[n].act if n in plans else None, *state(f"{attn}/{n}"), path=f"{attn}/{n}")
           for n in PRODUCT_NAMES}
    new = product_attention_type(type(node), made)(node, qps, path=attn)
    for p in paths:
      set_node(model, p, new)
  model.quant_rules = rules
  return model


def quantize_model(model: Any, rules: Sequence[QuantRule], *example_args: Any, **example_kwargs: Any) -> Any:
  """Quantizes a Linen or an NNX model by ``rules``: the one entry point.

  Args:
    model: a ``flax.linen`` Module or a ``flax.nnx`` Module, unmodified.
    rules: the quantization rules (``QuantRule``s, e.g. ``iao_rules(8, 8)``).
    *example_args: example inputs of the model's call (an NNX model is planned and its
      quantizer state built from them; unused for a Linen model, which is planned when it
      is first initialised or applied).
    **example_kwargs: keyword arguments of that call (``rngs`` included), as the model takes them.

  Returns:
    A Linen model: a ``QuantizedModel`` (``init``/``apply``). An NNX model: a quantized
    copy (``micronet_jax.nnx.quantize``).

  Raises:
    TypeError: ``model`` is neither, or an NNX model comes without example inputs.

  Example::

    >>> import jax, jax.numpy as jnp, micronet_jax as mj
    >>> from flax import nnx
    >>> class MLP(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.fc = nnx.Linear(4, 2, rngs=rngs)
    ...   def __call__(self, x):
    ...     return self.fc(x)
    >>> q = mj.quantize_model(MLP(nnx.Rngs(0)), mj.iao_rules(8, 8), jnp.ones((1, 4)))
    >>> type(q.fc).__name__
    'QuantLinear'
  """
  if isinstance(model, nnx.Module):
    if not example_args and not example_kwargs:
      raise TypeError(f"quantize_model: an NNX model ({type(model).__name__}) is planned on example inputs: "
                      "quantize_model(model, rules, x)")
    return quantize(model, rules, *example_args, **example_kwargs)
  if not isinstance(model, nn.Module):
    raise TypeError(f"quantize_model expects a flax.linen or a flax.nnx Module, got {type(model).__name__}")
  return linen_quantize_model(model, rules)


def plan(model: nnx.Module, *args: Any, **kwargs: Any) -> ModelPlan:
  """The model plan of a quantized NNX model for the call ``model(*args, **kwargs)`` (as
  ``QuantizedModel.plan``)."""
  return _linen(model).plan(*args, **call_kwargs(kwargs))


def summary(model: nnx.Module, *args: Any, **kwargs: Any) -> str:
  """``micronet_jax.summary`` of a quantized NNX model for the call ``model(*args, **kwargs)``."""
  return linen_summary(_linen(model), *args, **call_kwargs(kwargs))


def convert(model: nnx.Module, *args: Any, **kwargs: Any) -> Deploy:
  """The integer ``Deploy`` of a trained or calibrated quantized NNX model for the call
  ``model(*args, **kwargs)`` (the first positional argument is the example batch the
  deploy takes as its input); run it with ``micronet_jax.integer_apply``."""
  if not args:
    raise TypeError("convert needs an example batch: convert(model, x, ...)")
  qlinen = _linen(model)
  return linen_convert(qlinen, twin_variables(model, qlinen.model), args[0], **call_kwargs(kwargs, args[1:]))


def _dynamic(v: Any) -> bool:
  """Whether a call argument is traced (arrays, and NNX objects such as ``nnx.Rngs``,
  whose leaves are arrays) rather than static (Python values: ``train=False``)."""
  leaves = jax.tree.leaves(v)
  return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray, np.generic)) for x in leaves)


def _call(model: nnx.Module, dyn_args: tuple, dyn_kwargs: dict, static: tuple) -> Any:
  static_args, static_kwargs = static
  args = list(dyn_args)
  for i, a in static_args:
    args[i] = a
  return model(*args, **dyn_kwargs, **dict(static_kwargs))


_jit_call = nnx.jit(_call, static_argnums=3)


def calibrate(model: nnx.Module, batches: Iterable[Any], num_batches: int | None = None, **kwargs: Any
              ) -> nnx.Module:
  """PTQ: feeds ``batches`` through ``model`` in evaluation mode (BatchNorm statistics
  and dropout frozen) with only the observers moving, in place.

  Args:
    model: a quantized NNX model.
    batches: model inputs: each an array (the one positional argument) or a tuple of
      the positional arguments.
    num_batches: stop after this many (None: all).
    **kwargs: the model's keyword arguments for every call, passed unchanged (``rngs``
      included: its state moves as the model draws from it).

  Returns:
    ``model``, left in ``eval()`` mode.
  """
  model.eval()
  model.set_attributes(OBSERVING, use_running_average=False, raise_if_not_found=False)
  dyn_kwargs = {k: v for k, v in kwargs.items() if _dynamic(v)}
  static_kwargs = tuple(sorted((k, v) for k, v in kwargs.items() if k not in dyn_kwargs))
  seen = 0
  for batch in batches:
    if num_batches is not None and seen >= num_batches:
      break
    args = batch if isinstance(batch, tuple) else (batch,)
    static_args = tuple((i, a) for i, a in enumerate(args) if not _dynamic(a))
    dyn_args = tuple(a if _dynamic(a) else None for a in args)
    _jit_call(model, dyn_args, dyn_kwargs, (static_args, static_kwargs))
    seen += 1
  model.eval()
  if seen == 0:
    raise ValueError("calibration needs at least one batch")
  return model
