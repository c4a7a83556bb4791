"""The open quantizer protocol: a quantizer written outside the library, with a trainable
step size, trains through the ordinary transform and optax; an affine one is asked for
its grid by the layers. Nothing here imports the library's private modules."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import micronet_jax as mj
from micronet_jax._src.core.protocol import AffineGrid, QState, Quantizer

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (16, 6))
Y = jnp.arange(16) % 3


@dataclasses.dataclass(frozen=True)
class LearnedStep:
  """A user's quantizer: symmetric b-bit codes with a learned step s,
  x_q = r(clip(x / s, -Qn, Qp)) s, initialised to s = 2 mean|x| / sqrt(Qp)."""

  bits: int = 4

  @property
  def qp(self) -> int:
    return 2 ** (self.bits - 1) - 1

  def init(self, x, channel_axis):
    return QState(params={"step": 2 * jnp.mean(jnp.abs(x)) / np.sqrt(self.qp)})

  def apply(self, x, qstate, *, channel_axis, update):
    s = qstate.params["step"]
    return mj.round_ste(jnp.clip(x / s, -self.qp - 1, self.qp)) * s, qstate.stats


class Mlp(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.relu(nn.Dense(8, name="hidden")(x))
    return nn.Dense(3, name="out")(h)


def _qmodel(q=LearnedStep()):
  return mj.quantize_model(Mlp(), [mj.QuantRule(weight=q, act=q)])


def test_user_quantizer_follows_the_protocol():
  assert isinstance(LearnedStep(), Quantizer)
  assert not isinstance(LearnedStep(), AffineGrid)
  assert isinstance(mj.AffineWeight(), AffineGrid) and isinstance(mj.AffineActivation(), AffineGrid)
  for q in (mj.DoReFaWeight(), mj.DoReFaActivation(), mj.BinaryWeight(), mj.TernaryWeight(), mj.BinaryActivation()):
    assert isinstance(q, Quantizer) and not isinstance(q, AffineGrid)


def test_learned_params_live_under_the_layer_and_start_from_the_float_weights():
  float_vars = Mlp().init(KEY, X)
  v = mj.quantize_variables(_qmodel(), float_vars, X)
  for layer in ("hidden", "out"):
    p = v["params"][layer]
    assert set(p) == {"kernel", "bias", "kernel_step", "input_step"}
    np.testing.assert_array_equal(p["kernel"], float_vars["params"][layer]["kernel"])  # float weights load
    expected = 2 * jnp.mean(jnp.abs(float_vars["params"][layer]["kernel"])) / np.sqrt(7)
    np.testing.assert_allclose(p["kernel_step"], expected, rtol=1e-6)
  np.testing.assert_allclose(v["params"]["hidden"]["input_step"], 2 * jnp.mean(jnp.abs(X)) / np.sqrt(7), rtol=1e-6)
  assert "quant_stats" not in v  # nothing is observed


def test_forward_and_step_gradient_are_the_quantizers_own():
  qmodel = _qmodel()
  v = mj.quantize_variables(qmodel, Mlp().init(KEY, X), X)
  s_in = v["params"]["hidden"]["input_step"]
  k, b = v["params"]["hidden"]["kernel"], v["params"]["hidden"]["bias"]
  s_k = v["params"]["hidden"]["kernel_step"]
  q = LearnedStep()
  xq = jnp.round(jnp.clip(X / s_in, -8, 7)) * s_in  # no .5 ties here: random normal data
  kq = jnp.round(jnp.clip(k / s_k, -8, 7)) * s_k
  h = nn.relu(xq @ kq + b)
  got = jax.jit(lambda v: qmodel.apply(v, X))(v)
  hq = q.apply(h, QState(params={"step": v["params"]["out"]["input_step"]}), channel_axis=None, update=False)[0]
  want = hq @ q.apply(v["params"]["out"]["kernel"], QState(params={"step": v["params"]["out"]["kernel_step"]}),
                      channel_axis=-1, update=False)[0] + v["params"]["out"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  # d/ds of sum(x_q) with the STE: r(x/s) - x/s inside the clip window, -Qn or Qp outside
  g = jax.grad(lambda s: jnp.sum(q.apply(X, QState(params={"step": s}), channel_axis=None, update=False)[0]))(s_in)
  t = X / s_in
  inside = (t >= -8) & (t <= 7)
  want_g = jnp.sum(jnp.where(inside, jnp.round(t) - t, jnp.clip(t, -8, 7)))
  np.testing.assert_allclose(g, want_g, rtol=1e-5)


def test_training_moves_the_learned_steps_and_lowers_the_loss():
  qmodel = _qmodel()
  v = mj.quantize_variables(qmodel, Mlp().init(KEY, X), X)
  tx = optax.adam(1e-2)
  params = v["params"]
  opt = tx.init(params)

  def loss(p):
    return optax.softmax_cross_entropy_with_integer_labels(qmodel.apply({"params": p}, X), Y).mean()

  @jax.jit
  def step(p, o):
    l, g = jax.value_and_grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l, g

  losses = []
  p = params
  for _ in range(30):
    p, opt, l, g = step(p, opt)
    losses.append(float(l))
  assert losses[-1] < losses[0] - 0.1
  assert float(jnp.abs(g["hidden"]["kernel_step"])) > 0  # the optimizer sees the steps
  assert float(p["hidden"]["kernel_step"]) != float(params["hidden"]["kernel_step"])


@dataclasses.dataclass(frozen=True)
class PowerOfTwoWeight:
  """A user's affine weight quantizer: symmetric 8 bits on a power-of-two scale."""

  bits: int = 8

  def int_range(self):
    return -127, 127

  def grid(self, x, qstate, channel_axis):
    scale = 2.0 ** jnp.ceil(jnp.log2(jnp.max(jnp.abs(jax.lax.stop_gradient(x))) / 127))
    return scale, jnp.zeros_like(scale)

  def init(self, x, channel_axis):
    return QState()

  def apply(self, x, qstate, *, channel_axis, update):
    scale, zp = self.grid(x, qstate, channel_axis)
    return mj.affine_fake_quant(x, scale, zp, *self.int_range()), qstate.stats


