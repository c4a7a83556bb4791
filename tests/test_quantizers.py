"""Quantizer functions and specs (micronet_jax._src.core.quantizers).

DoReFa must match micronet bit for bit (shared/reference/micronet.md sections 1 and 5):
the references below are numpy float32 in micronet's order of operations
(t = tanh(w); n = t / 2 / max|t| + 0.5; q = 2 (r(n / s) s) - 1, and
y = clamp(0.1 x, 0, 1); q = r(y / s) s, with s = float32(1 / (2^k - 1)) and r = round
half away from zero). numpy's float32 division is correctly rounded, like PyTorch's.

The affine (IAO) quantizer deliberately uses the standard convention instead of
micronet's (section 6.3): zero_point = qmin - r(min / scale) clamped to [qmin, qmax] with
the range widened to contain 0, narrow symmetric weights, rounding before adding the
zero point. Those tests are hand-computed or property-based.

Tolerances: exact (assert_array_equal) wherever the arithmetic is exact or the
reference reproduces the float32 op order; 1e-3 integer units for "is on the grid";
rtol 1e-5 for gradients compared with a float64 closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from micronet_jax._src.core import observers as obs
from micronet_jax._src.core.quantizers import (
    EPS,
    AffineActivation,
    AffineWeight,
    DoReFaActivation,
    DoReFaWeight,
    affine_fake_quant,
    affine_int_range,
    affine_qparams,
    dorefa_activation,
    dorefa_step,
    dorefa_weight,
)

jax.config.update("jax_enable_x64", False)

F32 = np.float32
GRID_TOL = 1e-3  # in integer units
SETTINGS = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------- numpy references


def r_np(x):
  """micronet's rounding, float32: sign(x) * floor(|x| + 0.5)."""
  x = np.asarray(x, np.float32)
  return (np.sign(x) * np.floor(np.abs(x) + F32(0.5))).astype(np.float32)


def dorefa_weight_np(w, k, rounding=r_np):
  w = np.asarray(w, np.float32)
  s = F32(1.0 / (2**k - 1))
  t = np.tanh(w)
  n = t / F32(2) / np.max(np.abs(t)) + F32(0.5)
  return F32(2) * (rounding(n / s) * s) - F32(1)


def dorefa_n_over_s_np(w, k):
  w = np.asarray(w, np.float32)
  t = np.tanh(w)
  return (t / F32(2) / np.max(np.abs(t)) + F32(0.5)) / F32(1.0 / (2**k - 1))


def dorefa_activation_np(x, k, input_scale=0.1):
  x = np.asarray(x, np.float32)
  s = F32(1.0 / (2**k - 1))
  y = np.clip(x * F32(input_scale), F32(0), F32(1))
  return r_np(y / s) * s


def dorefa_weight_grad_np(w, g):
  """Closed form of d sum(g * q) / dw (identity STE on r), in float64.

  q = 2 n - 1 (up to the STE), n = t / (2M) + 1/2, t = tanh(w), M = max|t| = |t_k*|:
    dL/dt_j  = g_j / M                               (direct path)
    dL/dM    = -sum_j g_j t_j / M^2                  (through every n_j)
    dM/dt_k* = sign(t_k*)
  so dL/dw_i = (1 - t_i^2) [g_i / M - delta_{i,k*} sign(t_k*) sum_j g_j t_j / M^2].
  """
  w = np.asarray(w, np.float64).ravel()
  g = np.asarray(g, np.float64).ravel()
  t = np.tanh(w)
  kstar = int(np.argmax(np.abs(t)))
  m = np.abs(t[kstar])
  grad = g * (1 - t**2) / m
  grad[kstar] -= np.sign(t[kstar]) * (1 - t[kstar] ** 2) * np.sum(g * t) / m**2
  return grad


def _on_grid(values, scale, zero_point, qmin, qmax):
  """Integer codes of fake-quantized values; asserts they are integers in [qmin, qmax]."""
  codes = np.asarray(values, np.float64) / np.asarray(scale, np.float64) + np.asarray(
      zero_point, np.float64
  )
  nearest = np.round(codes)
  assert np.all(np.abs(codes - nearest) <= GRID_TOL), codes
  assert np.all(nearest >= qmin) and np.all(nearest <= qmax), (nearest, qmin, qmax)
  return nearest


# ----------------------------------------------------------------------------- DoReFa weight


