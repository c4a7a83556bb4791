"""Post-training calibration: the Percentile and MSEClip observers against numpy,
calibrate() (only quant_stats move, jit == eager), and PTQ of a briefly trained LeNet
on real Fashion-MNIST."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import micronet_jax as mj
from micronet_jax._src.core import observers as obs
from micronet_jax.app import train
from micronet_jax._src.flax.calibrate import METHODS, calibrate, make_observer, ptq_rules
from micronet_jax.app.data import train_batches
from micronet_jax.models import LeNet
from tests.conftest import init_variables

KEY = jax.random.key(0)


def rand(shape, seed=0, scale=1.0):
  return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------- Percentile


@pytest.mark.parametrize("p,n", [(0.9, 50), (0.5, 7), (0.999999, 1000), (1.0, 10), (0.01, 20)])
def test_percentile_is_kth_smallest_abs_signed(p, n):
  x = rand((n,), seed=n)
  x[0] = -abs(x[0]) - 0.1  # has negatives -> [-c, c]
  k = max(int(p * n), 1)
  c = np.sort(np.abs(x))[k - 1]
  s = obs.Percentile(p).update(obs.Percentile(p).init(), jnp.asarray(x), None)
  assert float(s.max) == c and float(s.min) == -c and bool(s.initialized)


def test_percentile_nonnegative_tensor_is_zero_to_c():
  x = np.abs(rand((4, 5, 6), seed=3))  # a ReLU output
  p = 0.95
  c = np.sort(x.ravel())[int(p * x.size) - 1]
  s = obs.Percentile(p).update(obs.Percentile(p).init(), jnp.asarray(x), None)
  assert float(s.min) == 0.0 and float(s.max) == c


def test_percentile_moving_average_over_two_batches():
  q = obs.Percentile(0.9, momentum=0.1)
  a, b = rand((40,), seed=1), rand((40,), seed=2, scale=3.0)
  ca, cb = np.sort(np.abs(a))[35], np.sort(np.abs(b))[35]
  s = q.update(q.update(q.init(), jnp.asarray(a), None), jnp.asarray(b), None)
  np.testing.assert_allclose(float(s.max), 0.9 * ca + 0.1 * cb, rtol=1e-6)
  np.testing.assert_allclose(float(s.min), -(0.9 * ca + 0.1 * cb), rtol=1e-6)


def test_percentile_rejects_per_channel_and_bad_p():
  with pytest.raises(ValueError, match="per-tensor"):
    obs.Percentile().update(obs.Percentile().init((3,)), jnp.ones((2, 3)), (0,))
  with pytest.raises(ValueError, match="Percentile.p"):
    obs.Percentile(0.0)


# ----------------------------------------------------------------------------- MSEClip


def numpy_mse(x: np.ndarray, c: float, bits: int) -> float:
  x = x.astype(np.float64).ravel()
  levels = 2.0**bits - 1
  nonneg = x.min() >= 0
  lo, step = (0.0, c / levels) if nonneg else (-c, 2 * c / levels)
  q = np.clip(np.round((x - lo) / step), 0, levels) * step + lo
  return float(np.mean((q - x) ** 2))


@pytest.mark.parametrize("bits,nonneg", [(4, False), (4, True), (3, False), (8, False)])
def test_mse_clip_picks_the_mse_minimising_candidate(bits, nonneg):
  x = rand((64,), seed=bits)
  x[:2] = [12.0, -9.0]  # outliers
  if nonneg:
    x = np.abs(x)
  q = obs.MSEClip(bits=bits, candidates=32)
  s = q.update(q.init(), jnp.asarray(x), None)
  top = np.abs(x).max()
  cands = top * np.arange(1, 33) / 32
  errors = np.array([numpy_mse(x, c, bits) for c in cands])
  chosen = float(s.max)
  i = int(np.argmin(np.abs(cands - chosen)))
  np.testing.assert_allclose(chosen, cands[i], rtol=1e-6)  # one of the candidates
  # ... with the smallest MSE (up to float32 rounding of a near-tie)
  assert errors[i] <= errors.min() * (1 + 1e-4), (chosen, cands[np.argmin(errors)])
  assert float(s.min) == (0.0 if nonneg else -chosen)


def test_mse_clip_clips_a_lone_outlier_at_low_bits():
  x = np.concatenate([np.linspace(-1, 1, 199), [50.0]]).astype(np.float32)
  q = obs.MSEClip(bits=3, candidates=50)
  c = float(q.update(q.init(), jnp.asarray(x), None).max)
  assert c < 40.0  # clipped: with c = 50 the step (14) would zero the bulk of the values
  assert numpy_mse(x, c, 3) < 0.5 * numpy_mse(x, 50.0, 3)


def test_mse_clip_moving_average():
  q = obs.MSEClip(bits=4, candidates=16, momentum=0.25)
  a, b = rand((50,), 1), rand((50,), 2, scale=4.0)
  ca = float(q.update(q.init(), jnp.asarray(a), None).max)
  cb = float(q.update(q.init(), jnp.asarray(b), None).max)
  s = q.update(q.update(q.init(), jnp.asarray(a), None), jnp.asarray(b), None)
  np.testing.assert_allclose(float(s.max), 0.75 * ca + 0.25 * cb, rtol=1e-6)


def test_make_observer_and_unknown_method():
  assert set(METHODS) == {"minmax", "moving_average", "percentile", "mse"}
  assert make_observer("percentile", percentile=0.99) == obs.Percentile(0.99)
  assert make_observer("mse", a_bits=6) == obs.MSEClip(bits=6)
  assert isinstance(make_observer("minmax"), obs.MinMax)
  with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
    make_observer("kl")
  with pytest.raises(ValueError, match="unknown calibration method"):
    ptq_rules("histogram")


# ----------------------------------------------------------------------------- calibrate()


class SmallNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    x = nn.Conv(4, (3, 3), strides=2)(x)
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


X_CAL = [jnp.asarray(rand((4, 8, 8, 2), seed=s)) for s in range(3)]


def _float_vars():
  v = init_variables(SmallNet(), X_CAL[0])
  stats = {"mean": jnp.full((4,), 0.3), "var": jnp.full((4,), 2.0)}
  return {**v, "batch_stats": {"BatchNorm_0": stats}}


def _states(tree):
  return jax.tree.leaves(tree, is_leaf=lambda t: isinstance(t, obs.RangeState))


@pytest.mark.parametrize("method,fold", [(m, True) for m in METHODS] + [("minmax", False)])
def test_calibrate_moves_only_quant_stats(method, fold):
  qmodel = mj.quantize_model(SmallNet(), ptq_rules(method, fold_bn=fold))
  v = mj.quantize_variables(qmodel, _float_vars(), X_CAL[0], train=False)
  params, bstats = jax.device_get(v["params"]), jax.device_get(v["batch_stats"])
  assert not any(bool(s.initialized) for s in _states(v["quant_stats"]))
  out = calibrate(qmodel, v, X_CAL)
  assert jax.tree.structure(out["params"]) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves((out["params"], out["batch_stats"])), jax.tree.leaves((params, bstats))):
    np.testing.assert_array_equal(a, b)
  states = _states(out["quant_stats"])
  assert len(states) == 3 and all(bool(s.initialized) for s in states)
  assert all(float(s.max) > float(s.min) for s in states)


JIT_TIE_BUG = pytest.mark.xfail(strict=True, reason=(
    "library bug: under jit XLA rewrites affine_fake_quant's (and affine_qparams') x / scale into "
    "x * (1 / scale), which is not correctly rounded, so exact .5 ties round differently than in eager mode "
    "(e.g. range [-1.5, 1.5]: eager -1.5 -> code 0, jitted -> code 1), and a calibrated range that depends on "
    "a quantized tensor moves by one step. Percentile makes such ties systematic: its clip element c sits at "
    "c / (2c / 255) = 127.5 on the [-c, c] grid"))


def _rules(method, fold_bn):
  """ptq_rules, but MSEClip with 8 candidates: eager mode runs its lax.map as a Python loop."""
  if method == "mse":
    return mj.iao_rules(8, 8, observer=obs.MSEClip(bits=8, candidates=8), fold_bn=fold_bn)
  return ptq_rules(method, fold_bn=fold_bn)


@pytest.mark.parametrize("method", ["minmax", "moving_average", "mse"])
def test_calibrate_jit_equals_eager(method):
  """Random data: no exact ties, jit and eager agree to float tolerance. (Percentile is left
  out here: its clip element always lies on a tie, see the next test.)"""
  qmodel = mj.quantize_model(SmallNet(), _rules(method, fold_bn=True))
  v = mj.quantize_variables(qmodel, _float_vars(), X_CAL[0], train=False)
  jitted = calibrate(qmodel, v, X_CAL[:2])
  with jax.disable_jit():
    eager = calibrate(qmodel, v, X_CAL[:2])
  for a, b in zip(jax.tree.leaves(jitted["quant_stats"]), jax.tree.leaves(eager["quant_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class TieNet(nn.Module):
  """Two identity dense layers: the second observes the first's quantized input."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(1, use_bias=False, name="second")(nn.Dense(1, use_bias=False, name="first")(x))