def test_layers_round_the_bias_on_a_user_affine_grid():
  """With an affine input and an AffineGrid weight quantizer, the bias is rounded to
  multiples of S_in * S_w (what an int32 accumulator holds)."""
  aq = mj.AffineActivation(8)
  qmodel = mj.quantize_model(nn.Dense(4), [mj.QuantRule(weight=PowerOfTwoWeight(), act=aq)])
  v = qmodel.init(KEY, X)
  v = {**v, "params": {**v["params"], "bias": jnp.asarray([0.1234, -0.5, 0.377, 1e-4])}}
  out, upd = qmodel.apply(v, X, mutable=["quant_stats"])
  s_in, zp = aq.qparams(upd["quant_stats"]["input"])
  s_w, _ = PowerOfTwoWeight().grid(v["params"]["kernel"], QState(), -1)
  xq = mj.affine_fake_quant(X, s_in, zp, 0, 255)
  kq = PowerOfTwoWeight().apply(v["params"]["kernel"], QState(), channel_axis=-1, update=False)[0]
  bq = jnp.round(v["params"]["bias"] / (s_in * s_w)) * (s_in * s_w)
  np.testing.assert_allclose(out, xq @ kq + bq, rtol=1e-6, atol=1e-6)
  assert not np.allclose(bq, v["params"]["bias"])  # the rounding is visible at this scale