def test_dorefa_step_is_float32_of_python_reciprocal():
  for k in (2, 3, 4, 8, 16):
    s = dorefa_step(k)
    assert s.dtype == np.float32 and s == F32(1.0 / (2**k - 1))


def test_dorefa_weight_hand_computed_2bit():
  # t = tanh([1, 0, -1]) = [M, 0, -M]; n = [1, 0.5, 0]; n / s = [3, 1.5, 0] -> r = [3, 2, 0]
  # q = 2 (r s) - 1 = [2 * float32(3 s) - 1, 2 * float32(2 s) - 1, -1] = [1, 0.33333337, -1].
  w = jnp.asarray(np.array([1.0, 0.0, -1.0], np.float32))
  expected = np.array([1.0, 2 * (2 * F32(1 / 3)) - 1, -1.0], np.float32)
  assert expected[1] == F32(0.33333337)
  np.testing.assert_array_equal(np.asarray(dorefa_weight(w, 2)), expected)
  np.testing.assert_array_equal(np.asarray(dorefa_weight(w, 2)), dorefa_weight_np(w, 2))


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 16])
def test_dorefa_weight_matches_micronet_float32(k):
  rng = np.random.default_rng(k)
  cases = [
      np.array([1.0, 0.0, -0.5, 0.25, -1.0 / 3.0], np.float32),
      np.array([[0.3, -0.2, 0.05], [-0.7, 0.0, 0.11]], np.float32),
      (rng.normal(size=(3, 3, 2, 4)) * 0.2).astype(np.float32),
  ]
  for w in cases:
    np.testing.assert_array_equal(np.asarray(dorefa_weight(jnp.asarray(w), k)), dorefa_weight_np(w, k))
    spec = DoReFaWeight(k)
    np.testing.assert_array_equal(np.asarray(spec.fake_quant(jnp.asarray(w), -1)), dorefa_weight_np(w, k))


# Weights whose float32 n / s is exactly m + 0.5 with m even: round half away from zero and
# round half to even disagree there (found by search; tanh is the same in numpy and XLA).
TIE_CASES = [
    (2, [1.0, 0.55966586], {1: 2.5}),
    (3, [1.0, -0.2211337, 0.22113374], {1: 2.5, 2: 4.5}),
    (4, [1.0, -0.10189705, 0.10189716, 0.31462383, 0.55966586], {1: 6.5, 2: 8.5, 3: 10.5, 4: 12.5}),
]


@pytest.mark.parametrize("k,w,ties", TIE_CASES)
def test_dorefa_weight_ties_round_half_away(k, w, ties):
  w = np.array(w, np.float32)
  v = dorefa_n_over_s_np(w, k)
  for i, tie in ties.items():
    assert v[i] == F32(tie)  # the case really is a tie in float32
  got = np.asarray(dorefa_weight(jnp.asarray(w), k))
  np.testing.assert_array_equal(got, dorefa_weight_np(w, k))
  banker = dorefa_weight_np(w, k, rounding=np.round)
  for i in ties:
    assert got[i] != banker[i]
    assert got[i] > banker[i]  # away from zero = up, since n >= 0


def test_dorefa_weight_is_per_tensor():
  # The max is over the whole tensor: channel_axis is ignored.
  w = jnp.asarray(np.array([[0.1, 2.0], [-0.3, 0.05]], np.float32))
  spec = DoReFaWeight(4)
  a = np.asarray(spec.fake_quant(w, -1))
  np.testing.assert_array_equal(a, np.asarray(spec.fake_quant(w, 0)))
  np.testing.assert_array_equal(a, dorefa_weight_np(np.asarray(w), 4))


@pytest.mark.parametrize("shape,k", [((7,), 2), ((3, 4), 4), ((2, 3, 2), 8)])
def test_dorefa_weight_gradient_closed_form(shape, k):
  rng = np.random.default_rng(sum(shape) + k)
  w = (rng.normal(size=shape) * 0.5).astype(np.float32)
  flat = w.reshape(-1)
  # Unique argmax of |t|, on a negative weight, well separated from the runner-up.
  i = int(np.argmax(np.abs(flat)))
  flat[i] = -(np.max(np.abs(flat)) + 0.3)
  w = flat.reshape(shape)
  g = rng.normal(size=shape).astype(np.float32)
  got = jax.grad(lambda w: jnp.sum(jnp.asarray(g) * dorefa_weight(w, k)))(jnp.asarray(w))
  expected = dorefa_weight_grad_np(w, g).reshape(shape)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6 * np.max(np.abs(expected)))
  # The argmax element really receives the extra term (the closed form is not trivial).
  direct = (g.ravel()[i] * (1 - np.tanh(np.float64(w.ravel()[i])) ** 2)) / np.max(np.abs(np.tanh(w.astype(np.float64))))
  assert abs(expected.ravel()[i] - direct) > 1e-3


