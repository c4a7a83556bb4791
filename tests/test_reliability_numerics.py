"""Reliability, numerics: DoReFa on all-zero weights, observers fed non-finite values,
``integer_apply`` fed the wrong input, DoReFa activations with a bad ``input_scale``,
``percent`` 0 pruning, and QAFT from a run whose observers have seen nothing."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import micronet_jax as mj
from micronet_jax._src.core import observers as obs
from micronet_jax._src.core import quantizers as qz
from micronet_jax._src.deploy import runtime
from micronet_jax._src.deploy.integer import convert, integer_apply
from micronet_jax._src.deploy.serialize import export
from micronet_jax._src.flax.calibrate import calibrate
from micronet_jax._src.prune import slimming as P
from micronet_jax import models
from tests.conftest import init_variables

NAN, INF = float("nan"), float("inf")

# ----------------------------------------------------------------------------- DoReFa weights


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(5,), (3, 3, 2, 4)])
def test_dorefa_all_zero_weights_give_zeros_and_zero_gradient(bits, shape):
  w = jnp.zeros(shape, jnp.float32)
  q = qz.dorefa_weight(w, bits)
  np.testing.assert_array_equal(q, np.zeros(shape, np.float32))
  g = jax.grad(lambda w: jnp.sum(qz.dorefa_weight(w, bits) * 3.0))(w)
  np.testing.assert_array_equal(g, np.zeros(shape, np.float32))  # finite: the safe divisor's branch is masked
  q_jit = jax.jit(lambda w: qz.DoReFaWeight(bits).fake_quant(w))(w)
  np.testing.assert_array_equal(q_jit, np.zeros(shape, np.float32))


def test_dorefa_nonzero_weights_unchanged_by_the_guard():
  # 2 bits: s = 1/3, grid {-1, -1/3, 1/3, 1}. w = [0, 0, 1]: t = [0, 0, tanh 1], n = [.5, .5, 1],
  # n / s = [1.5, 1.5, 3] -> round half away [2, 2, 3] -> q = 2 r s - 1 = [1/3, 1/3, 1].
  q = qz.dorefa_weight(jnp.array([0.0, 0.0, 1.0]), 2)
  np.testing.assert_allclose(q, [1 / 3, 1 / 3, 1.0], rtol=0, atol=1e-7)
  g = jax.grad(lambda w: jnp.sum(qz.dorefa_weight(w, 2)))(jnp.array([0.0, 0.5, 1.0]))
  assert np.all(np.isfinite(g))


@pytest.mark.parametrize("bits", [2, 8])
def test_dorefa_weight_is_finite_for_tiny_weights(bits):
  """At or below DOREFA_ZERO the tensor counts as zero (its gradient t / m^2 would be
  inf - inf); above it every weight is at the max, n = 1, the top code 2 (2^k - 1) s - 1."""
  value_and_grad = jax.jit(jax.value_and_grad(lambda w: jnp.sum(qz.dorefa_weight(w, bits) * jnp.arange(1.0, 9.0))))
  quant = jax.jit(lambda w: qz.dorefa_weight(w, bits))
  top = quant(jnp.ones(8))  # the top code, 2 (2^k - 1) s - 1, as XLA rounds it (1 + 2^-23 at 8 bits)
  assert abs(float(top[0]) - 1.0) <= 2**-23
  for tiny in (0.0, 1e-45, 1e-30, 2.0**-61, 2.0**-60, 2.0**-59, 1e-12, 1e-6):
    w = jnp.full((8,), tiny, jnp.float32)
    _, g = value_and_grad(w)
    assert np.all(np.isfinite(g)), (tiny, g)
    np.testing.assert_array_equal(quant(w), 0.0 if tiny <= qz.DOREFA_ZERO else top)


# ----------------------------------------------------------------------------- DoReFa activation


@pytest.mark.parametrize("scale", [INF, -INF, NAN, 0.0, -0.1, "0.1", True, None])
def test_dorefa_activation_rejects_bad_input_scale(scale):
  with pytest.raises(ValueError, match="input_scale must be a finite number > 0"):
    qz.DoReFaActivation(8, input_scale=scale)


@pytest.mark.parametrize("scale", [1e-6, 0.1, 1, np.float32(2.5), 1e30])
def test_dorefa_activation_accepts_finite_positive_scales(scale):
  assert qz.DoReFaActivation(8, input_scale=scale).input_scale == scale


# ----------------------------------------------------------------------------- observers

OBSERVERS = {
    "minmax": obs.MinMax(),
    "moving_average": obs.MovingAverageMinMax(0.5),
    "percentile": obs.Percentile(p=1.0, momentum=0.5),
    "mse": obs.MSEClip(bits=8, momentum=0.5),
}
CLEAN = np.array([-1.0, 0.25, 2.0, 0.5], np.float32)
POISON = [np.nan, np.inf, -np.inf]


@pytest.mark.parametrize("name", list(OBSERVERS))
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "all"])
def test_observer_skips_non_finite_values(name, bad):
  """A batch with nan/inf has the range of its finite values; the state stays finite."""
  o = OBSERVERS[name]
  poison = POISON if bad == "all" else [float(bad)]
  dirty = np.concatenate([CLEAN, np.array(poison, np.float32)])
  clean_state = jax.jit(lambda x: o.update(o.init(()), x, None))(CLEAN)
  dirty_state = jax.jit(lambda x: o.update(o.init(()), x, None))(dirty)
  for field in ("min", "max", "initialized"):
    np.testing.assert_array_equal(getattr(dirty_state, field), getattr(clean_state, field))
  assert np.isfinite(dirty_state.min) and np.isfinite(dirty_state.max) and bool(dirty_state.initialized)


EXPECTED_FIRST = {  # the range of CLEAN each observer takes from an empty state
    "minmax": (-1.0, 2.0), "moving_average": (-1.0, 2.0), "percentile": (-2.0, 2.0),
}


@pytest.mark.parametrize("name", list(EXPECTED_FIRST))
def test_observer_first_range_exact(name):
  s = OBSERVERS[name].update(OBSERVERS[name].init(()), jnp.asarray(CLEAN), None)
  assert (float(s.min), float(s.max)) == EXPECTED_FIRST[name]


@pytest.mark.parametrize("name", list(OBSERVERS))
def test_observer_all_non_finite_batch_leaves_state_unchanged(name):
  o = OBSERVERS[name]
  junk = jnp.array(POISON * 2, jnp.float32)
  empty = o.update(o.init(()), junk, None)  # nothing seen yet: stays uninitialised at [0, 0]
  assert not bool(empty.initialized) and float(empty.min) == 0.0 and float(empty.max) == 0.0
  s = o.update(o.init(()), jnp.asarray(CLEAN), None)
  after = o.update(s, junk, None)
  for field in ("min", "max", "initialized"):
    np.testing.assert_array_equal(getattr(after, field), getattr(s, field))


def test_moving_average_second_batch_with_nan_is_exact():
  o = obs.MovingAverageMinMax(0.5)
  s = o.update(o.init(()), jnp.array([-1.0, 2.0]), None)
  s = o.update(s, jnp.array([np.nan, -3.0, 4.0, np.inf]), None)
  assert (float(s.min), float(s.max)) == (-2.0, 3.0)  # 0.5 * -1 + 0.5 * -3, 0.5 * 2 + 0.5 * 4


def test_minmax_per_channel_skips_a_channel_with_no_finite_value():
  o = obs.MinMax()
  x = jnp.array([[1.0, np.nan, -2.0], [3.0, np.inf, 0.5]])  # channel 1: nothing finite
  s = o.update(o.init((3,)), x, (0,))
  np.testing.assert_array_equal(s.min, [1.0, 0.0, -2.0])
  np.testing.assert_array_equal(s.max, [3.0, 0.0, 0.5])
  s = o.update(s, jnp.array([[0.0, 5.0, 1.0]]), (0,))
  np.testing.assert_array_equal(s.min, [0.0, 0.0, -2.0])  # channel 1 widened from its [0, 0]
  np.testing.assert_array_equal(s.max, [3.0, 5.0, 1.0])


def test_percentile_counts_only_finite_values():
  # |x| finite = 1..10; p = 0.5 -> k = floor(0.5 * 10) = 5 -> the 5th smallest, 5
  x = jnp.array([*range(1, 11), np.nan, np.inf, -np.inf], jnp.float32)
  assert float(obs.kth_abs(x, 0.5)) == 5.0
  assert float(obs.kth_abs(jnp.arange(1.0, 11.0), 0.5)) == 5.0  # micronet's k = int(p N) when all finite
  assert float(obs.kth_abs(jnp.array([np.nan, np.inf]), 0.5)) == 0.0


@settings(max_examples=20, deadline=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=12),
    poison=st.lists(st.sampled_from(POISON), min_size=1, max_size=4),
    name=st.sampled_from(["minmax", "moving_average", "mse", "percentile"]),
)
def test_observer_range_with_poison_equals_range_without(values, poison, name):
  o = OBSERVERS[name]
  clean = np.array(values, np.float32)
  rng = np.random.default_rng(len(values) + len(poison))
  dirty = rng.permutation(np.concatenate([clean, np.array(poison, np.float32)]))
  a = o.update(o.update(o.init(()), jnp.asarray(clean), None), jnp.asarray(clean[::-1]), None)
  b = o.update(o.update(o.init(()), jnp.asarray(dirty), None), jnp.asarray(dirty[::-1]), None)
  np.testing.assert_array_equal(b.min, a.min)
  np.testing.assert_array_equal(b.max, a.max)
  assert np.isfinite(b.min) and np.isfinite(b.max)


def test_affine_activation_quantizes_inf_to_the_range_edge():
  q = qz.AffineActivation(8)
  x = jnp.array([0.0, 1.0, 2.0, np.inf], jnp.float32)
  y, state = q.fake_quant(x, q.init_state(x), update=True)
  assert (float(state.min), float(state.max)) == (0.0, 2.0)
  np.testing.assert_allclose(y, [0.0, 1.0, 2.0, 2.0], atol=2.0 / 255)
  assert float(y[-1]) == float(y[2])  # inf clipped to the top code


# ----------------------------------------------------------------------------- integer_apply input


class Small(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


X = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))


@pytest.fixture(scope="module")
def deploy():
  qmodel = mj.quantize_model(Small(), mj.iao_rules(8, 8))
  v = calibrate(qmodel, mj.quantize_variables(qmodel, init_variables(Small(), X[:1]), X[:1], train=False), [X])
  return convert(qmodel, v, X[:1])


def test_deploy_records_its_input_shape(deploy):
  assert deploy.input_shape == (12, 12, 1) and deploy.input_range == (0, 255)
  xq = deploy.quantize_input(X)
  assert xq.dtype == jnp.uint8
  assert integer_apply(deploy, xq).shape == (4, 3)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.uint16, jnp.float32, jnp.bool_])
def test_integer_apply_rejects_the_wrong_dtype(deploy, dtype):
  xq = deploy.quantize_input(X).astype(dtype)
  with pytest.raises(ValueError, match=f"expects the uint8 codes .*\\[0, 255\\]\\), got {jnp.dtype(dtype).name}"):
    integer_apply(deploy, xq)
  with pytest.raises(ValueError, match="expects the uint8 codes"):  # the same under jit (static dtype)
    jax.jit(lambda x: integer_apply(deploy, x))(xq)


@pytest.mark.parametrize("shape", [(4, 12, 12), (4, 12, 12, 2), (4, 11, 12, 1), (12, 12, 1), (4,), ()])
def test_integer_apply_rejects_the_wrong_shape(deploy, shape):
  xq = jnp.zeros(shape, jnp.uint8)
  with pytest.raises(ValueError, match=r"expects input of shape \(batch, 12, 12, 1\), got " + re_tuple(shape)):
    integer_apply(deploy, xq)
  with pytest.raises(ValueError, match=r"expects input of shape"):
    jax.jit(lambda x: integer_apply(deploy, x))(xq)


def re_tuple(shape) -> str:
  return "\\(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + "\\)"


def test_integer_apply_rejects_an_empty_batch(deploy):
  with pytest.raises(ValueError, match=r"empty batch \(input shape \(0, 12, 12, 1\)\)"):
    integer_apply(deploy, jnp.zeros((0, 12, 12, 1), jnp.uint8))


def test_check_input_signed_grid_and_symbolic_batch(deploy):
  runtime.check_input(jnp.zeros((2, 3), jnp.int8), (-128, 127), (3,))
  with pytest.raises(ValueError, match="expects the int8 codes .* got uint8"):
    runtime.check_input(jnp.zeros((2, 3), jnp.uint8), (-128, 127), (3,))
  runtime.check_input(jnp.zeros((1, 5, 5), jnp.int8), (-127, 127), None)  # an old Deploy: no shape recorded
  # jax.export's symbolic batch passes (it is >= 1), and the exported function still runs
  exported = export(deploy, (12, 12, 1))
  xq = deploy.quantize_input(X)
  np.testing.assert_array_equal(exported.call(xq), integer_apply(deploy, xq))


# ----------------------------------------------------------------------------- prune --percent 0

NIN_SMALL = (24, 20, 12, 24, 24, 24, 24, 24)


@pytest.mark.parametrize("regular", [1, 8])
def test_prune_percent_0_keeps_the_network_exactly(regular):
  model = models.NIN(cfg=NIN_SMALL)
  x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
  variables = init_variables(model, x[:1])
  # distinct, tied and zero gammas: micronet's rule would drop the smallest (and rounding to 8 more)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, a: (jnp.round(jax.random.normal(jax.random.key(len(p)), a.shape), 1)
                    if "bn" in jax.tree_util.keystr(p) and "scale" in jax.tree_util.keystr(p) else a), variables)
  new_model, new_vars, plan = P.prune(model, variables, 0.0, regular, compensate_beta=True)
  assert tuple(new_model.cfg) == tuple(model.cfg) == tuple(plan.cfg)
  assert plan.threshold < min(float(np.min(np.abs(g))) for g in P.prunable_gammas(model, variables))
  assert all(np.array_equal(k, np.arange(w)) for k, w in zip(plan.keep, plan.cfg))
  assert jax.tree.structure(new_vars) == jax.tree.structure(variables)
  jax.tree.map(np.testing.assert_array_equal, new_vars, variables)
  np.testing.assert_array_equal(new_model.apply(new_vars, x, train=False), model.apply(variables, x, train=False))


def test_prune_tiny_percent_still_follows_micronets_rule():
  gammas = [np.array([0.3, 0.1, 0.2]), np.array([0.4, 0.5])]
  plan = P.select_channels(gammas, tuple(P.SlimLayer(f"b{i}") for i in range(3)), 0.01)
  assert plan.threshold == 0.1 and plan.cfg == (2, 2)  # int(5 * 0.01) = 0: the smallest |gamma| goes

