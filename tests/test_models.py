"""The models against micronet's definitions: parameter counts, output shapes on both
input sizes, channel shuffle, cfg validation, the ReLU on NIN's logits and PyTorch's
BatchNorm momentum."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax import models
from micronet_jax.models import nin as nin_lib

CIFAR = (1, 32, 32, 3)
FMNIST = (2, 28, 28, 1)


def abstract_init(model, shape):
  """Variables of ``model`` for inputs of ``shape`` as ShapeDtypeStructs (no FLOPs)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def n_params(variables) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize("model, expected", [
    (models.NIN(), 969_822),  # micronet: conv 966,986 + BN 2,836
    (models.NINGC(), 591_390),  # micronet: conv 582,666 + BN 8,724
    (models.resnet18(), 11_173_962),
], ids=["nin", "nin_gc", "resnet18"])
def test_parameter_counts_match_micronet(model, expected):
  assert n_params(abstract_init(model, CIFAR)) == expected


def test_nin_parameter_count_by_layer():
  """The same count from micronet's table of layers (conv with bias + BN gamma/beta)."""
  widths = (3, *nin_lib.NIN_CFG, 10)
  kernels = [k for k, _ in nin_lib.NIN_LAYOUT]
  conv = sum(k * k * cin * cout + cout for k, cin, cout in zip(kernels, widths[:-1], widths[1:]))
  bn = 2 * sum(widths[1:])
  assert (conv, bn) == (966_986, 2_836)
  assert n_params(abstract_init(models.NIN(), CIFAR)) == conv + bn


# ----------------------------------------------------------------------------- shapes


@pytest.fixture(scope="module")
def nin_28():
  """(model, variables, logits) of the default NIN on a (2, 28, 28, 1) batch."""
  model = models.NIN()
  x = jax.random.normal(jax.random.key(1), FMNIST)
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
  return model, variables, jax.jit(lambda v: model.apply(v, x, train=False))(variables)


def test_nin_logits_on_28x28x1(nin_28):
  _, _, logits = nin_28
  assert logits.shape == (2, 10)


@pytest.mark.parametrize("model", [models.LeNet(), models.NINGC()], ids=["lenet", "nin_gc"])
def test_logits_on_28x28x1(model):
  x = jax.random.normal(jax.random.key(1), FMNIST)
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
  logits = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))


@pytest.mark.parametrize("model", [models.NIN(), models.NINGC(), models.resnet18()],
                         ids=["nin", "nin_gc", "resnet18"])
@pytest.mark.parametrize("shape", [FMNIST, (3, 32, 32, 3)], ids=["28x28x1", "32x32x3"])
def test_logits_shape_abstract(model, shape):
  variables = abstract_init(model, shape)
  out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape), train=False), variables)
  assert out.shape == (shape[0], 10)


def test_num_classes_and_cfg_fields():
  out = jax.eval_shape(lambda: models.get_model("nin", num_classes=7, cfg=(8,) * 8).init_with_output(
      jax.random.key(0), jnp.zeros(FMNIST))[0])
  assert out.shape == (2, 7)
  v = abstract_init(models.NIN(cfg=(24, 20, 12, 24, 24, 24, 24, 24)), FMNIST)
  assert [v["params"][f"block{i}"]["bn"]["scale"].shape[0] for i in range(9)] == [24, 20, 12, 24, 24, 24, 24, 24, 10]


# ----------------------------------------------------------------------------- shuffle


