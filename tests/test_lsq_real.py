"""LSQ / LSQ+ / PACT on the tensors real networks give them (micronet_jax._src.core.learned):
a zero-initialised kernel (big_vision's head), a constant tensor, an all-zero first batch,
and signed inputs (after a linear bottleneck, a LayerNorm). Each gets a positive step whose
gradient is not identically 0, signed inputs get a signed grid, and the integer deploy of
a signed grid still reproduces the fake-quant codes exactly."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import micronet_jax as mj
from micronet_jax._src.core.learned import EPS, UNIT_MEAN_ABS
from micronet_jax._src.core.protocol import QState
from tests.conftest import init_variables

f32 = np.float32
X = jax.random.normal(jax.random.key(1), (64, 12))
Y = jnp.arange(64) % 10


def _fq(q, x, params, channel_axis=None):
  return q.apply(x, QState(params=params), channel_axis=channel_axis, update=False)[0]


def _step_grad(q, x, params, channel_axis=None, seed=0):
  """d <x_q, r> / d step for a fixed random r: a loss whose gradient reaches every element."""
  r = jax.random.normal(jax.random.key(seed), x.shape)
  return jax.grad(lambda s: jnp.sum(_fq(q, x, {**params, "step": s}, channel_axis) * r))(params["step"])


# ----------------------------------------------------------------------------- zero and constant tensors


def test_zero_kernel_starts_from_lecun_scale_per_tensor_and_per_channel():
  """LSQ's 2 mean|w| / sqrt(Qp) is 0 on a zero kernel; it starts from LeCun-normal's
  mean|w| = sqrt(2 / pi) / sqrt(fan_in) instead (fan_in: weights per output channel)."""
  w = jnp.zeros((3, 3, 4, 8))
  lecun = 2 * UNIT_MEAN_ABS / math.sqrt(36) / math.sqrt(7)
  np.testing.assert_allclose(mj.LsqWeight(4).init(w, -1).params["step"], lecun, rtol=1e-6)
  np.testing.assert_allclose(mj.LsqWeight(4, per_channel=True).init(w, -1).params["step"], np.full(8, lecun),
                             rtol=1e-6)
  # a zero channel of a per-channel step takes the whole tensor's mean|w|, the others their own
  w = w.at[..., 0].set(1.0)
  step = mj.LsqWeight(4, per_channel=True).init(w, -1).params["step"]
  np.testing.assert_allclose(step[0], 2 / math.sqrt(7), rtol=1e-6)
  np.testing.assert_allclose(step[1:], 2 * (1 / 8) / math.sqrt(7), rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.floats(1e-3, 1e3), st.booleans(), st.integers(2, 8))
def test_a_constant_tensor_gets_a_positive_step_with_a_gradient(c, negative, bits):
  """A constant tensor c: LSQ's rule gives 2|c| / sqrt(Qp), so t = c / s = +-sqrt(Qp) / 2 is
  never an integer and d x_q / ds = g (r(t) - t) is not 0; LSQ+'s min/max span is 0, and it
  starts as LSQ instead."""
  c = -c if negative else c
  x = jnp.full((4, 6), c, jnp.float32)
  specs = [(mj.LsqWeight(bits), -1), (mj.LsqActivation(bits, signed=True), None),
           (mj.LsqPlusActivation(bits, start="lsq"), None), (mj.LsqPlusActivation(bits, start="minmax"), None)]
  if c > 0:
    specs.append((mj.LsqActivation(bits), None))
  for q, axis in specs:
    params = q.init(x, axis).params
    assert float(params["step"]) >= EPS and np.isfinite(float(params["step"])), q
    assert float(_step_grad(q, x, params, axis)) != 0.0, q
  np.testing.assert_allclose(mj.LsqWeight(bits).init(x, -1).params["step"],
                             2 * abs(c) / math.sqrt(2 ** (bits - 1) - 1), rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_an_all_zero_first_batch_starts_from_a_standard_normal_scale(bits):
  """No scale in the batch: mean|x| of a standard normal, sqrt(2 / pi), stands in; LSQ+
  takes the signed grid (the inputs after a zero layer will have both signs)."""
  z = jnp.zeros((8, 16))
  qp_u, qp_s, half = 2**bits - 1, 2 ** (bits - 1) - 1, 2 ** (bits - 1)
  np.testing.assert_allclose(mj.LsqActivation(bits).init(z, None).params["step"],
                             2 * UNIT_MEAN_ABS / math.sqrt(qp_u), rtol=1e-6)
  np.testing.assert_allclose(mj.LsqActivation(bits, signed=True).init(z, None).params["step"],
                             2 * UNIT_MEAN_ABS / math.sqrt(qp_s), rtol=1e-6)
  for start in ("lsq", "minmax"):
    q = mj.LsqPlusActivation(bits, start=start)
    p = q.init(z, None).params
    np.testing.assert_allclose(p["step"], 2 * UNIT_MEAN_ABS / math.sqrt(qp_s), rtol=1e-6)
    assert float(p["offset"]) == -half * float(p["step"])
    assert float(q.grid(None, QState(params=p), None)[1]) == half
  np.testing.assert_allclose(mj.PactActivation(bits).init(z, None).params["alpha"],
                             2 * UNIT_MEAN_ABS * math.sqrt(qp_u), rtol=1e-6)


def test_the_eps_floor_keeps_the_gradient_of_a_step_or_alpha_at_zero():
  """max(step, eps) had gradient 0 below eps: a step (or PACT alpha) at 0 could never move.
  The floor's value is unchanged; its gradient is the step's."""
  x = jnp.asarray(X)
  for s in (0.0, -1.0, EPS / 2):
    got = mj.lsq_fake_quant(x, jnp.float32(s), -8, 7)
    np.testing.assert_array_equal(got, mj.lsq_fake_quant(x, jnp.float32(EPS), -8, 7))  # the same forward
    g = jax.grad(lambda s: jnp.sum(mj.lsq_fake_quant(x, s, -8, 7)))(jnp.float32(s))
    # every element clips: d/ds = Qp above, -Qn below, summed over X's signs
    assert float(g) == float(jnp.sum(jnp.where(x > 0, 7.0, jnp.where(x < 0, -8.0, 0.0))))
  ga = jax.grad(lambda a: jnp.sum(mj.pact_activation(jnp.abs(x), a, 4)))(jnp.float32(0))
  assert float(ga) == float(jnp.sum(jnp.abs(x) >= EPS))  # every input at or above alpha: d/d alpha = 1
  q = mj.LsqWeight(4)
  assert float(q.grid(x, QState(params={"step": jnp.float32(0)}), -1)[0]) == EPS


# ----------------------------------------------------------------------------- signed inputs


def test_a_signed_input_gets_a_signed_grid_and_gradients_on_both_sides():
  """LayerNorm-like N(0, 1) data: LSQ's unsigned grid clips every negative input to code 0
  (no gradient into them); the ``lsq`` start gives zero point 2^(b-1), codes on both sides
  of 0, and gradients into the negative inputs and the step."""
  x = jax.random.normal(jax.random.key(2), (64, 32))
  q = mj.LsqPlusActivation(4, start="lsq")
  p = q.init(x, None).params
  np.testing.assert_allclose(p["step"], 2 * jnp.mean(jnp.abs(x)) / math.sqrt(7), rtol=1e-6)
  scale, zp = q.grid(None, QState(params=p), None)
  assert float(zp) == 8.0
  codes = jnp.clip(mj.round_half_away(x / scale) + zp, *q.int_range()) - zp
  assert int(codes.min()) <= -5 and int(codes.max()) >= 5  # N(0, 1) at 4 bits: +-3.5 sigma ~ +-6 steps
  np.testing.assert_allclose(jnp.mean(codes < 0), jnp.mean(mj.round_half_away(x / scale) < 0), atol=1e-6)
  # the forward is LSQ's signed grid's (up to the offset's rounding of (q + 8) s - 8 s)
  signed = _fq(mj.LsqActivation(4, signed=True), x, {"step": p["step"]})
  np.testing.assert_allclose(_fq(q, x, p), signed, atol=8 * float(scale) * 2**-23)
  dx = jax.grad(lambda x: jnp.sum(_fq(q, x, p)))(x)
  assert float(jnp.mean(dx[x < 0])) > 0.99  # inside the window, unlike the unsigned grid's 0
  dx_unsigned = jax.grad(lambda x: jnp.sum(_fq(mj.LsqActivation(4), x, {"step": p["step"]})))(x)
  assert float(jnp.max(jnp.abs(dx_unsigned[x < 0]))) == 0.0
  assert float(_step_grad(q, x, p)) != 0.0


def test_an_input_after_a_relu_keeps_lsqs_unsigned_grid():
  x = jax.nn.relu(jax.random.normal(jax.random.key(3), (64, 32)))
  q = mj.LsqPlusActivation(4, start="lsq")
  p = q.init(x, None).params
  np.testing.assert_allclose(p["step"], 2 * jnp.mean(x) / math.sqrt(15), rtol=1e-6)
  assert float(p["offset"]) == 0.0
  np.testing.assert_array_equal(_fq(q, x, p), _fq(mj.LsqActivation(4), x, {"step": p["step"]}))


batches = st.lists(st.floats(-50, 50, width=32), min_size=4, max_size=24)


@settings(max_examples=30, deadline=None)
@given(batches, st.integers(2, 8))
def test_lsq_start_picks_the_grid_from_the_batchs_sign(xs, bits):
  """Zero point 2^(b-1) (signed) iff some input is negative or none is positive, else 0;
  the step is LSQ's for that grid (at least eps); the forward is LsqActivation's on it."""
  x = jnp.asarray(np.asarray(xs, f32))
  q = mj.LsqPlusActivation(bits, start="lsq")
  p = q.init(x, None).params
  signed = bool(x.min() < 0) or not bool(x.max() > 0)
  assert float(q.grid(None, QState(params=p), None)[1]) == (2 ** (bits - 1) if signed else 0)
  assert float(p["step"]) >= EPS
  qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
  mean_abs = float(jnp.mean(jnp.abs(x)))
  if 2 * mean_abs / math.sqrt(qp) > 1.001 * EPS:  # (clear of the fallback's threshold)
    np.testing.assert_allclose(p["step"], 2 * mean_abs / math.sqrt(qp), rtol=1e-5)
  lsq = _fq(mj.LsqActivation(bits, signed=signed), x, {"step": p["step"]})
  np.testing.assert_allclose(_fq(q, x, p), lsq, atol=2 ** (bits - 1) * float(p["step"]) * 2**-22)


# ----------------------------------------------------------------------------- in a network


class Bottleneck(nn.Module):
  """ReLU -> linear bottleneck (signed) -> linear (signed) -> ReLU -> a head that starts at
  zero (big_vision's): every kind of input ``lsq_rules`` must handle. (A residual add
  would make a signed input too, but ``lsq_rules`` keep ``ops.Add`` float, which
  ``convert`` refuses.)"""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # (convert and fake_quant_codes pass it)
    h = nn.relu(nn.Dense(32, name="stem")(x))
    b = nn.Dense(16, name="bottleneck")(h)  # linear: signed
    b = nn.Dense(16, name="mix")(b)  # linear: signed
    h = nn.relu(nn.Dense(24, name="expand")(b))
    return nn.Dense(10, name="head")(h)


def _qat(net: nn.Module, steps: int = 8):
  """(qmodel, QAT variables at the start, after ``steps`` Adam steps, per-step grads,
  losses) of ``net`` under lsq_rules(4, 4), its head kernel zeroed (big_vision's init)."""
  fv = init_variables(net, X[:1])
  fv["params"]["head"]["kernel"] = jnp.zeros_like(fv["params"]["head"]["kernel"])
  qmodel = mj.quantize_model(net, mj.lsq_rules(4, 4))
  v0 = mj.quantize_variables(qmodel, fv, X)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, o):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(qmodel.apply({**v0, "params": p}, X), Y).mean()

    l, g = jax.value_and_grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l, g

  p, o, grads, losses = v0["params"], tx.init(v0["params"]), [], []
  for _ in range(steps):
    p, o, l, g = step(p, o)
    grads.append(g)
    losses.append(float(l))
  return qmodel, v0, {**v0, "params": p}, grads, losses