@JIT_TIE_BUG
@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_calibrate_jit_equals_eager_on_a_tie(method):
  x = jnp.asarray(np.linspace(-1.5, 1.5, 31, dtype=np.float32)[:, None])  # range [-1.5, 1.5]: -1.5 is a tie
  ones = jnp.ones((1, 1))
  qmodel = mj.quantize_model(TieNet(), _rules(method, fold_bn=False))
  v = mj.quantize_variables(qmodel, {"params": {"first": {"kernel": ones}, "second": {"kernel": ones}}}, x)
  jitted = calibrate(qmodel, v, [x])["quant_stats"]["second"]["input"]
  with jax.disable_jit():
    eager = calibrate(qmodel, v, [x])["quant_stats"]["second"]["input"]
  np.testing.assert_allclose(float(eager.min), -1.5058824, rtol=1e-6)  # -1.5 -> code 0 -> -128 * 3/255
  np.testing.assert_allclose(float(jitted.min), float(eager.min), rtol=1e-5)  # jitted: -1.4941177


@JIT_TIE_BUG
def test_affine_fake_quant_tie_jit_equals_eager():
  """The minimal form of the bug above: the range [-1.5, 1.5] puts -1.5 on a tie."""
  q = mj.AffineActivation(8)
  state = obs.RangeState(min=jnp.float32(-1.5), max=jnp.float32(1.5), initialized=jnp.bool_(True))
  f = lambda x: q.fake_quant(x, state, update=False)[0]
  x = jnp.array([-1.5, 1.5], jnp.float32)
  with jax.disable_jit():
    eager = f(x)
  jitted = jax.jit(f)(x)
  # eager: -1.5 / (3 / 255) = -127.5 -> -128 (round half away) -> code 0 -> -1.5058824
  np.testing.assert_allclose(eager, [-1.5058824, 1.4941176], rtol=1e-6)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)  # jitted: [-1.4941177, 1.4941177]


