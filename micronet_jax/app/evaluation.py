"""One evaluation loop for every pipeline: test accuracy of one or more forwards over
the same batches, and how often each predicts the class the first one predicts.

Batches come from ``data.eval_batches`` (one fixed size, the last padded and masked),
so a jitted forward compiles once. (The training loop's per-epoch loss and accuracy
stay in ``train.evaluate``: it needs the loss, and runs on a ``TrainState``.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import numpy as np

from micronet_jax.app import data as data_lib

Forward = Callable[[np.ndarray], Any]  # float images (N, H, W, C) -> logits (N, classes)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """``accuracy[name]`` of each forward; ``agreement[name]``: the fraction of images on
  which it predicts the class the first forward predicts (1.0 for the first)."""

  accuracy: dict[str, float]
  agreement: dict[str, float]
  images: int


def model_forward(model: Any, variables: dict, **apply_kwargs: Any) -> Forward:
  """``model.apply(variables, x, train=False, **apply_kwargs)``, jitted once with the
  variables as an argument (not baked into the compiled function as constants)."""
  fn = jax.jit(lambda v, x: model.apply(v, x, train=False, **apply_kwargs))
  return lambda x: fn(variables, x)


def evaluate(forwards: Mapping[str, Forward], x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> Evaluation:
  """Runs every forward on (x, y) in batches of ``batch_size`` and counts on the host."""
  if not forwards:
    raise ValueError("evaluate needs at least one forward")
  names = list(forwards)
  correct = dict.fromkeys(names, 0)
  agree = dict.fromkeys(names, 0)
  for xb, yb, mask in data_lib.eval_batches(x, y, batch_size):
    valid = mask > 0
    preds = {n: np.asarray(forwards[n](xb)).argmax(-1)[valid] for n in names}
    for n in names:
      correct[n] += int((preds[n] == yb[valid]).sum())
      agree[n] += int((preds[n] == preds[names[0]]).sum())
  n = len(x)
  return Evaluation({k: v / n for k, v in correct.items()}, {k: v / n for k, v in agree.items()}, n)
