"""Exactness against micronet's own modules (shared/reference/micronet.md §6.5, §6.6).

* ``ops.Add`` is micronet's QuantAdd: one observer per input (``observer_res``,
  ``observer_shortcut``) and both inputs quantized with the scale of the union of the two
  ranges. Values hand-computed; float32 moving averages are written out in float32.
* BN folding with ``bn_init_from_batch`` is micronet's ``pretrained_model=False``: the
  first training batch sets the running statistics, later ones average with momentum.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import micronet_jax as mj
from micronet_jax._src.flax import ops
from micronet_jax._src.core.quantizers import affine_fake_quant

F32 = np.float32


class AddNet(nn.Module):
  @nn.compact
  def __call__(self, a, b, train: bool = False):
    return ops.Add()(a, b)


def _add_model(observer):
  qmodel = mj.quantize_model(AddNet(), mj.iao_rules(8, 8, observer=observer))
  a0 = jnp.zeros((1, 2), jnp.float32)
  v = mj.quantize_variables(qmodel, AddNet().init(jax.random.key(0), a0, a0), a0, a0, train=False)
  return qmodel, v


def _step(qmodel, v, a, b):
  out, upd = qmodel.apply(v, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), mutable=["quant_stats"])
  return out, {**v, **upd}


def _range(v, name="input"):
  s = v["quant_stats"]["Add_0"][name]
  return float(s.min), float(s.max)


A1, B1 = [[-1.0, 2.0]], [[0.0, 6.0]]  # the branches' ranges differ by 3x at the top
A2, B2 = [[-3.0, 4.0]], [[0.0, 1.0]]


def test_add_minmax_keeps_the_union_of_both_inputs():
  qmodel, v = _add_model(mj.MinMax())
  _, v = _step(qmodel, v, A1, B1)
  assert _range(v, "input_a") == (-1.0, 2.0) and _range(v, "input_b") == (0.0, 6.0)
  assert _range(v) == (-1.0, 6.0)  # one update per call used to give 0.9 [-1, 2] + 0.1 [0, 6]
  _, v = _step(qmodel, v, A2, B2)
  assert _range(v, "input_a") == (-3.0, 4.0) and _range(v, "input_b") == (0.0, 6.0)
  assert _range(v) == (-3.0, 6.0)


def test_add_moving_average_per_input_then_union():
  qmodel, v = _add_model(mj.MovingAverageMinMax())
  _, v = _step(qmodel, v, A1, B1)
  assert _range(v) == (-1.0, 6.0)  # the first batch sets each input's range
  _, v = _step(qmodel, v, A2, B2)
  ma = lambda old, cur: float(F32(0.9) * F32(old) + F32(0.1) * F32(cur))
  # a: [0.9 (-1) + 0.1 (-3), 0.9 (2) + 0.1 (4)] = [-1.2, 2.2]; b: [0, 0.9 (6) + 0.1 (1)] = [0, 5.5]
  assert _range(v, "input_a") == (ma(-1, -3), ma(2, 4))
  assert _range(v, "input_b") == (0.0, ma(6, 1))
  assert _range(v) == (ma(-1, -3), ma(6, 1))  # [-1.2, 5.5], not the average of the two inputs
  np.testing.assert_allclose(_range(v), (-1.2, 5.5), rtol=1e-6)


def test_add_quantizes_both_inputs_on_the_union_scale():
  qmodel, v = _add_model(mj.MinMax())
  out, v = _step(qmodel, v, A1, B1)
  # union [-1, 6] on [0, 255]: scale 7/255, zero point 0 - r(-1 / (7/255)) = r(36.43) = 36
  scale, zp = mj.AffineActivation(8).qparams(v["quant_stats"]["Add_0"]["input"])
  assert float(scale) == F32(7) / F32(255) and float(zp) == 36.0
  a, b = jnp.asarray(A1), jnp.asarray(B1)
  expect = affine_fake_quant(a, scale, zp, 0, 255) + affine_fake_quant(b, scale, zp, 0, 255)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expect))
  # 6 is code r(6 / (7/255)) + 36 = 219 + 36 = 255, the top of the grid: the larger
  # branch is not clipped (on a [-1, 2.4] range it would be clipped to 2.4)
  b_q = affine_fake_quant(b, scale, zp, 0, 255)
  assert float(b_q[0, 1]) == float(F32(219) * scale)
  assert float(out[0, 1]) == float(F32(73) * scale + F32(219) * scale)  # a: r(2 / (7/255)) = 73
  # evaluation reads the union and moves nothing
  out_eval = qmodel.apply(v, a, b)
  np.testing.assert_array_equal(np.asarray(out_eval), np.asarray(expect))


def test_add_gradient_is_the_clipped_ste_of_each_input():
  qmodel, v = _add_model(mj.MinMax())
  _, v = _step(qmodel, v, A1, B1)
  # frozen range [-1, 6]: 7 is clipped (gradient 0), everything else passes (1)
  a = jnp.asarray([[-1.0, 2.0, 7.0]])
  b = jnp.asarray([[0.0, 6.0, 0.5]])
  ga, gb = jax.grad(lambda a, b: jnp.sum(qmodel.apply(v, a, b)), argnums=(0, 1))(a, b)
  # (1 within one float32 ulp: the chain rule multiplies by 1/scale and by scale)
  np.testing.assert_allclose(np.asarray(ga), [[1.0, 1.0, 0.0]], rtol=1.2e-7, atol=0)
  np.testing.assert_allclose(np.asarray(gb), [[1.0, 1.0, 1.0]], rtol=1.2e-7, atol=0)


def test_add_before_any_observation_uses_the_union_of_the_batch():
  qmodel, v = _add_model(mj.MinMax())
  a, b = jnp.asarray(A1), jnp.asarray(B1)
  out = qmodel.apply(v, a, b)  # nothing observed: the batch's own union [-1, 6], one scale
  scale, zp = F32(7) / F32(255), 36.0
  expect = affine_fake_quant(a, scale, zp, 0, 255) + affine_fake_quant(b, scale, zp, 0, 255)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expect))


def test_add_evaluates_from_the_union_alone():
  # Evaluation needs only quant_stats/<add>/input (checkpoints written before the
  # per-input observers existed still evaluate; the integer converter reads the same).
  qmodel, v = _add_model(mj.MinMax())
  _, v = _step(qmodel, v, A1, B1)
  only_union = {"quant_stats": {"Add_0": {"input": v["quant_stats"]["Add_0"]["input"]}}}
  a, b = jnp.asarray(A1), jnp.asarray(B1)
  np.testing.assert_array_equal(np.asarray(qmodel.apply(only_union, a, b)), np.asarray(qmodel.apply(v, a, b)))


# ----------------------------------------------------------------------------- BN statistics from the first batch


class PointConvBN(nn.Module):
  """1x1 conv -> BN, so that with kernel 1 and bias 0 the BN sees the input itself."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(1, (1, 1), name="conv")(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)


