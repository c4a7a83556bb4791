"""BatchNorm folding (bn_fold + the transform's conv -> BN discovery): the folding
formula, equality with conv + BatchNorm when quantization is off (eval and training,
running statistics and gradients included), the 8-bit path, bn_calib, what is not
folded, and QAFT with frozen statistics."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import micronet_jax as mj
from micronet_jax.app import train
from micronet_jax._src.core import bn_fold as core_fold
from micronet_jax._src.core.bn_fold import batch_moments, fold_batch_norm
from micronet_jax._src.flax.calibrate import calibrate
from micronet_jax.models import NIN
from micronet_jax._src.flax.ops import global_avg_pool
from tests.conftest import init_variables

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))


OFF = mj.QuantRule(fold_bn=True)  # folding with quantization off: weight=None, act=None


class ConvBN(nn.Module):
  """conv(bias) -> BN -> relu -> conv(no bias) -> BN -> global average pool (logits)."""

  fast_variance: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda name, momentum, eps: nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=eps,
                                                  use_fast_variance=self.fast_variance, name=name)
    x = nn.Conv(4, (3, 3), name="conv")(x)
    x = nn.relu(bn("bn", 0.9, 1e-5)(x))
    x = nn.Conv(3, (3, 3), use_bias=False, name="conv2")(x)
    x = bn("bn2", 0.8, 1e-3)(x)
    return global_avg_pool(x)


class OneConvBN(nn.Module):
  """A single conv -> BN (its BN statistics are computed from exactly the same conv output)."""

  fast_variance: bool = True
  momentum: float = 0.9
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), name="conv")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=self.eps,
                        use_fast_variance=self.fast_variance, name="bn")(x)


def randomize_bn(variables: dict, seed: int = 0) -> dict:
  """Non-trivial BN parameters and running statistics (gamma of both signs) and conv
  biases everywhere."""
  rng = np.random.default_rng(seed)

  def walk(params, stats):
    for k in params:
      if isinstance(params[k], dict) and "scale" in params[k] and k in stats and "var" in stats[k]:
        c = params[k]["scale"].shape[0]
        params[k]["scale"] = jnp.asarray(rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c), jnp.float32)
        params[k]["bias"] = jnp.asarray(rng.normal(size=c), jnp.float32)
        stats[k]["mean"] = jnp.asarray(rng.normal(size=c), jnp.float32)
        stats[k]["var"] = jnp.asarray(rng.uniform(0.2, 3.0, c), jnp.float32)
      elif isinstance(params[k], dict) and "kernel" in params[k] and "bias" in params[k]:
        params[k]["bias"] = jnp.asarray(rng.normal(size=params[k]["bias"].shape) * 0.5, jnp.float32)
      elif isinstance(params[k], dict):
        walk(params[k], stats.get(k, {}))

  out = jax.tree.map(lambda a: a, variables)  # fresh dicts
  walk(out["params"], out["batch_stats"])
  assert any(float(jnp.min(a)) < 0 for a in jax.tree.leaves(out["params"]))
  return out


def make(model, seed=0, x=X):
  return randomize_bn(init_variables(model, x, seed), seed)


# ----------------------------------------------------------------------------- the formula


def test_fold_batch_norm_hand_numbers_per_output_channel():
  kernel = jnp.array([[[[1.0, -2.0, 0.5]], [[3.0, 4.0, -1.0]]]])  # (1, 2, 1, 3): HWIO, 3 output channels
  bias = jnp.array([0.5, -1.0, 2.0])
  scale = jnp.array([2.0, -1.0, 0.5])
  beta = jnp.array([0.1, 0.2, -0.3])
  mean = jnp.array([1.0, -2.0, 0.0])
  var = jnp.array([3.0, 0.0, 15.0])
  eps = 1.0
  # gamma / sqrt(var + eps) = 2/2, -1/1, 0.5/4
  inv = np.array([1.0, -1.0, 0.125])
  w, b = fold_batch_norm(kernel, bias, scale, beta, mean, var, eps)
  np.testing.assert_allclose(w, np.asarray(kernel) * inv, rtol=1e-7)
  np.testing.assert_allclose(w[0, 0, 0], [1.0, 2.0, 0.0625], rtol=1e-7)
  np.testing.assert_allclose(w[0, 1, 0], [3.0, -4.0, -0.125], rtol=1e-7)
  # beta + (b - mu) * inv: 0.1 + (0.5 - 1) * 1, 0.2 + (-1 + 2) * -1, -0.3 + 2 * 0.125
  np.testing.assert_allclose(b, [-0.4, -0.8, -0.05], rtol=1e-6)
  # no conv bias: b = 0
  _, b0 = fold_batch_norm(kernel, None, scale, beta, mean, var, eps)
  np.testing.assert_allclose(b0, [0.1 - 1.0, 0.2 - 2.0, -0.3], rtol=1e-6)


def test_batch_moments_mean_and_biased_variance_over_all_but_channels():
  z = np.random.default_rng(0).normal(size=(3, 4, 5, 2)).astype(np.float32)
  mu, var = batch_moments(jnp.asarray(z))
  np.testing.assert_allclose(mu, z.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(var, z.var((0, 1, 2), ddof=0), rtol=1e-5)


class DictSeam:
  """The seam contract on plain dicts, no framework: what ``core.bn_fold`` needs of one."""

  path = "bn"

  def __init__(self, params: dict, stats: dict, running: dict, stats_move: bool):
    self.params, self.stats, self.running_stats, self.stats_move = params, stats, running, stats_move

  def param(self, name, init):
    return self.params.setdefault(name, init())

  def stat(self, name, init):
    return _DictRef(self.stats, name, init)

  def running(self, name, init):
    return _DictRef(self.running_stats, name, init)


class _DictRef:

  def __init__(self, d, name, init):
    d.setdefault(name, init())
    self.d, self.name = d, name

  @property
  def value(self):
    return self.d[self.name]

  @value.setter
  def value(self, v):
    self.d[self.name] = v


@pytest.mark.parametrize("init_from_batch", [False, True])
def test_core_folded_conv_bn_on_a_framework_free_seam_equals_linen(init_from_batch):
  """``core.bn_fold.folded_conv_bn`` reaches the BatchNorm only through the seam: on dicts
  and a ``lax`` conv it gives Linen's folded output, running statistics and flag."""
  rule = mj.QuantRule(weight=mj.AffineWeight(8, per_channel=True), fold_bn=True, bn_init_from_batch=init_from_batch)
  model = OneConvBN()
  v = make(model)
  qmodel = mj.quantize_model(model, [rule])
  v = mj.quantize_variables(qmodel, v, X)
  y_lin, upd = qmodel.apply(v, X, train=True, mutable=["batch_stats", "quant_stats"])

  conv, bn = v["params"]["conv"], v["params"]["bn"]
  conv_fn = lambda w: jax.lax.conv_general_dilated(  # noqa: E731  (nn.Conv's SAME, NHWC/HWIO)
      X, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  z = conv_fn(conv["kernel"]) + conv["bias"]
  assert isinstance(DictSeam({}, {}, {}, True), core_fold.BatchNormSeam)
  seam = DictSeam({}, dict(v.get("quant_stats", {}).get("bn", {})), dict(v["batch_stats"]["bn"]), stats_move=True)
  flag = seam.stat(core_fold.BN_INIT_FLAG, lambda: jnp.zeros((), jnp.bool_)) if init_from_batch else None
  norm = core_fold.BatchNormParams(bn["scale"], bn["bias"], 1e-5, 0.9)
  y = core_fold.folded_conv_bn(seam, z, conv["kernel"], conv["bias"], conv_fn, rule.weight, norm, calib=False,
                               batch_statistics=True, update=True, first_batch=flag)
  np.testing.assert_array_equal(y, y_lin)
  for k in ("mean", "var"):
    np.testing.assert_array_equal(seam.running_stats[k], upd["batch_stats"]["bn"][k])
  if init_from_batch:
    assert bool(seam.stats[core_fold.BN_INIT_FLAG]) and bool(upd["quant_stats"]["bn"][core_fold.BN_INIT_FLAG])


# ----------------------------------------------------------------------------- quantization off


def test_discovery_pairs_each_conv_with_its_bn():
  plans = mj.quantize_model(ConvBN(), [OFF]).plan(X)
  assert [(p.path, p.folded_bn, p.note, p.quantized) for p in plans] == [
      ("conv", "bn", "BatchNorm folded", False), ("conv2", "bn2", "BatchNorm folded", False)]
  assert [p.folded_bn for p in mj.quantize_model(ConvBN(), [mj.QuantRule()]).plan(X)] == [None, None]


def test_folded_eval_equals_conv_bn_eval():
  model = ConvBN()
  v = make(model)
  y = mj.quantize_model(model, [OFF]).apply(v, X)
  np.testing.assert_allclose(y, model.apply(v, X), atol=1e-5, rtol=0)


def test_folded_eval_equals_nin_eval():
  rule = OFF
  model = NIN(num_classes=5, cfg=(4, 6, 4, 6, 4, 6, 4, 6))
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  v = make(model, seed=1, x=x)
  qmodel = mj.quantize_model(model, [rule])
  plans = qmodel.plan(x)
  assert [p.folded_bn for p in plans] == [f"block{i}/bn" for i in range(9)]
  np.testing.assert_allclose(jax.jit(qmodel.apply)(v, x), jax.jit(model.apply)(v, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fast_variance", [True, False])
def test_folded_training_output_and_batch_stats_equal_batch_norm(fast_variance):
  rule = OFF
  model = ConvBN(fast_variance=fast_variance)
  v = make(model)
  y, upd = mj.quantize_model(model, [rule]).apply(v, X, train=True, mutable=["batch_stats"])
  y_ref, upd_ref = model.apply(v, X, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=0)
  assert jax.tree.structure(upd) == jax.tree.structure(upd_ref)
  assert set(upd["batch_stats"]["bn"]) == {"mean", "var"}
  # The first BN sees exactly the float conv output: statistics bit-identical. The second
  # BN's input differs from the unfolded one by float rounding of the first fold.
  for k in ("mean", "var"):
    np.testing.assert_array_equal(upd["batch_stats"]["bn"][k], upd_ref["batch_stats"]["bn"][k])
    np.testing.assert_allclose(upd["batch_stats"]["bn2"][k], upd_ref["batch_stats"]["bn2"][k], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(upd["batch_stats"]["bn"][k], v["batch_stats"]["bn"][k])  # they did move


@pytest.mark.parametrize("fast_variance", [True, False])  # nn.BatchNorm's E[z^2] - E[z]^2 or two-pass
@pytest.mark.parametrize("momentum,eps", [(0.9, 1e-5), (0.5, 1e-2)])
def test_single_conv_bn_running_stats_bit_identical(momentum, eps, fast_variance):
  model = OneConvBN(fast_variance=fast_variance, momentum=momentum, eps=eps)
  v = make(model)
  y, upd = mj.quantize_model(model, [OFF]).apply(v, X, train=True, mutable=["batch_stats"])
  y_ref, upd_ref = model.apply(v, X, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=0)
  assert jax.tree.structure(upd) == jax.tree.structure(upd_ref)
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_ref)):
    np.testing.assert_array_equal(a, b)


def test_folded_training_gradients_equal_conv_bn():
  rule = OFF
  model = ConvBN()
  v = make(model)
  proj = jax.random.normal(jax.random.key(3), (4, 3))

  def loss(mod, params):
    y, _ = mod.apply({**v, "params": params}, X, train=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y) * proj)  # not a plain sum: that has zero gradient w.r.t. gamma

  g = jax.jit(jax.grad(lambda p: loss(mj.quantize_model(model, [rule]), p)))(v["params"])
  g_ref = jax.jit(jax.grad(lambda p: loss(model, p)))(v["params"])
  for layer, name in [("conv", "kernel"), ("bn", "scale"), ("bn", "bias"), ("conv2", "kernel"), ("bn2", "scale"),
                      ("bn2", "bias")]:
    ref = np.asarray(g_ref[layer][name])
    assert np.abs(ref).max() > 1e-3, (layer, name)
    np.testing.assert_allclose(g[layer][name], ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), err_msg=f"{layer}/{name}")


