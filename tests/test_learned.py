"""LSQ, LSQ+ and PACT (micronet_jax._src.core.learned): forward values on hand examples,
gradients against the papers' formulas, the gradient scale, the initialisation from the
weights and the first batch, QAT through Linen (BatchNorm folding included), the integer
deploy of a trained model, the presets and the CLI."""

from __future__ import annotations

import json
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import micronet_jax as mj
from micronet_jax._src.core.protocol import AffineGrid, QState, Quantizer
from micronet_jax.models import LeNet
from tests.conftest import init_variables, make_idx_dir

KEY = jax.random.key(0)
X_IMG = jax.random.normal(jax.random.key(1), (64, 28, 28, 1))
Y_IMG = jnp.arange(64) % 10
f32 = np.float32


def _apply(q, x, **params):
  return q.apply(jnp.asarray(x), QState(params={k: jnp.asarray(v, jnp.float32) for k, v in params.items()}),
                 channel_axis=None, update=False)[0]


# ----------------------------------------------------------------------------- forward values


def test_lsq_forward_on_a_hand_example():
  # W3: codes [-4, 3], step 0.5: x/s = -6 -1.4 0.4 1 2.5 8 -> r = -6 -1 0 1 3 8 -> clip -4 -1 0 1 3 3
  x = np.array([-3.0, -0.7, 0.2, 0.5, 1.25, 4.0], f32)
  np.testing.assert_array_equal(_apply(mj.LsqWeight(3), x, step=0.5), [-2.0, -0.5, 0.0, 0.5, 1.5, 1.5])
  # unsigned A2 [0, 3]: negatives go to 0
  np.testing.assert_array_equal(_apply(mj.LsqActivation(2), x, step=0.5), [0, 0, 0, 0.5, 1.5, 1.5])
  # signed A2 [-2, 1]
  np.testing.assert_array_equal(_apply(mj.LsqActivation(2, signed=True), x, step=0.5), [-1, -0.5, 0, 0.5, 0.5, 0.5])


def test_lsq_plus_offset_is_snapped_to_the_grid():
  # step 0.5, offset -1.2 -> k = r(-2.4) = -2, beta^ = -1, zero point 2; A2 codes [0, 3] cover [-1, 0.5]
  q = mj.LsqPlusActivation(2)
  x = np.array([-3.0, -0.9, -0.2, 0.3, 0.9], f32)
  np.testing.assert_array_equal(_apply(q, x, step=0.5, offset=-1.2), [-1.0, -1.0, 0.0, 0.5, 0.5])
  scale, zp = q.grid(None, QState(params={"step": jnp.float32(0.5), "offset": jnp.float32(-1.2)}), None)
  assert float(scale) == 0.5 and float(zp) == 2.0


def test_pact_forward_on_a_hand_example():
  # alpha 1.5 on 2 bits: step 0.5, y = clip(x, 0, 1.5)
  x = np.array([-1.0, 0.2, 0.3, 0.8, 1.4, 7.0], f32)
  np.testing.assert_array_equal(_apply(mj.PactActivation(2), x, alpha=1.5), [0, 0, 0.5, 1.0, 1.5, 1.5])
  scale, zp = mj.PactActivation(2).grid(None, QState(params={"alpha": jnp.float32(1.5)}), None)
  assert float(scale) == 0.5 and float(zp) == 0.0


# ----------------------------------------------------------------------------- gradients


def _elementwise(f, n_params):
  """x, params -> per element d f(x_i, params) / d(x_i, params): reverse mode, vmapped."""
  return jax.vmap(jax.grad(f, argnums=tuple(range(1 + n_params))), in_axes=(0, *([None] * n_params)))


# jitted once per integer grid (qmin, qmax, bits static): hypothesis calls them many times
LSQ_GRADS = jax.jit(lambda x, s, g, qmin, qmax: _elementwise(
    lambda v, s: mj.lsq_fake_quant(v, s, qmin, qmax, g), 1)(x, s), static_argnums=(3, 4))
LSQ_PLUS_GRADS = jax.jit(lambda x, s, b, g, qmin, qmax: _elementwise(
    lambda v, s, b: mj.lsq_fake_quant(v, s, qmin, qmax, g, b), 2)(x, s, b), static_argnums=(4, 5))
