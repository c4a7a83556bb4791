"""Binary and ternary weights, binary activations (micronet's "wbwtab"), as pure functions.

Three quantizer specs, with the same interfaces as those in ``quantizers``:

* ``BinaryWeight()`` (1 bit): XNOR-Net, per output channel. alpha_o = mean|w_o| over the
  kernel's other axes, q = sign+(w) * alpha (sign+(0) = +1). Gradient as micronet's
  autograd computes it: an identity STE through the sign plus the path through alpha,
  ``dL/dw = alpha * g + sign(w) / n * sum_o(sign+(w) * g)`` (sign(0) = 0 there).
* ``TernaryWeight()`` (2 bits): TWN, per output channel. Delta = 0.7 mean|w|,
  t = +1 for w >= Delta, -1 for w <= -Delta, else 0; alpha = mean of |w| over |w| > Delta
  (strict). Gradient ``alpha * g + sign(w) [|w| > Delta] / cnt * sum_o(t * g)``. An
  all-zero filter quantizes to 0 (micronet: 0/0 = NaN).
* ``BinaryActivation()`` (1 bit): sign+(x), gradient ``g * [|x| < 1]`` (``ste.sign_ste``).

**Where the binary activation sits.** micronet replaces the ReLU after each hidden
conv/BN by sign. In this library every quantizer quantizes the *input* of a layer, so the
sign is the ``act_quant`` of the next conv/dense layer, and the model must hand that layer
the pre-ReLU value: sign(relu(x)) would be +1 everywhere. The models in
``micronet_jax.models`` therefore take an ``act`` field (default ``nn.relu``, which
leaves their behaviour and parameters unchanged) for exactly the activations micronet
binarises, and a binary network is built with ``act=binary.identity``. Between the BN and
the next layer there may be a max-pool or a channel shuffle; both commute with sign
(sign is monotone, the shuffle a permutation), so the forward values are micronet's.
(The gradient of a max-pool over ties of +-1 values differs: ours goes to the largest
pre-sign value, PyTorch's to the first of the tied ones.) For your own model: make the
activation in front of each binarised layer the identity (or anything odd and
increasing, such as hardtanh), and keep dropout away from it: sign(0) = +1 turns each
dropped unit into +1 (``micronet_jax.app.recipes.build`` builds LeNet without dropout for A1).

**Mean-centering and clipping are a params transform, not part of the forward.**
micronet overwrites the stored binary weights with ``clip(w - mean_in(w), -1, 1)``
(mean over input channels, HWIO axis 2) before every forward. Here this is the pure
function ``center_clip`` and ``center_clip_params``; ``center_clip_projection(qmodel,
x)`` returns the params -> params function for a given model, and
``train.create_train_state(..., project=...)`` applies it to the initial params and after
every optimizer step (projected gradient descent), which is the same sequence of weights
micronet trains on. The forward itself quantizes whatever params it is given.
A layer with one input channel (per group) cannot be centered: every weight would become
0, so asking for it raises an error naming the layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from micronet_jax._src.core.protocol import ObservedActivation, StatelessWeight
from micronet_jax._src.core.quantizers import reduce_axes
from micronet_jax._src.core.ste import sign_plus, sign_ste

Array = jax.Array


def identity(x: Array) -> Array:
  """The activation to give a model in front of binarised layers (sign replaces ReLU)."""
  return x


# ----------------------------------------------------------------------------- STEs


@jax.custom_vjp
def sign_identity_ste(w: Array) -> Array:
  """sign+(w) (sign(0) = +1) with an identity straight-through gradient (binary weights)."""
  return sign_plus(w)


sign_identity_ste.defvjp(lambda w: (sign_plus(w), None), lambda _, g: (g,))


def ternary_codes(w: Array, delta: Array) -> Array:
  """micronet's t = sign(sign(w + Delta) + sign(w - Delta)): +1 for w >= Delta, -1 for
  w <= -Delta, 0 in between (values exactly at +-Delta map to +-1). No gradient rule."""
  return jnp.sign(jnp.sign(w + delta) + jnp.sign(w - delta))


@jax.custom_vjp
def ternary_ste(w: Array, delta: Array) -> Array:
  """``ternary_codes(w, delta)`` with an identity gradient for ``w`` and none for ``delta``."""
  return ternary_codes(w, delta)


ternary_ste.defvjp(
    lambda w, delta: (ternary_codes(w, delta), delta),
    lambda delta, g: (g, jnp.zeros_like(delta)),
)


def _abs(w: Array) -> Array:
  """|w| whose derivative is sign(w) with sign(0) = 0, as torch's (jax's abs gives 1 at 0)."""
  return w * jax.lax.stop_gradient(jnp.sign(w))


# ----------------------------------------------------------------------------- weights


def binary_alpha(w: Array, channel_axis: int | None = -1) -> Array:
  """alpha = mean|w| per output channel (keepdims; ``channel_axis=None``: per tensor)."""
  return jnp.mean(_abs(w), axis=reduce_axes(w.ndim, channel_axis), keepdims=True)


def binary_weight(w: Array, channel_axis: int | None = -1) -> Array:
  """XNOR-Net binary weights: sign+(w) * mean|w| per output channel (see module doc)."""
  return sign_identity_ste(w) * binary_alpha(w, channel_axis)


def ternary_alpha(w: Array, delta: Array, channel_axis: int | None = -1) -> Array:
  """alpha = sum(|w| [|w| > Delta]) / count(|w| > Delta) per channel; 0 where the count is 0."""
  axes = reduce_axes(w.ndim, channel_axis)
  mask = jax.lax.stop_gradient((jnp.abs(w) > delta).astype(w.dtype))
  count = jnp.sum(mask, axis=axes, keepdims=True)
  total = jnp.sum(_abs(w) * mask, axis=axes, keepdims=True)
  return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.zeros_like(total))


def ternary_delta(w: Array, channel_axis: int | None = -1, threshold: float = 0.7) -> Array:
  """Delta = threshold * mean|w| per output channel (no gradient)."""
  e = jnp.mean(jnp.abs(w), axis=reduce_axes(w.ndim, channel_axis), keepdims=True)
  return jax.lax.stop_gradient(threshold * e)


def ternary_weight(w: Array, channel_axis: int | None = -1, threshold: float = 0.7) -> Array:
  """TWN ternary weights: t * alpha per output channel, t in {-1, 0, +1} (see module doc)."""
  delta = ternary_delta(w, channel_axis, threshold)
  return ternary_ste(w, delta) * ternary_alpha(w, delta, channel_axis)


def input_axis(ndim: int, channel_axis: int) -> int:
  """The kernel's input-channel axis: -2 (HWIO conv, (in, out) dense), or -1 when the
  output channels are on axis -2 (``ConvTranspose(transpose_kernel=True)``)."""
  return -1 if channel_axis % ndim == ndim - 2 else -2


def center_clip(w: Array, in_axis: int = -2) -> Array:
  """micronet's W_clip: clip(w - mean over input channels, -1, 1). Not differentiated."""
  return jnp.clip(w - jnp.mean(w, axis=in_axis, keepdims=True), -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class BinaryWeight(StatelessWeight):
  """1-bit XNOR-Net weights per output channel.

  ``center_clip=True`` (micronet's) asks the training loop to mean-center over input
  channels and clip to [-1, 1] after every step (``center_clip_projection``); the forward
  never does it.
  """

  center_clip: bool = True
  bits: int = dataclasses.field(default=1, init=False)

  def fake_quant(self, w: Array, channel_axis: int = -1) -> Array:
    if self.center_clip and w.ndim >= 2 and w.shape[input_axis(w.ndim, channel_axis)] == 1:
      raise ValueError(one_input_channel_message(f"a kernel of shape {tuple(w.shape)}"))
    return binary_weight(w, channel_axis)


@dataclasses.dataclass(frozen=True)
class TernaryWeight(StatelessWeight):
  """2-bit TWN weights per output channel, threshold ``threshold * mean|w|`` (0.7)."""

  threshold: float = 0.7
  bits: int = dataclasses.field(default=2, init=False)

  def __post_init__(self):
    if not 0 < self.threshold < 1:
      raise ValueError(f"TernaryWeight.threshold must be in (0, 1), got {self.threshold}")

  def fake_quant(self, w: Array, channel_axis: int = -1) -> Array:
    return ternary_weight(w, channel_axis, self.threshold)


@dataclasses.dataclass(frozen=True)
class BinaryActivation(ObservedActivation):
  """1-bit activations: sign+(x) in {-1, +1}, gradient g * [|x| < 1]. Stateless."""

  bits: int = dataclasses.field(default=1, init=False)

  def init_state(self, x: Array) -> None:
    return None

  def fake_quant(self, x: Array, state: None, *, update: bool) -> tuple[Array, None]:
    del update
    return sign_ste(x), state


def one_input_channel_message(where: str) -> str:
  return (f"BinaryWeight(center_clip=True) on {where} with 1 input channel (per group): "
          "mean-centering over input channels would make every weight 0. Keep this layer float "
          "(micronet keeps the first conv float) or use BinaryWeight(center_clip=False).")
