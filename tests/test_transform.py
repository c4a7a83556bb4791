"""quantize_model on unmodified models of every nesting style, rules, summary and
quantize_variables."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import micronet_jax as mj
from micronet_jax.models import LeNet

KEY = jax.random.key(0)
X = jax.random.normal(jax.random.key(1), (3, 10, 10, 2))
W_Q, A_Q = mj.AffineWeight(4), mj.AffineActivation(6)


class Block(nn.Module):
  """setup-style, with a list of layers and an nn.Sequential."""

  feats: int

  def setup(self):
    self.convs = [nn.Conv(self.feats, (3, 3)), nn.Conv(self.feats, (1, 1), use_bias=False)]
    self.head = nn.Sequential([nn.Dense(self.feats), nn.relu])

  def __call__(self, x):
    for conv in self.convs:
      x = nn.relu(conv(x))
    return self.head(x)


class Net(nn.Module):
  """compact-style, nesting Block twice, a shared layer and a strided conv."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Block(4)(x)
    shared = nn.Conv(4, (3, 3), name="shared")
    x = shared(nn.relu(shared(x)))
    x = nn.Conv(6, (3, 3), strides=(2, 2), feature_group_count=2, name="down")(x)
    x = Block(6, name="b2")(x)
    x = x.mean((1, 2))
    return nn.Dense(5)(x)