PACT_GRADS = jax.jit(lambda x, a, bits: _elementwise(lambda v, a: mj.pact_activation(v, a, bits), 1)(x, a),
                     static_argnums=2)


def _away_from_ties(t, lo, hi, margin=1e-3):
  """Elements whose rounding and clipping are unambiguous (the formulas differ only at
  ties and at the clip ends, where the derivative is a convention)."""
  return (np.abs(t - np.floor(t) - 0.5) > margin) & (np.abs(t - lo) > margin) & (np.abs(t - hi) > margin)


values = st.lists(st.floats(-20, 20, width=32), min_size=16, max_size=16)


@settings(max_examples=40, deadline=None)
@given(values, st.floats(0.05, 3.0), st.integers(2, 8), st.floats(1e-3, 10.0))
def test_lsq_gradients_are_the_papers(xs, step, bits, g):
  """LSQ eq. (3): d x_q/ds = g(r(t) - t) inside, g*(-Qn) below, g*Qp above; d x_q/dx = 1 inside."""
  x, s = np.asarray(xs, f32), f32(step)
  qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  t = x / s
  ok = _away_from_ties(t, qmin, qmax)
  dx, ds = (np.asarray(a)[ok] for a in LSQ_GRADS(jnp.asarray(x), s, jnp.float32(g), qmin, qmax))
  t = t[ok]
  inside = (t >= qmin) & (t <= qmax)
  want_ds = g * np.where(inside, np.round(t) - t, np.clip(t, qmin, qmax))
  np.testing.assert_allclose(ds, want_ds, rtol=1e-4, atol=1e-5 * g)
  np.testing.assert_allclose(dx, inside.astype(f32), rtol=1e-6)  # (1 / s) s: 1 within an ulp


@settings(max_examples=40, deadline=None)
@given(values, st.floats(0.05, 3.0), st.floats(-5, 5), st.integers(2, 8), st.floats(1e-3, 10.0))
def test_lsq_plus_gradients_are_the_papers(xs, step, offset, bits, g):
  """LSQ+ with t = (x - beta^)/s: d/ds = g(r(t) - t) inside, g n / g p outside; d/d beta = 0
  inside, g outside; d/dx = 1 inside."""
  x, s, b = np.asarray(xs, f32), f32(step), f32(offset)
  qmin, qmax = 0, 2**bits - 1
  k = np.round(b / s)
  assume(abs(b / s - np.floor(b / s) - 0.5) > 1e-3)
  t = x / s - k
  ok = _away_from_ties(t, qmin, qmax)
  dx, ds, db = (np.asarray(a)[ok] for a in LSQ_PLUS_GRADS(jnp.asarray(x), s, b, jnp.float32(g), qmin, qmax))
  t = t[ok]
  inside = (t >= qmin) & (t <= qmax)
  np.testing.assert_allclose(ds, g * np.where(inside, np.round(t) - t, np.clip(t, qmin, qmax)),
                             rtol=1e-4, atol=1e-4 * g * max(1.0, abs(k)))
  np.testing.assert_allclose(db, g * (~inside), atol=1e-6 * g)
  np.testing.assert_allclose(dx, inside.astype(f32), rtol=1e-6)  # (1 / s) s: 1 within an ulp


@settings(max_examples=40, deadline=None)
@given(values, st.floats(0.1, 10.0), st.integers(2, 8))
def test_pact_gradients_are_the_papers(xs, alpha, bits):
  """PACT: d x_q/d alpha = 1 where x >= alpha, else 0; d x_q/dx = 1 on 0 < x < alpha."""
  x, a = np.asarray(xs, f32), f32(alpha)
  ok = (np.abs(x - a) > 1e-3) & (np.abs(x) > 1e-3)
  dx, da = (np.asarray(v)[ok] for v in PACT_GRADS(jnp.asarray(x), a, bits))
  x = x[ok]
  np.testing.assert_array_equal(da, (x >= a).astype(f32))
  np.testing.assert_array_equal(dx, ((x > 0) & (x < a)).astype(f32))