# ----------------------------------------------------------------------------- 8 bits


def test_eight_bit_folded_params_summary_and_accuracy():
  model = ConvBN()
  v = make(model)
  qmodel = mj.quantize_model(model, mj.iao_rules(8, 8, fold_bn=True))
  qvars = jax.eval_shape(lambda: qmodel.init(KEY, X))
  # The quantized model has the float model's parameter tree: BN gamma/beta stay params.
  assert jax.tree.structure(qvars["params"]) == jax.tree.structure(v["params"])
  assert jax.tree.structure(qvars["batch_stats"]) == jax.tree.structure(v["batch_stats"])
  loaded = mj.quantize_variables(qmodel, v, X, train=False)
  assert loaded["params"] is v["params"] and loaded["batch_stats"] is v["batch_stats"]
  text = mj.summary(qmodel, X)
  rows = {line.split(" | ")[0].strip(): line for line in text.splitlines() if " | " in line}
  assert "BatchNorm folded" in rows["conv"] and "BatchNorm folded" in rows["conv2"]
  assert "quantized" in rows["conv"] and "2 of 2 layers quantized" in text
  # Calibrated on the batch itself, the W8A8 folded model stays close to float: tolerance
  # max |error| < 2% of max |output| (measured 0.0024 of 0.51, i.e. 0.5%).
  cal = calibrate(qmodel, loaded, [X])
  y, y_ref = qmodel.apply(cal, X), model.apply(v, X)
  err = float(jnp.max(jnp.abs(y - y_ref)))
  assert 0 < err < 0.02 * float(jnp.max(jnp.abs(y_ref))), err