def test_user_affine_quantizer_trains_and_converts_to_integers():
  """The integer converter asks for the AffineGrid capability, not for the library's own
  classes: a model whose weights use PowerOfTwoWeight trains, calibrates, converts, and
  its integer forward agrees with the fake-quant one."""
  qmodel = mj.quantize_model(Mlp(), [mj.QuantRule(weight=PowerOfTwoWeight(), act=mj.AffineActivation(8))])
  v = mj.quantize_variables(qmodel, Mlp().init(KEY, X), X)
  tx = optax.adam(1e-2)

  @jax.jit
  def step(p, stats, o):
    def loss(p):
      logits, upd = qmodel.apply({"params": p, "quant_stats": stats}, X, mutable=["quant_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean(), upd["quant_stats"]

    (_, stats), g = jax.value_and_grad(loss, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), stats, o

  p, stats, opt = v["params"], v["quant_stats"], tx.init(v["params"])
  for _ in range(5):
    p, stats, opt = step(p, stats, opt)
  v = mj.calibrate(qmodel, {"params": p, "quant_stats": stats}, [X[:8], X[8:]])
  d = mj.convert(qmodel, v, X[:1])
  assert isinstance(d.layers["hidden"], mj.IntDense) and d.layers["hidden"].w.dtype == jnp.int8
  logits_fq = qmodel.apply(v, X)
  logits_int = mj.integer_apply(d, d.quantize_input(X))
  np.testing.assert_array_equal(jnp.argmax(logits_int, -1), jnp.argmax(logits_fq, -1))
  np.testing.assert_allclose(logits_int, logits_fq, atol=0.02 * float(jnp.abs(logits_fq).max()))


@dataclasses.dataclass(frozen=True)
class OffsetWeight(PowerOfTwoWeight):
  """An affine weight grid with a nonzero zero point: integer kernels cannot hold it."""

  def grid(self, x, qstate, channel_axis):
    scale, zp = super().grid(x, qstate, channel_axis)
    return scale, zp + 3


def test_converter_names_what_an_affine_user_quantizer_lacks():
  import pytest

  for q, message in ((OffsetWeight(), "zero point 0"), (LearnedStep(), "AffineGrid")):
    qmodel = mj.quantize_model(Mlp(), [mj.QuantRule(weight=q, act=mj.AffineActivation(8))])
    v = mj.calibrate(qmodel, mj.quantize_variables(qmodel, Mlp().init(KEY, X), X), [X])
    with pytest.raises(ValueError, match=message):
      mj.convert(qmodel, v, X[:1])


def test_learned_kernel_step_with_batch_norm_folding():
  """A folded conv's kernel is quantized inside the BatchNorm's call, so its learned step
  lives under the BatchNorm; the folded forward is conv(x, q(W_fold)) + b_fold."""
  from micronet_jax._src.flax.bn_fold import fold_batch_norm

  class ConvBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      return nn.BatchNorm(use_running_average=not train, name="bn")(nn.Conv(4, (3, 3), name="conv")(x))

  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
  q = LearnedStep()
  qmodel = mj.quantize_model(ConvBN(), [mj.QuantRule(weight=q, fold_bn=True)])
  fv = ConvBN().init(KEY, x)
  fv = {**fv, "batch_stats": {"bn": {"mean": jnp.arange(4.0) / 10, "var": 1 + jnp.arange(4.0)}}}
  v = mj.quantize_variables(qmodel, fv, x)
  assert set(v["params"]["bn"]) == {"scale", "bias", "kernel_step"} and set(v["params"]["conv"]) == {"kernel", "bias"}
  conv, bn = v["params"]["conv"], v["params"]["bn"]
  w_fold, b_fold = fold_batch_norm(conv["kernel"], conv["bias"], bn["scale"], bn["bias"],
                                   fv["batch_stats"]["bn"]["mean"], fv["batch_stats"]["bn"]["var"], 1e-5)
  np.testing.assert_allclose(bn["kernel_step"], 2 * jnp.mean(jnp.abs(w_fold)) / np.sqrt(7), rtol=1e-6)
  w_q = q.apply(w_fold, QState(params={"step": bn["kernel_step"]}), channel_axis=-1, update=False)[0]
  want = nn.Conv(4, (3, 3), use_bias=False).apply({"params": {"kernel": w_q}}, x) + b_fold
  np.testing.assert_allclose(qmodel.apply(v, x, train=False), want, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda p: jnp.sum(qmodel.apply({**v, "params": p}, x, train=False) ** 2))(v["params"])
  assert float(jnp.abs(g["bn"]["kernel_step"])) > 0
