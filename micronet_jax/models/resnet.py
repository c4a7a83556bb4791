"""micronet's CIFAR ResNets (3x3 stem, no max-pool) as plain Linen models."""

from __future__ import annotations

from typing import ClassVar, Sequence

import flax.linen as nn
import jax

from micronet_jax.models.nin import batch_norm
from micronet_jax.ops import Add, global_avg_pool


class BasicBlock(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = nn.Conv(self.features, (3, 3), strides=self.strides, padding=1, use_bias=False)(x)
    y = nn.relu(batch_norm(train)(y))
    y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
    y = batch_norm(train)(y)
    return nn.relu(Add()(y, _shortcut(x, self.features, self.strides, train)))


class BottleNeck(nn.Module):
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = nn.relu(batch_norm(train)(nn.Conv(self.features, (1, 1), use_bias=False)(x)))
    y = nn.Conv(self.features, (3, 3), strides=self.strides, padding=1, use_bias=False)(y)
    y = nn.relu(batch_norm(train)(y))
    y = batch_norm(train)(nn.Conv(self.features * 4, (1, 1), use_bias=False)(y))
    return nn.relu(Add()(y, _shortcut(x, self.features * 4, self.strides, train)))


def _shortcut(x: jax.Array, features: int, strides: int, train: bool) -> jax.Array:
  """Identity, or conv1x1(stride) + BN when the shape changes (called inside a block)."""
  if strides == 1 and x.shape[-1] == features:
    return x
  x = nn.Conv(features, (1, 1), strides=strides, use_bias=False, name="shortcut_conv")(x)
  return batch_norm(train, name="shortcut_bn")(x)


class ResNet(nn.Module):
  """CIFAR ResNet: conv3x3 64 -> BN -> ReLU -> 4 stages (strides 1/2/2/2) -> global
  average pool -> dense. ``widths`` are the stage widths (before expansion)."""

  # No field an application may set: the factories (resnet18, ...) fix the architecture.
  KNOBS: ClassVar[tuple[str, ...]] = ()

  block: type = BasicBlock
  stages: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10
  widths: Sequence[int] = (64, 128, 256, 512)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=False)(x)
    x = nn.relu(batch_norm(train)(x))
    for stage, (n, width) in enumerate(zip(self.stages, self.widths)):
      for i in range(n):
        x = self.block(width, strides=2 if stage > 0 and i == 0 else 1, name=f"layer{stage + 1}_{i}")(x, train)
    return nn.Dense(self.num_classes)(global_avg_pool(x))


def resnet18(num_classes: int = 10) -> ResNet:
  return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet34(num_classes: int = 10) -> ResNet:
  return ResNet(BasicBlock, (3, 4, 6, 3), num_classes)


def resnet50(num_classes: int = 10) -> ResNet:
  return ResNet(BottleNeck, (3, 4, 6, 3), num_classes)
