"""Small NNX models written the way public Flax NNX code writes them (the flax MNIST
tutorial's CNN, a MobileNetV2 block, the flax ViT tutorial's shape, a decoder-only LM),
with nothing marked for quantization: plain ``x + y`` residuals, ``jnp.mean`` pooling,
``jax.nn.relu6``, ``nnx.Dropout`` drawing from ``rngs``, ``nnx.MultiHeadAttention``,
``LinearGeneral``/``Einsum``/``Embed`` with ``attend`` and a zero-initialised head. Used
by ``test_any_model_nnx.py``; sizes are tiny so that each compiles in seconds on CPU."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


class CNN(nnx.Module):
  """The flax MNIST tutorial's CNN (smaller): conv, dropout, BatchNorm, average pool; its
  call takes the dropout ``rngs`` (``model(x, rngs=rngs)``)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(8, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.025)
    self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm2 = nnx.BatchNorm(16, rngs=rngs)
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(4 * 4 * 16, 32, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025)
    self.linear2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.dropout2(self.conv2(x), rngs=rngs))))
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
    return self.linear2(x)


class InvertedResidual(nnx.Module):
  """MobileNetV2's block: 1x1 expand, 3x3 depthwise (``feature_group_count=C``), ReLU6,
  a linear 1x1 bottleneck, a residual add when the shapes allow."""

  def __init__(self, cin: int, cout: int, expand: int, strides: int = 1, *, rngs: nnx.Rngs):
    c = cin * expand
    self.expand = nnx.Conv(cin, c, (1, 1), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(c, momentum=0.9, rngs=rngs)
    self.depthwise = nnx.Conv(c, c, (3, 3), strides=strides, feature_group_count=c, use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(c, momentum=0.9, rngs=rngs)
    self.project = nnx.Conv(c, cout, (1, 1), use_bias=False, rngs=rngs)
    self.bn3 = nnx.BatchNorm(cout, momentum=0.9, rngs=rngs)
    self.residual = strides == 1 and cin == cout

  def __call__(self, x):
    y = jax.nn.relu6(self.bn1(self.expand(x)))
    y = jax.nn.relu6(self.bn2(self.depthwise(y)))
    y = self.bn3(self.project(y))  # linear bottleneck: signed output
    return x + y if self.residual else y


class MobileNetV2(nnx.Module):

  def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), strides=2, use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(8, momentum=0.9, rngs=rngs)
    self.blocks = nnx.List([InvertedResidual(8, 8, 2, rngs=rngs), InvertedResidual(8, 8, 2, rngs=rngs),
                            InvertedResidual(8, 12, 2, strides=2, rngs=rngs)])
    self.head = nnx.Linear(12, num_classes, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu6(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))


class EncoderBlock(nnx.Module):
  """The flax ViT tutorial's encoder block: pre-LayerNorm attention and MLP, dropout."""

  def __init__(self, width: int, heads: int, mlp_dim: int, dropout: float = 0.1, *, rngs: nnx.Rngs):
    self.norm1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(heads, width, broadcast_dropout=False, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp = nnx.Sequential(nnx.Linear(width, mlp_dim, rngs=rngs), nnx.gelu, nnx.Dropout(dropout, rngs=rngs),
                              nnx.Linear(mlp_dim, width, rngs=rngs), nnx.Dropout(dropout, rngs=rngs))

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class ViT(nnx.Module):
  """Patch conv, class token, learned position embedding, encoder blocks, a final
  LayerNorm and a zero-initialised head (big_vision's default)."""

  def __init__(self, num_classes: int = 10, width: int = 16, patch: int = 4, image: int = 16, *,
               rngs: nnx.Rngs):
    n = (image // patch) ** 2
    self.patches = nnx.Conv(3, width, (patch, patch), strides=patch, padding="VALID", rngs=rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, width)))
    self.pos_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n + 1, width)))
    self.encoder = nnx.List([EncoderBlock(width, 2, 32, rngs=rngs) for _ in range(2)])
    self.final_norm = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, num_classes, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x):
    x = self.patches(x)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    x = jnp.concatenate([jnp.tile(self.cls_token[...], (b, 1, 1)), x], axis=1) + self.pos_embedding[...]
    for block in self.encoder:
      x = block(x)
    return self.head(self.final_norm(x)[:, 0])


class DecoderLM(nnx.Module):
  """A decoder-only LM: Embed, causal grouped-query attention (``is_causal``), a
  LinearGeneral and an Einsum MLP, the logits from ``Embed.attend`` (tied weights)."""

  def __init__(self, vocab: int = 32, width: int = 16, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, width, rngs=rngs)
    self.layers = nnx.List()
    for _ in range(2):
      self.layers.append(nnx.Dict(
          norm1=nnx.LayerNorm(width, rngs=rngs),
          attn=nnx.MultiHeadAttention(2, width, num_kv_heads=1, decode=False, rngs=rngs),
          norm2=nnx.LayerNorm(width, rngs=rngs),
          up=nnx.LinearGeneral(width, (2, 16), rngs=rngs),
          down=nnx.Einsum("bthm,hmd->btd", (2, 16, width), (width,), rngs=rngs)))
    self.final_norm = nnx.LayerNorm(width, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = x + layer["attn"](layer["norm1"](x), is_causal=True)
      x = x + layer["down"](nnx.relu(layer["up"](layer["norm2"](x))))
    return self.embed.attend(self.final_norm(x))