@settings(max_examples=60, deadline=None)
@given(st.floats(1e-6, 1e6), st.floats(1e-6, 1.0))
def test_grad_scale_keeps_the_value_bit_exact_and_scales_the_gradient(x, g):
  x = jnp.float32(x)
  assert jax.jit(mj.grad_scale)(x, g) == x  # exactly, under jit too
  np.testing.assert_allclose(jax.grad(lambda v: 3.0 * mj.grad_scale(v, g))(x), 3.0 * g, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(values, st.floats(0.05, 3.0), st.floats(-5, 5), st.integers(2, 8))
def test_codes_are_the_integer_deploys(xs, step, offset, bits):
  """The forward's codes are clip(r(x / s) + z, qmin, qmax), computed as the deploy does."""
  q = mj.LsqPlusActivation(bits)
  x = jnp.asarray(np.asarray(xs, f32))
  state = QState(params={"step": jnp.float32(step), "offset": jnp.float32(offset)})
  scale, zp = q.grid(None, state, None)
  qmin, qmax = q.int_range()
  codes = jnp.clip(mj.round_half_away(x / scale) + zp, qmin, qmax)
  xq = jax.jit(lambda x: q.apply(x, state, channel_axis=None, update=False)[0])(x)
  np.testing.assert_allclose(xq, (codes - zp) * scale, rtol=1e-6, atol=1e-6 * float(scale) * max(1, abs(float(zp))))


# ----------------------------------------------------------------------------- init and grad scale


def test_weight_init_and_grad_scale_per_tensor_and_per_channel():
  w = jax.random.normal(KEY, (3, 3, 4, 8)) * jnp.arange(1, 9)
  q = mj.LsqWeight(4)
  np.testing.assert_allclose(q.init(w, -1).params["step"], 2 * jnp.mean(jnp.abs(w)) / math.sqrt(7), rtol=1e-6)
  assert q.grad_scale(w, -1) == 1 / math.sqrt(w.size * 7)
  qc = mj.LsqWeight(4, per_channel=True)
  np.testing.assert_allclose(qc.init(w, -1).params["step"], 2 * jnp.mean(jnp.abs(w), (0, 1, 2)) / math.sqrt(7),
                             rtol=1e-6)
  assert qc.grad_scale(w, -1) == 1 / math.sqrt(36 * 7)
  # the gradient into the step is g times LSQ's unscaled one
  for spec, step in ((q, q.init(w, -1).params["step"]), (qc, qc.init(w, -1).params["step"])):
    got = jax.jit(jax.grad(lambda s: jnp.sum(spec.apply(w, QState(params={"step": s}), channel_axis=-1,
                                                        update=False)[0])))(step)
    s_b = step if step.ndim == 0 else step.reshape(1, 1, 1, -1)
    unscaled = jax.jit(jax.grad(lambda s: jnp.sum(mj.lsq_fake_quant(w, s, -8, 7))))(s_b).reshape(step.shape)
    np.testing.assert_allclose(got, spec.grad_scale(w, -1) * unscaled, rtol=1e-5)


def test_activation_grad_scale_counts_features_per_example():
  x = jnp.abs(jax.random.normal(KEY, (5, 6, 6, 3)))
  assert mj.LsqActivation(3).grad_scale(x) == 1 / math.sqrt(108 * 7)
  assert mj.LsqActivation(3).grad_scale(x[:2]) == mj.LsqActivation(3).grad_scale(x)  # not the batch size
  assert mj.LsqPlusActivation(3).grad_scale(x) == 1 / math.sqrt(108 * 7)


@pytest.fixture(scope="module")
def lenet_lsq():
  """(qmodel, float variables, QAT variables from quantize_variables) of an LSQ W4A4 LeNet."""
  net = LeNet()
  fv = init_variables(net, X_IMG[:1])
  qmodel = mj.quantize_model(net, mj.lsq_rules(4, 4))
  return qmodel, fv, mj.quantize_variables(qmodel, fv, X_IMG)


def _layer_inputs(qmodel, v, x):
  """{layer: its input before quantization} in the quantized model's forward (jitted)."""
  def run(v, x):
    h = {}

    def grab(next_fun, args, kwargs, context):
      m = context.module
      if context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.Conv)) and not hasattr(m, "act_quant"):
        h[m.name] = args[0]  # the float layer the transform swaps: its input before quantization
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      qmodel.apply(v, x)
    return h

  return jax.jit(run)(v, x)


