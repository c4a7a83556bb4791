"""Post-training quantization: run calibration batches through the observers, freeze.

``calibrate(qmodel, variables, batches)`` applies the quantized model in evaluation
mode (``train=False`` for a model that takes ``train``: BatchNorm uses and keeps its running statistics, dropout is off,
nothing trains) with only ``quant_stats`` mutable, so the observers, and nothing else,
see the calibration data. The returned variables evaluate with the frozen ranges.

Methods (``ptq_rules(method=...)``): ``minmax``, ``moving_average``, ``percentile``
(micronet's: |x| at p = 0.999999, moving average 0.1) and ``mse`` (the clipping value
that minimises the batch's quantization MSE, moving-averaged).
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
from tqdm.auto import tqdm

from micronet_jax._src.core import observers as obs
from micronet_jax._src.core.rules import QuantRule, iao_rules
from micronet_jax._src.flax.transform import QuantizedModel, eval_kwargs

METHODS = tuple(obs.OBSERVERS)


def make_observer(method: str, a_bits: int = 8, percentile: float = 0.999999) -> obs.Observer:
  if method not in obs.OBSERVERS:
    raise ValueError(f"unknown calibration method {method!r}; choose one of {list(METHODS)}")
  if method == "percentile":
    return obs.Percentile(percentile)
  if method == "mse":
    return obs.MSEClip(bits=a_bits)
  return obs.OBSERVERS[method]()


def ptq_rules(method: str = "percentile", w_bits: int = 8, a_bits: int = 8, *, fold_bn: bool = True,
              percentile: float = 0.999999) -> tuple[QuantRule, ...]:
  """IAO rules whose activation observers use a calibration method."""
  return iao_rules(w_bits, a_bits, observer=make_observer(method, a_bits, percentile), fold_bn=fold_bn)


class _ByIdentity:
  """Static-argument key for a model that cannot be hashed (e.g. a Linen field holding a
  list): equal only for the same model object, so repeated calls still share one
  compilation. The jit cache keeps the key, hence the model, alive: ids cannot collide."""

  def __init__(self, qmodel: QuantizedModel):
    self.qmodel = qmodel

  def __hash__(self) -> int:
    return id(self.qmodel)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _ByIdentity) and other.qmodel is self.qmodel


def _static_model(qmodel: QuantizedModel) -> QuantizedModel | _ByIdentity:
  try:
    hash(qmodel)  # a frozen dataclass of a Linen module and rules: by value
  except TypeError:
    return _ByIdentity(qmodel)
  return qmodel


@functools.partial(jax.jit, static_argnames=("qmodel", "apply_kwargs"))
def _observe(qmodel: QuantizedModel | _ByIdentity, variables: dict, args: tuple, rngs: Any,
             apply_kwargs: tuple) -> Any:
  """One calibration batch: the observers' ``quant_stats`` after seeing ``args``.

  ``qmodel`` (see ``_static_model``) and ``apply_kwargs`` (sorted ``(name, value)``
  pairs) are static; every array, params, inputs and rngs included, is an argument, so
  one compilation serves every call with an equal model, the same kwargs and the same
  shapes.
  """
  model = qmodel.qmodel if isinstance(qmodel, _ByIdentity) else qmodel
  extra = {} if rngs is None else {"rngs": rngs}
  _, upd = model.apply(variables, *args, mutable=["quant_stats"], **extra, **dict(apply_kwargs))
  return upd["quant_stats"]


def calibrate(
    qmodel: QuantizedModel, variables: dict, batches: Iterable[Any], num_batches: int | None = None,
    progress: bool = False, *, rngs: Any = None, **apply_kwargs: Any,
) -> dict:
  """Feeds ``batches`` through the observers and returns the variables with the
  calibrated ``quant_stats``. Parameters and ``batch_stats`` are returned unchanged.

  Args:
    qmodel: the quantized model.
    variables: its variables (``quantize_variables``).
    batches: model inputs: each an array (the one positional argument of the model's
      ``__call__``) or a tuple of the positional arguments.
    num_batches: stop after this many (None: all).
    progress: show a progress bar.
    rngs: passed to ``apply`` as they are (e.g. ``{"dropout": key}`` for a model that
      draws random numbers in evaluation too, such as a VAE's ``z_rng``).
    **apply_kwargs: the model's keyword arguments, passed unchanged; they must be
      hashable (static arguments of the compiled step). A model whose ``__call__`` takes
      ``train`` and is not given it is evaluated with ``train=False`` (see
      ``eval_kwargs``); no other argument is added.

  Returns:
    ``variables`` with the new ``quant_stats``.
  """
  static_kwargs = tuple(sorted(eval_kwargs(qmodel.model, apply_kwargs).items()))
  static_model = _static_model(qmodel)
  stats = variables["quant_stats"]
  seen = 0
  for batch in tqdm(batches, total=num_batches, desc="calibrating", disable=not progress, leave=False):
    if num_batches is not None and seen >= num_batches:
      break
    args = batch if isinstance(batch, tuple) else (batch,)
    stats = _observe(static_model, {**variables, "quant_stats": stats}, args, rngs, static_kwargs)
    seen += 1
  if seen == 0:
    raise ValueError("calibration needs at least one batch")
  return {**variables, "quant_stats": stats}
