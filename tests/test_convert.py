"""Integer-only deploy (convert / integer_apply): the fixed-point arithmetic against exact
references, the Deploy pytree's dtypes, agreement of the integer network with the
fake-quant eval forward on three briefly trained Fashion-MNIST networks (LeNet, a
BN-folded NIN, a small residual network), and the errors for what cannot be converted.

How the agreement networks are made (the faster of the two options): a float model is
trained briefly (100-150 Adam steps of batch 32 on the first 2000 training images), its
activation ranges are calibrated with ``calibrate()`` (iao_rules 8/8, moving-average
observer, BatchNorm folded for NIN and the ResNet) on 1024 training images, and the result
is converted. Runtime matters more than accuracy here (0.60-0.75).
"""

import math
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import micronet_jax as mj
from micronet_jax.app import data
from micronet_jax._src.flax import ops
from micronet_jax.app import train
from micronet_jax._src.core import quantizers as qz
from micronet_jax._src.flax.calibrate import calibrate
from micronet_jax._src.core.fixed_point import (precise_mul_shift, precise_multiplier, quantize_multiplier,
                                               rounding_mul_shift)
from micronet_jax._src.deploy.integer import Deploy, add_fraction_bits, convert, fake_quant_codes, integer_apply
from micronet_jax.models import NIN, LeNet
from tests.conftest import init_variables

KEY = jax.random.key(0)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ----------------------------------------------------------------------------- fixed point


def exact_mul_shift(acc: int, m: int, s: int) -> int:
  """floor((acc * m + 2^(s-1)) / 2^s) with Python integers (2^(-1) -> 0 for s = 0)."""
  return (acc * m + ((1 << (s - 1)) if s > 0 else 0)) >> s


TRIPLES = st.lists(
    st.tuples(st.integers(INT32_MIN + 1, INT32_MAX), st.integers(2**14, 2**15 - 1), st.integers(0, 40)),
    min_size=1, max_size=64)
_rms = jax.jit(rounding_mul_shift)


def _run_rms(triples):
  """(rounding_mul_shift, exact reference) for the triples; padded to 64 so jit compiles once."""
  padded = list(triples) + [(0, 2**14, 0)] * (64 - len(triples))
  acc, m, s = (np.array(c, np.int64) for c in zip(*padded))
  got = np.asarray(_rms(acc.astype(np.int32), m.astype(np.int32), s.astype(np.int32))).astype(np.int64)
  exact = [exact_mul_shift(*t) for t in triples]
  return got[:len(triples)], exact


@given(TRIPLES)
@settings(max_examples=150, deadline=None)
@example([(2**31 - 1, 2**15 - 1, 40), (-(2**31) + 1, 2**15 - 1, 40), (-1, 2**14, 1), (1, 2**14, 15), (-3, 2**14 + 1, 16),
          (12345, 2**14, 0), (2**15, 2**15 - 1, 16), (-(2**16), 2**14, 17)])
def test_rounding_mul_shift_exact_where_no_saturation(triples):
  """Bit-exact against the integer reference wherever |result| < 2^30 (every requantized
  value that matters: the result is then clipped to an 8-bit grid)."""
  got, exact = _run_rms(triples)
  for g, e, t in zip(got, exact, triples):
    if abs(e) < 2**30:
      assert g == e, t
    else:  # saturated near +-2^30: right sign, far beyond any 8-bit code
      assert np.sign(g) == np.sign(e) and abs(g) >= 2**30 - 2**16, (t, g, e)


def test_quantize_multiplier_relative_error_and_range():
  real = np.geomspace(1e-6, 1e3, 20001)
  real = np.concatenate([real, [2.0**-k for k in range(0, 19)], [0.5 - 1e-12, 1 - 1e-9, 2**14 / 2**15]])
  m, s = quantize_multiplier(real)
  assert m.dtype == np.int32 and s.dtype == np.int32
  assert m.min() >= 2**14 and m.max() < 2**15
  rel = np.abs(m * np.exp2(-s.astype(np.float64)) - real) / real
  assert rel.max() < 2.0**-14, rel.max()  # measured: < 2^-15
  with pytest.raises(ValueError):
    quantize_multiplier(np.array([0.0]))
  with pytest.raises(ValueError):
    quantize_multiplier(np.array([np.inf]))


_pms = jax.jit(precise_mul_shift)