X1 = jnp.asarray([1.0, 2.0, 3.0, 6.0]).reshape(1, 2, 2, 1)  # mean 3, biased var 12.5 - 9 = 3.5
X2 = jnp.asarray([0.0, 0.0, 2.0, 2.0]).reshape(1, 2, 2, 1)  # mean 1, biased var 2 - 1 = 1


def _bn_model(init_from_batch: bool, calib: bool = False):
  rule = mj.QuantRule(fold_bn=True, bn_calib=calib, bn_init_from_batch=init_from_batch)  # quantization off
  qmodel = mj.quantize_model(PointConvBN(), (rule,))
  fv = PointConvBN().init(jax.random.key(0), X1)
  fv = {"params": {"conv": {"kernel": jnp.ones((1, 1, 1, 1)), "bias": jnp.zeros((1,))},
                   "bn": {"scale": jnp.ones((1,)), "bias": jnp.zeros((1,))}},
        "batch_stats": {"bn": {"mean": jnp.full((1,), 10.0), "var": jnp.full((1,), 7.0)}}}  # not from this data
  return qmodel, mj.quantize_variables(qmodel, fv, X1, train=False)


def _train_step(qmodel, v, x, mutable=("batch_stats", "quant_stats")):
  step = jax.jit(lambda v, x: qmodel.apply(v, x, train=True, mutable=list(mutable)))
  y, upd = step(v, x)
  return y, {**v, **upd}


def _stats(v):
  return float(v["batch_stats"]["bn"]["mean"][0]), float(v["batch_stats"]["bn"]["var"][0])


ema = lambda old, cur: float(F32(0.9) * F32(old) + F32(1 - 0.9) * F32(cur))  # nn.BatchNorm's momentum 0.9