@pytest.fixture(scope="module")
def bottleneck():
  return _qat(Bottleneck())


def test_lsq_rules_give_each_input_the_grid_of_its_sign(bottleneck):
  _, v0, _, _, _ = bottleneck
  p = v0["params"]
  zero_points = {k: float(-mj.round_half_away(p[k]["input_offset"] / p[k]["input_step"])) for k in p}
  # stem: the image (min/max, 8 bits); bottleneck and head (8 bits): after a ReLU, unsigned;
  # mix and expand: after a linear layer, signed
  assert zero_points == {"stem": zero_points["stem"], "bottleneck": 0.0, "mix": 8.0, "expand": 8.0,
                         "head": 0.0}
  assert 0 < zero_points["stem"] < 255
  # the zero head: a positive step on LeCun's scale (fan_in 24, 8 bits: the last layer)
  np.testing.assert_allclose(p["head"]["kernel_step"], 2 * UNIT_MEAN_ABS / math.sqrt(24) / math.sqrt(127),
                             rtol=1e-6)


def test_every_step_trains(bottleneck):
  """A zero head blocks the backward pass until its codes leave 0, as a float zero head does
  for one step: at first only its kernel has a gradient (its codes are inside the window),
  then its step (d/ds = g (r(t) - t) = -g t once w moves), and, once |w| > s / 2, every
  other step. By the last steps every step has a gradient, all have moved, and the loss
  falls. (An offset learns only from inputs outside its window, LSQ+'s rule, and LSQ's
  start leaves few or none there.)"""
  _, v0, v, grads, losses = bottleneck
  assert float(jnp.abs(grads[0]["head"]["kernel"]).max()) > 0
  assert float(grads[0]["head"]["kernel_step"]) == 0.0 and float(grads[1]["head"]["kernel_step"]) != 0.0
  for layer, leaves in v0["params"].items():
    for name in leaves:
      if name.endswith("_step"):
        assert all(float(jnp.abs(g[layer][name]).max()) > 0 for g in grads[-3:]), (layer, name)
        assert not np.array_equal(v["params"][layer][name], v0["params"][layer][name]), (layer, name)
  assert np.mean(losses[-3:]) < losses[0] - 0.05, losses


