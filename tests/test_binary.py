"""Binary and ternary networks (micronet's wbwtab): quantizer values and gradients against
hand-computed cases of micronet's formulas (reference section 4), properties, the
centering/clipping params transform, the preset, BN -> bias fusion with negative and
zero gamma, bit packing and the packed / XNOR inference paths, and the CLI."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import micronet_jax as mj
from micronet_jax._src.core import binary as B
from micronet_jax._src.deploy import binary as D
from micronet_jax._src.flax import centering as C
from micronet_jax.app import train as train_lib
from micronet_jax.models import NIN, NINGC, LeNet
from micronet_jax._src.flax.stats import model_stats

KEY = jax.random.key(0)

# ----------------------------------------------------------------------------- quantizers


def test_binary_weight_hand_case_values_and_gradient():
  # Dense kernel (in 3, out 2); per output channel (column) alpha = mean|w|.
  w = jnp.array([[0.5, -0.2], [-0.3, 0.0], [0.1, 0.4]], jnp.float32)
  g = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], jnp.float32)
  q = mj.BinaryWeight().fake_quant(w, channel_axis=-1)
  # alpha = (0.3, 0.2); sign(0) -> +1.
  np.testing.assert_allclose(q, [[0.3, -0.2], [-0.3, 0.2], [0.3, 0.2]], rtol=1e-6)
  grad = jax.grad(lambda w: jnp.sum(B.binary_weight(w) * g))(w)
  # dL/dw = alpha g + sign(w)/n * sum(sign+(w) g):  column 0: sum = 1 - 3 + 5 = 3, n = 3;
  # column 1: sum = -2 + 4 + 6 = 8, and the zero weight gets no alpha-path term (sign(0) = 0).
  expected = [[0.3 * 1 + 1.0, 0.2 * 2 - 8 / 3], [0.3 * 3 - 1.0, 0.2 * 4], [0.3 * 5 + 1.0, 0.2 * 6 + 8 / 3]]
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


def _micronet_binary_grad(w, g):
  """numpy transcription of reference §4.1's gradient, per output channel (last axis)."""
  axes = tuple(range(w.ndim - 1))
  n = np.prod([w.shape[a] for a in axes])
  alpha = np.abs(w).mean(axes, keepdims=True)
  s_plus = np.where(w >= 0, 1.0, -1.0)
  return alpha * g + np.sign(w) / n * (s_plus * g).sum(axes, keepdims=True)


def test_binary_weight_conv_kernel_matches_micronet_formula():
  w = np.array(jax.random.normal(jax.random.key(1), (3, 3, 4, 5)), np.float32)
  w[0, 0, 0, 0] = 0.0
  g = np.asarray(jax.random.normal(jax.random.key(2), w.shape), np.float32)
  alpha = np.abs(w).mean((0, 1, 2), keepdims=True)
  np.testing.assert_allclose(B.binary_weight(jnp.asarray(w)), np.where(w >= 0, 1, -1) * alpha, rtol=1e-6)
  grad = jax.jit(jax.grad(lambda w: jnp.sum(B.binary_weight(w) * g)))(jnp.asarray(w))
  np.testing.assert_allclose(grad, _micronet_binary_grad(w, g), rtol=1e-5, atol=1e-6)


def test_ternary_weight_hand_case_values_and_gradient():
  # E = mean|w| = 1.75 / 4 = 0.4375, Delta = 0.30625; t = (1, 0, 1, -1); alpha = mean of
  # (0.7, 0.35, 0.6) = 0.55.
  w = jnp.array([[0.7], [-0.1], [0.35], [-0.6]], jnp.float32)
  q = mj.TernaryWeight().fake_quant(w)
  np.testing.assert_allclose(q[:, 0], [0.55, 0.0, 0.55, -0.55], rtol=1e-6)
  g = jnp.array([[1.0], [2.0], [3.0], [-4.0]])
  grad = jax.grad(lambda w: jnp.sum(B.ternary_weight(w) * g))(w)
  # alpha g + sign(w) m / cnt * sum(t g), sum(t g) = 1 + 3 + 4 = 8, cnt = 3, m = (1, 0, 1, 1).
  np.testing.assert_allclose(grad[:, 0], [0.55 + 8 / 3, 1.1, 1.65 + 8 / 3, -2.2 - 8 / 3], rtol=1e-6)