# ----------------------------------------------------------------------------- DoReFa activation


def test_dorefa_activation_hand_computed_2bit():
  # y = clip(0.1 x, 0, 1) = [0, 0, 0.16, 0.5, 1, 1]; y / s = [0, 0, 0.48, 1.5, 3, 3]
  # r -> [0, 0, 0, 2, 3, 3]; q = r s.
  x = jnp.asarray(np.array([-1.0, 0.0, 1.6, 5.0, 10.0, 20.0], np.float32))
  s = F32(1 / 3)
  expected = np.array([0, 0, 0, 2 * s, 3 * s, 3 * s], np.float32)
  np.testing.assert_array_equal(np.asarray(dorefa_activation(x, 2)), expected)


@pytest.mark.parametrize("k", [2, 3, 5, 8, 16])
def test_dorefa_activation_matches_micronet_float32(k):
  x = np.concatenate(
      [np.linspace(-3, 13, 161, dtype=np.float32), np.array([0.0, 5.0, 10.0, 10.000001, 2.5], np.float32)]
  )
  np.testing.assert_array_equal(np.asarray(dorefa_activation(jnp.asarray(x), k)), dorefa_activation_np(x, k))
  out, state = DoReFaActivation(k).fake_quant(jnp.asarray(x), None, update=True)
  assert state is None
  np.testing.assert_array_equal(np.asarray(out), dorefa_activation_np(x, k))


def test_dorefa_activation_tie_scalar_input_matches_micronet():
  # x = 1, k = 4: y = float32(0.1); y / s = 1.5 exactly in float32 -> r = 2 -> q = 2 s.
  x = F32(1.0)
  s = dorefa_step(4)
  assert (F32(0.1) * x) / s == F32(1.5)
  assert float(dorefa_activation(jnp.asarray(x), 4)) == 2 * s


def test_dorefa_activation_tie_batched_input_matches_micronet():
  x = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
  expected = dorefa_activation_np(x, 4)
  np.testing.assert_array_equal(expected, np.full(4, 2 * dorefa_step(4), np.float32))
  np.testing.assert_array_equal(np.asarray(dorefa_activation(jnp.asarray(x), 4)), expected)


def test_dorefa_activation_gradient_inclusive_window():
  x = jnp.asarray(np.array([-1.0, -1e-6, 0.0, 3.3, 10.0, 10.001, 20.0], np.float32))
  for k in (2, 8):
    g = np.asarray(jax.grad(lambda x: jnp.sum(dorefa_activation(x, k)))(x))
    np.testing.assert_array_equal(g != 0, [False, False, True, True, True, False, False])
    np.testing.assert_allclose(g[[2, 3, 4]], F32(0.1), rtol=1e-6)


def test_dorefa_activation_input_scale():
  spec = DoReFaActivation(bits=3, input_scale=0.5)
  x = jnp.asarray(np.array([-1.0, 0.0, 0.7, 2.0, 2.5], np.float32))
  out, _ = spec.fake_quant(x, None, update=False)
  np.testing.assert_array_equal(np.asarray(out), dorefa_activation_np(np.asarray(x), 3, 0.5))
  g = np.asarray(jax.grad(lambda x: jnp.sum(spec.fake_quant(x, None, update=False)[0]))(x))
  np.testing.assert_array_equal(g != 0, [False, True, True, True, False])
  np.testing.assert_allclose(g[1:4], 0.5, rtol=1e-6)
  with pytest.raises(ValueError, match="DoReFaActivation"):
    DoReFaActivation(bits=4, input_scale=0.0)


# ----------------------------------------------------------------------------- DoReFa grids