def test_params_start_from_the_float_weights_and_the_first_batch(lenet_lsq):
  qmodel, fv, v = lenet_lsq
  p = v["params"]
  assert set(p["Conv_0"]) == {"kernel", "bias", "kernel_step", "input_step", "input_offset"}
  assert set(p["Conv_1"]) == {"kernel", "bias", "kernel_step", "input_step", "input_offset"}
  np.testing.assert_array_equal(p["Conv_1"]["kernel"], fv["params"]["Conv_1"]["kernel"])
  np.testing.assert_allclose(p["Conv_1"]["kernel_step"],
                             2 * jnp.mean(jnp.abs(fv["params"]["Conv_1"]["kernel"])) / math.sqrt(7), rtol=1e-6)
  np.testing.assert_allclose(p["Dense_1"]["kernel_step"],  # the last layer is 8-bit
                             2 * jnp.mean(jnp.abs(fv["params"]["Dense_1"]["kernel"])) / math.sqrt(127), rtol=1e-6)
  # the image input (LSQ+, 8 bits): the first batch's min and max
  lo, hi = float(X_IMG.min()), float(X_IMG.max())
  np.testing.assert_allclose(p["Conv_0"]["input_step"], (hi - lo) / 255, rtol=1e-6)
  np.testing.assert_allclose(p["Conv_0"]["input_offset"], lo, rtol=1e-6)
  # a hidden input: 2 mean|x| / sqrt(Qp) of what reaches the layer in the quantized model
  # (the layers before it quantize with their own initial params); LeNet's follow a ReLU,
  # so the grid is LSQ's unsigned one, offset 0
  h = _layer_inputs(qmodel, v, X_IMG)
  for layer in ("Conv_1", "Dense_0", "Dense_1"):
    assert float(p[layer]["input_offset"]) == 0.0, layer
  np.testing.assert_allclose(p["Dense_0"]["input_step"], 2 * jnp.mean(jnp.abs(h["Dense_0"])) / math.sqrt(15),
                             rtol=1e-5)
  np.testing.assert_allclose(p["Dense_1"]["input_step"], 2 * jnp.mean(jnp.abs(h["Dense_1"])) / math.sqrt(255),
                             rtol=1e-5)
  assert "quant_stats" not in v or not jax.tree.leaves(v["quant_stats"])  # nothing observed


def test_pact_alpha_init():
  x = jnp.abs(jax.random.normal(KEY, (8, 10)))
  np.testing.assert_allclose(mj.PactActivation(3).init(x, None).params["alpha"],
                             2 * jnp.mean(x) * math.sqrt(7), rtol=1e-6)
  assert float(mj.PactActivation(3, alpha_init=10.0).init(x, None).params["alpha"]) == 10.0


def test_specs_follow_the_protocol_and_check_their_bits():
  for q in (mj.LsqWeight(), mj.LsqActivation(), mj.LsqPlusActivation(), mj.PactActivation()):
    assert isinstance(q, Quantizer) and isinstance(q, AffineGrid)
  for make in (mj.LsqWeight, mj.LsqActivation, mj.LsqPlusActivation, mj.PactActivation):
    with pytest.raises(ValueError, match="bits"):
      make(1)
  with pytest.raises(ValueError, match="alpha_init"):
    mj.PactActivation(4, alpha_init=0.0)


# ----------------------------------------------------------------------------- presets