def test_ternary_threshold_values_map_to_alpha_but_are_not_counted():
  w = jnp.array([0.5, 0.2, -0.5, 0.9, -0.49])
  delta = jnp.float32(0.5)
  np.testing.assert_array_equal(B.ternary_codes(w, delta), [1, 0, -1, 1, 0])
  np.testing.assert_allclose(B.ternary_alpha(w, delta, channel_axis=None), 0.9)  # strict |w| > Delta


def test_ternary_all_zero_filter_is_zero_not_nan():
  w = jnp.zeros((3, 3, 2, 2)).at[..., 1].set(jax.random.normal(KEY, (3, 3, 2)))
  q, grad = jax.jit(lambda w: (B.ternary_weight(w), jax.grad(lambda w: jnp.sum(B.ternary_weight(w)))(w)))(w)
  assert np.all(np.isfinite(q)) and np.all(q[..., 0] == 0)
  assert np.all(np.isfinite(grad))


def test_binary_activation_values_and_strict_gradient_window():
  x = jnp.array([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
  y, state = mj.BinaryActivation().fake_quant(x, None, update=True)
  assert state is None and mj.BinaryActivation().bits == 1
  np.testing.assert_array_equal(y, [-1, -1, -1, 1, 1, 1, 1])
  grad = jax.grad(lambda x: jnp.sum(mj.BinaryActivation().fake_quant(x, None, update=False)[0] * 2))(x)
  np.testing.assert_array_equal(grad, [0, 0, 2, 2, 2, 0, 0])


def test_bits_are_fixed_and_threshold_validated():
  assert (mj.BinaryWeight().bits, mj.TernaryWeight().bits) == (1, 2)
  with pytest.raises(TypeError):
    mj.BinaryWeight(bits=3)
  with pytest.raises(ValueError, match="threshold must be in"):
    mj.TernaryWeight(threshold=1.5)


# A few shapes only: every new shape costs XLA compilations, every new value nothing.
kernels = hnp.arrays(
    np.float32, st.sampled_from([(1, 1, 1, 1), (1, 1, 3, 2), (3, 3, 2, 4), (2, 1, 4, 3)]),
    # XLA flushes subnormals to zero: keep magnitudes normal (or exactly 0).
    elements=st.floats(-4, 4, width=32).map(lambda v: 0.0 if abs(v) < 1e-6 else v),
)


@settings(max_examples=40, deadline=None)
@given(kernels)
def test_binary_outputs_are_plus_minus_alpha(w):
  q = np.asarray(B.binary_weight(jnp.asarray(w)))
  alpha = np.abs(w).mean((0, 1, 2))
  nonzero = np.any(w != 0, axis=(0, 1, 2))
  assert np.all(alpha[nonzero] > 0)
  np.testing.assert_allclose(np.abs(q), np.broadcast_to(alpha, q.shape), rtol=1e-6)
  assert np.all(np.sign(q[..., nonzero]) == np.where(w >= 0, 1, -1)[..., nonzero])


@settings(max_examples=40, deadline=None)
@given(kernels)
def test_ternary_outputs_are_in_minus_alpha_zero_alpha(w):
  q = np.asarray(B.ternary_weight(jnp.asarray(w)))
  assert np.all(np.isfinite(q))
  for o in range(w.shape[-1]):
    values = set(np.abs(q[..., o]).ravel().tolist())
    alphas = values - {0.0}
    if np.any(w[..., o] != 0):
      assert len(alphas) == 1 and min(alphas) > 0, values
      # every weight at least Delta in magnitude is +-alpha, with its sign
      delta = np.float32(0.7) * np.abs(w[..., o]).mean()
      big = np.abs(w[..., o]) >= delta * (1 + 1e-5)  # away from the threshold's float rounding
      assert np.all(np.sign(q[..., o][big]) == np.sign(w[..., o][big]))
    else:
      assert values == {0.0}


# ----------------------------------------------------------------------------- centering, preset


def test_center_clip_hand_case():
  # HWIO (1, 1, 3, 2): mean over the 3 input channels of each output channel.
  w = jnp.array([[[[3.0, 0.1], [0.0, 0.2], [-0.6, 0.3]]]])
  out = B.center_clip(w)
  np.testing.assert_allclose(out[0, 0, :, 0], [1.0, -0.8, -1.0], rtol=1e-6)  # (2.2, -0.8, -1.4) clipped
  np.testing.assert_allclose(out[0, 0, :, 1], [-0.1, 0.0, 0.1], atol=1e-7)


def _plan(qmodel, x):
  return {p.path: (type(p.weight).__name__ if p.weight else None, type(p.act).__name__ if p.act else None)
          for p in qmodel.plan(x, train=False)}


def test_preset_placement_nin_and_lenet():
  x = jnp.zeros((1, 8, 8, 3))
  plan = _plan(mj.quantize_model(NIN(cfg=(8,) * 8, act=B.identity), mj.binary_rules(1, 1)), x)
  assert plan["block0/conv"] == (None, None)  # first conv float, image input float
  assert all(plan[f"block{i}/conv"] == ("BinaryWeight", "BinaryActivation") for i in range(1, 8))
  assert plan["block8/conv"] == (None, "BinaryActivation")  # last conv: float weights, binary input
  plan = _plan(mj.quantize_model(NIN(cfg=(8,) * 8), mj.ternary_rules(2, 32)), x)
  assert plan["block4/conv"] == ("TernaryWeight", None) and plan["block8/conv"] == (None, None)
  plan = _plan(mj.quantize_model(LeNet(act=B.identity), mj.binary_rules(1, 1, layers="all")), jnp.zeros((1, 28, 28, 1)))
  assert plan == {"Conv_0": (None, None), "Conv_1": ("BinaryWeight", "BinaryActivation"),
                  "Dense_0": ("BinaryWeight", "BinaryActivation"), "Dense_1": (None, "BinaryActivation")}
  with pytest.raises(ValueError, match="a_bits must be 1"):
    mj.binary_rules(1, 4)
  with pytest.raises(ValueError, match="w_bits must be 2"):
    mj.ternary_rules(1, 1)


def test_act_field_keeps_default_models_unchanged():
  x = jnp.zeros((2, 28, 28, 1))
  shapes = jax.eval_shape(lambda: LeNet().init(KEY, x))
  assert jax.eval_shape(lambda: LeNet(act=B.identity).init(KEY, x)) == shapes
  assert LeNet(act=nn.relu) == LeNet()  # the default is the model as it was


def test_binary_activation_lenet_is_built_without_dropout():
  """sign(0) = +1 would turn each dropped unit into +1; A32 and float keep the dropout."""
  from micronet_jax.app.config import TrainConfig
  from micronet_jax.app.recipes import build

  rates = {}
  for quant, a in (("float", 32), ("binary", 1), ("ternary", 1), ("binary", 32)):
    float_model, _ = build(TrainConfig(model="lenet", quant=quant, w_bits=32 if quant == "float" else
                                       {"binary": 1, "ternary": 2}[quant], a_bits=a))
    rates[quant, a] = float_model.dropout_rate
  assert rates == {("float", 32): 0.5, ("binary", 1): 0.0, ("ternary", 1): 0.0, ("binary", 32): 0.5}


def test_lenet_dropout_rate_zero_trains_deterministically():
  x = jax.random.normal(KEY, (4, 28, 28, 1))
  model = LeNet(dropout_rate=0.0)
  v = model.init(KEY, x)
  train_out = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(train_out, model.apply(v, x, train=False))
  dropped = LeNet().apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(dropped, train_out)  # the default still drops


def test_one_input_channel_center_clip_is_an_error_naming_the_layer():
  x = jnp.zeros((1, 28, 28, 1))
  qmodel = mj.quantize_model(LeNet(), [mj.QuantRule(weight=mj.BinaryWeight())])
  with pytest.raises(ValueError, match="layer Conv_0: .*1 input channel"):
    C.center_clip_projection(qmodel, x, train=False)
  with pytest.raises(ValueError, match=r"kernel of shape \(5, 5, 1, 10\) with 1 input channel"):
    qmodel.init(KEY, x, train=False)
  # without centering, or with the preset (first conv float), it is fine
  ok = mj.quantize_model(LeNet(), [mj.QuantRule(weight=mj.BinaryWeight(center_clip=False))])
  assert C.center_clip_projection(ok, x, train=False) is None
  layers = C.center_clip_layers(mj.quantize_model(LeNet(), mj.binary_rules(1, 32, layers="all")), x, train=False)
  assert layers == {"Conv_1": -2, "Dense_0": -2}


def test_train_step_applies_the_projection():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dense(6)(x)
      x = nn.Dense(5)(x)
      return nn.Dense(3)(x)

  x = jax.random.normal(KEY, (8, 4))
  y = jnp.arange(8) % 3
  qmodel = mj.quantize_model(Net(), mj.binary_rules(1, 1, layers="all"))
  v = qmodel.init(KEY, x, train=False)
  v["params"]["Dense_1"]["kernel"] = v["params"]["Dense_1"]["kernel"] * 10 + 3  # far from centered
  project = C.center_clip_projection(qmodel, x, train=False)
  state = train_lib.create_train_state(qmodel.apply, v, optax.adam(0.1), project=project)
  k = state.params["Dense_1"]["kernel"]
  np.testing.assert_allclose(k, B.center_clip(v["params"]["Dense_1"]["kernel"]), rtol=1e-6)
  plain = train_lib.create_train_state(qmodel.apply, {**v, "params": jax.tree.map(jnp.copy, state.params)},
                                       optax.adam(0.1))
  state, _ = train_lib.train_step(state, x, y)
  plain, _ = train_lib.train_step(plain, x, y)
  # the step, then micronet's centering and clipping of the binary kernels; nothing else
  np.testing.assert_allclose(state.params["Dense_1"]["kernel"], B.center_clip(plain.params["Dense_1"]["kernel"]),
                             rtol=1e-6)
  assert float(jnp.max(jnp.abs(state.params["Dense_1"]["kernel"]))) <= 1.0
  for layer in ("Dense_0", "Dense_2"):  # float layers: only the optimizer moved them
    np.testing.assert_array_equal(state.params[layer]["kernel"], plain.params[layer]["kernel"])


# ----------------------------------------------------------------------------- fusion, packing


def random_variables(qmodel, x, seed=0):
  """Variables for ``qmodel`` filled with numpy random numbers (no XLA compilation of an
  init). Every BatchNorm has negative gammas and gamma = 0, beta = -0.3 on channel 0."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: qmodel.init(KEY, x, train=False))

  def fill(path, s):
    name, bn = path[-1].key, "bn" in jax.tree_util.keystr(path)
    if name == "kernel":
      v = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif name == "var":
      v = 0.5 + rng.uniform(size=s.shape)
    elif name == "scale":
      v = rng.normal(size=s.shape)
      v[0] = 0.0
    elif bn and name == "bias":
      v = 0.5 * rng.normal(size=s.shape)
      v[0] = -0.3
    else:  # conv/dense biases, BN means
      v = 0.3 * rng.normal(size=s.shape)
    return jnp.asarray(v, s.dtype)

  v = jax.tree_util.tree_map_with_path(fill, shapes)
  project = C.center_clip_projection(qmodel, x, train=False)
  return {**v, "params": project(v["params"])} if project else v


@pytest.fixture(scope="module", params=[(NINGC, 1), (NIN, 2)], ids=["nin_gc-binary", "nin-ternary"])
def fused_net(request):
  cls, w_bits = request.param
  cfg = (32, 32, 32, 32, 32, 64, 64, 64) if cls is NINGC else (12, 10, 8, 12, 12, 12, 12, 12)
  x = jax.random.normal(jax.random.key(3), (3, 8, 8, 3))
  qmodel = mj.quantize_model(cls(cfg=cfg, act=B.identity), mj.binary_rules(w_bits, 1))
  v = random_variables(qmodel, x)
  fused, fv = mj.fuse_bn(qmodel, v, x, train=False)
  # Also capture block 1's output: the BN output before the sign, or the fused conv's.
  capture = dict(capture_intermediates=lambda m, method: m.name == "block1", mutable=["intermediates"])
  y, inter = jax.jit(lambda v, x: qmodel.apply(v, x, train=False, **capture))(v, x)
  y_fused, inter_fused = jax.jit(lambda v, x: fused.apply(v, x, train=False, **capture))(fv, x)
  block1 = lambda t: np.asarray(t["intermediates"]["block1"]["__call__"][0])
  return dict(qmodel=qmodel, v=v, x=x, fused=fused, fv=fv, kind="binary" if w_bits == 1 else "ternary",
              y=y, y_fused=y_fused, pre_sign=block1(inter), pre_sign_fused=block1(inter_fused))


def test_fused_model_equals_unfused_with_negative_and_zero_gamma(fused_net):
  n = fused_net
  gammas = np.concatenate([np.asarray(n["v"]["params"][f"block{i}"]["bn"]["scale"]) for i in range(9)])
  assert np.any(gammas < 0) and np.any(gammas == 0)
  assert len(n["fused"].fused_bns) == 9 and not n["fv"].get("batch_stats")
  assert [p for p, _, _ in n["fused"].packed] == [f"block{i}/conv" for i in range(1, 8)]
  np.testing.assert_allclose(n["y_fused"], n["y"], rtol=1e-5, atol=1e-5)


def test_fused_bias_gives_the_same_signs_including_zero_gamma(fused_net):
  # Block 1's pre-sign value: unfused BN output vs the fused conv output, compared by sign.
  ref, fused = fused_net["pre_sign"], fused_net["pre_sign_fused"]
  np.testing.assert_array_equal(np.where(fused >= 0, 1, -1), np.where(ref >= 0, 1, -1))
  # channel 0 has gamma = 0: the output is the constant sign(beta) = -1 there (beta = -0.3)
  assert np.all(fused[..., 0] < 0) and np.all(ref[..., 0] == np.float32(-0.3))


def test_packed_round_trip_and_sizes(fused_net):
  n = fused_net
  dv = mj.pack_variables(n["fused"], n["fv"])
  bits_per = 1 if n["kind"] == "binary" else 2
  for path, kind, axis in n["fused"].packed:
    blk = path.split("/")[0]
    pk, k = dv["params"][blk]["conv"]["kernel"], n["fv"]["params"][blk]["conv"]["kernel"]
    assert isinstance(pk, mj.PackedKernel) and pk.kind == kind == n["kind"] and pk.bits.dtype == jnp.uint8
    per_channel = int(np.prod(k.shape[:-1]))
    assert pk.bits.shape == (k.shape[-1], -(-per_channel * bits_per // 8))
    np.testing.assert_array_equal(D.unpack(pk), k)  # exact
  assert D.deploy_bytes(dv) < D.deploy_bytes(n["fv"])


def test_packed_and_xnor_inference_agree_with_fake_quant(fused_net):
  n = fused_net
  dv = mj.pack_variables(n["fused"], n["fv"])
  np.testing.assert_array_equal(jax.jit(lambda v, x: n["fused"].apply(v, x, train=False))(dv, n["x"]), n["y_fused"])
  if n["kind"] == "binary":
    assert n["fused"].xnor_layers == tuple(f"block{i}/conv" for i in range(1, 8))
    y_xnor = jax.jit(lambda v, x: n["fused"].apply(v, x, train=False, xnor=True))(dv, n["x"])
    np.testing.assert_allclose(y_xnor, n["y_fused"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("shape, axis", [((3, 3, 5, 7), -1), ((11, 4), -1), ((2, 2, 6, 3), -2)])
def test_pack_round_trip_random_kernels(kind, shape, axis):
  w = jax.random.normal(jax.random.key(7), shape)
  q = B.binary_weight(w, axis) if kind == "binary" else B.ternary_weight(w, axis)
  pk = D.pack(q, kind, axis)
  np.testing.assert_array_equal(D.unpack(pk), q)
  assert set(np.unique(D.unpack_codes(pk)).tolist()) <= ({-1.0, 1.0} if kind == "binary" else {-1.0, 0.0, 1.0})
  with pytest.raises(ValueError, match="not binary"):
    D.pack(w, "binary", axis)


@pytest.mark.parametrize("kw", [
    dict(features=6, kernel_size=(3, 3), strides=2, padding=1, feature_group_count=2),
    dict(features=4, kernel_size=(2, 2), kernel_dilation=2, padding="SAME"),
])
def test_xnor_conv_equals_conv_of_signs(kw):
  x = jax.random.normal(jax.random.key(8), (2, 7, 7, 4)).at[0, 0, 0, 0].set(0.0)
  conv = nn.Conv(**kw, use_bias=False)
  shape = jax.eval_shape(lambda: conv.init(KEY, x))["params"]["kernel"].shape
  q = B.binary_weight(jax.random.normal(jax.random.key(9), shape))
  ref = jax.jit(lambda x: conv.apply({"params": {"kernel": q}}, B.sign_plus(x)))(x)
  pk = D.pack(q, "binary")
  out = jax.jit(lambda x: D.xnor_conv(x, pk, conv))(x)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_lenet_w1a1_deploy_with_xnor_dense_and_model_size():
  x = jax.random.normal(jax.random.key(9), (4, 28, 28, 1))
  qmodel = mj.quantize_model(LeNet(act=B.identity), mj.binary_rules(1, 1, layers="all"))
  # Nonzero biases (random_variables): with zero biases a sum of an even number of +-alpha
  # can be exactly 0, which XNOR gets exactly (sign +1) and a float conv only to rounding.
  v = random_variables(qmodel, x)
  fused, dv = mj.deploy_binary(qmodel, v, x, train=False)
  assert fused.fused_bns == () and fused.xnor_layers == ("Conv_1", "Dense_0")
  y = jax.jit(lambda v, x: qmodel.apply(v, x, train=False))(v, x)
  apply = jax.jit(lambda v, x, xnor: fused.apply(v, x, train=False, xnor=xnor), static_argnums=2)
  np.testing.assert_array_equal(apply(dv, x, False), y)
  np.testing.assert_allclose(apply(dv, x, True), y, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="needs packed variables"):
    jax.eval_shape(lambda v: fused.apply(v, x, train=False, xnor=True), D.unpack_tree(dv))
  # micronet's table: binarised kernels at 1 bit, everything else at 32
  s = model_stats(qmodel, v, x, train=False)
  conv1, conv2, fc1, fc2 = 5 * 5 * 1 * 10, 5 * 5 * 10 * 20, 320 * 50, 50 * 10
  biases = 10 + 20 + 50 + 10
  assert s.params == conv1 + conv2 + fc1 + fc2 + biases
  assert s.size_mb == pytest.approx(((conv1 + fc2 + biases) * 32 + (conv2 + fc1)) / 8 / 1e6)
  assert s.compression > 0.9
  # the packed artifact: 1 bit per binarised weight, one float alpha per output channel
  assert D.deploy_bytes(dv) == (conv1 + fc2 + biases) * 4 + 20 * 32 + 50 * 40 + (20 + 50) * 4


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("args, message", [
    (["--quant", "binary", "--a-bits", "2"], "with binary weights a_bits must be 1 (binary) or 32 (float ReLU); got 2"),
    (["--quant", "binary", "--w-bits", "2"], "binary weights are 1 bit(s): w_bits must be 1 (or 32 for float weights); got 2"),
    (["--quant", "ternary", "--w-bits", "1"], "ternary weights are 2 bit(s): w_bits must be 2 (or 32 for float weights); got 1"),
    (["--quant", "ternary", "--a-bits", "8"], "with ternary weights a_bits must be 1 (binary) or 32 (float ReLU); got 8"),
], ids=["binary-a2", "binary-w2", "ternary-w1", "ternary-a8"])
def test_cli_bad_binary_values_exit_2(capsys, tmp_path, args, message):
  from micronet_jax.app import cli

  rc = cli.main(["train", *args, "--out", str(tmp_path / "run"), "--no-progress"])
  out, err = capsys.readouterr()
  assert rc == 2 and out == "" and "Traceback" not in err
  assert err.strip() == "micronet-jax train: error: " + message
  assert not (tmp_path / "run").exists()


def test_cli_binary_run_on_synthetic_data(capsys, tmp_path, no_data_sources):
  from conftest import make_idx_dir
  from micronet_jax.app import cli

  folder = tmp_path / "idx"
  make_idx_dir(folder, n_train=32, n_test=16)
  rc = cli.main(["train", "--data-dir", str(folder), "--quant", "binary", "--model", "resnet18",
                 "--batch-size", "16", "--out", str(tmp_path / "bad"), "--no-progress"])
  assert rc == 2 and "has no `act` field" in capsys.readouterr().err
  out_dir = tmp_path / "run"
  rc = cli.main(["train", "--data-dir", str(folder), "--quant", "binary", "--epochs", "1", "--batch-size", "16",
                 "--eval-batch-size", "16", "--out", str(out_dir), "--no-progress"])
  out, err = capsys.readouterr()
  assert rc == 0, err
  assert "| binary W1A1 | 1 |" in out
  m = json.loads((out_dir / "metrics.json").read_text())
  assert m["config"]["w_bits"] == 1 and m["config"]["a_bits"] == 1
  assert m["config"]["lr"] == 0.01 and m["config"]["lr_schedule"] == "constant"  # micronet's wbwtab rate
  assert m["model_stats"]["compression"] > 0.9
