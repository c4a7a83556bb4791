"""micronet's mean-centering and clipping of binary weights, as a params transform.

``center_clip_projection(qmodel, x)`` returns the params -> params function that applies
``binary.center_clip`` to the kernel of every layer whose weight quantizer is
``BinaryWeight(center_clip=True)`` (found in the model's plan); the training loop applies
it to the initial params and after every optimizer step (see ``core/binary.py``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from micronet_jax._src.core.binary import BinaryWeight, center_clip, one_input_channel_message


def center_clip_layers(qmodel: Any, *args, **kwargs) -> dict[str, int]:
  """{layer path: input axis} of the layers whose weight quantizer is
  ``BinaryWeight(center_clip=True)``, from ``qmodel.plan(*args, **kwargs)``. Raises
  ValueError, naming the layer, for one input channel per group."""
  found: dict[str, int] = {}
  for p in qmodel.plan(*args, **kwargs):
    if not (isinstance(p.weight, BinaryWeight) and p.weight.center_clip):
      continue
    if p.in_features // p.groups == 1:
      raise ValueError(f"layer {p.path}: " + one_input_channel_message(f"{p.kind} {p.path}"))
    found[p.path] = -1 if p.out_axis == -2 else -2
  return found


def _kernel_path(path) -> str | None:
  keys = [str(getattr(k, "key", k)) for k in path]
  return "/".join(keys[:-1]) if keys and keys[-1] == "kernel" else None


def center_clip_params(params: Any, layers: dict[str, int]) -> Any:
  """Applies ``center_clip`` to the kernel of every layer in ``layers`` ({path: input axis})."""

  def f(path, leaf):
    layer = _kernel_path(path)
    return center_clip(leaf, layers[layer]) if layer in layers else leaf

  return jax.tree_util.tree_map_with_path(f, params)


def center_clip_projection(qmodel: Any, *args, **kwargs) -> Callable[[Any], Any] | None:
  """params -> params applying micronet's centering and clipping to the model's
  ``BinaryWeight(center_clip=True)`` kernels, or None if it has none. Give it to
  ``train.create_train_state(..., project=...)`` or call it after each optimizer step."""
  if not hasattr(qmodel, "rules"):
    return None
  layers = center_clip_layers(qmodel, *args, **kwargs)
  if not layers:
    return None
  return lambda params: center_clip_params(params, layers)
