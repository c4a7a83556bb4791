"""One ``export`` for every deploy artifact: a ``jax.export`` StableHLO function with the
artifact's arrays baked in and a symbolic batch size, which runs without the model's
Python code (``jax.export.deserialize(blob).call(x)``)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from micronet_jax._src.deploy.binary import FusedModel
from micronet_jax._src.deploy.integer import Deploy, integer_apply


def export(artifact: Deploy | tuple[FusedModel, dict], input_shape: Sequence[int], *, dtype: Any = None,
           **apply_kwargs: Any) -> jax.export.Exported:
  """The exported forward of ``artifact`` for inputs of shape (batch, *input_shape).

  * a ``Deploy``: ``integer_apply`` (logits), input dtype uint8 or int8 as the deploy's
    input grid (the codes of ``deploy.quantize_input``);
  * ``(fused, variables)`` from ``deploy_binary``/``fuse_bn``: ``fused.apply(variables, x,
    **apply_kwargs)`` (e.g. ``train=False, xnor=True``), input float32 unless ``dtype``.

  ``.serialize()`` gives the bytes to store.
  """
  batch, = jax.export.symbolic_shape("batch")
  if isinstance(artifact, Deploy):
    fn = jax.jit(lambda xq: integer_apply(artifact, xq, **apply_kwargs))
    dtype = dtype or (jnp.uint8 if artifact.input_range[0] >= 0 else jnp.int8)
  elif isinstance(artifact, tuple) and len(artifact) == 2 and isinstance(artifact[0], FusedModel):
    fused, variables = artifact
    fn = jax.jit(lambda x: fused.apply(variables, x, **apply_kwargs))
    dtype = dtype or jnp.float32
  else:
    raise TypeError(f"export expects a Deploy or a (FusedModel, variables) pair, got {type(artifact).__name__}")
  return jax.export.export(fn)(jax.ShapeDtypeStruct((batch, *input_shape), dtype))
