"""Small Linen models written the way public Flax code writes them (flax examples,
big_vision, MaxText style), with nothing marked for quantization: plain ``x + y``
residuals, ``jnp.mean`` pooling, ``jax.nn.relu6``, ``nn.MultiHeadDotProductAttention``,
``DenseGeneral``/``Einsum``/``Embed`` with ``attend``, kernels boxed by
``nn.with_logical_partitioning`` and a zero-initialised head. Used by
``test_any_model.py``; sizes are tiny so that each compiles in seconds on CPU."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

lecun = nn.initializers.lecun_normal()


def partitioned(*axes: str):
  return nn.with_logical_partitioning(lecun, axes)


class ResNetBlock(nn.Module):
  filters: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
    y = nn.relu(norm("bn1")(nn.Conv(self.filters, (3, 3), self.strides, use_bias=False, name="conv1")(x)))
    y = norm("bn2")(nn.Conv(self.filters, (3, 3), use_bias=False, name="conv2")(y))
    if x.shape != y.shape:
      x = norm("proj_bn")(nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="proj")(x))
    return nn.relu(x + y)


class ResNet(nn.Module):
  """flax/examples/imagenet's ResNet shape: stem conv-BN-relu, basic blocks, mean pool, head."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn_init")(
        nn.Conv(8, (3, 3), use_bias=False, name="conv_init")(x)))
    x = ResNetBlock(8)(x, train)
    x = ResNetBlock(16, strides=2)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(x)


class InvertedResidual(nn.Module):
  out: int
  expand: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train)  # noqa: E731
    c = x.shape[-1] * self.expand
    y = jax.nn.relu6(norm()(nn.Conv(c, (1, 1), use_bias=False)(x)))
    y = jax.nn.relu6(norm()(nn.Conv(c, (3, 3), self.strides, feature_group_count=c, use_bias=False)(y)))
    y = norm()(nn.Conv(self.out, (1, 1), use_bias=False)(y))  # linear bottleneck: signed output
    return x + y if self.strides == 1 and x.shape[-1] == self.out else y


class MobileNetV2(nn.Module):
  """Depthwise convs, ReLU6, linear bottlenecks and residual adds."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jax.nn.relu6(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3), 2, use_bias=False)(x)))
    x = InvertedResidual(8, expand=2)(x, train)
    x = InvertedResidual(8, expand=2)(x, train)
    x = InvertedResidual(12, expand=2, strides=2)(x, train)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class EncoderBlock(nn.Module):
  mlp_dim: int
  heads: int

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, kernel_init=partitioned("embed", "heads", "kv"),
                                        deterministic=deterministic)(nn.LayerNorm()(x))
    x = x + y
    y = nn.Dense(self.mlp_dim, kernel_init=partitioned("embed", "mlp"))(nn.LayerNorm()(x))
    y = nn.Dense(x.shape[-1], kernel_init=partitioned("mlp", "embed"))(nn.gelu(y))
    return x + y


class ViT(nn.Module):
  """big_vision's ViT shape: patch conv, learned position embedding, class token,
  pre-LayerNorm encoder blocks, a zero-initialised head."""

  num_classes: int = 10
  width: int = 16
  patch: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (self.patch, self.patch), self.patch, padding="VALID", name="embedding")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
    x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
    for i in range(2):
      x = EncoderBlock(32, 2, name=f"encoderblock_{i}")(x, deterministic=not train)
    x = nn.LayerNorm(name="encoder_norm")(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x[:, 0])


class DecoderLM(nn.Module):
  """A decoder-only LM (lm1b/MaxText shape): Embed, causal attention, a DenseGeneral
  and an Einsum MLP, the logits from ``Embed.attend`` (tied weights); no ``train``."""

  vocab: int = 32
  width: int = 16

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.width, embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")))
    x = embed(tokens)
    mask = nn.make_causal_mask(tokens)
    for i in range(2):
      y = nn.MultiHeadDotProductAttention(num_heads=2, kernel_init=partitioned("embed", "heads", "kv"),
                                          name=f"attn_{i}")(nn.LayerNorm()(x), mask=mask)
      x = x + y
      y = nn.DenseGeneral((2, 16), kernel_init=partitioned("embed", "heads", "mlp"), name=f"up_{i}")(nn.LayerNorm()(x))
      y = nn.Einsum((2, 16, self.width), "bthm,hmd->btd", name=f"down_{i}")(nn.relu(y))
      x = x + y
    return embed.attend(nn.LayerNorm()(x))


class VAE(nn.Module):
  """flax/examples/vae's shape: the call takes the sampling key, ``(x, z_rng)``, no ``train``."""

  latents: int = 4

  @nn.compact
  def __call__(self, x, z_rng):
    h = nn.relu(nn.Dense(32, name="enc_fc1")(x))
    mean, logvar = nn.Dense(self.latents, name="enc_mean")(h), nn.Dense(self.latents, name="enc_logvar")(h)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(z_rng, logvar.shape)
    return nn.Dense(x.shape[-1], name="dec_fc2")(nn.relu(nn.Dense(32, name="dec_fc1")(z))), mean, logvar
