"""Straight-through estimators (micronet_jax._src.core.ste): forward values and hand-written gradients.

Reference: shared/reference/micronet.md section 1 (round half away from zero, torch.clamp's
inclusive gradient, sign(0) handling) and section 4.3 (|x| < 1 window of the sign STE).
Everything here is exact: the forward values are integers or clip bounds and the
gradients are 0/1 masks, so the tests use exact equality. The clipped-round window is
on the rounded value, lo <= r(x) <= hi (ste.py since commit 53d96b8).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from micronet_jax._src.core.ste import (
    clip_inclusive,
    clipped_round_ste,
    round_half_away,
    round_ste,
    sign_plus,
    sign_ste,
)

jax.config.update("jax_enable_x64", False)

F32 = np.float32


def _f32(*v):
  return jnp.asarray(np.array(v, dtype=np.float32))


def _grad_sum(f, x, *args):
  """d/dx sum(f(x, *args)): the per-element gradient of an elementwise function."""
  return np.asarray(jax.grad(lambda x: jnp.sum(f(x, *args)))(x))


# ----------------------------------------------------------------------------- round_half_away


def test_round_half_away_ties_go_away_from_zero():
  x = _f32(-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, -3.5)
  np.testing.assert_array_equal(
      np.asarray(round_half_away(x)), np.array([-3, -2, -1, 1, 2, 3, 4, -4], np.float32)
  )


def test_round_half_away_differs_from_jnp_round_exactly_at_even_ties():
  x = _f32(-2.5, -1.5, -0.5, 0.5, 1.5, 2.5)
  ours = np.asarray(round_half_away(x))
  banker = np.asarray(jnp.round(x))  # half to even: -2, -2, -0, 0, 2, 2
  np.testing.assert_array_equal(banker, np.array([-2, -2, 0, 0, 2, 2], np.float32))
  # They disagree exactly where the tie's lower neighbour is even: -2.5, -0.5, 0.5, 2.5.
  np.testing.assert_array_equal(ours != banker, [True, False, True, True, False, True])


def test_round_half_away_agrees_with_jnp_round_off_ties():
  rng = np.random.default_rng(0)
  x = rng.uniform(-50, 50, size=1000).astype(np.float32)
  frac = np.abs(x - np.trunc(x))
  x = x[np.abs(frac - 0.5) > 1e-3]  # away from ties (and from float32's 0.49999997 corner)
  np.testing.assert_array_equal(np.asarray(round_half_away(jnp.asarray(x))), np.round(x))


def test_round_half_away_integers_and_zero_are_fixed_points():
  x = _f32(-3, -1, 0, 1, 7, 255)
  np.testing.assert_array_equal(np.asarray(round_half_away(x)), np.asarray(x))


# ----------------------------------------------------------------------------- round_ste


def test_round_ste_forward_is_round_half_away():
  x = _f32(-2.5, -0.7, -0.5, 0.0, 0.4, 0.5, 1.5, 2.5, 2.6)
  np.testing.assert_array_equal(np.asarray(round_ste(x)), np.asarray(round_half_away(x)))


def test_round_ste_gradient_is_identity():
  x = _f32(-2.5, -0.7, -0.5, 0.0, 0.4, 0.5, 1.5, 2.5, 100.0)
  np.testing.assert_array_equal(_grad_sum(round_ste, x), np.ones(9, np.float32))
  # The upstream gradient is passed through unchanged (not just a 0/1 mask).
  g = _f32(3.0, -2.0, 0.25, 7.0, 0.0, -1.0, 5.0, 0.5, 9.0)
  _, vjp = jax.vjp(round_ste, x)
  np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g))


def test_round_ste_works_under_jit_and_scalar():
  np.testing.assert_array_equal(np.asarray(jax.jit(round_ste)(_f32(2.5, -2.5))), [3, -3])
  assert float(jax.grad(round_ste)(F32(0.3))) == 1.0


# ----------------------------------------------------------------------------- clipped_round_ste


def test_clipped_round_ste_forward_is_clip_of_round():
  x = _f32(-4.0, -2.6, -2.5, -2.0, -0.5, 0.5, 2.5, 3.0, 3.4, 3.5, 9.0)
  out = np.asarray(clipped_round_ste(x, F32(-2.0), F32(3.0)))
  np.testing.assert_array_equal(out, np.array([-2, -2, -2, -2, -1, 1, 3, 3, 3, 3, 3], np.float32))


def test_clipped_round_ste_gradient_inclusive_window():
  # Window on the rounded value (commit 53d96b8): g passes where lo <= r(x) <= hi, i.e.
  # the clip does not bite; inclusive at both ends.
  lo, hi = F32(-2.0), F32(3.0)
  x = _f32(-2.5, -2.4999998, -2.0, -1.5, 0.0, 2.9, 3.0, 3.4999998, 3.5, 10.0, -10.0)
  np.testing.assert_array_equal(
      _grad_sum(clipped_round_ste, x, lo, hi), np.array([0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], np.float32)
  )


def test_clipped_round_ste_gradient_exactly_at_bounds():
  lo, hi = F32(-2.0), F32(3.0)
  np.testing.assert_array_equal(_grad_sum(clipped_round_ste, _f32(-2.0, 3.0), lo, hi), [1, 1])


def test_clipped_round_ste_gradient_window_is_on_rounded_value():
  # 3.4 rounds to 3 = hi: the clip does not bite, so the gradient passes even though
  # x > hi (the largest weight of a channel can land an ulp above qmax after x / scale).
  # 3.5 rounds (half away) to 4 > hi: clipped, no gradient. Same on the low side.
  x = _f32(3.4, 3.5, -2.4, -2.5, 3.0000002)
  np.testing.assert_array_equal(_grad_sum(clipped_round_ste, x, F32(-2.0), F32(3.0)), [1, 0, 1, 0, 1])


def test_clipped_round_ste_gradient_mask_is_clip_inactive():
  # Property form: the gradient is 1 exactly where clip(r(x)) == r(x).
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-6, 7, size=500).astype(np.float32))
  lo, hi = F32(-3.0), F32(4.0)
  r = np.asarray(round_half_away(x))
  np.testing.assert_array_equal(
      _grad_sum(clipped_round_ste, x, lo, hi), ((r >= lo) & (r <= hi)).astype(np.float32)
  )


def test_clipped_round_ste_python_scalar_bounds():
  x = _f32(-3.0, -2.0, 0.0, 3.0, 4.0)
  np.testing.assert_array_equal(np.asarray(clipped_round_ste(x, -2.0, 3.0)), [-2, -2, 0, 3, 3])
  np.testing.assert_array_equal(_grad_sum(clipped_round_ste, x, -2.0, 3.0), [0, 1, 1, 1, 0])
  np.testing.assert_array_equal(_grad_sum(clipped_round_ste, x, -2, 3), [0, 1, 1, 1, 0])


def test_clipped_round_ste_per_channel_bounds_broadcast():
  # x: (rows, channels) = (4, 3); one [lo, hi] per channel, broadcast along rows.
  lo = jnp.asarray(np.array([-1.0, 0.0, -5.0], np.float32))
  hi = jnp.asarray(np.array([1.0, 2.0, 5.0], np.float32))
  x = jnp.asarray(
      np.array(
          [
              [-1.0, 0.0, -5.0],  # exactly at lo: inside
              [1.0, 2.0, 5.0],  # exactly at hi: inside
              [1.6, -0.6, 5.5],  # r = 2 > hi / -1 < lo / 6 > hi: clipped
              [0.4, 1.5, -4.5],  # strictly inside
          ],
          np.float32,
      )
  )
  out = np.asarray(clipped_round_ste(x, lo, hi))
  expected = np.array([[-1, 0, -5], [1, 2, 5], [1, 0, 5], [0, 2, -5]], np.float32)
  # (1.5 rounds half away to 2 = hi; -4.5 to -5 = lo: inside.)
  np.testing.assert_array_equal(out, expected)
  grad = _grad_sum(clipped_round_ste, x, lo, hi)
  np.testing.assert_array_equal(
      grad, np.array([[1, 1, 1], [1, 1, 1], [0, 0, 0], [1, 1, 1]], np.float32)
  )


def test_clipped_round_ste_gradient_scales_upstream_and_bounds_get_none():
  x = _f32(-3.0, 0.2, 2.0)
  lo, hi = jnp.asarray(F32(-2.0)), jnp.asarray(F32(2.0))
  _, vjp = jax.vjp(clipped_round_ste, x, lo, hi)
  gx, glo, ghi = vjp(_f32(5.0, -7.0, 0.5))
  np.testing.assert_array_equal(np.asarray(gx), [0.0, -7.0, 0.5])
  assert float(glo) == 0.0 and float(ghi) == 0.0


# ----------------------------------------------------------------------------- sign_ste


def test_sign_ste_forward_zero_maps_to_plus_one():
  x = _f32(-3.0, -1.0, -1e-8, -0.0, 0.0, 1e-8, 1.0, 3.0)
  np.testing.assert_array_equal(np.asarray(sign_ste(x)), [-1, -1, -1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(sign_plus(x)), np.asarray(sign_ste(x)))


def test_sign_ste_gradient_strict_unit_window():
  x = _f32(-1.5, -1.0, -0.9999999, -0.5, 0.0, 0.5, 0.9999999, 1.0, 1.5)
  np.testing.assert_array_equal(_grad_sum(sign_ste, x), [0, 0, 1, 1, 1, 1, 1, 0, 0])


def test_sign_ste_gradient_passes_upstream_values():
  x = _f32(-0.5, 0.3, 2.0)
  _, vjp = jax.vjp(sign_ste, x)
  np.testing.assert_array_equal(np.asarray(vjp(_f32(4.0, -2.0, 9.0))[0]), [4.0, -2.0, 0.0])


# ----------------------------------------------------------------------------- clip_inclusive


def test_clip_inclusive_forward_equals_clip():
  x = _f32(-2.0, -1.0, 0.0, 0.5, 1.0, 2.0)
  np.testing.assert_array_equal(np.asarray(clip_inclusive(x, 0.0, 1.0)), [0, 0, 0, 0.5, 1, 1])


def test_clip_inclusive_gradient_is_one_at_both_ends():
  x = _f32(-0.5, 0.0, 0.5, 1.0, 1.5)
  np.testing.assert_array_equal(_grad_sum(clip_inclusive, x, 0.0, 1.0), [0, 1, 1, 1, 0])


def test_jnp_clip_gradient_at_ends_is_not_one():
  # The reason clip_inclusive exists: jnp.clip (min/max) splits the gradient at ties.
  x = _f32(0.0, 0.5, 1.0)
  g = _grad_sum(jnp.clip, x, 0.0, 1.0)
  assert g[1] == 1.0
  assert g[0] != 1.0 and g[2] != 1.0
  np.testing.assert_array_equal(g, [0.5, 1.0, 0.5])  # observed with jax 0.10


def test_clip_inclusive_per_channel_bounds():
  lo = jnp.asarray(np.array([0.0, -1.0], np.float32))
  hi = jnp.asarray(np.array([1.0, 1.0], np.float32))
  x = jnp.asarray(np.array([[0.0, -1.0], [1.0, 1.0], [1.5, -1.5]], np.float32))
  np.testing.assert_array_equal(
      np.asarray(clip_inclusive(x, lo, hi)), [[0.0, -1.0], [1.0, 1.0], [1.0, -1.0]]
  )
  np.testing.assert_array_equal(_grad_sum(clip_inclusive, x, lo, hi), [[1, 1], [1, 1], [0, 0]])


@pytest.mark.parametrize("fn", [round_ste, sign_ste])
def test_ste_gradients_under_jit(fn):
  x = _f32(-2.0, -0.5, 0.5, 2.0)
  eager = _grad_sum(fn, x)
  jitted = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(fn(x))))(x))
  np.testing.assert_array_equal(eager, jitted)