finite32 = st.floats(-100, 100, width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
small_shapes = st.sampled_from([(5, 3), (2, 2, 3)])


@SETTINGS
@given(w=hnp.arrays(np.float32, small_shapes, elements=finite32), k=st.integers(2, 8))
def test_dorefa_weight_on_grid(w, k):
  assume(np.max(np.abs(w)) > 1e-3)  # all-zero weights give 0/0 (as in micronet)
  q = np.asarray(dorefa_weight(jnp.asarray(w), k), np.float64)
  s = np.float64(dorefa_step(k))
  i = (q + 1) / (2 * s)
  assert np.all(np.abs(i - np.round(i)) <= GRID_TOL)
  assert np.all(np.round(i) >= 0) and np.all(np.round(i) <= 2**k - 1)
  assert np.all(np.abs(q) <= 1 + 1e-6)
  # The largest |w| is mapped to an end of the grid.
  j = np.unravel_index(np.argmax(np.abs(w)), w.shape)
  assert abs(abs(q[j]) - 1) <= 1e-6


@SETTINGS
@given(x=hnp.arrays(np.float32, small_shapes, elements=finite32), k=st.integers(2, 8))
def test_dorefa_activation_on_grid(x, k):
  q = np.asarray(dorefa_activation(jnp.asarray(x), k), np.float64)
  s = np.float64(dorefa_step(k))
  i = q / s
  assert np.all(np.abs(i - np.round(i)) <= GRID_TOL)
  assert np.all(np.round(i) >= 0) and np.all(np.round(i) <= 2**k - 1)
  # Error of the quantization of y = clip(0.1 x, 0, 1) is at most s / 2.
  y = np.clip(x.astype(np.float64) * 0.1, 0, 1)
  assert np.all(np.abs(q - y) <= s * (0.5 + GRID_TOL))


# ----------------------------------------------------------------------------- affine: ranges and qparams


def test_affine_int_ranges():
  assert affine_int_range(8, True, narrow=True) == (-127, 127)
  assert affine_int_range(8, True, narrow=False) == (-128, 127)
  assert affine_int_range(8, False) == (0, 255)
  assert affine_int_range(2, True, narrow=True) == (-1, 1)
  assert affine_int_range(2, True) == (-2, 1)
  assert affine_int_range(16, False) == (0, 65535)
  assert AffineWeight(8).int_range() == (-127, 127)
  # micronet's unsigned weight grid is narrow too: [0, 2^b - 2] (0..254 at 8 bits)
  assert affine_int_range(8, False, narrow=True) == (0, 254)
  assert affine_int_range(2, False, narrow=True) == (0, 2)
  assert AffineWeight(8, symmetric=False).int_range() == (0, 254)
  assert AffineWeight(4, symmetric=False).int_range() == (0, 14)
  assert AffineActivation(8).int_range() == (0, 255)
  assert AffineActivation(8, symmetric=True).int_range() == (-128, 127)


def _qp(lo, hi, qmin, qmax, symmetric):
  s, z = affine_qparams(lo, hi, qmin, qmax, symmetric)
  assert s.dtype == jnp.float32 and z.dtype == jnp.float32
  return np.asarray(s), np.asarray(z)


def test_affine_qparams_symmetric():
  s, z = _qp(-2.0, 1.0, -127, 127, True)
  assert s == F32(2) / F32(127) and z == 0
  # Activations: scale = absmax / (2^(b-1) - 1), not / 127.5 as in micronet.
  s, z = _qp(-1.0, 0.5, -128, 127, True)
  assert s == F32(1) / F32(127) and z == 0
  s, z = _qp(0.25, 3.0, -128, 127, True)
  assert s == F32(3) / F32(127) and z == 0


def test_affine_qparams_symmetric_per_channel_and_eps_floor():
  lo = np.array([-1.0, -0.5, 0.0], np.float32)
  hi = np.array([0.5, 2.0, 0.0], np.float32)
  s, z = _qp(lo, hi, -7, 7, True)
  np.testing.assert_array_equal(s, np.array([F32(1) / F32(7), F32(2) / F32(7), F32(EPS)], np.float32))
  np.testing.assert_array_equal(z, np.zeros(3, np.float32))
  assert EPS == float(np.finfo(np.float32).eps)


def test_affine_qparams_asymmetric_all_positive_widens_to_zero():
  # micronet would give zp = +127 for [1, 3]; we widen to [0, 3]: zp = 0, scale = 3 / 255.
  s, z = _qp(1.0, 3.0, 0, 255, False)
  assert s == F32(3) / F32(255) and z == 0


def test_affine_qparams_asymmetric_all_negative_widens_to_zero():
  s, z = _qp(-3.0, -1.0, 0, 255, False)
  assert s == F32(3) / F32(255) and z == 255


def test_affine_qparams_asymmetric_negative_min():
  # scale = 4 / 255; min / scale = -63.75 -> r = -64 -> zp = 0 - (-64) = 64.
  s, z = _qp(-1.0, 3.0, 0, 255, False)
  assert s == F32(4) / F32(255) and z == 64
  # Same range on a signed asymmetric grid: zp = qmin - r(min / scale) = -128 + 64.
  s, z = _qp(-1.0, 3.0, -128, 127, False)
  assert s == F32(4) / F32(255) and z == -64


def test_affine_qparams_zero_point_rounds_half_away():
  # scale = 6 / 3 = 2 exactly; min / scale = -2.5 exactly -> r = -3 (half to even: -2).
  s, z = _qp(-5.0, 1.0, 0, 3, False)
  assert s == 2 and z == 3


def test_affine_qparams_degenerate_range():
  s, z = _qp(0.0, 0.0, 0, 255, False)
  assert s == F32(EPS) and z == 0


def test_affine_qparams_carry_no_gradient():
  g = jax.grad(lambda lo, hi: jnp.sum(jnp.stack(affine_qparams(lo, hi, 0, 255, False))), argnums=(0, 1))(
      jnp.float32(-1.0), jnp.float32(3.0)
  )
  assert float(g[0]) == 0.0 and float(g[1]) == 0.0


@pytest.mark.parametrize(
    "lo,hi,bits", [(1.0, 3.0, 8), (-1.0, 3.0, 8), (-3.0, -1.0, 4), (-0.37, 5.1, 3), (-5.0, 1.0, 2)]
)
def test_affine_zero_is_exactly_representable(lo, hi, bits):
  qmin, qmax = affine_int_range(bits, False)
  s, z = affine_qparams(lo, hi, qmin, qmax, False)
  assert float(z) == round(float(z)) and qmin <= float(z) <= qmax
  zeros = jnp.zeros((3,), jnp.float32)
  np.testing.assert_array_equal(np.asarray(affine_fake_quant(zeros, s, z, qmin, qmax)), np.zeros(3))


@SETTINGS
@given(
    lo=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    hi=st.floats(-1e3, 1e3, width=32, allow_subnormal=False),
    bits=st.integers(2, 8),
)
def test_affine_zero_exactly_representable_property(lo, hi, bits):
  lo, hi = min(lo, hi), max(lo, hi)
  qmin, qmax = affine_int_range(bits, False)
  s, z = affine_qparams(lo, hi, qmin, qmax, False)
  assert float(z) == round(float(z)) and qmin <= float(z) <= qmax
  assert float(affine_fake_quant(jnp.zeros((2,), jnp.float32), s, z, qmin, qmax)[0]) == 0.0


# ----------------------------------------------------------------------------- affine_fake_quant


def test_affine_fake_quant_hand_computed_and_rounds_before_zero_point():
  # scale 0.5, zp 3 on [0, 15]: codes x / 0.5 + 3, clipped; real window [-1.5, 6].
  x = jnp.asarray(np.array([-2.0, -1.6, -1.5, -0.3, 0.0, 0.3, 1.25, 6.0, 6.1, 9.0], np.float32))
  out = np.asarray(affine_fake_quant(x, jnp.float32(0.5), jnp.float32(3.0), 0, 15))
  expected = np.array([-1.5, -1.5, -1.5, -0.5, 0.0, 0.5, 1.5, 6.0, 6.0, 6.0], np.float32)
  np.testing.assert_array_equal(out, expected)
  # Rounding happens before the zero point is added: x / scale = -2.5 -> r = -3 (code 0),
  # whereas r(-2.5 + 3) = r(0.5) = 1 would give -2.
  out = affine_fake_quant(jnp.asarray([-2.5], jnp.float32), jnp.float32(1.0), jnp.float32(3.0), 0, 15)
  assert float(out[0]) == -3.0


def test_affine_fake_quant_gradient_window():
  # scale 0.5, zp 3 on [0, 15]: the code r(x / 0.5) + 3 is clipped outside [0, 15], i.e.
  # for r(x / 0.5) outside [-3, 12]. The gradient window is on the rounded code (the
  # clip does not bite; ste.py since commit 53d96b8), inclusive at both ends.
  x = np.array([-2.0, -1.75, -1.7, -1.5, -0.3, 0.0, 1.25, 6.0, 6.2, 6.25, 9.0], np.float32)
  g = jax.grad(lambda x: jnp.sum(affine_fake_quant(x, jnp.float32(0.5), jnp.float32(3.0), 0, 15)))(
      jnp.asarray(x)
  )
  # codes x / 0.5: -4, -3.5 (r -4), -3.4 (r -3), -3, ..., 12, 12.4 (r 12), 12.5 (r 13), 18
  np.testing.assert_array_equal(np.asarray(g), [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0])
  # The gradient is 1 exactly where the forward clip does not bite.
  r = r_np(x / F32(0.5))
  np.testing.assert_array_equal((r >= -3) & (r <= 12), np.asarray(g) == 1)


def test_affine_fake_quant_gradient_per_channel():
  scale = jnp.asarray(np.array([[0.5, 0.25]], np.float32))
  zp = jnp.asarray(np.array([[0.0, 8.0]], np.float32))
  # channel 0: codes [-8, 7], zp 0 -> reals [-4, 3.5]; channel 1: codes [0, 15], zp 8 -> [-2, 1.75]
  x = jnp.asarray(
      np.array([[-4.0, -2.0], [3.5, 1.75], [3.8, 1.9], [-4.3, -2.2], [0.2, 0.1], [3.7, 1.85]], np.float32)
  )
  qmin = jnp.asarray(np.array([[-8.0, 0.0]], np.float32))
  qmax = jnp.asarray(np.array([[7.0, 15.0]], np.float32))
  out = np.asarray(affine_fake_quant(x, scale, zp, qmin, qmax))
  np.testing.assert_array_equal(
      out, [[-4.0, -2.0], [3.5, 1.75], [3.5, 1.75], [-4.0, -2.0], [0.0, 0.0], [3.5, 1.75]]
  )
  g = jax.grad(lambda x: jnp.sum(affine_fake_quant(x, scale, zp, qmin, qmax)))(x)
  # row 2: x / s = 7.6 -> r 8 (clipped); row 3: -8.6 / -8.8 -> r -9 (clipped);
  # row 5: 7.4 -> r 7 (not clipped, gradient passes although x is beyond the last level).
  np.testing.assert_array_equal(np.asarray(g), [[1, 1], [1, 1], [0, 0], [0, 0], [1, 1], [1, 1]])


def test_affine_fake_quant_no_gradient_into_zero_point():
  x = jnp.asarray(np.array([0.3, 1.2, -0.7, 5.0], np.float32))
  g = jax.grad(lambda z: jnp.sum(affine_fake_quant(x, jnp.float32(0.5), z, 0, 15)))(jnp.float32(3.0))
  assert float(g) == 0.0


def test_affine_fake_quant_no_gradient_into_scale():
  x = jnp.asarray(np.array([0.3, 1.2, -0.7, 5.0], np.float32))
  g = jax.grad(lambda s: jnp.sum(affine_fake_quant(x, s, jnp.float32(3.0), 0, 15)))(jnp.float32(0.5))
  assert float(g) == 0.0


def test_affine_weight_gradient_is_ste_mask_through_qparams():
  # Ranges come from w itself but carry no gradient: d sum(fq(w)) / dw is the STE mask.
  w = jnp.asarray(np.array([[0.3, -1.2], [0.5, 0.1], [-0.2, 0.9]], np.float32))
  for spec in (AffineWeight(8), AffineWeight(3, symmetric=False), AffineWeight(4, per_channel=False)):
    g = jax.grad(lambda w: jnp.sum(spec.fake_quant(w)))(w)
    np.testing.assert_allclose(np.asarray(g), np.ones((3, 2)), rtol=1e-6)


# ----------------------------------------------------------------------------- AffineWeight


def test_affine_weight_qparams_shapes_and_values():
  w = np.array([[0.5, -2.0, 0.0], [-1.0, 1.0, 0.0]], np.float32)  # (in, out): channel axis -1
  s, z = AffineWeight(8).qparams(jnp.asarray(w), -1)
  assert s.shape == (1, 3) and z.shape == (1, 3)
  np.testing.assert_array_equal(
      np.asarray(s), [[F32(1) / F32(127), F32(2) / F32(127), F32(EPS)]]
  )
  s, z = AffineWeight(8, per_channel=False).qparams(jnp.asarray(w), -1)
  assert s.shape == () and float(s) == F32(2) / F32(127) and float(z) == 0
  s, z = AffineWeight(8, symmetric=False).qparams(jnp.asarray(w), -1)
  # Unsigned weights: 254 steps (micronet's [0, 254]). Per-channel: XLA evaluates
  # (hi - lo) / 254 as (hi - lo) * (1 / 254), which can be one ulp off the correctly
  # rounded quotient, hence rtol (one float32 ulp is ~1.2e-7).
  np.testing.assert_allclose(
      np.asarray(s), [[F32(1.5) / F32(254), F32(3) / F32(254), F32(EPS)]], rtol=2.5e-7, atol=0
  )
  np.testing.assert_array_equal(np.asarray(z), [[169, 169, 0]])  # r(-1/(1.5/254)) = r(-169.33) = -169
  k = jnp.zeros((3, 3, 2, 4), jnp.float32).at[..., 2].set(1.0)  # HWIO kernel
  s, _ = AffineWeight(8).qparams(k, -1)
  assert s.shape == (1, 1, 1, 4)
  np.testing.assert_array_equal(np.asarray(s).ravel(), [EPS, EPS, F32(1) / F32(127), EPS])


def test_affine_weight_asymmetric_narrow_grid_exact():
  # 3 bits, per tensor, range [-3, 3]: micronet's grid [0, 6] gives scale 6 / 6 = 1 and
  # zero point 0 - r(-3 / 1) = 3; codes r(w) + 3 = [0, 3, 4, 6], values [-3, 0, 1, 3]
  # (on [0, 7] the scale would be 6/7 and 1.4 would not land on 1).
  spec = AffineWeight(3, symmetric=False, per_channel=False)
  w = jnp.asarray(np.array([-3.0, 0.0, 1.4, 3.0], np.float32))
  s, z = spec.qparams(w, -1)
  assert float(s) == 1.0 and float(z) == 3.0
  np.testing.assert_array_equal(np.asarray(spec.fake_quant(w)), [-3.0, 0.0, 1.0, 3.0])
  # 8 bits: the range [0, 2.54] spans exactly the 254 steps: the maximum is code 254
  w8 = jnp.asarray(np.array([0.0, 1.27, 2.54], np.float32))
  s8, z8 = AffineWeight(8, symmetric=False, per_channel=False).qparams(w8, -1)
  assert float(s8) == F32(2.54) / F32(254) and float(z8) == 0.0
  codes = np.asarray(jnp.round(w8 / s8) + z8)
  np.testing.assert_array_equal(codes, [0, 127, 254])
  # gradient: the clipped STE passes every weight of its own range
  g = jax.grad(lambda w: jnp.sum(spec.fake_quant(w)))(w)
  np.testing.assert_array_equal(np.asarray(g), [1.0, 1.0, 1.0, 1.0])


def test_affine_weight_symmetric_narrow_is_odd():
  # Narrow range: -w quantizes to -q exactly.
  rng = np.random.default_rng(3)
  w = rng.normal(size=(6, 4)).astype(np.float32)
  spec = AffineWeight(4)
  a = np.asarray(spec.fake_quant(jnp.asarray(w)))
  b = np.asarray(spec.fake_quant(jnp.asarray(-w)))
  np.testing.assert_array_equal(a, -b)


@SETTINGS
@given(
    w=hnp.arrays(np.float32, small_shapes, elements=finite32),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
    channel_axis=st.sampled_from([-1, 0]),
)
def test_affine_weight_properties(w, bits, symmetric, per_channel, channel_axis):
  spec = AffineWeight(bits, symmetric, per_channel)
  wj = jnp.asarray(w)
  scale, zp = spec.qparams(wj, channel_axis)
  qmin, qmax = spec.int_range()
  wq = spec.fake_quant(wj, channel_axis)
  np.testing.assert_array_equal(np.asarray(wq), np.asarray(affine_fake_quant(wj, scale, zp, qmin, qmax)))
  # zero points are integers of the grid, scales positive
  assert np.all(np.asarray(zp) == np.round(np.asarray(zp)))
  assert np.all((np.asarray(zp) >= qmin) & (np.asarray(zp) <= qmax))
  assert np.all(np.asarray(scale) >= F32(EPS))
  if symmetric:
    assert np.all(np.asarray(zp) == 0)
  # on the grid
  _on_grid(wq, scale, zp, qmin, qmax)
  # error at most scale / 2: every weight is inside its own range
  err = np.abs(np.asarray(wq, np.float64) - w.astype(np.float64))
  assert np.all(err <= np.asarray(scale, np.float64) * (0.5 + GRID_TOL))
  # idempotent with the same qparams
  wq2 = affine_fake_quant(wq, scale, zp, qmin, qmax)
  np.testing.assert_array_equal(np.asarray(wq2), np.asarray(wq))


@SETTINGS
@given(
    w=hnp.arrays(np.float32, (5, 3), elements=finite32),
    replacement=hnp.arrays(np.float32, (5,), elements=finite32),
    j=st.integers(0, 2),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    transpose=st.booleans(),
)
def test_affine_weight_per_channel_independent(w, replacement, j, bits, symmetric, transpose):
  spec = AffineWeight(bits, symmetric, per_channel=True)
  w2 = w.copy()
  w2[:, j] = replacement
  axis = -1
  if transpose:  # channels on axis 0 instead
    w, w2, axis = w.T.copy(), w2.T.copy(), 0
  a = np.asarray(spec.fake_quant(jnp.asarray(w), axis))
  b = np.asarray(spec.fake_quant(jnp.asarray(w2), axis))
  others = [i for i in range(3) if i != j]
  if transpose:
    np.testing.assert_array_equal(a[others, :], b[others, :])
  else:
    np.testing.assert_array_equal(a[:, others], b[:, others])


# ----------------------------------------------------------------------------- AffineActivation


def _inside(x, scale, zp, qmin, qmax):
  """Values whose real code x / scale + zp lies in [qmin - 0.5, qmax + 0.5]."""
  codes = x.astype(np.float64) / np.asarray(scale, np.float64) + np.asarray(zp, np.float64)
  return (codes >= qmin - 0.5 + GRID_TOL) & (codes <= qmax + 0.5 - GRID_TOL)


@SETTINGS
@given(
    x=hnp.arrays(np.float32, (2, 5), elements=finite32),
    x2=hnp.arrays(np.float32, (2, 5), elements=finite32),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    observer=st.sampled_from([obs.MinMax(), obs.MovingAverageMinMax()]),
)
def test_affine_activation_properties(x, x2, bits, symmetric, observer):
  spec = AffineActivation(bits, symmetric, observer)
  qmin, qmax = spec.int_range()
  state = spec.init_state(jnp.asarray(x))
  for batch in (x, x2):
    xq, state = spec.fake_quant(jnp.asarray(batch), state, update=True)
    scale, zp = spec.qparams(state)
    assert scale.shape == () and zp.shape == ()
    if symmetric:
      assert float(zp) == 0.0
    _on_grid(xq, scale, zp, qmin, qmax)
    np.testing.assert_array_equal(
        np.asarray(affine_fake_quant(xq, scale, zp, qmin, qmax)), np.asarray(xq)
    )
    # Inside the observed range (widened to 0; symmetric: [-absmax, absmax]) the error is at
    # most scale / 2.
    lo, hi = float(state.min), float(state.max)
    if symmetric:
      m = max(abs(lo), abs(hi))
      lo, hi = -m, m
    else:
      lo, hi = min(lo, 0.0), max(hi, 0.0)
    inside = (batch >= lo) & (batch <= hi)
    err = np.abs(np.asarray(xq, np.float64) - batch.astype(np.float64))
    assert np.all(err[inside] <= float(scale) * (0.5 + GRID_TOL))
  # The first batch always lies inside its own range.
  xq1, st1 = spec.fake_quant(jnp.asarray(x), spec.init_state(jnp.asarray(x)), update=True)
  s1, z1 = spec.qparams(st1)
  assert np.all(np.abs(np.asarray(xq1, np.float64) - x) <= float(s1) * (0.5 + GRID_TOL))


# ----------------------------------------------------------------------------- bad bits

SPECS = [DoReFaWeight, DoReFaActivation, AffineWeight, AffineActivation]


@pytest.mark.parametrize("cls", SPECS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bits", [1, 17, 3.5, True, 0, -8, "8", None], ids=repr)
def test_bad_bits_raise_with_class_name(cls, bits):
  with pytest.raises(ValueError, match=cls.__name__):
    cls(bits=bits)


@pytest.mark.parametrize("cls", SPECS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bits", [2, 16, np.int32(8), np.int64(4)], ids=repr)
def test_good_bits_accepted(cls, bits):
  assert cls(bits=bits).bits == bits