def torch_channel_shuffle_nchw(x: np.ndarray, groups: int) -> np.ndarray:
  """micronet's definition on NCHW: view(N, g, C/g, H, W) -> transpose(1, 2) -> reshape."""
  n, c, h, w = x.shape
  return x.reshape(n, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(n, c, h, w)


@pytest.mark.parametrize("channels, groups", [(8, 2), (12, 3), (32, 16), (64, 4), (6, 1), (6, 6)])
def test_channel_shuffle_matches_pytorch_definition(channels, groups):
  x = np.random.default_rng(channels * groups).normal(size=(2, 3, 5, channels)).astype(np.float32)
  expected = torch_channel_shuffle_nchw(x.transpose(0, 3, 1, 2), groups).transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(np.asarray(nin_lib.channel_shuffle(jnp.asarray(x), groups)), expected)


def test_channel_shuffle_is_a_permutation_with_known_order():
  idx = jnp.arange(6.0).reshape(1, 1, 1, 6)
  # groups of 3: [0 1 2 | 3 4 5] -> interleaved [0 3 1 4 2 5]
  np.testing.assert_array_equal(np.asarray(nin_lib.channel_shuffle(idx, 2)).ravel(), [0, 3, 1, 4, 2, 5])


# ----------------------------------------------------------------------------- cfg validation


@pytest.mark.parametrize("index, value", [(0, 255), (3, 500), (4, 510), (7, 1020)])
def test_nin_gc_cfg_not_divisible_names_the_index(index, value):
  cfg = list(nin_lib.NIN_GC_CFG)
  cfg[index] = value
  with pytest.raises(ValueError, match=rf"cfg\[{index}\]"):
    abstract_init(models.NINGC(cfg=tuple(cfg)), FMNIST)


@pytest.mark.parametrize("cls", [models.NIN, models.NINGC])
@pytest.mark.parametrize("cfg", [(192,) * 7, (192,) * 9, (192, 160, 96, 0, 192, 192, 192, 192)],
                         ids=["7 entries", "9 entries", "zero width"])
def test_bad_cfg_length_or_width_raises(cls, cfg):
  with pytest.raises(ValueError, match="cfg"):
    abstract_init(cls(cfg=cfg), FMNIST)


# ----------------------------------------------------------------------------- NIN specifics


def test_nin_logits_are_non_negative(nin_28):
  """micronet's NIN has BN and ReLU on the 10-class layer, before the average pool."""
  model, variables, logits = nin_28
  assert np.all(np.asarray(logits) >= 0.0)
  # A class whose last BN shift is very negative is exactly 0, not negative.
  params = jax.tree.map(np.array, variables["params"])
  params["block8"]["bn"]["bias"][:5] = -1e3
  logits = np.asarray(jax.jit(lambda v: model.apply(v, jnp.ones(FMNIST), train=False))({**variables, "params": params}))
  np.testing.assert_array_equal(logits[:, :5], 0.0)
  assert np.all(logits[:, 5:] > 0.0)


def test_batchnorm_momentum_is_pytorch_0_1():
  """Train mode: running = 0.9 * running + 0.1 * batch statistic (PyTorch momentum 0.1).

  The batch variance is the biased one (Flax's); PyTorch updates running_var with the
  unbiased one, n / (n - 1) larger (n = N*H*W per channel, 131,072 for a CIFAR batch of
  128, so the difference is negligible in practice). This tiny input (n = 72) pins the
  biased convention.
  """
  model = models.NIN(cfg=(6, 5, 4, 6, 5, 4, 6, 5))
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 1))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  variables = jax.tree.map(lambda a: np.full(a.shape, 0.1, a.dtype), variables)
  variables["params"]["block0"]["conv"]["kernel"] = np.random.default_rng(1).normal(
      size=(5, 5, 1, 6)).astype(np.float32)
  rng = np.random.default_rng(0)
  old = {"mean": rng.normal(size=6).astype(np.float32), "var": rng.uniform(0.5, 1.5, 6).astype(np.float32)}
  stats = jax.tree.map(np.array, variables["batch_stats"])
  stats["block0"]["bn"].update(old)
  variables = {**variables, "batch_stats": stats}

  _, state = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats", "intermediates"],
                                           capture_intermediates=lambda mdl, _: mdl.name == "conv"))(variables)
  pre_bn = np.asarray(state["intermediates"]["block0"]["conv"]["__call__"][0], np.float64)
  assert pre_bn.shape == (2, 6, 6, 6)
  batch_mean = pre_bn.mean(axis=(0, 1, 2))
  batch_var = pre_bn.var(axis=(0, 1, 2))  # biased
  new = state["batch_stats"]["block0"]["bn"]
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * batch_var, rtol=1e-5, atol=1e-6)
  unbiased = 0.9 * old["var"] + 0.1 * batch_var * 72 / 71
  assert np.all(np.abs(np.asarray(new["var"]) - unbiased) > 1e-5)


def test_batchnorm_epsilon_is_pytorch_1e_5():
  bn = nin_lib.batch_norm(train=False)
  assert (bn.epsilon, bn.momentum) == (1e-5, 0.9)
