"""Integer conversion of conv-transpose layers and ``ops.ReLU6``: ``integer_apply`` agrees
with the fake-quant eval forward.

The networks are calibrated (iao_rules 8/8) on synthetic images scaled so that ReLU6
clips; the comparison is the one ``tests/test_convert.py`` makes: every layer's input
codes from ``integer_apply(capture=...)`` against ``fake_quant_codes`` (the fake-quant
forward's r(x / S) + Z), within one step (off by one on under 1% of the codes: a
rounding tie that the clamp or the pooled mean moves), the logits within 2% of their range.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import micronet_jax as mj
from micronet_jax import ops
from micronet_jax._src.deploy.integer import fake_quant_codes
from tests.conftest import init_variables


class Decoder(nn.Module):
  """conv -> ConvTranspose (SAME, stride 2) -> ReLU6 -> ConvTranspose (VALID, stride 2,
  transpose_kernel) -> ConvTranspose (explicit pads, dilated kernel) -> dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
    x = ops.ReLU6()(nn.ConvTranspose(5, (3, 3), strides=(2, 2), padding="SAME")(x))
    x = nn.relu(nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID", transpose_kernel=True)(x))
    x = nn.relu(nn.ConvTranspose(3, (3, 3), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1), use_bias=False)(x))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class Relu6Net(nn.Module):
  """conv -> BN -> ReLU6 -> max-pool -> [ReLU6(conv), relu(conv)] concatenated -> conv
  -> ReLU6 -> global average -> dense. Where the clamp shows: Conv_3 reads ReLU6 codes
  beside wider relu ones (its grid reaches past 6), and the pooled mean is of clamped
  values."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3), use_bias=False)(x))
    x = nn.max_pool(ops.ReLU6()(x), (2, 2), (2, 2))
    x = jnp.concatenate([ops.ReLU6()(nn.Conv(6, (3, 3))(x)), nn.relu(nn.Conv(6, (3, 3))(x))], -1)
    x = ops.ReLU6()(nn.Conv(8, (3, 3))(x))
    return nn.Dense(10)(ops.global_avg_pool(x))


SHAPE = (12, 12, 2)
X = 20.0 * jax.random.uniform(jax.random.key(3), (96, *SHAPE))  # large enough that ReLU6 clips


def _integer(deploy, xq):
  """(logits, captured input codes) of integer_apply, jitted."""
  def run(xq):
    cap = {}
    return mj.integer_apply(deploy, xq, capture=cap), cap
  return jax.jit(run)(xq)


def _calibrated(model, rules):
  qmodel = mj.quantize_model(model, rules)
  v = mj.quantize_variables(qmodel, init_variables(model, X[:1], seed=2), X[:1], train=False)
  return qmodel, mj.calibrate(qmodel, v, [X[:48], X[48:]])


NETS = {"decoder": (Decoder(), mj.iao_rules(8, 8)), "relu6": (Relu6Net(), mj.iao_rules(8, 8, fold_bn=True))}


@pytest.fixture(scope="module", params=list(NETS))
def net(request):
  qmodel, v = _calibrated(*NETS[request.param])
  return request.param, qmodel, v, mj.convert(qmodel, v, X[:1])


def test_integer_codes_match_fake_quant(net):
  name, qmodel, v, deploy = net
  x = X[:64] * jnp.linspace(0.2, 1.5, 64)[:, None, None, None]  # some inputs beyond the calibrated range
  logits, cap = _integer(deploy, deploy.quantize_input(x))
  ref = jax.jit(lambda v, x: fake_quant_codes(qmodel, v, x))(v, x)
  assert set(cap) == set(ref) and len(cap) >= 4
  for path in ref:
    diff = np.abs(np.asarray(cap[path]) - np.asarray(ref[path]))
    assert diff.max() <= 1 and diff.mean() < 0.01, (name, path, diff.max(), diff.mean())
  fq = jax.jit(lambda v, x: qmodel.apply(v, x, train=False))(v, x)
  # a code one step off moves the logits by S_in |w| of one weight: 2% of their range bounds it here
  assert np.max(np.abs(np.asarray(logits) - np.asarray(fq))) <= 0.02 * np.max(np.abs(np.asarray(fq))), name
  assert np.mean(np.argmax(logits, -1) == np.argmax(fq, -1)) >= 0.95


def test_relu6_is_a_clamp_on_the_integer_grid():
  """Each ReLU6 is an IntClamp record, int32 round(6 / S) of its producer's scale. On
  Conv_3's grid (which reaches past 6) the ReLU6 channels stop at the code of 6, often,
  while the relu channels go beyond; and without the clamps (hi = 2^31 - 1) the pooled
  classifier's input no longer matches the fake-quant forward."""
  qmodel, v = _calibrated(*NETS["relu6"])
  deploy = mj.convert(qmodel, v, X[:1])
  clamps = {p: r for p, r in deploy.layers.items() if isinstance(r, mj.IntClamp)}
  assert len(clamps) == 3 and all(r.hi.dtype == jnp.int32 and np.all(r.hi > 0) for r in clamps.values())
  _, cap = _integer(deploy, deploy.quantize_input(X))
  q = qmodel.plan(X[:1], train=False)["Conv_3"].act
  scale, zp = q.grid(None, mj.QState({}, v["quant_stats"]["Conv_3"]["input"]), None)
  code6 = int(np.round(6.0 / float(np.asarray(scale).reshape(())))) + int(np.asarray(zp).reshape(()))
  codes = np.asarray(cap["Conv_3"])
  assert code6 < q.int_range()[1]
  assert codes[..., :6].max() <= code6 + 1 and np.mean(codes[..., :6] >= code6 - 1) > 0.01
  assert codes[..., 6:].max() > code6 + 1
  ref = jax.jit(lambda v, x: fake_quant_codes(qmodel, v, x))(v, X)["Dense_0"]
  np.testing.assert_allclose(cap["Dense_0"], ref, atol=1)
  unclamped = deploy.replace(layers={p: (mj.IntClamp(jnp.full_like(r.hi, 2**31 - 1)) if p in clamps else r)
                                     for p, r in deploy.layers.items()})
  _, cap_off = _integer(unclamped, deploy.quantize_input(X))
  assert np.abs(np.asarray(cap_off["Dense_0"]) - np.asarray(ref)).max() > 1