@given(st.lists(st.tuples(st.floats(1e-6, 1e3), st.floats(-1024, 1024)), min_size=1, max_size=64))
@settings(max_examples=100, deadline=None)
def test_precise_mul_shift_rounds_to_nearest(pairs):
  """The deploy's requantization: round-half-up of acc * (m_hi + m_lo 2^-15) 2^-s, exact but
  within 2^-14 of a tie, and that 30-bit multiplier within 2^-28 (relative) of the real."""
  real = np.array([r for r, _ in pairs] + [1.0] * (64 - len(pairs)))
  acc = np.array([int(t / r) for r, t in pairs] + [0] * (64 - len(pairs)), np.int64)  # |result| <= 1024
  assert np.all(np.abs(acc) < 2**31)
  m_hi, m_lo, s = precise_multiplier(real)
  m30 = m_hi.astype(np.int64) * 2**15 + m_lo
  assert np.all(np.abs(m30 * np.exp2(-(s.astype(np.float64) + 15)) - real) / real < 2.0**-28)
  got = np.asarray(_pms(acc.astype(np.int32), m_hi, m_lo, s))[:len(pairs)]
  for i in range(len(pairs)):
    exact = Fraction(int(acc[i]) * int(m30[i]), 2 ** (int(s[i]) + 15))
    nearest = math.floor(exact + Fraction(1, 2))
    if abs(exact - math.floor(exact) - Fraction(1, 2)) > Fraction(1, 2**14):
      assert got[i] == nearest, (pairs[i], int(acc[i]), float(exact))
    else:
      assert abs(int(got[i]) - nearest) <= 1


def test_requantization_composes_multiplier_and_shift():
  """round(acc * real) for real = S_producer / S_consumer, through (m, s): within 1."""
  rng = np.random.default_rng(0)
  real = np.geomspace(1e-5, 1.0, 64)
  acc = np.round(rng.uniform(-512, 512, (1000, 64)) / real).astype(np.int64)  # results up to +-512
  m, s = quantize_multiplier(real)
  got = np.asarray(_rms(acc.astype(np.int32), m[None], s[None]))
  np.testing.assert_array_less(np.abs(got - acc * real), 1.0)


# ----------------------------------------------------------------------------- small models


class TinyResNet(nn.Module):
  """stem conv/BN/relu -> 2 basic blocks (identity shortcut, then a strided one with a
  1x1 conv/BN shortcut), residual adds marked with ops.Add -> global average pool -> dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    x = nn.relu(bn()(nn.Conv(8, (3, 3), strides=2, use_bias=False)(x)))
    for feats, stride in [(8, 1), (16, 2)]:
      y = nn.relu(bn()(nn.Conv(feats, (3, 3), strides=stride, use_bias=False)(x)))
      y = bn()(nn.Conv(feats, (3, 3), use_bias=False)(y))
      if stride != 1 or x.shape[-1] != feats:
        x = bn()(nn.Conv(feats, (1, 1), strides=stride, use_bias=False)(x))
      x = nn.relu(ops.Add()(y, x))
    return nn.Dense(10)(ops.global_avg_pool(x))


class Small(nn.Module):
  """conv -> relu -> dense -> relu -> dense ("out"), for the error tests."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x))
    x = nn.relu(nn.Dense(8)(x.reshape((x.shape[0], -1))))
    return nn.Dense(3, name="out")(x)


X_RAND = jax.random.normal(jax.random.key(1), (4, 12, 12, 1))


def _calibrated(model, rules, x=X_RAND):
  qmodel = mj.quantize_model(model, rules)
  float_vars = init_variables(model, x[:1])
  return qmodel, calibrate(qmodel, mj.quantize_variables(qmodel, float_vars, x[:1], train=False), [x])