class HandNet(nn.Module):
  """What quantize_model(Net(), one rule) must compute, written by hand."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    q = dict(weight_quant=W_Q, act_quant=A_Q)

    class QBlock(nn.Module):
      feats: int

      def setup(self):
        self.convs = [mj.QuantConv(self.feats, (3, 3), **q), mj.QuantConv(self.feats, (1, 1), use_bias=False, **q)]
        self.head = nn.Sequential([mj.QuantDense(self.feats, **q), nn.relu])

      def __call__(self, x):
        for conv in self.convs:
          x = nn.relu(conv(x))
        return self.head(x)

    x = QBlock(4, name="Block_0")(x)
    shared = mj.QuantConv(4, (3, 3), name="shared", **q)
    x = shared(nn.relu(shared(x)))
    x = mj.QuantConv(6, (3, 3), strides=(2, 2), feature_group_count=2, name="down", **q)(x)
    x = QBlock(6, name="b2")(x)
    return mj.QuantDense(5, name="Dense_0", **q)(x.mean((1, 2)))


PATHS = ["Block_0/convs_0", "Block_0/convs_1", "Block_0/head/layers_0", "shared", "down",
         "b2/convs_0", "b2/convs_1", "b2/head/layers_0", "Dense_0"]


def test_param_tree_is_the_float_models():
  float_vars = Net().init(KEY, X)
  qvars = mj.quantize_model(Net(), [mj.QuantRule(weight=W_Q, act=A_Q)]).init(KEY, X)
  assert jax.tree.structure(qvars["params"]) == jax.tree.structure(float_vars["params"])
  for a, b in zip(jax.tree.leaves(qvars["params"]), jax.tree.leaves(float_vars["params"])):
    np.testing.assert_array_equal(a, b)  # same initialisers, same keys: same values
  stats_paths = {"/".join(k.key for k in path[:-2]) for path, _ in jax.tree_util.tree_leaves_with_path(qvars["quant_stats"])}
  assert stats_paths == set(PATHS)


def test_every_layer_is_planned_in_call_order():
  plans = mj.quantize_model(Net(), [mj.QuantRule(weight=W_Q, act=A_Q)]).plan(X)
  assert [p.path for p in plans] == PATHS
  assert all(p.quantized for p in plans)


def test_output_equals_hand_written_quantized_model():
  qmodel = mj.quantize_model(Net(), [mj.QuantRule(weight=W_Q, act=A_Q)])
  variables = qmodel.init(KEY, X)
  hand_vars = HandNet().init(KEY, X)
  assert jax.tree.structure(hand_vars) == jax.tree.structure(variables)
  # training-mode apply (observers update) and eval-mode apply both agree exactly
  y, upd = qmodel.apply(variables, X, mutable=["quant_stats"])
  y_hand, upd_hand = HandNet().apply(variables, X, mutable=["quant_stats"])
  np.testing.assert_array_equal(y, y_hand)
  for a, b in zip(jax.tree.leaves(upd), jax.tree.leaves(upd_hand)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(qmodel.apply({**variables, **upd}, X), HandNet().apply({**variables, **upd}, X))
  # and differs from the float model (quantization really happens)
  assert not np.allclose(y, Net().apply(variables, X), atol=1e-4)


def test_float_model_is_untouched():
  variables = Net().init(KEY, X)
  before = Net().apply(variables, X)
  mj.quantize_model(Net(), mj.iao_rules(2, 2)).apply(mj.quantize_variables(
      mj.quantize_model(Net(), mj.iao_rules(2, 2)), variables, X), X)
  np.testing.assert_array_equal(Net().apply(variables, X), before)


def test_first_match_wins_and_none_keeps_float():
  rules = [
      mj.QuantRule(pattern="b2/.*", weight=None, act=None),
      mj.QuantRule(pattern=".*convs_1", weight=mj.AffineWeight(3)),
      mj.QuantRule(kinds=("dense",), act=A_Q),
  ]
  plans = {p.path: p for p in mj.quantize_model(Net(), rules).plan(X)}
  assert [k for k, p in plans.items() if p.quantized] == ["Block_0/convs_1", "Block_0/head/layers_0", "Dense_0"]
  assert plans["b2/convs_1"].rule == 0 and not plans["b2/convs_1"].quantized
  assert plans["Block_0/convs_1"].weight == mj.AffineWeight(3) and plans["Block_0/convs_1"].act is None
  assert plans["shared"].rule is None and plans["shared"].note == "no rule matched"


def test_index_rules_first_and_last_of_a_kind():
  rules = [
      mj.QuantRule(kinds=("conv",), index=0),
      mj.QuantRule(kinds=("conv",), index=-1),
      mj.QuantRule(weight=W_Q),
  ]
  plans = mj.quantize_model(Net(), rules).plan(X)
  floats = [p.path for p in plans if not p.quantized]
  assert floats == ["Block_0/convs_0", "b2/convs_1"]


def test_lenet_presets():
  x = jnp.zeros((2, 28, 28, 1))
  dorefa = mj.quantize_model(LeNet(), mj.dorefa_rules(8, 8)).plan(x, train=False)
  assert [p.quantized for p in dorefa] == [False, True, True, True]  # micronet: first layer float
  iao = mj.quantize_model(LeNet(), mj.iao_rules(8, 8)).plan(x, train=False)
  assert all(p.quantized for p in iao)
  w32 = mj.quantize_model(LeNet(), mj.iao_rules(32, 8)).plan(x, train=False)
  assert all(p.weight is None and p.act is not None for p in w32)


def test_rule_that_matches_nothing_is_reported():
  qmodel = mj.quantize_model(Net(), [mj.QuantRule(pattern="decoder/.*", weight=W_Q), mj.QuantRule(weight=W_Q)])
  with pytest.warns(UserWarning, match=r"rule 0 .*decoder.* matched no layer"):
    qmodel.init(KEY, X)
  text = mj.summary(qmodel, X)
  assert "rule 0 matched no layer" in text


def test_subclassed_layer_is_quantized_like_its_base_with_its_own_call():
  class MyDense(nn.Dense):
    """A subclass with its own __call__ around the base one."""

    @nn.compact
    def __call__(self, x):
      return 2.0 * super().__call__(x)

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return MyDense(3)(nn.Dense(4)(x))

  x = jax.random.normal(KEY, (2, 5))
  qmodel = mj.quantize_model(M(), [mj.QuantRule(weight=W_Q)])
  plans = qmodel.plan(x)
  assert [(p.path, p.kind, p.quantized) for p in plans] == [("Dense_0", "dense", True), ("MyDense_0", "dense", True)]
  v = M().init(KEY, x)
  h = x @ W_Q.fake_quant(v["params"]["Dense_0"]["kernel"], -1) + v["params"]["Dense_0"]["bias"]
  want = 2.0 * (h @ W_Q.fake_quant(v["params"]["MyDense_0"]["kernel"], -1) + v["params"]["MyDense_0"]["bias"])
  np.testing.assert_allclose(qmodel.apply(v, x), want, rtol=1e-6, atol=1e-6)


def test_summary_table():
  text = mj.summary(mj.quantize_model(LeNet(), mj.dorefa_rules(4, 8)), jnp.zeros((1, 28, 28, 1)))
  lines = text.splitlines()
  assert lines[0].split(" | ")[0].strip() == "layer"
  row = {l.split("|")[0].strip(): [c.strip() for c in l.split("|")] for l in lines[2:6]}
  assert row["Conv_0"][2] == "float" and row["Conv_0"][4] == "32"
  assert row["Dense_1"][2] == "quantized" and row["Dense_1"][3] == "DoReFaWeight"
  assert row["Dense_1"][4] == "4" and row["Dense_1"][6] == "8"
  # DoReFa keeps the first conv float: its 24*24*10*25 of LeNet's 480,500 MACs and its
  # 250 of 21,840 parameters (the kernels of the three others are quantized: 5000 + 16000 + 500)
  macs = 24 * 24 * 10 * 25, 8 * 8 * 20 * 250, 320 * 50, 50 * 10
  assert lines[-1] == (f"3 of 4 layers quantized; quantized: {100 * sum(macs[1:]) / sum(macs):.1f}% of MACs, "
                       f"{100 * (5000 + 16000 + 500) / 21_840:.1f}% of parameters")
  assert row["Conv_0"][7] == f"{100 * macs[0] / sum(macs):.1f}%"


def test_quantize_variables_keeps_float_weights_and_adds_empty_stats():
  qmodel = mj.quantize_model(LeNet(), mj.iao_rules(8, 8))
  x = jnp.zeros((1, 28, 28, 1))
  float_vars = LeNet().init(jax.random.key(3), x)
  qvars = mj.quantize_variables(qmodel, float_vars, x, train=False)
  assert qvars["params"] is float_vars["params"]
  stats = jax.tree.leaves(qvars["quant_stats"], is_leaf=lambda t: isinstance(t, mj.RangeState))
  assert len(stats) == 4 and not any(bool(s.initialized) for s in stats)


def test_quantize_variables_rejects_another_models_checkpoint():
  qmodel = mj.quantize_model(LeNet(), mj.iao_rules(8, 8))
  x = jnp.zeros((1, 28, 28, 1))
  other = LeNet(cfg=(8, 20, 50)).init(KEY, x)
  with pytest.raises(ValueError, match=r"params\['Conv_0'\]\['kernel'\] has shape \(5, 5, 1, 8\) in the checkpoint but \(5, 5, 1, 10\)"):
    mj.quantize_variables(qmodel, other, x, train=False)
  with pytest.raises(ValueError, match=r"missing from the checkpoint"):
    mj.quantize_variables(qmodel, {"params": {}}, x, train=False)


def test_jitted_qat_step_updates_stats_and_trains():
  qmodel = mj.quantize_model(Net(), mj.iao_rules(8, 8))
  variables = qmodel.init(KEY, X)

  @jax.jit
  def step(v):
    def loss(p):
      y, upd = qmodel.apply({**v, "params": p}, X, mutable=["quant_stats"])
      return jnp.mean(y**2), upd
    (l, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
    return {"params": jax.tree.map(lambda a, b: a - 0.1 * b, v["params"], g), **upd}, l

  v1, l0 = step(variables)
  _, l1 = step(v1)
  assert float(l1) < float(l0)
  assert all(bool(s.initialized) for s in jax.tree.leaves(v1["quant_stats"], is_leaf=lambda t: isinstance(t, mj.RangeState)))


def test_bad_rules_fail_early():
  with pytest.raises(ValueError, match="not a valid regex"):
    mj.QuantRule(pattern="(")
  with pytest.raises(ValueError, match="kinds"):
    mj.QuantRule(kinds=("lstm",))
  with pytest.raises(ValueError, match="quantizer spec"):
    mj.QuantRule(weight=8)
  with pytest.raises(TypeError, match="QuantRule"):
    mj.quantize_model(Net(), [dict(pattern=".*")])
  with pytest.raises(ValueError, match="unknown quantization method 'xnor_plus'"):
    mj.preset("xnor_plus")
