"""BatchNorm folding into a quantized convolution during QAT (Jacob et al. 2018, §3.2),
written once against the seam contract so that Linen and NNX run the same function.

For a conv ``z = conv(x, W) + b`` followed by BatchNorm with scale gamma, shift beta,
statistics (mu, sigma^2) and epsilon, the folded layer is

    W_fold = W * gamma / sqrt(sigma^2 + eps)          (per output channel)
    b_fold = beta + (b - mu) * gamma / sqrt(sigma^2 + eps)
    y      = conv(Aq(x), Wq(W_fold)) + b_fold

so the weights that are quantized are the ones an integer deploy uses. Statistics:

* training: the batch mean and the **biased** batch variance of the float output ``z``
  (the statistics ``BatchNorm`` normalises with, so with quantization off the folded
  layer equals conv + BatchNorm; micronet uses the unbiased variance here). Gradients
  flow through them. The running averages are updated exactly as ``BatchNorm`` does
  (``ra = momentum * ra + (1 - momentum) * batch``).
* evaluation, or training with the running statistics frozen (QAFT, calibration): the
  running statistics; nothing is updated.
* ``calib=True`` (micronet's ``bn_fuse_calib``): in training the weights are folded
  with the running variance and the conv output is rescaled by sigma_run / sigma_batch,
  so the quantized weights do not jitter with the batch variance.
* ``init_from_batch=True`` (micronet's ``pretrained_model=False``): the first training
  batch *sets* the running statistics, ``ra = batch``, instead of averaging them into
  the loaded ones (which, in a model trained from scratch, are the initial 0 and 1).
  Which batch is the first is kept in a bool statistic of the BatchNorm,
  ``quant_stats/<bn>/bn_stats_initialized`` (``BN_INIT_FLAG``), False until the first
  update sets it, so it is checkpointed and jit-compatible (no host sync); a resumed run
  does not re-initialise (micronet does, §11.6 of its reference). The flag moves only
  when the BatchNorm's statistics move (``seam.stats_move``) as well as its running ones.

The pieces: the pure maths (``fold_batch_norm``, ``batch_moments``, ``update_running``)
and ``folded_conv_bn``, the folded forward. ``folded_conv_bn`` reaches the BatchNorm
only through a ``BatchNormSeam``: the seam contract (``core/seam.py``) plus
``running(name, init)``, the BatchNorm's running statistics. The folded kernel's
quantizer keeps its state on the BatchNorm (``params/<bn>/kernel_<name>``), where the
kernel is folded. The conv itself is a function of the quantized folded kernel, given by
the adapter (Linen's ``nn.Conv``, NNX's ``nnx.Conv`` forward), and so are the decisions
that are a framework's own: whether this call normalises with the batch's statistics
and whether it writes the running ones (Linen: ``batch_stats`` mutable, not ``init``;
NNX: ``use_running_average``), and where the init-from-batch flag lives.

Imports jax only: no framework here.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from micronet_jax._src.core.quantizers import bias_fake_quant
from micronet_jax._src.core.seam import Seam, StatRef, accumulator_scale, apply_quantizer, quantizer_state

Array = jax.Array
BN_INIT_FLAG = "bn_stats_initialized"  # in quant_stats/<bn>, with init_from_batch only


# ----------------------------------------------------------------------------- the maths


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

  Args:
    kernel: the layer's weight, output channels on ``out_axis``.
    bias: the layer's bias (C,), or None.
    scale: gamma (C,).
    beta: the BatchNorm's shift (C,).
    mean: mu (C,).
    var: sigma^2 (C,).
    eps: the BatchNorm's epsilon.
    out_axis: the kernel's output-channel axis.
    feeds_sign: see above.

  Returns:
    (W_fold, b_fold), shaped as ``kernel`` and (C,).
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
  ``BatchNorm`` does: E[z^2] - E[z]^2 (``use_fast_variance``) or E[(z - E[z])^2]."""
  axes = tuple(range(z.ndim - 1))
  mean = jnp.mean(z, axes)
  if fast_variance:
    return mean, jnp.maximum(0.0, jnp.mean(jnp.square(z), axes) - jnp.square(mean))
  return mean, jnp.mean(jnp.square(z - mean), axes)


def update_running(ra: Array, batch: Array, momentum: float, first: Array | bool = False) -> Array:
  """``batch`` when ``first``, else ``momentum * ra + (1 - momentum) * batch`` (BatchNorm's
  update; micronet's momentum 0.1 is Flax's 0.9). No gradient into the running value."""
  batch = jax.lax.stop_gradient(batch)
  return jnp.where(first, batch, momentum * ra + (1 - momentum) * batch)


# ----------------------------------------------------------------------------- the folded forward