def test_deploy_holds_only_integers_but_out_scale():
  qmodel, v = _calibrated(TinyResNet(), mj.iao_rules(8, 8, fold_bn=True))
  d = convert(qmodel, v, X_RAND[:1])
  assert isinstance(d, Deploy)
  leaves = jax.tree_util.tree_leaves_with_path(d)
  names = {jax.tree_util.keystr(k) for k, _ in leaves}
  assert ".out_scale" in names
  for k, leaf in leaves:
    if jax.tree_util.keystr(k) == ".out_scale":
      assert jnp.issubdtype(leaf.dtype, jnp.floating)
    else:
      assert jnp.issubdtype(leaf.dtype, jnp.integer), (jax.tree_util.keystr(k), leaf.dtype)
  convs = {p: e for p, e in d.layers.items() if isinstance(e, (mj.IntConv, mj.IntDense))}
  adds = {p: e for p, e in d.layers.items() if isinstance(e, mj.IntAdd)}
  assert len(convs) == 7 and len(adds) == 2  # 6 convs + dense; BNs folded, 2 residual adds
  assert isinstance(d.layers["Dense_0"], mj.IntDense) and isinstance(d.layers["Conv_0"], mj.IntConv)
  for p, e in convs.items():
    assert e.w.dtype == jnp.int8 and e.bias.dtype == jnp.int32 and e.w_sum.dtype == jnp.int32, p
    assert int(jnp.max(jnp.abs(e.w.astype(jnp.int32)))) == 127  # symmetric narrow grid, max used
  # the adds keep as many fraction bits (at most 16) as an average over their outputs allows in int32
  assert {p: e.fraction_bits for p, e in adds.items()} == {"Add_0": 16, "Add_1": 16}  # 6x6, 3x3 here
  assert [add_fraction_bits(510, (1, n, n, 8)) for n in (7, 14, 56)] == [16, 14, 10]  # 510 2^F n^2 < 2^31
  assert set(d.folded_bns) == {f"BatchNorm_{i}" for i in range(6)}
  assert d.nbytes() == mj.nbytes(d) > 0
  # jit with the Deploy as a pytree argument (the model is static)
  xq = d.quantize_input(np.asarray(X_RAND))
  assert xq.dtype == jnp.uint8
  logits = jax.jit(integer_apply)(d, xq)
  acc = jax.jit(lambda d, x: integer_apply(d, x, dequantize=False))(d, xq)
  assert logits.dtype == jnp.float32 and acc.dtype == jnp.int32 and acc.shape == (4, 10)
  np.testing.assert_array_equal(logits, acc * d.out_scale)
  # the exported StableHLO forward (arrays baked in, any batch) gives the same logits
  exported = mj.export(d, X_RAND.shape[1:])
  np.testing.assert_array_equal(exported.call(xq), logits)


# ----------------------------------------------------------------------------- errors


def test_dorefa_model_is_rejected_naming_the_quantizer():
  rule = mj.QuantRule(weight=mj.DoReFaWeight(8), act=mj.DoReFaActivation(8))
  qmodel = mj.quantize_model(Small(), [rule])
  v = init_variables(Small(), X_RAND[:1])
  with pytest.raises(ValueError, match="DoReFa"):
    convert(qmodel, v, X_RAND[:1])


def test_dorefa_preset_is_rejected_naming_the_quantizer():
  qmodel = mj.quantize_model(Small(), mj.dorefa_rules(8, 8))
  v = init_variables(Small(), X_RAND[:1])
  with pytest.raises(ValueError) as e:
    convert(qmodel, v, X_RAND[:1])
  assert "DoReFa" in str(e.value), str(e.value)


def test_float_layer_is_rejected_naming_it():
  rules = (mj.QuantRule(pattern="out"), *mj.iao_rules(8, 8))  # the classifier stays float
  qmodel, v = _calibrated(Small(), rules)
  assert [p.quantized for p in qmodel.plan(X_RAND[:1])] == [True, True, False]
  with pytest.raises(ValueError, match="layer out "):
    convert(qmodel, v, X_RAND[:1])


class MeanPoolNet(nn.Module):
  """jnp.mean instead of ops.global_avg_pool in front of the classifier."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    return nn.Dense(3, name="head")(jnp.mean(x, axis=(1, 2)))


class PaddedAvgPoolNet(nn.Module):
  """nn.avg_pool with zero padding (border averages mix in padding) between two convs."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.avg_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    x = nn.Conv(4, (3, 3), name="after_pool")(x)
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@pytest.mark.parametrize("model,layer", [(MeanPoolNet(), "head"), (PaddedAvgPoolNet(), "after_pool")])
def test_op_that_is_not_integer_exact_is_reported_naming_the_layer(model, layer):
  """Raised by convert (zero-padded averages mix tags) or, at the latest, by integer_apply
  (jnp.mean of int32 accumulators is float32 and reaches the next layer)."""
  qmodel, v = _calibrated(model, mj.iao_rules(8, 8))
  with pytest.raises(ValueError, match=layer):
    d = convert(qmodel, v, X_RAND[:1])
    integer_apply(d, d.quantize_input(np.asarray(X_RAND)))


