"""micronet's NIN and NIN-GC (CIFAR-10 networks), as plain Linen models.

Both take a channel config ``cfg`` (8 widths) so that a pruned network can be rebuilt,
and end in a global average pool, so they run on 32x32x3 (CIFAR-10, where it equals
micronet's AvgPool2d(8)) and 28x28x1 (Fashion-MNIST) inputs alike. BatchNorm uses
PyTorch's defaults (momentum 0.1, i.e. Flax momentum 0.9; eps 1e-5).
"""

from __future__ import annotations

from typing import Callable, ClassVar, Sequence

import flax.linen as nn
import jax

from micronet_jax import SlimLayer
from micronet_jax.ops import global_avg_pool

NIN_CFG = (192, 160, 96, 192, 192, 192, 192, 192)
NIN_GC_CFG = (256, 256, 256, 512, 512, 512, 1024, 1024)
# Per conv of NIN-GC: (kernel, padding, feature groups, channel-shuffle groups before or 0).
NIN_GC_LAYOUT = (
    (5, 2, 1, 0), (1, 0, 2, 0), (1, 0, 2, 2),
    (3, 1, 16, 2), (1, 0, 4, 16), (1, 0, 4, 4),
    (3, 1, 32, 4), (1, 0, 8, 32), (1, 0, 1, 0),
)
NIN_LAYOUT = ((5, 2), (1, 0), (1, 0), (5, 2), (1, 0), (1, 0), (3, 1), (1, 0), (1, 0))
POOL_AFTER = (2, 5)  # a max-pool follows blocks 2 and 5 in both networks


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """NHWC channel shuffle: (N, H, W, g, C/g) -> swap the last two axes -> (N, H, W, C)."""
  n, h, w, c = x.shape
  return x.reshape(n, h, w, groups, c // groups).swapaxes(-1, -2).reshape(n, h, w, c)


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class ConvBNReLU(nn.Module):
  """conv (bias) -> BatchNorm -> ``act`` (ReLU), with an optional channel shuffle before the conv."""

  features: int
  kernel: int
  padding: int
  groups: int = 1
  shuffle_groups: int = 0
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.shuffle_groups:
      x = channel_shuffle(x, self.shuffle_groups)
    x = nn.Conv(self.features, (self.kernel, self.kernel), padding=self.padding,
                feature_group_count=self.groups, name="conv")(x)
    return self.act(batch_norm(train, name="bn")(x))


def _check_cfg(cfg: Sequence[int], name: str) -> None:
  if len(cfg) != 8 or any(int(c) < 1 for c in cfg):
    raise ValueError(f"{name} cfg must be 8 positive channel counts, got {tuple(cfg)}")


class NIN(nn.Module):
  """Network-in-network: 9 ConvBNReLU blocks (the last one on the logits), 2 max-pools
  (k3, s2, p1), global average pool. Input NHWC; output (N, num_classes), non-negative.
  ``act`` replaces the ReLU of blocks 0..7 (those micronet binarises; the logits block
  keeps its ReLU): binary networks set it to the identity."""

  # The fields an application may set (``micronet_jax.app.recipes``): widths, activation.
  KNOBS: ClassVar[tuple[str, ...]] = ("cfg", "act")

  num_classes: int = 10
  cfg: Sequence[int] = NIN_CFG
  act: Callable = nn.relu

  def slim_layout(self) -> tuple[SlimLayer, ...]:
    """The conv+BN chain network slimming prunes (``micronet_jax.prune``)."""
    return tuple(SlimLayer(f"block{i}") for i in range(len(NIN_LAYOUT)))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_cfg(self.cfg, "NIN")
    widths = (*self.cfg, self.num_classes)
    for i, ((k, p), c) in enumerate(zip(NIN_LAYOUT, widths)):
      x = ConvBNReLU(c, k, p, act=self.act if i < 8 else nn.relu, name=f"block{i}")(x, train)
      if i in POOL_AFTER:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return global_avg_pool(x)


class NINGC(nn.Module):
  """NIN with group convolutions and channel shuffles (micronet's ``nin_gc``); max-pools
  are k2 s2. Every width in ``cfg`` must be divisible by its conv's groups and by the
  next conv's groups (see ``NIN_GC_LAYOUT``). ``act`` as in ``NIN``."""

  KNOBS: ClassVar[tuple[str, ...]] = ("cfg", "act")  # as NIN's

  num_classes: int = 10
  cfg: Sequence[int] = NIN_GC_CFG
  act: Callable = nn.relu

  def slim_layout(self) -> tuple[SlimLayer, ...]:
    """The conv+BN chain with its groups and shuffles, for network slimming."""
    return tuple(SlimLayer(f"block{i}", g, s) for i, (_, _, g, s) in enumerate(NIN_GC_LAYOUT))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_cfg(self.cfg, "NIN-GC")
    widths = (*self.cfg, self.num_classes)
    for i, ((k, p, g, s), c) in enumerate(zip(NIN_GC_LAYOUT, widths)):
      next_groups = NIN_GC_LAYOUT[i + 1][2] if i + 1 < len(NIN_GC_LAYOUT) else 1
      if i < 8 and (c % g or c % next_groups):
        raise ValueError(f"NIN-GC cfg[{i}] = {c} must be divisible by this conv's groups ({g}) "
                         f"and the next conv's groups ({next_groups})")
      x = ConvBNReLU(c, k, p, groups=g, shuffle_groups=s, act=self.act if i < 8 else nn.relu,
                     name=f"block{i}")(x, train)
      if i in POOL_AFTER:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return global_avg_pool(x)