def test_calibrate_num_batches_stops_early():
  qmodel = mj.quantize_model(SmallNet(), ptq_rules("minmax", fold_bn=True))
  v = mj.quantize_variables(qmodel, _float_vars(), X_CAL[0], train=False)
  two = calibrate(qmodel, v, iter(X_CAL), num_batches=2)
  for a, b in zip(jax.tree.leaves(two["quant_stats"]), jax.tree.leaves(calibrate(qmodel, v, X_CAL[:2])["quant_stats"])):
    np.testing.assert_array_equal(a, b)


def test_calibrate_needs_a_batch():
  qmodel = mj.quantize_model(SmallNet(), ptq_rules("minmax"))
  v = mj.quantize_variables(qmodel, _float_vars(), X_CAL[0], train=False)
  with pytest.raises(ValueError, match="at least one batch"):
    calibrate(qmodel, v, [])
  with pytest.raises(ValueError, match="at least one batch"):
    calibrate(qmodel, v, X_CAL, num_batches=0)


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def float_lenet(fashion_mnist_small):
  """A float LeNet after 195 steps of batch 128 (13 epochs of the 2000-image slice)."""
  ds = fashion_mnist_small
  model = LeNet()
  state = train.create_train_state(model.apply, init_variables(model, ds.x_train[:1]), train.make_optimizer(2e-3))
  for epoch in range(13):
    for x, y in train_batches(ds.x_train, ds.y_train, 128, seed=epoch):
      state, _ = train.train_step(state, x, y)
  return model, jax.device_get(state.variables)


@pytest.mark.realdata
def test_ptq_lenet_w8a8_within_two_points_of_float(float_lenet, fashion_mnist_small):
  ds = fashion_mnist_small
  model, fvars = float_lenet
  tx = train.make_optimizer()
  acc_float = train.evaluate(train.create_train_state(model.apply, fvars, tx), ds.x_test, ds.y_test)["accuracy"]
  assert acc_float > 0.7, acc_float
  cal = [ds.x_train[i:i + 128] for i in range(0, 8 * 128, 128)]
  results = {}
  for method in ("minmax", "percentile", "mse"):
    qmodel = mj.quantize_model(model, ptq_rules(method, 8, 8))
    v = calibrate(qmodel, mj.quantize_variables(qmodel, fvars, ds.x_train[:1], train=False), cal)
    results[method] = train.evaluate(train.create_train_state(qmodel.apply, v, tx), ds.x_test, ds.y_test)["accuracy"]
  for method, acc in results.items():
    assert abs(acc - acc_float) <= 0.02, (method, acc, acc_float, results)