class MeanAtTheEnd(nn.Module):
  """jnp.mean of the last layer's output (NIN's head before it used ops.global_avg_pool)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return jnp.mean(nn.relu(nn.Conv(3, (3, 3), name="logits_conv")(x)), axis=(1, 2))


def test_float_mean_before_the_output_is_reported():
  qmodel, v = _calibrated(MeanAtTheEnd(), mj.iao_rules(8, 8))
  with pytest.raises(ValueError):
    d = convert(qmodel, v, X_RAND[:1])
    integer_apply(d, d.quantize_input(np.asarray(X_RAND)))


def test_integer_apply_rejects_float_input():
  qmodel, v = _calibrated(Small(), mj.iao_rules(8, 8))
  d = convert(qmodel, v, X_RAND[:1])
  with pytest.raises(ValueError, match="uint8/int8"):
    integer_apply(d, X_RAND)
  with pytest.raises(ValueError, match="observer never saw data"):
    convert(qmodel, mj.quantize_variables(qmodel, init_variables(Small(), X_RAND[:1]), X_RAND[:1]), X_RAND[:1])


# ----------------------------------------------------------------------------- agreement on real data

N_TRAIN, N_EVAL, N_CODES = 2000, 2000, 500
NETS = {
    # name: (model, rules, float training steps of batch 32, learning rate)
    "lenet": (LeNet(), mj.iao_rules(8, 8), 150, 3e-3),
    "nin": (NIN(cfg=(16,) * 8), mj.iao_rules(8, 8, fold_bn=True), 100, 3e-3),
    # 150 steps, not 100: on one machine 100 steps reached 0.5985 (fake-quant accuracy on the
    # 2000 test images), 150 steps 0.6705, 200 0.668, 300 0.728
    "resnet": (TinyResNet(), mj.iao_rules(8, 8, fold_bn=True), 150, 3e-3),
}


def _layer_inputs(qmodel, plans, forced=None):
  """An interceptor (outermost) that records every conv/dense layer's float input in the
  fake-quant forward and, with ``forced`` (integer codes by path), then replaces that
  input by the dequantized integer codes, so that the next layers start from them."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    path = "/".join(m.scope.path) if m.scope is not None else ""
    if context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.Conv)) and path in plans \
        and not hasattr(m, "act_quant"):
      seen[path] = args[0]  # computed by the fake-quant forward; the last (real) pass wins over discovery
      if forced is not None:  # what the following layers see: this layer's integer input codes
        scale, zp = forced["qparams"][path]
        args = ((forced["codes"][path] - zp).astype(jnp.float32) * scale, *args[1:])
    return next_fun(*args, **kwargs)

  return record, seen


def reference_codes(qmodel, variables, x, forced_codes=None):
  """(logits, codes): the fake-quant eval forward and the input codes r(x / S) + Z it gives
  every conv/dense layer (what convert.fake_quant_codes computes; also for BN-folded
  models, see the xfail below).

  With ``forced_codes`` (teacher forcing) every layer runs on the integer network's input
  codes instead of its own, so each recorded input is one fake-quant layer (and the ops
  after it) applied to exactly what the integer network used: only that one layer's error
  (int32 bias rounding, fixed-point multipliers) remains, nothing accumulated."""
  plans = {p.path: p for p in qmodel.plan(x[:1], train=False)}
  qparams = {}
  for path, plan in plans.items():
    if plan.kind == "add":
      continue
    state = variables["quant_stats"]
    for k in path.split("/"):
      state = state[k]
    qparams[path] = plan.act.qparams(state["input"])
  forced = None if forced_codes is None else {"codes": forced_codes, "qparams": qparams}
  record, seen = _layer_inputs(qmodel, qparams, forced)
  with nn.intercept_methods(record):
    logits = qmodel.apply(variables, x, train=False)
  codes = {}
  for path, xin in seen.items():
    scale, zp = qparams[path]
    qmin, qmax = plans[path].act.int_range()
    codes[path] = jnp.clip(qz.round_half_away(xin / scale) + zp, qmin, qmax).astype(jnp.int32)
  return logits, codes


def _integer_and_forced(qmodel):
  """(d, x_q, variables, x) -> (integer logits, integer codes, teacher-forced reference codes)."""

  def run(d, xq, v, x):
    cap = {}
    logits = integer_apply(d, xq, capture=cap)
    return logits, cap, reference_codes(qmodel, v, x, cap)[1]

  return jax.jit(run)


@pytest.fixture(scope="module")
def fmnist(fashion_mnist_dir):
  """The first 2000 training images and the first N_EVAL test images."""
  return data.subset(data.load("fashion_mnist", fashion_mnist_dir), N_TRAIN, N_EVAL)