def test_presets_place_the_quantizers():
  first, last, rest, products = mj.lsq_rules(3, 2)
  assert (first.index, last.index, rest.index) == (0, -1, None)
  # attention's activation x activation products: both operands at a_bits, sign from the first batch
  assert products.kinds == ("attention",) and products.weight is None
  assert products.act == mj.LsqPlusActivation(2, start="lsq")
  assert len(mj.lsq_rules(3, 32)) == 3  # float activations: no product rule
  # the image input from its min/max, every other input LSQ's start on the grid its sign asks for
  assert first.weight == mj.LsqWeight(8) and first.act == mj.LsqPlusActivation(8, start="minmax")
  assert last.weight == mj.LsqWeight(8) and last.act == mj.LsqPlusActivation(8, start="lsq")
  assert rest.weight == mj.LsqWeight(3) and rest.act == mj.LsqPlusActivation(2, start="lsq")
  assert mj.lsq_rules(3, 2, first_last_bits=None)[1].act == mj.LsqPlusActivation(2, start="lsq")
  assert mj.lsq_rules(4, 4, plus=True)[2].act == mj.LsqPlusActivation(4, start="minmax")
  assert all(r.fold_bn for r in mj.lsq_rules(4, 4, fold_bn=True)[:3])  # the layers with weights
  assert mj.preset("lsq", 4, 4) == mj.lsq_rules(4, 4)
  keep, pact = mj.pact_rules(2, 3)
  assert keep.keeps_float and keep.index == 0
  assert pact.weight == mj.LsqWeight(2) and pact.act == mj.PactActivation(3)
  assert mj.pact_rules(2, 3, per_channel=True)[1].weight == mj.LsqWeight(2, per_channel=True)
  assert mj.pact_rules(2, 3, weight="dorefa")[1].weight == mj.DoReFaWeight(2)
  with pytest.raises(ValueError, match="weight must be one of"):
    mj.pact_rules(2, 3, weight="iao")
  with pytest.raises(ValueError, match="DoReFa weights have none"):
    mj.pact_rules(2, 3, weight="dorefa", per_channel=True)
  assert mj.preset("pact", 4, 4) == mj.pact_rules(4, 4)
  from micronet_jax.app.config import QUANT_METHODS
  assert {"lsq", "pact"} <= set(QUANT_METHODS)


# ----------------------------------------------------------------------------- QAT through Linen


def _train(qmodel, v, x, y, steps, lr=3e-3):
  tx = optax.adam(lr)

  @jax.jit
  def step(p, o, rng):
    def loss(p):
      logits = qmodel.apply({**v, "params": p}, x, train=True, rngs={"dropout": rng})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    l, g = jax.value_and_grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l, g

  p, o, losses, first_grads = v["params"], tx.init(v["params"]), [], None
  for i in range(steps):
    p, o, l, g = step(p, o, jax.random.key(i))
    losses.append(float(l))
    first_grads = g if first_grads is None else first_grads
  return {**v, "params": p}, losses, first_grads


@pytest.fixture(scope="module")
def trained(lenet_lsq):
  """{"lsq" | "pact": (qmodel, initial variables, variables after 25 Adam steps, first-step
  grads, losses)} on the 64 synthetic images. PACT: LSQ weights (so that it converts) and
  PACT activations from alpha = 1, where inputs above it clip and alpha has a gradient
  (from the default start, 2 mean|x| sqrt(15), few or none do and alpha may not move in
  25 steps); the first layer's input is LSQ+ and the last layer 8-bit, as in lsq_rules."""
  out = {}
  qmodel, _, v0 = lenet_lsq
  out["lsq"] = (qmodel, v0, *_train(qmodel, v0, X_IMG, Y_IMG, 25))
  net = LeNet()
  qmodel = mj.quantize_model(net, [
      mj.QuantRule(index=0, weight=mj.LsqWeight(8), act=mj.LsqPlusActivation(8)),
      mj.QuantRule(index=-1, weight=mj.LsqWeight(8), act=mj.PactActivation(8, alpha_init=1.0)),
      mj.QuantRule(weight=mj.LsqWeight(4), act=mj.PactActivation(4, alpha_init=1.0))])
  v0 = mj.quantize_variables(qmodel, init_variables(net, X_IMG[:1]), X_IMG)
  out["pact"] = (qmodel, v0, *_train(qmodel, v0, X_IMG, Y_IMG, 25))
  return out


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_qat_steps_lower_the_loss_and_move_the_learned_params(trained, method):
  _, v0, v, losses, g = trained[method]
  # (dropout makes single steps noisy; measured drops: lsq 0.8, pact from alpha = 1 0.12)
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.08, losses
  name = "input_step" if method == "lsq" else "input_alpha"
  assert float(jnp.abs(g["Dense_0"][name])) > 0
  for layer in ("Conv_1", "Dense_0", "Dense_1"):
    assert float(v["params"][layer][name]) != float(v0["params"][layer][name]), layer
    assert float(jnp.abs(g[layer]["kernel_step"])) > 0