def test_bn_calib_uses_running_variance_and_rescales():
  model = OneConvBN(fast_variance=False, momentum=0.7, eps=1e-3)
  v = make(model)
  # Coarse and per tensor, so that which variance is folded into the weights matters (per
  # output channel, Wq(c W) = c Wq(W) for c > 0 and the rescaling would cancel exactly).
  wq = mj.AffineWeight(4, per_channel=False)
  rule = lambda calib: mj.QuantRule(weight=wq, act=None, fold_bn=True, bn_calib=calib)
  y, upd = mj.quantize_model(model, [rule(True)]).apply(v, X, train=True, mutable=["batch_stats"])

  k, b = v["params"]["conv"]["kernel"], v["params"]["conv"]["bias"]
  gamma, beta = v["params"]["bn"]["scale"], v["params"]["bn"]["bias"]
  conv = lambda w: jax.lax.conv_general_dilated(X, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  z = np.asarray(conv(k) + b, np.float64)
  mu_b, var_b = z.mean((0, 1, 2)), z.var((0, 1, 2))
  var_run = 0.7 * np.asarray(v["batch_stats"]["bn"]["var"], np.float64) + 0.3 * var_b  # updated first (as micronet)
  mean_run = 0.7 * np.asarray(v["batch_stats"]["bn"]["mean"], np.float64) + 0.3 * mu_b
  np.testing.assert_allclose(upd["batch_stats"]["bn"]["var"], var_run, rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["bn"]["mean"], mean_run, rtol=1e-5, atol=1e-6)

  w_fold = wq.fake_quant(k * (gamma * jax.lax.rsqrt(jnp.asarray(var_run, jnp.float32) + 1e-3)), channel_axis=-1)
  b_fold = np.asarray(beta) + (np.asarray(b) - mu_b) * np.asarray(gamma) / np.sqrt(var_b + 1e-3)
  expected = np.asarray(conv(w_fold), np.float64) * np.sqrt(var_run + 1e-3) / np.sqrt(var_b + 1e-3) + b_fold
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)

  # Without calib the batch variance is folded into the quantized weights: a different output.
  w_batch = wq.fake_quant(k * (gamma * jax.lax.rsqrt(jnp.asarray(var_b, jnp.float32) + 1e-3)), channel_axis=-1)
  y_nocalib, _ = mj.quantize_model(model, [rule(False)]).apply(v, X, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y_nocalib, np.asarray(conv(w_batch), np.float64) + b_fold, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(y) - np.asarray(y_nocalib)).max() > 1e-2
  # In eval, calib changes nothing: both fold the running statistics.
  np.testing.assert_array_equal(mj.quantize_model(model, [rule(True)]).apply(v, X),
                                mj.quantize_model(model, [rule(False)]).apply(v, X))