_CACHE = {}


@pytest.fixture(params=list(NETS))
def net(request, fmnist):
  """Trained, calibrated, converted and evaluated once per network (module-wide cache)."""
  name = request.param
  if name in _CACHE:
    return _CACHE[name]
  model, rules, steps, lr = NETS[name]
  ds = fmnist
  state = train.create_train_state(model.apply, init_variables(model, ds.x_train[:1]), train.make_optimizer(lr))
  done, epoch = 0, 0
  while done < steps:
    for x, y in data.train_batches(ds.x_train, ds.y_train, 32, seed=epoch):
      state, _ = train.train_step(state, x, y)
      done += 1
      if done == steps:
        break
    epoch += 1
  qmodel = mj.quantize_model(model, rules)
  v = mj.quantize_variables(qmodel, jax.device_get(state.variables), ds.x_train[:1], train=False)
  v = calibrate(qmodel, v, [ds.x_train[i:i + 256] for i in range(0, 1024, 256)])
  d = convert(qmodel, v, ds.x_train[:1])
  fake_quant = jax.jit(lambda v, x: reference_codes(qmodel, v, x))
  integer = _integer_and_forced(qmodel)
  out = {"name": name, "qmodel": qmodel, "variables": v, "deploy": d, "x_codes": ds.x_test[:N_CODES],
         "labels": ds.y_test[:N_EVAL], "logits_fq": [], "logits_int": []}
  for i in range(0, N_EVAL, N_CODES):  # codes are kept from the first batch only
    xb = ds.x_test[i:i + N_CODES]
    logits_fq, free = fake_quant(v, xb)
    logits_int, int_codes, forced = integer(d, d.quantize_input(xb), v, xb)
    out["logits_fq"].append(np.asarray(logits_fq))
    out["logits_int"].append(np.asarray(logits_int))
    if i == 0:  # codes are in [0, 255]: int16 keeps the cache small
      codes = {"free": free, "int_codes": int_codes, "forced": forced}
      out.update(jax.tree.map(lambda a: np.asarray(a).astype(np.int16), codes))
  for k in ("logits_fq", "logits_int"):
    out[k] = np.concatenate(out[k])
  out["pred_fq"], out["pred_int"] = out["logits_fq"].argmax(-1), out["logits_int"].argmax(-1)
  _CACHE[name] = out
  return out


def _diff_report(ref, got):
  """{layer: (max |diff|, fraction of codes that differ)}."""
  assert set(ref) == set(got)
  diff = {k: np.asarray(got[k], np.int32) - np.asarray(ref[k], np.int32) for k in ref}
  return {k: (int(np.abs(d).max()), float(np.mean(d != 0))) for k, d in diff.items()}


@pytest.mark.realdata
def test_agreement_networks_are_trained_and_converted(net):
  acc = float(np.mean(net["pred_fq"] == net["labels"]))
  assert acc > 0.6, (net["name"], acc)
  layers = [p.path for p in net["qmodel"].plan(net["x_codes"][:1], train=False) if p.kind != "add"]
  assert set(net["int_codes"]) == set(layers) and len(layers) == {"lenet": 4, "nin": 9, "resnet": 7}[net["name"]]


# Measured on this config (2000 test images; float accuracy of the fake-quant model lenet
# 0.75, nin 0.72, resnet 0.60): predicted class agreement lenet 100%, nin 100%, resnet 99.0%
# (20 images). (Before the fake-quant forward rounded biases to the int32 grid and the
# deploy used 30-bit multipliers: lenet 99.95-100%, nin 99.85-100%.)
# An ops.Add used to hand a pool its sum on its own 8-bit grid, so the mean lost its fraction
# (resnet: 20 of 2000 predictions differed). With 8 fraction bits the pool's integer rounding
# (2^-9 of the add's step, times S_add / S_dense) still moved 0.41% of Dense_0's teacher-forced
# codes (100 steps; 0.71% at 150); the sum now keeps as many bits as int32 allows for an average
# over its positions (14 and 16 here): measured after the change (150 steps) Dense_0 teacher-forced
# 1/0.0125% (1 of 8000 codes), free-running 1/0.11%, resnet class agreement 100%.
AGREEMENT_XFAIL = {}


