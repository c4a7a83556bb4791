"""Integer conversion through the ops between layers that need no marking: concatenation,
channel shuffle with group convolutions, strided/dilated convs and flattening; and a
marked residual add whose two branches have different ranges."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import micronet_jax as mj
from micronet_jax._src.flax import ops
from micronet_jax._src.flax.calibrate import calibrate
from micronet_jax._src.deploy.integer import fake_quant_codes
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
  assert deploy.layers["c"].requant.m_hi.shape == (10,)
  assert len(np.unique(np.asarray(deploy.layers["c"].requant.m_hi))) > 1
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


class TwoScaleResidual(nn.Module):
  """A residual add of two branches whose ranges differ (a ReLU branch and a wide,
  signed 1x1 branch), then a conv and a classifier."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    a = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="a")(x))
    b = nn.Conv(4, (1, 1), name="b")(x)
    y = nn.relu(ops.Add()(a, b))
    y = nn.relu(nn.Conv(6, (3, 3), strides=2, name="c")(y))
    return nn.Dense(5, name="head")(y.reshape((y.shape[0], -1)))


def test_residual_add_shares_the_union_range_through_the_integer_path():
  model = TwoScaleResidual()
  x = X[:32]
  float_vars = init_variables(model, x[:1])
  params = float_vars["params"]
  float_vars = {**float_vars, "params": {**params, "b": {**params["b"], "kernel": params["b"]["kernel"] * 6.0}}}
  qmodel = mj.quantize_model(model, mj.iao_rules(8, 8, observer=mj.MinMax()))
  v = mj.quantize_variables(qmodel, float_vars, x[:1], train=False)
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, ops.Add) and context.module.act_quant is not None:
      seen["a"], seen["b"] = args
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # one calibration batch, eager, the Add's inputs recorded
    _, upd = qmodel.apply(v, x, train=False, mutable=["quant_stats"])
  v = {**v, **upd}
  s = v["quant_stats"]["Add_0"]
  lo_a, hi_a, lo_b, hi_b = (float(f(seen[k])) for k in "ab" for f in (jnp.min, jnp.max))
  assert (float(s["input_a"].min), float(s["input_a"].max)) == (lo_a, hi_a)
  assert (float(s["input_b"].min), float(s["input_b"].max)) == (lo_b, hi_b)
  assert (float(s["input"].min), float(s["input"].max)) == (min(lo_a, lo_b), max(hi_a, hi_b))
  assert lo_a == 0.0 and lo_b < 0.0 and hi_b > 2 * hi_a  # the union is neither input's range
  # the integer deploy requantizes both inputs to the union's scale and agrees
  deploy = mj.convert(qmodel, v, x[:2])
  scale, zp = mj.AffineActivation(8).qparams(s["input"])
  assert int(deploy.layers["Add_0"].grid.zero_point) == int(zp)
  captured = {}
  logits_int = mj.integer_apply(deploy, deploy.quantize_input(x), capture=captured)
  logits_fq = qmodel.apply(v, x, train=False)
  codes = fake_quant_codes(qmodel, v, x)
  for layer in codes:
    assert int(jnp.abs(codes[layer] - captured[layer]).max()) <= 1, layer
  np.testing.assert_array_equal(jnp.argmax(logits_int, -1), jnp.argmax(logits_fq, -1))