@runtime_checkable
class BatchNormSeam(Seam, Protocol):
  """The seam of a BatchNorm: the contract of ``core/seam.py`` plus its running statistics.

  ``running(name, init)`` gets or creates the running statistic ``name`` (``"mean"``,
  ``"var"``): Linen's ``batch_stats/<bn>/<name>``, NNX's ``nnx.BatchStat`` attribute
  ``<name>``. ``init()`` is called only to create it. The ``StatRef`` is written only
  when ``folded_conv_bn`` is told to update the running statistics.
  """

  def running(self, name: str, init: Callable[[], Array]) -> StatRef:
    ...


class BatchNormParams(NamedTuple):
  """What a folded BatchNorm contributes besides its statistics (all (C,) or scalars)."""

  scale: Array  # gamma; ones when the BatchNorm has no scale
  beta: Array  # the shift; zeros when the BatchNorm has no bias
  epsilon: float
  momentum: float
  fast_variance: bool = True  # E[z^2] - E[z]^2, as BatchNorm's use_fast_variance


def folded_conv_bn(
    bn: BatchNormSeam, z: Array, kernel: Array, bias: Array | None, conv: Callable[[Array], Array],
    weight_quant: Any, norm: BatchNormParams, *, calib: bool, batch_statistics: bool, update: bool,
    first_batch: StatRef | None = None, input_scale: Array | None = None,
) -> Array:
  """Forward of a conv (already run in float as ``z``) folded into the BatchNorm that
  consumes it (see the module docstring).

  Args:
    bn: the BatchNorm's seam: its running statistics, and the folded kernel quantizer's
      state (role ``kernel``).
    z: the conv's float output, conv(x, W) + b: what the batch statistics are taken of.
    kernel: the conv's float kernel W, output channels last.
    bias: the conv's float bias b, or None.
    conv: ``w -> conv(Aq(x), w)``: the conv on its quantized input with another kernel
      and no bias (the adapter binds the input and the conv's configuration).
    weight_quant: the kernel quantizer (None: the folded kernel stays float).
    norm: the BatchNorm's scale, shift, epsilon, momentum and variance formula.
    calib: micronet's ``bn_fuse_calib`` (see the module docstring).
    batch_statistics: whether this call normalises with the batch's statistics
      (training) rather than the running ones.
    update: whether this call writes the running statistics (only with
      ``batch_statistics``).
    first_batch: the init-from-batch flag (a bool statistic of the BatchNorm), or None
      (option off): while False, an update sets the running statistics to the batch's.
      It moves with the running statistics when ``bn.stats_move``.
    input_scale: S_in of an affine input quantizer of the conv, or None; with an affine
      weight quantizer b_fold is then rounded onto the int32 grid S_in * S_w of integer
      inference.

  Returns:
    conv(Aq(x), Wq(W_fold)) (rescaled with ``calib``) + b_fold.
  """
  c = kernel.shape[-1]
  ra_mean = bn.running("mean", lambda: jnp.zeros((c,), jnp.float32))
  ra_var = bn.running("var", lambda: jnp.ones((c,), jnp.float32))
  if batch_statistics:
    mu, var = batch_moments(z, norm.fast_variance)
    if update:
      first: Array | bool = False
      if first_batch is not None and bn.stats_move:
        first = jnp.logical_not(first_batch.value)
        first_batch.value = jnp.ones((), jnp.bool_)
      ra_mean.value = update_running(ra_mean.value, mu, norm.momentum, first)
      ra_var.value = update_running(ra_var.value, var, norm.momentum, first)
  else:
    mu, var = ra_mean.value, ra_var.value

  correction = None
  if batch_statistics and calib:
    w_fold, _ = fold_batch_norm(kernel, bias, norm.scale, norm.beta, ra_mean.value, ra_var.value, norm.epsilon)
    _, b_fold = fold_batch_norm(kernel, bias, norm.scale, norm.beta, mu, var, norm.epsilon)
    correction = jnp.sqrt(ra_var.value + norm.epsilon) * jax.lax.rsqrt(var + norm.epsilon)
  else:
    w_fold, b_fold = fold_batch_norm(kernel, bias, norm.scale, norm.beta, mu, var, norm.epsilon)
  # The folded kernel is quantized on the BatchNorm's seam, so a kernel quantizer that
  # owns params keeps them under the BatchNorm (params/<bn>/kernel_<name>): in Linen,
  # params are created only in the module whose method is running.
  w_q = apply_quantizer(bn, "kernel", weight_quant, w_fold, -1)
  if input_scale is not None:  # the state is read only when an input scale makes a grid
    acc_scale = accumulator_scale(weight_quant, w_fold, input_scale, -1,
                                  quantizer_state(bn, "kernel", weight_quant))
    if acc_scale is not None:
      b_fold = bias_fake_quant(b_fold, acc_scale)
  y = conv(w_q)
  if correction is not None:
    y = y * correction
  return y + b_fold