def test_conv_transpose_records(net):
  name, _, _, deploy = net
  if name != "decoder":
    pytest.skip("no conv-transpose")
  recs = [deploy.layers[f"ConvTranspose_{i}"] for i in range(3)]
  assert [r.input_dilation for r in recs] == [(2, 2), (2, 2), (1, 1)]
  assert all(r.strides == (1, 1) and r.w.dtype == jnp.int8 for r in recs)
  assert recs[1].w.shape == (2, 2, 5, 4)  # transpose_kernel: (kh, kw, out, in) flipped to HWIO
  assert recs[2].padding == ((1, 0), (2, 1)) and recs[2].dilation == (2, 1)


def test_onnxruntime_equals_integer_apply(net):
  ort = pytest.importorskip("onnxruntime")
  _, _, _, deploy = net
  xq = np.asarray(deploy.quantize_input(X[:8]))
  sess = ort.InferenceSession(mj.export_onnx(deploy, SHAPE, batch_size=8), providers=["CPUExecutionProvider"])
  acc, logits = sess.run(["acc", "logits"], {"x": xq})
  np.testing.assert_array_equal(acc, np.asarray(mj.integer_apply(deploy, jnp.asarray(xq), dequantize=False)))
  np.testing.assert_array_equal(logits, np.asarray(mj.integer_apply(deploy, jnp.asarray(xq))))


def test_circular_conv_transpose_is_rejected():
  class Circ(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      return nn.Dense(3)(nn.ConvTranspose(2, (3, 3), padding="CIRCULAR")(x).reshape((x.shape[0], -1)))

  qmodel, v = _calibrated(Circ(), mj.iao_rules(8, 8))
  with pytest.raises(ValueError, match="circular padding"):
    mj.convert(qmodel, v, X[:1])