@pytest.mark.parametrize("weight,learned_params", [("lsq", {"kernel_step", "input_alpha"}), ("dorefa", {"input_alpha"})])
def test_pact_rules_train(weight, learned_params):
  net = LeNet()
  qmodel = mj.quantize_model(net, mj.pact_rules(4, 4, weight=weight, alpha_init=1.0))
  v0 = mj.quantize_variables(qmodel, init_variables(net, X_IMG[:1]), X_IMG)
  assert set(v0["params"]["Conv_0"]) == {"kernel", "bias"}  # the first layer stays float
  assert set(v0["params"]["Dense_0"]) == {"kernel", "bias", *learned_params}
  _, losses, g = _train(qmodel, v0, X_IMG, Y_IMG, 10)
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) and float(jnp.abs(g["Dense_0"]["input_alpha"])) > 0


class ConvBN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train, name="bn")(nn.Conv(6, (3, 3), name="conv")(x))
    x = nn.relu(x).reshape((x.shape[0], -1))
    return nn.Dense(10, name="head")(x)


X_BN, Y_BN = X_IMG[:32, :10, :10], Y_IMG[:32]


@pytest.fixture(scope="module")
def folded():
  """(qmodel, float variables, QAT variables after 15 steps, first-step grads, losses) of
  an LSQ ConvBN whose BatchNorm is folded into the conv."""
  net = ConvBN()
  fv = init_variables(net, X_BN[:1])
  fv = {**fv, "batch_stats": {"bn": {"mean": jnp.arange(6.0) / 10, "var": 1 + jnp.arange(6.0)}}}
  # two layers: the first and the last rule take them, the third matches nothing
  with pytest.warns(UserWarning, match="matched no layer"):
    qmodel = mj.quantize_model(net, mj.lsq_rules(4, 4, first_last_bits=None, fold_bn=True))
    v0 = mj.quantize_variables(qmodel, fv, X_BN)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, bs, o):
    def loss(p):
      logits, upd = qmodel.apply({"params": p, "batch_stats": bs}, X_BN, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, Y_BN).mean(), upd["batch_stats"]

    (l, bs), g = jax.value_and_grad(loss, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), bs, o, l, g

  p, bs, o = v0["params"], v0["batch_stats"], tx.init(v0["params"])
  losses, grads = [], []
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "quantization rule 2", UserWarning)
    for _ in range(15):
      p, bs, o, l, g = step(p, bs, o)
      losses.append(float(l))
      grads.append(g)
  return qmodel, fv, v0, {**v0, "params": p, "batch_stats": bs}, grads[0], losses


def test_lsq_with_batch_norm_folding_learns_the_step_of_the_folded_kernel(folded):
  """A folded conv's learned kernel step lives under the BatchNorm and starts from W_fold
  (the kernel the integer deploy stores); it trains with the rest."""
  from micronet_jax._src.flax.bn_fold import fold_batch_norm

  qmodel, fv, v0, _, g, losses = folded
  assert set(v0["params"]["bn"]) == {"scale", "bias", "kernel_step"}
  assert set(v0["params"]["conv"]) == {"kernel", "bias", "input_step", "input_offset"}
  conv, bn = v0["params"]["conv"], v0["params"]["bn"]
  w_fold, b_fold = fold_batch_norm(conv["kernel"], conv["bias"], bn["scale"], bn["bias"],
                                   fv["batch_stats"]["bn"]["mean"], fv["batch_stats"]["bn"]["var"], 1e-5)
  np.testing.assert_allclose(bn["kernel_step"], 2 * jnp.mean(jnp.abs(w_fold)) / math.sqrt(7), rtol=1e-5)
  # eval forward: conv(Aq(x), Wq(W_fold)) + b_fold rounded to S_in * S_w, then the head
  q_in, q_w = mj.LsqPlusActivation(4), mj.LsqWeight(4)
  s_in = {"step": conv["input_step"], "offset": conv["input_offset"]}
  xq = q_in.apply(X_BN, QState(params=s_in), channel_axis=None, update=False)[0]
  wq = q_w.apply(w_fold, QState(params={"step": bn["kernel_step"]}), channel_axis=-1, update=False)[0]
  acc = q_in.grid(None, QState(params=s_in), None)[0] * q_w.grid(w_fold, QState(params={"step": bn["kernel_step"]}),
                                                                  -1)[0]
  z = nn.Conv(6, (3, 3), use_bias=False).apply({"params": {"kernel": wq}}, xq) + mj.round_ste(b_fold / acc) * acc
  np.testing.assert_allclose(qmodel.apply(v0, X_BN, train=False)[:, :3],
                             _head(v0, nn.relu(z).reshape((32, -1)))[:, :3], rtol=1e-4, atol=1e-4)
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) and float(jnp.abs(g["bn"]["kernel_step"])) > 0