class ReluThenBN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3), name="conv")(x))
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    return nn.Conv(3, (1, 1), name="head")(x)


def test_conv_followed_by_relu_then_bn_is_quantized_not_folded():
  qmodel = mj.quantize_model(ReluThenBN(), mj.iao_rules(8, 8, fold_bn=True))
  plans = {p.path: p for p in qmodel.plan(X)}
  assert plans["conv"].quantized and plans["conv"].folded_bn is None and plans["conv"].note == ""
  text = mj.summary(qmodel, X)
  assert "BatchNorm folded" not in text and "2 of 2 layers quantized" in text
  # The BN stays an ordinary BatchNorm with its own statistics, which move in training.
  v = mj.quantize_variables(qmodel, init_variables(ReluThenBN(), X), X)
  _, upd = qmodel.apply(v, X, train=True, mutable=["batch_stats", "quant_stats"])
  assert not np.array_equal(upd["batch_stats"]["bn"]["mean"], v["batch_stats"]["bn"]["mean"])


# ----------------------------------------------------------------------------- QAFT


def _qaft_state(qmodel, v):
  return train.create_train_state(qmodel.apply, v, train.make_optimizer(1e-2), frozen=("quant_stats", "batch_stats"))


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "unfolded"])
def test_qaft_train_step_freezes_stats_and_trains_params(fold):
  model = ConvBN()
  v = make(model)
  qmodel = mj.quantize_model(model, mj.iao_rules(8, 8, fold_bn=fold))
  v = calibrate(qmodel, mj.quantize_variables(qmodel, v, X, train=False), [X])
  state = _qaft_state(qmodel, v)
  stats_before = jax.device_get(state.model_state)  # host copies: train_step donates its state
  params_before = jax.device_get(state.params)
  labels = jnp.array([0, 1, 2, 0])
  state, metrics = train.train_step(state, X, labels)
  state, metrics = train.train_step(state, X, labels)
  assert np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state.model_state)
  assert jax.tree.structure(after) == jax.tree.structure(stats_before)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(stats_before)):
    np.testing.assert_array_equal(a, b)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.params)),
                                                      jax.tree.leaves(params_before))]
  assert all(changed)


