"""micronet's LeNet (for 28x28x1 inputs; any NHWC size of at least 16x16), as a plain Linen model."""

from __future__ import annotations

from typing import Callable, ClassVar

import flax.linen as nn
import jax


class LeNet(nn.Module):
  """conv 10 k5 -> max-pool 2 -> relu -> conv 20 k5 -> max-pool 2 -> relu ->
  dense 50 -> relu -> dropout ``dropout_rate`` (0.5) -> dense ``num_classes``.

  ``cfg`` = (conv1, conv2, hidden) so that a pruned network can be rebuilt. ``act`` is
  the activation between the first and the last layer (the three ReLUs); binary
  networks set it to the identity so that the next layer's sign sees the pre-activation.
  Input (N, H, W, C), H and W at least 16: (N, 28, 28, 1) for Fashion-MNIST, (N, 32, 32, 3)
  for CIFAR-10 (the first dense layer takes the flattened 4x4 or 5x5 map, so its input size
  follows from the input shape at init); output logits (N, num_classes).
  """

  # The fields an application may set (``micronet_jax.app.recipes``): widths, the
  # activation (binary nets: the identity) and the dropout (binary inputs: none).
  KNOBS: ClassVar[tuple[str, ...]] = ("cfg", "act", "dropout_rate")

  num_classes: int = 10
  cfg: tuple[int, int, int] = (10, 20, 50)
  act: Callable = nn.relu
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    c1, c2, hidden = self.cfg
    x = nn.Conv(c1, (5, 5), padding="VALID")(x)
    x = self.act(nn.max_pool(x, (2, 2), strides=(2, 2)))
    x = nn.Conv(c2, (5, 5), padding="VALID")(x)
    x = self.act(nn.max_pool(x, (2, 2), strides=(2, 2)))
    x = x.reshape((x.shape[0], -1))
    x = self.act(nn.Dense(hidden)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)