def _head(v, h):
  """The LSQ head of ConvBN on its input h (the last layer: LSQ weights, LSQ-started LSQ+ input)."""
  p = v["params"]["head"]
  q_in, q_w = mj.LsqPlusActivation(4, start="lsq"), mj.LsqWeight(4)
  s_in = QState(params={"step": p["input_step"], "offset": p["input_offset"]})
  hq = q_in.apply(h, s_in, channel_axis=None, update=False)[0]
  wq = q_w.apply(p["kernel"], QState(params={"step": p["kernel_step"]}), channel_axis=-1, update=False)[0]
  acc = q_in.grid(None, s_in, None)[0] * q_w.grid(
      p["kernel"], QState(params={"step": p["kernel_step"]}), -1)[0]
  return hq @ wq + mj.round_ste(p["bias"] / acc) * acc


def test_lsq_with_batch_norm_folding_converts(folded):
  qmodel, _, _, v, _, _ = folded
  d = mj.convert(qmodel, v, X_BN[:1])
  assert d.folded_bns == ("bn",) and d.layers["conv"].w.dtype == jnp.int8
  logits_fq = qmodel.apply(v, X_BN)
  logits_int = mj.integer_apply(d, d.quantize_input(X_BN))
  np.testing.assert_array_equal(jnp.argmax(logits_int, -1), jnp.argmax(logits_fq, -1))
  np.testing.assert_allclose(logits_int, logits_fq, atol=0.01 * float(jnp.abs(logits_fq).max()))


# ----------------------------------------------------------------------------- integer deploy


@jax.jit
def _run_integer(d, xq):
  cap = {}
  return mj.integer_apply(d, xq, capture=cap), cap


def _agreement(qmodel, v, x):
  """(fraction of equal predictions, first layer's codes equal, max |logit diff| / max
  |logit|, deploy) of the integer deploy against the fake-quant eval forward."""
  from micronet_jax._src.deploy.integer import fake_quant_codes

  d = mj.convert(qmodel, v, x[:1])
  logits_int, cap = _run_integer(d, d.quantize_input(x))
  logits_fq = jax.jit(lambda v, x: qmodel.apply(v, x))(v, x)
  codes = jax.jit(lambda v, x: fake_quant_codes(qmodel, v, x))(v, x)
  # Logits lie on the accumulator grid, so two classes can tie exactly in integers (low-bit
  # layers make it common); the fake-quant argmax then only needs to be one of the tied.
  pred_fq = jnp.argmax(logits_fq, -1)
  picked = jnp.take_along_axis(logits_int, pred_fq[:, None], -1)[:, 0]
  agree = float(jnp.mean((jnp.argmax(logits_int, -1) == pred_fq) | (picked == logits_int.max(-1))))
  first = bool(jnp.array_equal(cap["Conv_0"], codes["Conv_0"]))
  return agree, first, float(jnp.abs(logits_int - logits_fq).max() / jnp.abs(logits_fq).max()), d


@pytest.mark.parametrize("method", ["lsq", "pact"])
def test_trained_lenet_converts_and_agrees_with_fake_quant(trained, method):
  """LSQ LeNet (LSQ+ image input), and LSQ weights with PACT activations: a learned step is
  the deploy's scale."""
  qmodel, _, v, _, _ = trained[method]
  x = jax.random.normal(jax.random.key(7), (256, 28, 28, 1))
  agree, first_codes_equal, dev, d = _agreement(qmodel, v, x)
  assert agree >= 0.999 and first_codes_equal and dev < 0.02, (agree, first_codes_equal, dev)
  assert all(rec.w.dtype == jnp.int8 for rec in d.layers.values())
  # the steps are the deploy's scales: Dense_0's weight codes are r(W / kernel_step)
  k, s = v["params"]["Dense_0"]["kernel"], v["params"]["Dense_0"]["kernel_step"]
  np.testing.assert_array_equal(d.layers["Dense_0"].w, jnp.clip(mj.round_half_away(k / s), -8, 7).astype(jnp.int8))


