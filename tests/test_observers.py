"""Range observers (micronet_jax._src.core.observers) and the observer inside AffineActivation.

Reference: shared/reference/micronet.md section 6.1. MinMax: the first batch sets the
range, later batches only widen it. MovingAverageMinMax(momentum=0.1): the first batch
sets, then v <- 0.9 v + 0.1 cur. Unlike micronet, ``initialized`` is part of the state.
Expected values are computed in numpy float32 with the same operations, so comparisons
are exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax._src.core import observers as obs
from micronet_jax._src.core.quantizers import AffineActivation, affine_fake_quant, affine_qparams

jax.config.update("jax_enable_x64", False)

F32 = np.float32


def _a(v):
  return jnp.asarray(np.asarray(v, np.float32))


def _state(s):
  return float(s.min), float(s.max), bool(s.initialized)


def test_empty_range():
  s = obs.empty_range((3,))
  assert s.min.shape == (3,) and s.max.shape == (3,) and s.initialized.shape == ()
  assert s.min.dtype == jnp.float32 and s.initialized.dtype == jnp.bool_
  assert not bool(s.initialized)
  assert not bool(obs.MinMax().init().initialized)
  assert not bool(obs.MovingAverageMinMax().init((2,)).initialized)


def test_batch_range_all_axes_and_per_axis():
  x = _a([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
  lo, hi = obs.batch_range(x, None)
  assert float(lo) == -2.0 and float(hi) == 4.0
  lo, hi = obs.batch_range(x, (0,))
  np.testing.assert_array_equal(np.asarray(lo), [0.5, -2.0, -1.0])
  np.testing.assert_array_equal(np.asarray(hi), [1.0, 4.0, 3.0])


# ----------------------------------------------------------------------------- MinMax


def test_minmax_first_batch_sets_range_not_widened_to_initial_zeros():
  o = obs.MinMax()
  s = o.update(o.init(), _a([2.0, 5.0, 3.0]), None)
  # The empty state is [0, 0]; the first batch replaces it (it does not widen it to 0).
  assert _state(s) == (2.0, 5.0, True)


def test_minmax_later_batches_only_widen():
  o = obs.MinMax()
  s = o.update(o.init(), _a([2.0, 5.0]), None)
  s = o.update(s, _a([3.0, 4.0]), None)  # inside: unchanged
  assert _state(s) == (2.0, 5.0, True)
  s = o.update(s, _a([-1.0, 4.5]), None)  # lower min only
  assert _state(s) == (-1.0, 5.0, True)
  s = o.update(s, _a([0.0, 7.0]), None)  # higher max only
  assert _state(s) == (-1.0, 7.0, True)
  s = o.update(s, _a([100.0, 100.0]), None)  # never shrinks
  assert _state(s) == (-1.0, 100.0, True)


def test_minmax_per_channel_axes():
  o = obs.MinMax()
  s = o.update(o.init((3,)), _a([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]]), (0,))
  np.testing.assert_array_equal(np.asarray(s.min), [0.5, -2.0, -1.0])
  np.testing.assert_array_equal(np.asarray(s.max), [1.0, 4.0, 3.0])
  s = o.update(s, _a([[0.0, 0.0, 0.0], [2.0, 1.0, 2.0]]), (0,))
  np.testing.assert_array_equal(np.asarray(s.min), [0.0, -2.0, -1.0])
  np.testing.assert_array_equal(np.asarray(s.max), [2.0, 4.0, 3.0])
  # Reduction over several axes (e.g. an NHWC activation observed per channel).
  x = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) - 10
  s = o.update(o.init((4,)), _a(x), (0, 1))
  np.testing.assert_array_equal(np.asarray(s.min), x.min(axis=(0, 1)))
  np.testing.assert_array_equal(np.asarray(s.max), x.max(axis=(0, 1)))


# ----------------------------------------------------------------------------- MovingAverageMinMax


def test_moving_average_first_batch_sets_then_ema_exact():
  o = obs.MovingAverageMinMax()
  assert o.momentum == 0.1
  rng = np.random.default_rng(0)
  batches = [rng.normal(size=(4, 5)).astype(np.float32) * (i + 1) for i in range(5)]
  s = o.init()
  vmin = vmax = None
  for i, b in enumerate(batches):
    s = o.update(s, _a(b), None)
    if i == 0:
      vmin, vmax = b.min(), b.max()
    else:
      vmin = F32(0.9) * vmin + F32(0.1) * b.min()
      vmax = F32(0.9) * vmax + F32(0.1) * b.max()
    assert vmin.dtype == np.float32
    assert float(s.min) == vmin and float(s.max) == vmax, (i, float(s.min), vmin)
    assert bool(s.initialized)


def test_moving_average_hand_computed():
  o = obs.MovingAverageMinMax()
  s = o.update(o.init(), _a([-1.0, 3.0]), None)
  assert _state(s) == (-1.0, 3.0, True)
  s = o.update(s, _a([-11.0, 13.0]), None)
  # 0.9 * -1 + 0.1 * -11 = -2 and 0.9 * 3 + 0.1 * 13 = 4, up to float32 rounding.
  assert float(s.min) == F32(0.9) * F32(-1) + F32(0.1) * F32(-11)
  assert float(s.max) == F32(0.9) * F32(3) + F32(0.1) * F32(13)
  np.testing.assert_allclose([float(s.min), float(s.max)], [-2.0, 4.0], rtol=1e-6)
  # Unlike MinMax, the range can shrink.
  s2 = o.update(s, _a([0.0, 0.0]), None)
  assert float(s2.min) > float(s.min) and float(s2.max) < float(s.max)


def test_moving_average_under_jit_matches_eager():
  o = obs.MovingAverageMinMax(momentum=0.25)
  rng = np.random.default_rng(1)
  batches = [_a(rng.normal(size=(8,))) for _ in range(4)]
  upd = jax.jit(o.update, static_argnums=2)
  se, sj = o.init(), o.init()
  for b in batches:
    se, sj = o.update(se, b, None), upd(sj, b, None)
    np.testing.assert_array_equal(np.asarray(se.min), np.asarray(sj.min))
    np.testing.assert_array_equal(np.asarray(se.max), np.asarray(sj.max))


def test_moving_average_per_channel_axes():
  o = obs.MovingAverageMinMax()
  x1 = np.array([[1.0, -2.0], [3.0, 0.0]], np.float32)
  x2 = np.array([[5.0, -12.0], [-7.0, 10.0]], np.float32)
  s = o.update(o.update(o.init((2,)), _a(x1), (0,)), _a(x2), (0,))
  np.testing.assert_array_equal(
      np.asarray(s.min), F32(0.9) * x1.min(axis=0) + F32(0.1) * x2.min(axis=0)
  )
  np.testing.assert_array_equal(
      np.asarray(s.max), F32(0.9) * x1.max(axis=0) + F32(0.1) * x2.max(axis=0)
  )


@pytest.mark.parametrize("m", [0.0, -0.1, 1.5])
def test_moving_average_bad_momentum(m):
  with pytest.raises(ValueError, match="MovingAverageMinMax"):
    obs.MovingAverageMinMax(momentum=m)


def test_moving_average_momentum_one_tracks_last_batch():
  o = obs.MovingAverageMinMax(momentum=1.0)
  s = o.update(o.update(o.init(), _a([-5.0, 5.0]), None), _a([1.0, 2.0]), None)
  assert _state(s) == (1.0, 2.0, True)


# ----------------------------------------------------------------------------- current_or_observed


def test_current_or_observed_falls_back_to_batch_when_uninitialized():
  x = _a([[-3.0, 1.0], [2.0, 0.5]])
  lo, hi = obs.current_or_observed(obs.empty_range(), x, None)
  assert float(lo) == -3.0 and float(hi) == 2.0
  lo, hi = obs.current_or_observed(obs.empty_range((2,)), x, (0,))
  np.testing.assert_array_equal(np.asarray(lo), [-3.0, 0.5])
  np.testing.assert_array_equal(np.asarray(hi), [2.0, 1.0])


def test_current_or_observed_uses_state_once_initialized():
  s = obs.RangeState(min=_a(-0.5), max=_a(0.25), initialized=jnp.ones((), jnp.bool_))
  lo, hi = obs.current_or_observed(s, _a([-3.0, 2.0]), None)
  assert float(lo) == -0.5 and float(hi) == 0.25


def test_observer_carries_no_gradient():
  o = obs.MinMax()
  g = jax.grad(lambda x: o.update(o.init(), x, None).max)(_a([1.0, 2.0, 3.0]))
  np.testing.assert_array_equal(np.asarray(g), [0.0, 0.0, 0.0])


# ----------------------------------------------------------------------------- AffineActivation state


def test_affine_activation_update_true_updates_state():
  spec = AffineActivation(bits=8)
  x = _a([-1.0, 0.5, 3.0])
  s0 = spec.init_state(x)
  assert not bool(s0.initialized)
  xq, s1 = spec.fake_quant(x, s0, update=True)
  assert _state(s1) == (-1.0, 3.0, True)
  # The batch is quantized with the updated range: scale 4/255, zp 64 (hand-computed in
  # test_quantizers).
  scale, zp = spec.qparams(s1)
  assert float(scale) == F32(4) / F32(255) and float(zp) == 64
  np.testing.assert_array_equal(np.asarray(xq), np.asarray(affine_fake_quant(x, scale, zp, 0, 255)))
  # Second batch: the moving average moves and the batch uses the *updated* range.
  x2 = _a([-11.0, 13.0])
  xq2, s2 = spec.fake_quant(x2, s1, update=True)
  assert float(s2.min) == F32(0.9) * F32(-1) + F32(0.1) * F32(-11)
  assert float(s2.max) == F32(0.9) * F32(3) + F32(0.1) * F32(13)
  scale2, zp2 = affine_qparams(s2.min, s2.max, 0, 255, False)
  np.testing.assert_array_equal(np.asarray(xq2), np.asarray(affine_fake_quant(x2, scale2, zp2, 0, 255)))


def test_affine_activation_update_false_leaves_state_unchanged():
  spec = AffineActivation(bits=4, observer=obs.MinMax())
  _, s1 = spec.fake_quant(_a([-1.0, 3.0]), spec.init_state(None), update=True)
  x = _a([-10.0, 0.7, 20.0])  # outside the stored range
  xq, s2 = spec.fake_quant(x, s1, update=False)
  assert _state(s2) == _state(s1) == (-1.0, 3.0, True)
  # Quantized with the stored range, so the out-of-range values are clipped to it.
  scale, zp = affine_qparams(s1.min, s1.max, 0, 15, False)
  np.testing.assert_array_equal(np.asarray(xq), np.asarray(affine_fake_quant(x, scale, zp, 0, 15)))
  out = np.asarray(xq)
  assert out[0] == -float(zp) * float(scale) and out[2] == (15 - float(zp)) * float(scale)


def test_affine_activation_update_false_uninitialized_uses_batch_range():
  spec = AffineActivation(bits=8, symmetric=True)
  s0 = spec.init_state(None)
  x = _a([-2.0, 0.3, 1.0])
  xq, s1 = spec.fake_quant(x, s0, update=False)
  assert not bool(s1.initialized)
  assert _state(s1) == _state(s0)
  scale, zp = affine_qparams(F32(-2.0), F32(1.0), -128, 127, True)
  assert float(scale) == F32(2) / F32(127) and float(zp) == 0
  np.testing.assert_array_equal(np.asarray(xq), np.asarray(affine_fake_quant(x, scale, zp, -128, 127)))
  # Not the empty [0, 0] range (which would quantize everything to 0).
  assert np.any(np.asarray(xq) != 0)


def test_affine_activation_state_round_trips_through_jit():
  # The observer state is identical under jit. The quantized values agree to 1 ulp only:
  # XLA folds the scalar division (hi - lo) / 255 into a multiplication by 1/255 under jit
  # (not in eager mode), so the scale itself can differ in the last bit.
  spec = AffineActivation(bits=8)
  step = jax.jit(lambda x, s: spec.fake_quant(x, s, update=True))
  rng = np.random.default_rng(2)
  se = sj = spec.init_state(None)
  for _ in range(3):
    x = _a(rng.normal(size=(2, 6)))
    (qe, se), (qj, sj) = spec.fake_quant(x, se, update=True), step(x, sj)
    assert _state(se) == _state(sj)
    np.testing.assert_allclose(np.asarray(qj), np.asarray(qe), rtol=3e-7, atol=1e-7)
    scale, zp = spec.qparams(se)
    codes_e = np.asarray(qe, np.float64) / float(scale) + float(zp)
    codes_j = np.asarray(qj, np.float64) / float(scale) + float(zp)
    np.testing.assert_array_equal(np.round(codes_e), np.round(codes_j))
