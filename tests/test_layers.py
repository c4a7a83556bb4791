"""QuantDense / QuantConv / QuantConvTranspose: same params as Flax's layers, and the
forward is exactly op(fake_quant(x), fake_quant(w)) + b."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import micronet_jax as mj
from micronet_jax._src.flax import seam
from micronet_jax._src.core.quantizers import affine_fake_quant

KEY = jax.random.key(0)
X_IMG = jax.random.normal(jax.random.key(1), (2, 9, 9, 4))

CONV_CASES = [
    dict(features=6, kernel_size=(3, 3)),
    dict(features=6, kernel_size=(3, 3), strides=(2, 2), padding="VALID", use_bias=False),
    dict(features=8, kernel_size=(3, 3), kernel_dilation=(2, 2), padding=((1, 2), (0, 1))),
    dict(features=8, kernel_size=(1, 1), feature_group_count=4),
]


def shapes(tree):
  return jax.tree.map(jnp.shape, tree)


@pytest.mark.parametrize("kw", CONV_CASES)
def test_quant_conv_has_conv_params_and_float_output_without_quantizers(kw):
  ref = nn.Conv(**kw)
  q = mj.QuantConv(**kw)
  v = ref.init(KEY, X_IMG)
  assert shapes(q.init(KEY, X_IMG)["params"]) == shapes(v["params"])
  np.testing.assert_array_equal(q.apply(v, X_IMG), ref.apply(v, X_IMG))


@pytest.mark.parametrize("kw", CONV_CASES)
def test_quant_conv_forward_is_conv_of_fake_quantized_operands(kw):
  wq, aq = mj.AffineWeight(4), mj.AffineActivation(5)
  q = mj.QuantConv(**kw, weight_quant=wq, act_quant=aq)
  v = q.init(KEY, X_IMG)
  y, upd = q.apply(v, X_IMG, mutable=["quant_stats"])
  # Expected: the observer saw X first (initialises it to the batch range).
  state = aq.observer.update(aq.init_state(X_IMG), X_IMG, None)
  xq = affine_fake_quant(X_IMG, *aq.qparams(state), *aq.int_range())
  kernel = wq.fake_quant(v["params"]["kernel"], channel_axis=-1)
  params = dict(v["params"], kernel=kernel)
  expected = nn.Conv(**kw).apply({"params": params}, xq)
  np.testing.assert_allclose(y, expected, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(upd["quant_stats"]["input"].min, X_IMG.min())
  np.testing.assert_array_equal(upd["quant_stats"]["input"].max, X_IMG.max())


def test_quant_dense_forward_and_param_names():
  x = jax.random.normal(KEY, (5, 7))
  q = mj.QuantDense(3, weight_quant=mj.DoReFaWeight(3), act_quant=mj.DoReFaActivation(3))
  v = nn.Dense(3).init(KEY, x)
  assert shapes(q.init(KEY, x)["params"]) == shapes(v["params"])
  expected = mj.dorefa_activation(x, 3) @ mj.dorefa_weight(v["params"]["kernel"], 3) + v["params"]["bias"]
  np.testing.assert_allclose(q.apply(v, x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_quant_conv_transpose_per_channel_axis(transpose_kernel):
  kw = dict(features=5, kernel_size=(3, 3), strides=(2, 2), transpose_kernel=transpose_kernel)
  q = mj.QuantConvTranspose(**kw, weight_quant=mj.AffineWeight(4))
  v = nn.ConvTranspose(**kw).init(KEY, X_IMG)
  kernel = v["params"]["kernel"]
  out_axis = -2 if transpose_kernel else -1
  assert kernel.shape[out_axis] == 5
  kq = mj.AffineWeight(4).fake_quant(kernel, channel_axis=out_axis)
  expected = nn.ConvTranspose(**kw).apply({"params": dict(v["params"], kernel=kq)}, X_IMG)
  np.testing.assert_allclose(q.apply(v, X_IMG), expected, rtol=0, atol=1e-6)
  # Per output channel: every channel's max |w| maps to exactly 7 steps.
  scale, _ = mj.AffineWeight(4).qparams(kernel, channel_axis=out_axis)
  assert scale.size == 5


def test_observer_moves_only_when_quant_stats_is_mutable():
  q = mj.QuantDense(3, act_quant=mj.AffineActivation(8))
  x = jnp.linspace(-2.0, 3.0, 14).reshape(2, 7)
  v = q.init(KEY, x)
  assert not bool(v["quant_stats"]["input"].initialized)  # init does not observe
  _, upd = q.apply(v, x, mutable=["quant_stats"])
  s = upd["quant_stats"]["input"]
  assert bool(s.initialized) and float(s.min) == -2.0 and float(s.max) == 3.0
  # Read-only apply: same output as a mutable apply with the updated state, and no update.
  v2 = {**v, **upd}
  y_eval = q.apply(v2, 10 * x)  # would widen the range if it were observed
  y_ref, upd2 = q.apply(v2, 10 * x, mutable=["quant_stats"])
  assert float(upd2["quant_stats"]["input"].max) > 3.0
  assert not np.allclose(y_eval, y_ref)


def test_kernel_gradient_passes_the_ste():
  x = jax.random.normal(KEY, (4, 6))
  q = mj.QuantDense(2, weight_quant=mj.AffineWeight(8))
  v = q.init(KEY, x)
  g = jax.grad(lambda p: q.apply({"params": p}, x).sum())(v["params"])
  # Identity STE inside the range: d/dW sum(x @ Wq) = x.sum(0) for every output column.
  np.testing.assert_allclose(g["kernel"], jnp.tile(x.sum(0)[:, None], (1, 2)), rtol=1e-6)
  np.testing.assert_allclose(g["bias"], [4.0, 4.0])


def test_fake_quant_keeps_the_layer_dtype():
  """bf16 in, bf16 out: the quantizer maths runs in float32, the result is cast back."""
  x = jax.random.normal(jax.random.key(3), (4, 6)).astype(jnp.bfloat16)
  qmodel = mj.quantize_model(nn.Dense(3, dtype=jnp.bfloat16),
                             [mj.QuantRule(weight=mj.AffineWeight(8), act=mj.AffineActivation(8))])
  v = qmodel.init(jax.random.key(0), x)
  y, upd = qmodel.apply(v, x, mutable=["quant_stats"])
  assert y.dtype == jnp.bfloat16

  class Probe(nn.Module):  # the seam itself: float32 maths, the input's dtype out
    @nn.compact
    def __call__(self, x):
      return seam.apply_quantizer(self, "input", mj.AffineActivation(8), x, None)

  probe_out, _ = Probe().init_with_output(jax.random.key(0), x)
  assert probe_out.dtype == jnp.bfloat16
  aq = mj.AffineActivation(8)
  s, z = aq.qparams(upd["quant_stats"]["input"])
  xq = mj.affine_fake_quant(x.astype(jnp.float32), s, z, 0, 255).astype(jnp.bfloat16)
  kq = mj.AffineWeight(8).fake_quant(v["params"]["kernel"]).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(xq @ kq + v["params"]["bias"].astype(jnp.bfloat16), np.float32))