@pytest.mark.realdata
def test_lsq_lenet_on_fashion_mnist_converts_with_999_agreement(fashion_mnist_small):
  ds = fashion_mnist_small
  net = LeNet()
  qmodel = mj.quantize_model(net, mj.lsq_rules(4, 4))
  x_tr, y_tr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  v = mj.quantize_variables(qmodel, init_variables(net, x_tr[:1]), x_tr[:128])
  tx = optax.adam(2e-3)

  @jax.jit
  def step(p, o, i):
    xb = jax.lax.dynamic_slice_in_dim(x_tr, (i % 15) * 128, 128)
    yb = jax.lax.dynamic_slice_in_dim(y_tr, (i % 15) * 128, 128)

    def loss(p):
      logits = qmodel.apply({"params": p}, xb, train=True, rngs={"dropout": jax.random.key(i)})
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    g = jax.grad(loss)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  p, o = v["params"], tx.init(v["params"])
  for i in range(100):
    p, o = step(p, o, i)
  v = {**v, "params": p}
  x_te = jnp.asarray(ds.x_test)
  acc = float(jnp.mean(jnp.argmax(jax.jit(qmodel.apply)(v, x_te), -1) == jnp.asarray(ds.y_test)))
  agree, first_codes_equal, dev, _ = _agreement(qmodel, v, x_te)
  assert acc > 0.7, acc
  assert agree >= 0.999 and first_codes_equal and dev < 0.02, (agree, first_codes_equal, dev)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("quant,per_channel", [("lsq", False), ("pact", True)])  # ~15 s a CLI run here
def test_cli_trains_with_learned_quantizers(quant, per_channel, tmp_path):
  from micronet_jax.app import cli, runs

  idx = make_idx_dir(tmp_path / "idx", n_train=128, n_test=64, seed=2) and str(tmp_path / "idx")
  out = tmp_path / quant
  argv = ["train", "--model", "lenet", "--quant", quant, "--w-bits", "4", "--a-bits", "4", "--epochs", "1",
          "--batch-size", "64", "--eval-batch-size", "64", "--data-dir", idx, "--out", str(out)]
  argv += ["--per-channel"] if per_channel else []
  config = cli.parse_config(argv)
  assert config.per_channel is per_channel and cli.parse_config(cli.config_to_argv(config)) == config
  assert ("--per-channel" in cli.config_to_argv(config)) is per_channel  # the run's reported command says so
  assert cli.main([*argv, "--no-progress"]) == 0
  with open(out / "metrics.json") as f:
    m = json.load(f)
  assert m["config"]["quant"] == quant and m["label"] == f"{quant} W4A4" and 0 <= m["test_accuracy"] <= 1
  assert m["config"]["per_channel"] is per_channel
  _, _, v = runs.load_run(str(out))
  # started from the first training batch, not from the zeros of the example input (from
  # which the step would be the standard-normal fallback and the LSQ grid signed)
  if quant == "lsq":
    zeros_start = mj.LsqPlusActivation(4, start="lsq").init(jnp.zeros((1, 256)), None).params
    assert float(v["params"]["Dense_0"]["input_offset"]) > zeros_start["offset"] / 2  # ~0, not -8 s
  else:
    zeros_start = mj.PactActivation(4).init(jnp.zeros((1, 256)), None).params
    assert abs(float(v["params"]["Dense_0"]["input_alpha"]) - float(zeros_start["alpha"])) > 0.1
  # one learned weight step per output channel with --per-channel, one per tensor without
  dense = v["params"]["Dense_0"]
  assert dense["kernel_step"].shape == ((dense["kernel"].shape[-1],) if per_channel else ())


def test_per_channel_needs_a_learned_step_method():
  from micronet_jax.app.config import TrainConfig
  from micronet_jax.app.errors import ConfigError

  with pytest.raises(ConfigError, match="needs --quant lsq or pact, got iao"):
    TrainConfig(quant="iao", per_channel=True)
  assert TrainConfig(quant="lsq", per_channel=True).per_channel
