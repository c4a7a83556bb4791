"""ONNX export of the integer deploy (``mj.export_onnx``), run by onnxruntime on CPU.

onnxruntime's int32 accumulators and float32 logits must equal ``integer_apply``'s bit
for bit: on LeNet (IAO W8A8), a BatchNorm-folded NIN and a residual network with
``ops.Add`` and ``ops.global_avg_pool``, each calibrated on synthetic images (the
arithmetic, not the accuracy, is under test), on random inputs and on the two extreme
inputs that saturate every grid. The fixed-point requantization and the shift
translations are also checked alone on int32 edge values against JAX. Skipped when
onnxruntime is not installed (``pip install -e ".[onnx]"``).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import micronet_jax as mj
from micronet_jax._src.core.fixed_point import precise_mul_shift, precise_multiplier
from micronet_jax._src.deploy.onnx_export import function_to_onnx
from micronet_jax._src.flax import ops
from micronet_jax.models import NIN, LeNet
from tests.conftest import init_variables

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
BATCH = 16


def session(blob: bytes):
  return ort.InferenceSession(blob, providers=["CPUExecutionProvider"])



class TinyResNet(nn.Module):
  """conv -> BN -> relu, one residual block (ops.Add) with a strided 1x1 shortcut, pooled."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    def bn():
      return nn.BatchNorm(use_running_average=not train)
    x = nn.relu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))
    y = nn.relu(bn()(nn.Conv(8, (3, 3), strides=2, use_bias=False)(x)))
    y = bn()(nn.Conv(12, (3, 3), use_bias=False)(y))
    s = bn()(nn.Conv(12, (1, 1), strides=2, use_bias=False)(x))
    x = nn.relu(ops.Add()(y, s))
    return nn.Dense(10)(ops.global_avg_pool(x))


@functools.lru_cache(maxsize=None)
def _case_deploy(name):
  """The deploy of CASES[name], built once per test session."""
  model, rules, shape = CASES[name]
  return _deploy(model, rules, shape)


def _deploy(model, rules, shape, seed=0):
  x = jax.random.uniform(jax.random.key(seed), (64, *shape))
  qmodel = mj.quantize_model(model, rules)
  v = mj.quantize_variables(qmodel, init_variables(model, x[:1], seed), x[:1], train=False)
  v = mj.calibrate(qmodel, v, [x[:32], x[32:]])
  return mj.convert(qmodel, v, x[:1])


def _inputs(deploy, shape, seed=1):
  """BATCH random images, then the two inputs at the ends of the input grid."""
  x = jax.random.uniform(jax.random.key(seed), (BATCH - 2, *shape), minval=-0.2, maxval=1.2)
  xq = np.asarray(deploy.quantize_input(x))
  lo, hi = deploy.input_range
  return np.concatenate([xq, np.full((1, *shape), lo, xq.dtype), np.full((1, *shape), hi, xq.dtype)])


CASES = {
    "lenet": (LeNet(), mj.iao_rules(8, 8), (28, 28, 1)),
    "nin_folded": (NIN(cfg=(8, 8, 8, 16, 16, 16, 16, 16)), mj.iao_rules(8, 8, fold_bn=True), (20, 20, 1)),
    "resnet_add": (TinyResNet(), mj.iao_rules(8, 8, fold_bn=True), (12, 12, 3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_onnxruntime_equals_integer_apply(name):
  shape = CASES[name][2]
  deploy = _case_deploy(name)
  xq = _inputs(deploy, shape)
  acc, logits = session(mj.export_onnx(deploy, shape, batch_size=BATCH)).run(["acc", "logits"], {"x": xq})
  ref_acc, ref_logits = (np.asarray(a) for a in jax.jit(
      lambda q: (mj.integer_apply(deploy, q, dequantize=False), mj.integer_apply(deploy, q)))(xq))
  assert acc.dtype == np.int32 and logits.dtype == np.float32
  np.testing.assert_array_equal(acc, ref_acc)
  np.testing.assert_array_equal(logits, ref_logits)
  assert len(np.unique(ref_acc)) > BATCH  # not a degenerate, constant network


def test_graph_is_integer_only_but_the_last_multiply():
  """The weights are int8 initializers; the convolutions and matmuls are integer ops; no
  float tensor exists before the final Cast that feeds ``logits``."""
  deploy = _case_deploy("lenet")
  m = onnx.load_from_string(mj.export_onnx(deploy, (28, 28, 1)))
  ops_used = {n.op_type for n in m.graph.node}
  assert {"ConvInteger", "MatMulInteger"} <= ops_used
  assert not ops_used & {"Conv", "MatMul", "QuantizeLinear", "DequantizeLinear"}
  floats = [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
  assert [int(np.prod(f.dims)) for f in floats] == [10]  # out_scale only
  int8 = sum(int(np.prod(i.dims)) for i in m.graph.initializer if i.data_type == onnx.TensorProto.INT8)
  assert int8 == sum(int(np.prod(r.w.shape)) for r in deploy.layers.values())
  casts_to_float = [n for n in m.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT]
  assert len(casts_to_float) == 1


def test_fixed_point_requantization_exact_on_int32_edges():
  """precise_mul_shift (the requantization) through ONNX equals JAX on accumulators that
  span int32, with multipliers 2^-40..2^3: the shifts' ONNX forms (wrapping Mul for <<,
  (x - Mod(x, 2^k)) / 2^k for >>) reproduce XLA's."""
  rng = np.random.default_rng(0)
  real = np.geomspace(2.0**-40, 8.0, 64)
  m_hi, m_lo, s = precise_multiplier(real)
  edges = np.array([INT32_MIN, INT32_MIN + 1, -(2**30), -65537, -65536, -1, 0, 1, 65535, 65536, 2**30, INT32_MAX])
  acc = np.concatenate([np.broadcast_to(edges[:, None], (12, 64)),
                        rng.integers(INT32_MIN, INT32_MAX, (52, 64), endpoint=True)]).astype(np.int32)

  def fn(a):
    return (precise_mul_shift(a, m_hi, m_lo, s), a >> (s % 32), a << (s % 8), a // 7, a % -5)

  names = ["req", "shr", "shl", "div", "rem"]
  model = function_to_onnx(fn, [jax.ShapeDtypeStruct(acc.shape, np.int32)], ["a"], names)
  got = session(model.SerializeToString()).run(names, {"a": acc})
  for name, g, want in zip(names, got, jax.jit(fn)(acc)):
    np.testing.assert_array_equal(g, np.asarray(want), err_msg=name)


def test_export_onnx_rejects_what_it_cannot_write():
  with pytest.raises(TypeError, match="integer Deploy"):
    mj.export_onnx({"not": "a deploy"}, (4,))
  spec = jax.ShapeDtypeStruct((3,), np.float32)
  with pytest.raises(NotImplementedError, match="'exp'"):
    function_to_onnx(jnp.exp, [spec], ["a"], ["y"])

