"""BatchNorm folding in Linen: the framework-neutral ``core.bn_fold.folded_conv_bn`` called
on a bound ``nn.Conv`` and ``nn.BatchNorm``.

The maths and the orchestration (statistics, the init-from-batch flag, the folded kernel's
quantizer, the bias on the accumulator grid) are ``core/bn_fold.py``, shared with NNX; its
module docstring describes them. What is Linen's own is decided here:

* the BatchNorm normalises with the batch's statistics when ``use_running_average`` is
  False **and** ``batch_stats`` is mutable (training); with ``batch_stats`` immutable
  (QAFT, calibration) it uses the running ones;
* it writes the running statistics in such a call unless the model is being initialised
  (``init`` creates the variables; it does not observe);
* the init-from-batch flag is ``quant_stats/<bn>/bn_stats_initialized``: created when
  ``quant_stats`` is mutable (``init``, ``quantize_variables``), read if it exists, and
  otherwise absent (a model saved without it, evaluated with ``quant_stats`` immutable);
* the conv is ``nn.Conv`` with the float conv's fields, on the folded kernel, no bias.

The pure helpers are re-exported for the modules that import them from here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from micronet_jax._src.core import bn_fold as core
from micronet_jax._src.core.bn_fold import BN_INIT_FLAG, batch_moments, fold_batch_norm, update_running  # noqa: F401
from micronet_jax._src.core.seam import STATS
from micronet_jax._src.flax.seam import BATCH_STATS, LinenSeam

Array = jax.Array
_CONV_FIELDS = ("features", "kernel_size", "strides", "padding", "input_dilation", "kernel_dilation",
                "feature_group_count", "precision", "dtype")


def _first_batch_flag(bn: nn.Module, enabled: bool):
  """The BN's init-from-batch flag variable, or None (option off, or a model saved
  without the flag evaluated with ``quant_stats`` immutable)."""
  if not enabled or not (bn.is_mutable_collection(STATS) or bn.has_variable(STATS, BN_INIT_FLAG)):
    return None
  return bn.variable(STATS, BN_INIT_FLAG, lambda: jnp.zeros((), jnp.bool_))


def folded_conv_bn(
    conv: nn.Module, bn: nn.Module, x_q: Array, z: Array, weight_quant: Any, calib: bool,
    use_running_average: bool, input_scale: Array | None = None, init_from_batch: bool = False,
) -> Array:
  """Forward of a conv (already run in float as ``z``) folded into the BN that consumes it.

  Args:
    conv: the bound float ``nn.Conv`` (its scope holds ``kernel`` and ``bias``).
    bn: the bound ``nn.BatchNorm``; call this inside its method (it reads and creates the
      BatchNorm's variables and the folded kernel quantizer's state).
    x_q: the conv's quantized input.
    z: the conv's float output.
    weight_quant: the folded kernel's quantizer, or None.
    calib: micronet's ``bn_fuse_calib``.
    use_running_average: the BatchNorm's mode in this call.
    input_scale: S_in of the conv's affine input quantizer, if any (then b_fold is
      rounded to the int32 grid S_in * S_w of integer inference).
    init_from_batch: the first training batch sets the running statistics.

  Returns:
    The folded layer's output (``core.bn_fold.folded_conv_bn``).
  """
  kernel = nn.unbox(conv.get_variable("params", "kernel"))
  bias = nn.unbox(conv.get_variable("params", "bias")) if conv.use_bias else None
  c = kernel.shape[-1]
  scale = bn.param("scale", bn.scale_init, (c,), bn.param_dtype) if bn.use_scale else jnp.ones((c,))
  beta = bn.param("bias", bn.bias_init, (c,), bn.param_dtype) if bn.use_bias else jnp.zeros((c,))
  batch_statistics = not use_running_average and bn.is_mutable_collection(BATCH_STATS)
  fields = {f: getattr(conv, f) for f in _CONV_FIELDS}

  def conv_fn(w: Array) -> Array:
    return nn.Conv(**fields, use_bias=False).apply({"params": {"kernel": w}}, x_q)

  flag = _first_batch_flag(bn, init_from_batch)
  norm = core.BatchNormParams(scale, beta, bn.epsilon, bn.momentum, getattr(bn, "use_fast_variance", True))
  return core.folded_conv_bn(LinenSeam(bn), z, kernel, bias, conv_fn, weight_quant, norm, calib=calib,
                             batch_statistics=batch_statistics, update=batch_statistics and not bn.is_initializing(),
                             first_batch=flag, input_scale=input_scale)