def test_qaft_unfolded_bn_in_train_mode_uses_running_stats():
  model = ConvBN()
  v = make(model)
  qmodel = mj.quantize_model(model, mj.iao_rules(8, 8))  # no folding: plain BatchNorms
  v = calibrate(qmodel, mj.quantize_variables(qmodel, v, X, train=False), [X])
  with pytest.raises(flax.errors.ModifyScopeVariableError):  # plain Flax: training needs mutable batch_stats
    model.apply(v, X, train=True)
  y_train = qmodel.apply(v, X, train=True)  # frozen statistics: no error, running statistics
  np.testing.assert_array_equal(y_train, qmodel.apply(v, X, train=False))
  # ... and not the batch statistics
  y_batch, _ = qmodel.apply(v, X, train=True, mutable=["batch_stats"])
  assert np.abs(np.asarray(y_batch) - np.asarray(y_train)).max() > 1e-2


def test_qaft_folded_train_mode_uses_running_stats():
  model = ConvBN()
  v = make(model)
  qmodel = mj.quantize_model(model, mj.iao_rules(8, 8, fold_bn=True))
  v = calibrate(qmodel, mj.quantize_variables(qmodel, v, X, train=False), [X])
  np.testing.assert_array_equal(qmodel.apply(v, X, train=True), qmodel.apply(v, X, train=False))
