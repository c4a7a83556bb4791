"""``model_stats``: parameters, MACs per example and size at the stored bit widths,
all computed here by hand from the layer shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from micronet_jax import models
from micronet_jax.models import nin as nin_lib
from micronet_jax._src.core.rules import dorefa_rules, iao_rules
from micronet_jax._src.flax.stats import model_stats
from micronet_jax._src.flax.transform import quantize_model

LENET_X = jnp.zeros((2, 28, 28, 1))

# LeNet: (kernel elements, bias elements) per layer.
LENET_LAYERS = {
    "conv1": (5 * 5 * 1 * 10, 10),
    "conv2": (5 * 5 * 10 * 20, 20),
    "dense1": (320 * 50, 50),  # 4 x 4 x 20 = 320 inputs
    "dense2": (50 * 10, 10),
}
LENET_KERNELS = sum(k for k, _ in LENET_LAYERS.values())
LENET_BIASES = sum(b for _, b in LENET_LAYERS.values())
LENET_MACS = 24 * 24 * 10 * 25 + 8 * 8 * 20 * 250 + 320 * 50 + 50 * 10


def abstract_variables(model, x):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def test_lenet_params_macs_and_float_size():
  model = models.LeNet()
  stats = model_stats(model, abstract_variables(model, LENET_X), LENET_X, train=False)
  assert LENET_KERNELS + LENET_BIASES == 21_840
  assert stats.params == 21_840
  assert LENET_MACS == 480_500
  assert stats.macs == LENET_MACS
  assert stats.size_mb == pytest.approx(21_840 * 4 / 1e6) == stats.float_size_mb
  assert stats.compression == pytest.approx(0.0)
  row = stats.row()
  assert row["params"] == 21_840 and row["MMACs"] == pytest.approx(0.4805) and row["size_mb"] == pytest.approx(0.08736)


def test_macs_are_per_example():
  model = models.LeNet()
  for n in (1, 5):
    x = jnp.zeros((n, 28, 28, 1))
    assert model_stats(model, abstract_variables(model, x), x, train=False).macs == LENET_MACS


def test_lenet_iao_w8a8_size():
  qmodel = quantize_model(models.LeNet(), iao_rules(8, 8))
  variables = abstract_variables(qmodel, LENET_X)
  assert "quant_stats" in variables  # observer state is not counted as parameters
  stats = model_stats(qmodel, variables, LENET_X, train=False)
  size_bytes = LENET_KERNELS * 8 / 8 + LENET_BIASES * 32 / 8  # 21,750 + 360
  assert stats.params == 21_840 and stats.macs == LENET_MACS
  assert stats.size_mb == pytest.approx(size_bytes / 1e6) == pytest.approx(0.02211)
  assert stats.float_size_mb == pytest.approx(0.08736)
  assert stats.compression == pytest.approx(1 - size_bytes / (21_840 * 4))
  assert stats.row()["compression"] == pytest.approx(stats.compression)


def test_lenet_iao_float_weights_keep_32_bits():
  qmodel = quantize_model(models.LeNet(), iao_rules(32, 8))  # activations only
  stats = model_stats(qmodel, abstract_variables(qmodel, LENET_X), LENET_X, train=False)
  assert stats.size_mb == pytest.approx(stats.float_size_mb) and stats.compression == pytest.approx(0.0)


def test_lenet_dorefa_w4_first_conv_stays_float():
  qmodel = quantize_model(models.LeNet(), dorefa_rules(4, 4))
  stats = model_stats(qmodel, abstract_variables(qmodel, LENET_X), LENET_X, train=False)
  first = LENET_LAYERS["conv1"][0]
  size_bytes = first * 32 / 8 + (LENET_KERNELS - first) * 4 / 8 + LENET_BIASES * 32 / 8  # 1,000 + 10,750 + 360
  assert stats.size_mb == pytest.approx(size_bytes / 1e6) == pytest.approx(0.01211)
  assert stats.compression == pytest.approx(1 - size_bytes / (21_840 * 4))


def conv_macs(hw: int, k: int, cin_per_group: int, cout: int) -> int:
  return hw * hw * cout * k * k * cin_per_group


def test_nin_macs_on_cifar():
  """micronet: "about 0.22 GMAC"; every block by hand (pools after blocks 2 and 5)."""
  widths = (3, *nin_lib.NIN_CFG, 10)
  sizes = (32, 32, 32, 16, 16, 16, 8, 8, 8)
  by_hand = sum(conv_macs(hw, k, cin, cout)
                for hw, (k, _), cin, cout in zip(sizes, nin_lib.NIN_LAYOUT, widths[:-1], widths[1:]))
  assert by_hand == 222_486_528
  x = jnp.zeros((1, 32, 32, 3))
  stats = model_stats(models.NIN(), abstract_variables(models.NIN(), x), x, train=False)
  assert stats.macs == 222_486_528
  assert stats.params == 969_822 and stats.size_mb == pytest.approx(969_822 * 4 / 1e6)


def test_nin_gc_macs_count_grouped_convs_per_group():
  """micronet: "about 0.158 GMAC"; a grouped conv contracts over Cin / groups."""
  widths = (3, *nin_lib.NIN_GC_CFG, 10)
  sizes = (32, 32, 32, 16, 16, 16, 8, 8, 8)
  by_hand = sum(conv_macs(hw, k, cin // g, cout)
                for hw, (k, _, g, _), cin, cout in zip(sizes, nin_lib.NIN_GC_LAYOUT, widths[:-1], widths[1:]))
  assert by_hand == pytest.approx(0.158e9, rel=0.01)
  x = jnp.zeros((1, 32, 32, 3))
  stats = model_stats(models.NINGC(), abstract_variables(models.NINGC(), x), x, train=False)
  assert stats.macs == by_hand and stats.params == 591_390