def test_bn_first_batch_sets_running_statistics_then_momentum():
  qmodel, v = _bn_model(init_from_batch=True)
  assert not bool(v["quant_stats"]["bn"]["bn_stats_initialized"])  # a fresh quant_stats: nothing seen
  _, v = _train_step(qmodel, v, X1)
  assert _stats(v) == (3.0, 3.5)  # the loaded (10, 7) are replaced, as micronet's pretrained_model=False
  assert bool(v["quant_stats"]["bn"]["bn_stats_initialized"])
  _, v = _train_step(qmodel, v, X2)  # later batches (and a resumed run: the flag is checkpointed) average
  # 0.9 (3, 3.5) + 0.1 (1, 1) = (2.8, 3.25), to one float32 rounding (XLA may fuse the
  # multiply-add, so the last ulp is the compiler's)
  np.testing.assert_allclose(_stats(v), (ema(3.0, 1.0), ema(3.5, 1.0)), rtol=1.2e-7, atol=0)
  np.testing.assert_allclose(_stats(v), (2.8, 3.25), rtol=1.2e-7, atol=0)


def test_bn_default_averages_into_the_loaded_statistics():
  qmodel, v = _bn_model(init_from_batch=False)
  assert "quant_stats" not in v or "bn" not in v["quant_stats"]  # no flag: the variable tree is unchanged
  _, v = _train_step(qmodel, v, X1)
  np.testing.assert_allclose(_stats(v), (ema(10.0, 3.0), ema(7.0, 3.5)), rtol=1.2e-7, atol=0)
  np.testing.assert_allclose(_stats(v), (9.3, 6.65), rtol=1.2e-7, atol=0)


def test_bn_first_batch_flag_moves_only_in_training_with_both_collections_mutable():
  qmodel, v = _bn_model(init_from_batch=True)
  _, v_eval = qmodel.apply(v, X1, train=False, mutable=["batch_stats", "quant_stats"])  # eval: nothing moves
  assert not bool(v_eval["quant_stats"]["bn"]["bn_stats_initialized"])
  assert _stats({**v, **v_eval}) == (10.0, 7.0)
  _, v_frozen = _train_step(qmodel, v, X1, mutable=("batch_stats",))  # ranges frozen: usual average
  np.testing.assert_allclose(_stats(v_frozen), (9.3, 6.65), rtol=1.2e-7, atol=0)
  assert not bool(v_frozen["quant_stats"]["bn"]["bn_stats_initialized"])


def test_bn_first_batch_output_is_the_batch_normalised_conv():
  # The training output always uses the batch statistics: (x - 3) / sqrt(3.5 + 1e-5). With
  # bn_calib the weights fold the running variance, which the first batch has just set to
  # the batch variance, so the correction sqrt(var_run + eps) / sqrt(var_B + eps) is 1.
  expect = (np.asarray(X1, np.float32) - F32(3)) / np.sqrt(F32(3.5) + F32(1e-5))
  for calib in (False, True):
    qmodel, v = _bn_model(init_from_batch=True, calib=calib)
    y, _ = _train_step(qmodel, v, X1)
    np.testing.assert_allclose(np.asarray(y), expect, rtol=1e-6, atol=1e-6)


def test_bn_first_batch_with_eight_bit_quantization():
  # iao_rules(fold_bn=True, bn_init_from_batch=True): the statistics come from the float
  # conv output (micronet's step 1), here the input itself, whatever the quantizers do.
  _, v = _bn_model(init_from_batch=True)
  qmodel = mj.quantize_model(PointConvBN(), mj.iao_rules(8, 8, fold_bn=True, bn_init_from_batch=True))
  v = mj.quantize_variables(qmodel, {k: v[k] for k in ("params", "batch_stats")}, X1, train=False)
  _, v = _train_step(qmodel, v, X1)
  assert _stats(v) == (3.0, 3.5)
  assert float(v["quant_stats"]["conv"]["input"].max) == 6.0  # the input observer moved as usual
  _, v = _train_step(qmodel, v, X2)
  np.testing.assert_allclose(_stats(v), (2.8, 3.25), rtol=1.2e-7, atol=0)


def test_bn_init_from_batch_rule_and_preset():
  rule, = mj.iao_rules(8, 8, fold_bn=True, bn_init_from_batch=True)
  assert rule.fold_bn and rule.bn_init_from_batch
  assert not mj.iao_rules(8, 8, fold_bn=True)[0].bn_init_from_batch  # default: start from loaded statistics
  with pytest.raises(ValueError, match="bn_init_from_batch=True needs fold_bn=True"):
    mj.QuantRule(bn_init_from_batch=True)