@jax.jit
def _run_integer(d, xq):
  cap = {}
  return mj.integer_apply(d, xq, capture=cap), cap


def test_signed_grids_convert_to_the_same_integer_codes(bottleneck):
  """The integer deploy computes clip(r(x / S) + Z) with Z = 8 on the signed inputs and
  reproduces the fake-quant forward's codes of every layer, and its logits."""
  from micronet_jax._src.deploy.integer import fake_quant_codes

  qmodel, _, v, _, _ = bottleneck
  x = jax.random.normal(jax.random.key(5), (128, 12))
  d = mj.convert(qmodel, v, x[:1])
  assert int(d.layers["mix"].grid.zero_point) == 8 and int(d.layers["bottleneck"].grid.zero_point) == 0
  logits_int, cap = _run_integer(d, d.quantize_input(x))
  codes = jax.jit(lambda v, x: fake_quant_codes(qmodel, v, x))(v, x)  # jitted: seconds less than eager
  assert set(codes) == set(cap) == {"stem", "bottleneck", "mix", "expand", "head"}
  for layer in codes:
    np.testing.assert_array_equal(cap[layer], codes[layer], err_msg=layer)
  assert int(cap["mix"].min()) < 8 < int(cap["mix"].max())  # codes on both sides of the zero point
  logits_fq = jax.jit(qmodel.apply)(v, x)
  np.testing.assert_allclose(logits_int, logits_fq, atol=1e-3 * float(jnp.abs(logits_fq).max()))
