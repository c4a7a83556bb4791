"""BatchNorm folding into a quantized convolution during QAT (Jacob et al. 2018, §3.2).

For a conv ``z = conv(x, W) + b`` followed by BatchNorm with scale gamma, shift beta,
statistics (mu, sigma^2) and epsilon, the folded layer is

    W_fold = W * gamma / sqrt(sigma^2 + eps)          (per output channel)
    b_fold = beta + (b - mu) * gamma / sqrt(sigma^2 + eps)
    y      = conv(Aq(x), Wq(W_fold)) + b_fold

so the weights that are quantized are the ones an integer deploy uses. Statistics:

* training: the batch mean and the **biased** batch variance of the float output ``z``
  (the same statistics ``nn.BatchNorm`` normalises with, so with quantization off the
  folded layer equals conv + BatchNorm; micronet uses the unbiased variance here).
  Gradients flow through them. The running averages are updated exactly as
  ``nn.BatchNorm`` does (``ra = momentum * ra + (1 - momentum) * batch``).
* evaluation, or training with ``batch_stats`` immutable (QAFT, calibration): the
  running statistics; nothing is updated.
* ``calib=True`` (micronet's ``bn_fuse_calib``): in training the weights are folded
  with the running variance and the conv output is rescaled by sigma_run / sigma_batch,
  so the quantized weights do not jitter with the batch variance.
* ``init_from_batch=True`` (micronet's ``pretrained_model=False``): the first training
  batch *sets* the running statistics, ``ra = batch``, instead of averaging them into
  the loaded ones (which, in a model trained from scratch, are the initial 0 and 1).
  Which batch is the first is kept in a bool flag, ``quant_stats/<bn>/bn_stats_initialized``,
  made False by ``quantize_variables`` and set by the first update, so it is checkpointed
  and jit-compatible (no host sync); a resumed run does not re-initialise (micronet
  does, §11.6 of its reference). The flag moves only when ``quant_stats`` is mutable as
  well as ``batch_stats``; with ranges frozen the statistics are averaged as usual.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from micronet_jax._src.flax import seam
from micronet_jax._src.flax.layers import accumulator_scale
from micronet_jax._src.core.quantizers import bias_fake_quant

Array = jax.Array
BN_INIT_FLAG = "bn_stats_initialized"  # in quant_stats/<bn>, with init_from_batch only


def fold_batch_norm(
    kernel: Array, bias: Array | None, scale: Array, beta: Array, mean: Array, var: Array, eps: float,
    *, out_axis: int = -1, feeds_sign: bool = False,
) -> tuple[Array, Array]:
  """(W_fold, b_fold): a BatchNorm folded into the layer whose output it consumes.

  ``kernel``'s output channels lie on ``out_axis``; ``scale``/``beta``/``mean``/``var`` are
  (C,), ``bias`` (C,) or None. With k = scale / sqrt(var + eps) (flax's multiplier):

  * ``feeds_sign=False``: W k, beta + (b - mean) k (the layer then equals layer + BN);
  * ``feeds_sign=True`` (the BN's output only reaches a sign, as in a binary network):
    sign+(k (z - mean) + beta) = sign+(s (z - mean + beta / k)) with s = sign(k), so the
    kernel is only multiplied by s (a binary kernel stays binary with its own alpha) and
    the bias becomes s (b - mean + beta / k). Where k = 0 the output is the constant
    sign+(beta): the kernel channel becomes 0 and the bias beta.
  """
  k = scale * jax.lax.rsqrt(var + eps)
  b = jnp.zeros_like(beta) if bias is None else bias
  if feeds_sign:
    dead = k == 0
    flip = jnp.where(k < 0, -1.0, 1.0)
    b_fold = jnp.where(dead, beta, flip * (b - mean + beta / jnp.where(dead, 1.0, k)))
    k = jnp.where(dead, 0.0, flip)
  else:
    b_fold = beta + (b - mean) * k
  shape = [1] * kernel.ndim
  shape[out_axis] = -1
  return kernel * k.reshape(shape), b_fold


def batch_moments(z: Array, fast_variance: bool = True) -> tuple[Array, Array]:
  """Mean and biased variance over every axis but the last (channels), computed as
  ``nn.BatchNorm`` does: E[z^2] - E[z]^2 (``use_fast_variance``) or E[(z - E[z])^2]."""
  axes = tuple(range(z.ndim - 1))
  mean = jnp.mean(z, axes)
  if fast_variance:
    return mean, jnp.maximum(0.0, jnp.mean(jnp.square(z), axes) - jnp.square(mean))
  return mean, jnp.mean(jnp.square(z - mean), axes)


def update_running(
    ra: Array, batch: Array, momentum: float, first: Array | bool = False
) -> Array:
  """``batch`` when ``first``, else ``momentum * ra + (1 - momentum) * batch`` (nn.BatchNorm's
  update; micronet's momentum 0.1 is Flax's 0.9). No gradient into the running value."""
  batch = jax.lax.stop_gradient(batch)
  return jnp.where(first, batch, momentum * ra + (1 - momentum) * batch)


def _first_batch_flag(bn: nn.Module, enabled: bool):
  """The BN's init-from-batch flag variable, or None (option off, or a model saved
  without the flag evaluated with ``quant_stats`` immutable)."""
  if not enabled or not (bn.is_mutable_collection("quant_stats") or bn.has_variable("quant_stats", BN_INIT_FLAG)):
    return None
  return bn.variable("quant_stats", BN_INIT_FLAG, lambda: jnp.zeros((), jnp.bool_))


def folded_conv_bn(
    conv: nn.Module, bn: nn.Module, x_q: Array, z: Array, weight_quant: Any, calib: bool,
    use_running_average: bool, input_scale: Array | None = None, init_from_batch: bool = False,
) -> Array:
  """Forward of a conv (already run in float as ``z``) folded into the BN that consumes it.

  ``conv`` and ``bn`` are the bound float modules (their scopes hold the parameters and
  statistics, under nn.Conv's and nn.BatchNorm's own names); ``x_q`` is the conv's
  quantized input and ``input_scale`` its affine scale, if any (then b_fold is rounded to
  the int32 grid S_in * S_w of integer inference). ``init_from_batch``: the first
  training batch sets the running statistics (see the module docstring). Must be called
  inside ``bn``'s method (it reads/creates BN variables).
  """
  kernel = conv.get_variable("params", "kernel")
  bias = conv.get_variable("params", "bias") if conv.use_bias else None
  c = kernel.shape[-1]
  scale = bn.param("scale", bn.scale_init, (c,), bn.param_dtype) if bn.use_scale else jnp.ones((c,))
  beta = bn.param("bias", bn.bias_init, (c,), bn.param_dtype) if bn.use_bias else jnp.zeros((c,))
  ra_mean = bn.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
  ra_var = bn.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
  flag = _first_batch_flag(bn, init_from_batch)

  train_stats = not use_running_average and bn.is_mutable_collection("batch_stats")
  if train_stats:
    mu, var = batch_moments(z, getattr(bn, "use_fast_variance", True))
    if not bn.is_initializing():
      first = False
      if flag is not None and bn.is_mutable_collection("quant_stats"):
        first = jnp.logical_not(flag.value)
        flag.value = jnp.ones((), jnp.bool_)
      ra_mean.value = update_running(ra_mean.value, mu, bn.momentum, first)
      ra_var.value = update_running(ra_var.value, var, bn.momentum, first)
  else:
    mu, var = ra_mean.value, ra_var.value

  correction = None
  if train_stats and calib:
    w_fold, _ = fold_batch_norm(kernel, bias, scale, beta, ra_mean.value, ra_var.value, bn.epsilon)
    _, b_fold = fold_batch_norm(kernel, bias, scale, beta, mu, var, bn.epsilon)
    correction = jnp.sqrt(ra_var.value + bn.epsilon) * jax.lax.rsqrt(var + bn.epsilon)
  else:
    w_fold, b_fold = fold_batch_norm(kernel, bias, scale, beta, mu, var, bn.epsilon)
  # The folded kernel is quantized here, inside the BatchNorm's call, so a kernel quantizer
  # that owns params keeps them under the BatchNorm (params/<bn>/kernel_<name>): Linen
  # creates params only in the module whose method is running.
  w_q = seam.apply_quantizer(bn, "kernel", weight_quant, w_fold, -1)
  acc_scale = accumulator_scale(weight_quant, w_fold, input_scale, -1,
                                seam.quantizer_state(bn, "kernel", weight_quant))
  if acc_scale is not None:
    b_fold = bias_fake_quant(b_fold, acc_scale)
  w_fold = w_q
  fields = {f: getattr(conv, f) for f in ("features", "kernel_size", "strides", "padding", "input_dilation",
                                          "kernel_dilation", "feature_group_count", "precision", "dtype")}
  y = nn.Conv(**fields, use_bias=False).apply({"params": {"kernel": w_fold}}, x_q)
  if correction is not None:
    y = y * correction
  return y + b_fold