@pytest.mark.realdata
def test_predicted_class_agrees_with_fake_quant(net, request):
  if net["name"] in AGREEMENT_XFAIL:
    request.applymarker(AGREEMENT_XFAIL[net["name"]])
  agree = float(np.mean(net["pred_fq"] == net["pred_int"]))
  assert len(net["pred_fq"]) >= 2000
  assert agree >= 0.999, (net["name"], agree)


@pytest.mark.realdata
def test_integer_logits_close_to_fake_quant(net):
  """Measured max |integer - fake-quant| logit / max |logit|: lenet 0.2%, nin 0.24%, resnet 1.3%."""
  scale = np.abs(net["logits_fq"]).max()
  dev = np.abs(net["logits_int"] - net["logits_fq"]).max()
  assert dev < 0.02 * scale, (net["name"], dev, scale)
  # every disagreement is a near tie of the fake-quant logits
  flipped = net["pred_fq"] != net["pred_int"]
  top2 = np.sort(net["logits_fq"][flipped], axis=-1)[:, -2:]
  assert np.all(top2[:, 1] - top2[:, 0] <= 2 * dev), (net["name"], top2)


@pytest.mark.realdata
def test_codes_of_fake_quant_codes_api_within_one_step(net, request):
  """convert.fake_quant_codes vs integer_apply(capture=...), as the API is meant to be used."""
  qmodel, v, x = net["qmodel"], net["variables"], net["x_codes"]
  ref = jax.jit(lambda v, x: fake_quant_codes(qmodel, v, x))(v, x)
  _assert_free_running(net["name"], _diff_report(ref, net["int_codes"]))


# Free-running comparison: integer_apply(capture=...) against the fake-quant eval forward,
# each network on its own (differences propagate from layer to layer). Measured on 500
# images, max |diff| / fraction of codes that differ, per layer input in call order:
#   lenet : 0/0, 1/0.0004%, 1/0.0013%, 0/0
#   nin   : 0/0, 1/0.0004%, 1/0.001%, 2/0.0035%, 1/0.017%, 2/0.036%, 2/0.07%, 2/0.12%, 3/0.22%
#   resnet: 0/0, 1/0.0004%, 1/0.001%, 2/0.004%, 1/0.015%, 2/0.004%, Dense_0 2/66%
# In the deeper networks the rare off-by-one codes of one layer can move a code of the next by
# one more step, so free-running codes drift to 2-3 steps in later layers on < 0.25% of codes
# (accumulation, not a wrong operation: every layer on its own stays within one step, see the
# teacher-forced test). LeNet stays within one step everywhere.
def _assert_free_running(name, report):
  if name == "lenet":
    assert max(m for m, _ in report.values()) <= 1, report
  else:
    assert max(m for m, _ in report.values()) <= 3, (name, report)
    assert all(frac < 0.005 for _, frac in report.values()), (name, report)


@pytest.mark.realdata
def test_codes_free_running_within_one_step(net):
  _assert_free_running(net["name"], _diff_report(net["free"], net["int_codes"]))


# Teacher-forced (every layer runs on the integer network's input codes, so each layer is
# compared on the same input). Measured max |diff| / fraction differing:
#   lenet : 0/0, 1/0.0004%, 1/0.0006%, 0/0
#   nin   : 0/0, then 1 / 0.0001%..0.0023% at every layer
#   resnet: 0/0, 1/0.0004%, 1/0.0001%, 2/0.001% (Conv_3), 1/0.0005%, 2/0.001% (Conv_5), Dense_0 2/66%
# A layer behind an ops.Add may differ by 2: the Add requantizes two inputs (one of them the
# identity shortcut, not teacher-forced), each possibly off by one. Off-by-one codes come from
# exact values within ~2^-15 of a .5 boundary (30-bit multipliers; the fake-quant forward
# rounds biases to the same int32 grid), so they are rare: < 0.1% required.
AFTER_ADD = {"resnet": {"Conv_3", "Conv_5"}}


@pytest.mark.realdata
def test_codes_teacher_forced_within_one_step(net):
  report = _diff_report(net["forced"], net["int_codes"])
  for layer, (max_diff, frac) in report.items():
    assert max_diff <= (2 if layer in AFTER_ADD.get(net["name"], ()) else 1), (net["name"], report)
    assert frac < 0.001, (net["name"], report)


@pytest.mark.realdata
@pytest.mark.parametrize("net", ["resnet"], indirect=True)
def test_pooled_add_precision(net):
  max_diff, frac = _diff_report(net["forced"], net["int_codes"])["Dense_0"]
  assert max_diff <= 1 and frac < 0.001, (max_diff, frac)
