"""The model plan: one abstract trace per input signature, kept and read by the swap,
model_stats and the centering projection; its facts (order, BN pairs, MACs) exact."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import micronet_jax as mj
from micronet_jax._src.flax.plan import ModelPlan

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
TRACES = {"n": 0}


class ConvBNNet(nn.Module):
  """conv -> BN -> relu -> strided conv -> dense; counts how often it is traced."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    TRACES["n"] += 1
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(nn.Conv(4, (3, 3), name="conv")(x)))
    x = nn.Conv(6, (3, 3), strides=2, use_bias=False, name="down")(x)
    return nn.Dense(5, name="head")(x.reshape((x.shape[0], -1)))


def test_plan_facts_are_exact():
  plan = mj.quantize_model(ConvBNNet(), mj.iao_rules(8, 8, fold_bn=True)).plan(X, train=False)
  assert [p.path for p in plan] == ["conv", "down", "head"]
  assert plan["conv"].folded_bn == "bn" and plan["down"].folded_bn is None
  assert plan.folded_bns == ("bn",)
  assert [(b.path, b.follows, b.epsilon) for b in plan.batch_norms] == [("bn", "conv", 1e-5)]
  assert plan["conv"].macs == 8 * 8 * 4 * (3 * 3 * 2)  # SAME: 8x8 outputs, 4 filters of 3x3x2
  assert plan["down"].macs == 4 * 4 * 6 * (3 * 3 * 4)
  assert plan["head"].macs == 4 * 4 * 6 * 5
  assert (plan["down"].in_features, plan["down"].use_bias, plan["down"].kernel_shape) == (4, False, (3, 3, 4, 6))
  assert mj.model_stats(ConvBNNet(), ConvBNNet().init(KEY, X), X).macs == sum(
      p.macs for p in plan)


def test_the_model_is_traced_once_for_the_plan_and_once_per_jit():
  qmodel = mj.quantize_model(ConvBNNet(), mj.iao_rules(8, 8, fold_bn=True))
  TRACES["n"] = 0
  v = qmodel.init(KEY, X, train=False)
  assert TRACES["n"] == 2  # the plan, then init itself

  @jax.jit
  def train_apply(v, x):
    return qmodel.apply(v, x, train=True, mutable=["batch_stats", "quant_stats"])

  @jax.jit
  def eval_apply(v, x):
    return qmodel.apply(v, x, train=False)

  TRACES["n"] = 0
  for _ in range(3):
    _, upd = train_apply(v, X)
    v = {**v, **upd}
  assert TRACES["n"] == 2  # a new signature (train=True): its plan, then the jit trace
  for _ in range(3):
    eval_apply(v, X)
  assert TRACES["n"] == 3  # train=False was planned by init: only the jit trace
  qmodel.plan(X, train=False)
  mj.summary(qmodel, X, train=False)
  assert TRACES["n"] == 3  # read from the kept plan


def test_a_layer_the_plan_did_not_see_is_an_error():
  class Branchy(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(3, name="a")(x)
      if x.shape[0] == 5:  # a branch on a shape: planned per input signature, so still seen
        x = nn.Dense(3, name="b")(x)
      return x

  qmodel = mj.quantize_model(Branchy(), [mj.QuantRule(weight=mj.AffineWeight(8))])
  v = qmodel.init(KEY, jnp.ones((2, 3)))
  assert [p.path for p in qmodel.plan(jnp.ones((5, 3)))] == ["a", "b"]
  qmodel.apply(qmodel.init(KEY, jnp.ones((5, 3))), jnp.ones((5, 3)))
  # A plan poisoned by hand stands for a model whose calls depend on something the key
  # does not see: the swap names the layer instead of silently leaving it float.
  key = next(iter(qmodel._plans))
  qmodel._plans[key] = ModelPlan(())
  with pytest.raises(ValueError, match="layer a .* was not called when the model was planned"):
    qmodel.apply(v, jnp.ones((2, 3)))


def test_a_symbolic_batch_plans_with_per_example_macs():
  """Under ``jax.export`` the batch is a symbol: the plan still counts MACs per example."""
  qmodel = mj.quantize_model(ConvBNNet(), mj.iao_rules(8, 8))
  v = qmodel.init(KEY, X, train=False)
  b, = jax.export.symbolic_shape("b")
  x = jax.ShapeDtypeStruct((b, 8, 8, 2), jnp.float32)
  exported = jax.export.export(jax.jit(lambda x: qmodel.apply(v, x, train=False)))(x)
  assert exported.out_avals[0].shape[1:] == (5,)
  plan = qmodel.plan(x, train=False)
  assert plan["conv"].macs == 8 * 8 * 4 * (3 * 3 * 2) and plan["head"].macs == 4 * 4 * 6 * 5
