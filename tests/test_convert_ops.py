"""Integer conversion through the ops between layers that need no marking: concatenation,
channel shuffle with group convolutions, strided/dilated convs and flattening."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import micronet_jax as mj
from micronet_jax.calibrate import calibrate
from micronet_jax.convert import fake_quant_codes
from micronet_jax.models import NINGC
from tests.conftest import init_variables

RNG = np.random.default_rng(0)
X = jnp.asarray(RNG.normal(size=(64, 12, 12, 3)).astype(np.float32))


class ConcatNet(nn.Module):
  """Two branches (each on its own accumulator scale), concatenated on channels."""

  scale_b: float = 1.0  # != 1: a float multiply between layers, not integer-exact

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = nn.relu(nn.Conv(4, (3, 3), name="a")(x))
    b = nn.relu(nn.Conv(6, (1, 1), strides=2, name="b")(x))
    a = nn.max_pool(a, (2, 2), strides=(2, 2))
    y = jnp.concatenate([a, b * self.scale_b if self.scale_b != 1.0 else b], axis=-1)
    y = nn.relu(nn.Conv(8, (3, 3), kernel_dilation=2, padding="SAME", name="c")(y))
    return nn.Dense(5, name="head")(y.reshape((y.shape[0], -1)))


def _convert_and_compare(model, x, rules):
  qmodel = mj.quantize_model(model, rules)
  v = mj.quantize_variables(qmodel, init_variables(model, x[:1]), x[:1], train=False)
  v = calibrate(qmodel, v, [x[i : i + 16] for i in range(0, len(x), 16)])
  deploy = mj.convert(qmodel, v, x[:2])
  captured = {}
  logits_int = mj.integer_apply(deploy, deploy.quantize_input(x), capture=captured)
  logits_fq = qmodel.apply(v, x, train=False)
  codes = fake_quant_codes(qmodel, v, x)
  return deploy, logits_int, logits_fq, codes, captured


def test_concat_of_branches_with_different_scales():
  deploy, logits_int, logits_fq, codes, captured = _convert_and_compare(ConcatNet(), X, mj.iao_rules(8, 8))
  # the consumer of the concatenation requantizes each half from its own producer's scale
  assert deploy.layers["c"]["req_m"].shape == (10,)
  assert len(np.unique(np.asarray(deploy.layers["c"]["req_m"]))) > 1
  for layer in codes:
    assert int(jnp.abs(codes[layer] - captured[layer]).max()) <= 1, layer
  np.testing.assert_array_equal(jnp.argmax(logits_int, -1), jnp.argmax(logits_fq, -1))
  np.testing.assert_allclose(logits_int, logits_fq, atol=0.02 * float(jnp.abs(logits_fq).max()))


def test_float_multiply_between_layers_is_reported():
  with pytest.raises(ValueError, match="the input of c is not a quantized tensor"):
    _convert_and_compare(ConcatNet(scale_b=3.0), X, mj.iao_rules(8, 8))


def test_nin_gc_group_convs_and_channel_shuffles():
  model = NINGC(cfg=(16, 16, 16, 16, 16, 32, 32, 32))  # divisible by every conv's groups
  x = jnp.asarray(RNG.normal(size=(32, 16, 16, 3)).astype(np.float32))
  with pytest.raises(ValueError, match="BatchNorm that is not folded"):  # an unfolded BN is float maths
    _convert_and_compare(model, x, mj.iao_rules(8, 8))
  deploy, logits_int, logits_fq, codes, captured = _convert_and_compare(model, x, mj.iao_rules(8, 8, fold_bn=True))
  assert set(captured) == {f"block{i}/conv" for i in range(9)}
  for layer in codes:  # free-running over 9 layers: rare one-step differences can compound
    diff = jnp.abs(codes[layer] - captured[layer])
    assert int(diff.max()) <= 3 and float(jnp.mean(diff > 1)) < 0.001, layer
    assert float(jnp.mean(diff != 0)) < 0.01, layer
  agree = float(jnp.mean(jnp.argmax(logits_int, -1) == jnp.argmax(logits_fq, -1)))
  assert agree >= 31 / 32, agree
