"""Flax NNX: an unmodified nnx.Module quantized with the Linen rules and specs.

Parity is exact: the NNX model and the Linen model with the same weights give equal
outputs, gradients and updated statistics for DoReFa W4A4, IAO W8A8 with BatchNorm
folding and binary, on LeNet and on a small residual net (nested, with a marked add).
"""

import ast
import dataclasses
import pathlib
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import micronet_jax as mj
import micronet_jax.nnx as mjn
from micronet_jax import ops
from micronet_jax.models import LeNet

X28 = jax.random.normal(jax.random.key(1), (8, 28, 28, 1))
X8 = jax.random.normal(jax.random.key(2), (6, 8, 8, 3))
Y = jnp.arange(8) % 10
identity = lambda x: x  # noqa: E731


class NNXLeNet(nnx.Module):
  """micronet_jax.models.LeNet in NNX (attributes named as Linen names the layers)."""

  def __init__(self, rngs: nnx.Rngs, act: Callable = nnx.relu, dropout_rate: float = 0.0):
    self.Conv_0 = nnx.Conv(1, 10, (5, 5), padding="VALID", rngs=rngs)
    self.Conv_1 = nnx.Conv(10, 20, (5, 5), padding="VALID", rngs=rngs)
    self.Dense_0 = nnx.Linear(320, 50, rngs=rngs)
    self.Dropout_0 = nnx.Dropout(dropout_rate, rngs=rngs)
    self.Dense_1 = nnx.Linear(50, 10, rngs=rngs)
    self.act = act

  def __call__(self, x):
    x = self.act(nn.max_pool(self.Conv_0(x), (2, 2), strides=(2, 2)))
    x = self.act(nn.max_pool(self.Conv_1(x), (2, 2), strides=(2, 2)))
    x = self.act(self.Dense_0(x.reshape((x.shape[0], -1))))
    return self.Dense_1(self.Dropout_0(x))


class NNXBlock(nnx.Module):

  def __init__(self, c: int, rngs: nnx.Rngs, act: Callable):
    self.conv1 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(c, rngs=rngs)
    self.conv2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(c, rngs=rngs)
    self.add = mjn.Add()
    self.act = act

  def __call__(self, x):
    y = self.act(self.bn1(self.conv1(x)))
    return self.act(self.add(x, self.bn2(self.conv2(y))))


class NNXResNet(nnx.Module):
  """stem conv+BN, one residual block (nested), global average, dense head."""

  def __init__(self, rngs: nnx.Rngs, act: Callable = nnx.relu):
    self.stem = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
    self.stem_bn = nnx.BatchNorm(8, rngs=rngs)
    self.block = NNXBlock(8, rngs, act)
    self.head = nnx.Linear(8, 10, rngs=rngs)
    self.act = act

  def __call__(self, x):
    x = self.block(self.act(self.stem_bn(self.stem(x))))
    return self.head(ops.global_avg_pool(x))


class LinenBlock(nn.Module):
  act: Callable

  @nn.compact
  def __call__(self, x, train):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
    y = self.act(bn("bn1")(nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)))
    y = bn("bn2")(nn.Conv(8, (3, 3), use_bias=False, name="conv2")(y))
    return self.act(ops.Add(name="add")(x, y))


class LinenResNet(nn.Module):
  act: Callable = nn.relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), use_bias=False, name="stem")(x)
    x = self.act(nn.BatchNorm(use_running_average=not train, name="stem_bn")(x))
    x = LinenBlock(self.act, name="block")(x, train)
    return nn.Dense(10, name="head")(ops.global_avg_pool(x))


def _bn_stats_off_init(model: nnx.Module) -> nnx.Module:
  """Non-trivial BatchNorm parameters and statistics, so that folding is exercised."""
  bns = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
  for i, m in enumerate(bns):
    c = m.num_features
    m.scale.set_value(1 + 0.1 * jnp.sin(jnp.arange(c) + i))
    m.bias.set_value(0.05 * jnp.cos(jnp.arange(c) + i))
    m.mean.set_value(0.02 * jnp.arange(c))
    m.var.set_value(1 + 0.03 * jnp.arange(c))
  return model


CASES = {
    "lenet-dorefa": (lambda: NNXLeNet(nnx.Rngs(0)), LeNet(dropout_rate=0.0), mj.dorefa_rules(4, 4), X28),
    "lenet-iao": (lambda: NNXLeNet(nnx.Rngs(0)), LeNet(dropout_rate=0.0), mj.iao_rules(8, 8), X28),
    "lenet-binary": (lambda: NNXLeNet(nnx.Rngs(0), act=identity), LeNet(act=identity, dropout_rate=0.0),
                     mj.binary_rules(layers="all"), X28),
    "resnet-dorefa": (lambda: _bn_stats_off_init(NNXResNet(nnx.Rngs(0))), LinenResNet(), mj.dorefa_rules(4, 4), X8),
    "resnet-iao-fold": (lambda: _bn_stats_off_init(NNXResNet(nnx.Rngs(0))), LinenResNet(),
                        mj.iao_rules(8, 8, fold_bn=True), X8),
    "resnet-binary": (lambda: _bn_stats_off_init(NNXResNet(nnx.Rngs(0), act=identity)), LinenResNet(act=identity),
                      mj.binary_rules(), X8),
}


def _ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y[: logits.shape[0]]).mean()


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize("case", list(CASES))
def test_nnx_and_linen_agree_exactly(case):
  make, linen_model, rules, x = CASES[case]
  float_model = make()
  q = mjn.quantize(float_model, rules, x)
  lq = mj.quantize_model(linen_model, rules)
  assert [(p.path, p.weight, p.act, p.folded_bn) for p in mjn.plan(q, x)] == \
         [(p.path, p.weight, p.act, p.folded_bn) for p in lq.plan(x)]
  v = mjn.linen_variables(q)
  _assert_trees_equal(v, mj.quantize_variables(lq, mjn.linen_variables(float_model), x))  # the same init

  mutable = [c for c in ("batch_stats", "quant_stats") if c in v]

  def linen_loss(params):
    out, upd = lq.apply({**v, "params": params}, x, train=True, mutable=mutable)
    return _ce(out, Y), (out, upd)

  (l_lin, (out_lin, upd_lin)), g_lin = jax.value_and_grad(linen_loss, has_aux=True)(v["params"])
  q.train()
  (l_nnx, out_nnx), g_nnx = nnx.value_and_grad(lambda m: (lambda o: (_ce(o, Y), o))(m(x)), has_aux=True)(q)
  np.testing.assert_array_equal(out_nnx, out_lin)
  assert float(l_nnx) == float(l_lin)
  _assert_trees_equal(nnx.to_pure_dict(g_nnx), g_lin)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_lin))
  after = mjn.linen_variables(q)  # the observers and running statistics moved as Linen's did
  for col in mutable:
    _assert_trees_equal(after[col], upd_lin[col])

  q.eval()
  want = lq.apply({**v, **upd_lin}, x, train=False)
  np.testing.assert_array_equal(q(x), want)
  _assert_trees_equal(mjn.linen_variables(q), after)  # evaluation moves nothing


class NNXNested(nnx.Module):
  """Layers in an nnx.List, a shared conv called twice, a conv-transpose, nnx.Sequential."""

  def __init__(self, rngs: nnx.Rngs):
    self.convs = nnx.List([nnx.Conv(2, 4, (3, 3), rngs=rngs), nnx.Conv(4, 4, (1, 1), use_bias=False, rngs=rngs)])
    self.shared = nnx.Conv(4, 4, (3, 3), strides=2, rngs=rngs)
    self.up = nnx.ConvTranspose(4, 3, (2, 2), strides=2, rngs=rngs)
    self.head = nnx.Sequential(nnx.Linear(3, 5, rngs=rngs))

  def __call__(self, x):
    for conv in self.convs:
      x = nnx.relu(conv(x))
    x = self.up(nnx.relu(self.shared(nnx.relu(self.shared(x)))))
    return self.head(x.mean((1, 2)))


class _Group(nn.Module):
  """Linen modules named as NNX paths: ``children`` is ((name, make_layer), ...)."""

  children_: tuple

  @nn.compact
  def __call__(self, x):
    for name, make in self.children_:
      x = make(name)(x)
    return x


class LinenNested(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    relu_conv = lambda feats, k, **kw: lambda name: lambda x: nn.relu(nn.Conv(feats, k, name=name, **kw)(x))  # noqa: E731
    x = _Group((("0", relu_conv(4, (3, 3))), ("1", relu_conv(4, (1, 1), use_bias=False))), name="convs")(x)
    shared = nn.Conv(4, (3, 3), strides=2, name="shared")
    x = nn.ConvTranspose(3, (2, 2), strides=2, name="up")(nn.relu(shared(nn.relu(shared(x)))))
    dense = lambda name: _Group((("0", lambda n: nn.Dense(5, name=n)),), name=name)  # noqa: E731
    return _Group((("layers", dense),), name="head")(x.mean((1, 2)))


def test_nested_shared_and_transposed_layers_match_linen():
  x = jax.random.normal(jax.random.key(3), (2, 8, 8, 2))
  rules = [mj.QuantRule(weight=mj.AffineWeight(4), act=mj.AffineActivation(6))]
  model = NNXNested(nnx.Rngs(0))
  q = mjn.quantize(model, rules, x)
  assert isinstance(q.convs[1], mjn.QuantConv) and isinstance(q.up, mjn.QuantConvTranspose)
  assert isinstance(q.head.layers[0], mjn.QuantLinear)
  lq = mj.quantize_model(LinenNested(), rules)
  v = mjn.linen_variables(q)
  assert set(v["params"]) == {"convs", "shared", "up", "head"} and "0" in v["params"]["head"]["layers"]
  _assert_trees_equal(v, mj.quantize_variables(lq, mjn.linen_variables(model), x))
  out_lin, upd = lq.apply(v, x, mutable=["quant_stats"])
  q.train()
  np.testing.assert_array_equal(q(x), out_lin)
  _assert_trees_equal(mjn.linen_variables(q)["quant_stats"], upd["quant_stats"])


def test_paths_and_float_state_are_kept():
  model = NNXResNet(nnx.Rngs(0))
  q = mjn.quantize(model, mj.iao_rules(8, 8, fold_bn=True), X8)
  flat = lambda s: {k for k, _ in nnx.to_flat_state(s)}  # noqa: E731
  assert flat(nnx.state(q, nnx.Param)) == flat(nnx.state(model, nnx.Param))
  assert flat(nnx.state(q, nnx.BatchStat)) == flat(nnx.state(model, nnx.BatchStat))
  assert flat(nnx.state(q, mjn.QuantStats)) == {("stem", "quant_stats"), ("block", "conv1", "quant_stats"),
                                                 ("block", "conv2", "quant_stats"), ("block", "add", "quant_stats"),
                                                 ("head", "quant_stats")}
  assert isinstance(q.block.conv1, mjn.QuantConv) and isinstance(q.block.bn1, mjn.FoldedBatchNorm)
  assert type(model.block.conv1) is nnx.Conv  # the float model is untouched
  other = NNXResNet(nnx.Rngs(7))  # a float checkpoint loads with no renaming
  nnx.update(q, nnx.state(other, nnx.Param))
  np.testing.assert_array_equal(q.block.conv1.kernel.get_value(), other.block.conv1.kernel.get_value())
  summary = mjn.summary(q, X8)
  assert "block/conv1" in summary and "BatchNorm folded" in summary and "5 of 5 layers quantized" in summary


@dataclasses.dataclass(frozen=True)
class LearnedStep:
  """A quantizer with a learned step (as in test_protocol): x_q = r(clip(x / s)) s."""

  bits: int = 4

  def init(self, x, channel_axis):
    return mj.QState(params={"step": 2 * jnp.mean(jnp.abs(x)) / np.sqrt(7)})

  def apply(self, x, qstate, *, channel_axis, update):
    s = qstate.params["step"]
    return mj.round_ste(jnp.clip(x / s, -8, 7)) * s, qstate.stats


def test_learned_quantizer_params_are_nnx_params_and_train():
  q = mjn.quantize(NNXLeNet(nnx.Rngs(0)), [mj.QuantRule(weight=LearnedStep(), act=LearnedStep())], X28)
  steps = {k for k, _ in nnx.to_flat_state(nnx.state(q, nnx.Param)) if k[-1].endswith("_step")}
  assert steps == {(layer, f"{role}_step") for layer in ("Conv_0", "Conv_1", "Dense_0", "Dense_1")
                   for role in ("input", "kernel")}
  np.testing.assert_allclose(q.Dense_0.kernel_step.get_value(),
                             2 * jnp.mean(jnp.abs(q.Dense_0.kernel.get_value())) / np.sqrt(7), rtol=1e-6)
  opt = nnx.Optimizer(q, optax.adam(1e-2), wrt=nnx.Param)
  before = float(q.Dense_0.kernel_step.get_value())
  grads = nnx.grad(lambda m: _ce(m(X28), Y))(q)
  assert float(jnp.abs(grads["Dense_0"]["kernel_step"].get_value())) > 0
  opt.update(q, grads)
  assert float(q.Dense_0.kernel_step.get_value()) != before


def test_statistics_move_only_in_training_mode():
  q = mjn.quantize(NNXLeNet(nnx.Rngs(0)), mj.iao_rules(8, 8), X28)
  empty = nnx.state(q, mjn.QuantStats)
  assert not bool(q.Conv_0.quant_stats.get_value()["input"].initialized)
  q.eval()
  q(X28)
  _assert_trees_equal(nnx.state(q, mjn.QuantStats), empty)
  q.train()
  q(X28)
  r = q.Conv_0.quant_stats.get_value()["input"]
  assert bool(r.initialized)
  np.testing.assert_allclose([r.min, r.max], [X28.min(), X28.max()], rtol=1e-6)


def _qat(q, steps, x, y, use_nnx_jit):
  """A few QAT steps with Adam: nnx.Optimizer + nnx.jit, or split/merge + jax.jit."""
  q.train()
  tx = optax.adam(1e-3)
  losses = []
  if use_nnx_jit:
    opt = nnx.Optimizer(q, tx, wrt=nnx.Param)

    @nnx.jit
    def step(m, opt, x, y):
      loss, g = nnx.value_and_grad(lambda m: _ce(m(x), y))(m)
      opt.update(m, g)
      return loss

    for _ in range(steps):
      losses.append(float(step(q, opt, x, y)))
    return q, losses
  graphdef, params, rest = nnx.split(q, nnx.Param, ...)
  opt_state = tx.init(params)

  @jax.jit
  def jstep(params, rest, opt_state, x, y):
    m = nnx.merge(graphdef, params, rest)
    loss, g = nnx.value_and_grad(lambda m: _ce(m(x), y))(m)
    p = nnx.state(m, nnx.Param)
    updates, opt_state = tx.update(g, opt_state, p)
    nnx.update(m, optax.apply_updates(p, updates))
    _, params, rest = nnx.split(m, nnx.Param, ...)
    return params, rest, opt_state, loss

  for _ in range(steps):
    params, rest, opt_state, loss = jstep(params, rest, opt_state, x, y)
    losses.append(float(loss))
  return nnx.merge(graphdef, params, rest), losses


def test_qat_with_nnx_jit_and_with_split_merge_jax_jit_agree():
  make = lambda: mjn.quantize(_bn_stats_off_init(NNXResNet(nnx.Rngs(0))), mj.iao_rules(8, 8, fold_bn=True), X8)  # noqa: E731
  y = Y[:6]
  a, la = _qat(make(), 5, X8, y, use_nnx_jit=True)
  b, lb = _qat(make(), 5, X8, y, use_nnx_jit=False)
  assert la[-1] < la[0]
  np.testing.assert_allclose(la, lb, rtol=1e-5)
  for u, w in zip(jax.tree.leaves(mjn.linen_variables(a)), jax.tree.leaves(mjn.linen_variables(b))):
    np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(w, np.float32), rtol=1e-4, atol=1e-5)


def test_calibrate_matches_linen_calibrate():
  model = _bn_stats_off_init(NNXResNet(nnx.Rngs(0)))
  rules = mj.ptq_rules("minmax", fold_bn=True)
  q = mjn.quantize(model, rules, X8)
  lq = mj.quantize_model(LinenResNet(), rules)
  batches = [X8, 0.5 * X8 + 1]
  v = mj.calibrate(lq, mjn.linen_variables(q), batches)
  mjn.calibrate(q, batches)
  _assert_trees_equal(mjn.linen_variables(q), v)  # observers moved, BatchNorm statistics did not
  np.testing.assert_array_equal(q(X8), lq.apply(v, X8))


def test_convert_is_the_linen_deploy_and_agrees_with_the_fake_quant_forward():
  model = _bn_stats_off_init(NNXResNet(nnx.Rngs(0)))
  rules = mj.iao_rules(8, 8, fold_bn=True)
  q = mjn.calibrate(mjn.quantize(model, rules, X8), [X8])
  x = jax.random.normal(jax.random.key(5), (64, 8, 8, 3))
  d = mjn.convert(q, x)
  lq = mj.quantize_model(LinenResNet(), rules)
  d_lin = mj.convert(lq, mjn.linen_variables(q), x)
  for k, arr in d_lin.flat_arrays().items():
    np.testing.assert_array_equal(d.flat_arrays()[k], arr)
  logits = jax.jit(mj.integer_apply)(d, d.quantize_input(x))
  np.testing.assert_array_equal(logits, mj.integer_apply(d_lin, d_lin.quantize_input(x)))
  fake = q(x)
  assert float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(fake, -1))) >= 0.999
  np.testing.assert_allclose(logits, fake, atol=0.05 * float(jnp.abs(fake).max()))


def test_bad_input_fails_early_with_a_message():
  with pytest.raises(TypeError, match="nnx.Module"):
    mjn.quantize(LeNet(), mj.iao_rules(), X28)
  with pytest.raises(TypeError, match="QuantRule"):
    mjn.quantize(NNXLeNet(nnx.Rngs(0)), [mj.AffineWeight(8)], X28)
  q = mjn.quantize(NNXLeNet(nnx.Rngs(0)), mj.iao_rules(), X28)
  with pytest.raises(ValueError, match="already quantized"):
    mjn.quantize(q, mj.iao_rules(), X28)
  with pytest.raises(ValueError, match="not quantized"):
    mjn.summary(NNXLeNet(nnx.Rngs(0)), X28)
  with pytest.raises(ValueError, match="observer never saw data"):
    mjn.convert(q, X28)


@pytest.mark.realdata
def test_qat_on_fashion_mnist_lowers_the_loss_and_converts(fashion_mnist_small):
  ds = fashion_mnist_small
  x, y = jnp.asarray(ds.x_train[:512]), jnp.asarray(ds.y_train[:512])
  q = mjn.quantize(NNXLeNet(nnx.Rngs(0), dropout_rate=0.0), mj.iao_rules(8, 8), x[:64])
  q.train()
  opt = nnx.Optimizer(q, optax.adam(2e-3), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt, xb, yb):
    loss, g = nnx.value_and_grad(lambda m: _ce(m(xb), yb))(m)
    opt.update(m, g)
    return loss

  full_loss = nnx.jit(lambda m: _ce(m(x), y))
  q.eval()
  before = float(full_loss(q))
  q.train()
  for epoch in range(3):
    for i in range(0, 512, 64):
      step(q, opt, x[i:i + 64], y[i:i + 64])
  q.eval()
  assert float(full_loss(q)) < 0.7 * before
  xt = jnp.asarray(ds.x_test[:1000])
  d = mjn.convert(q, xt[:64])
  pred_int = jnp.argmax(jax.jit(mj.integer_apply)(d, d.quantize_input(xt)), -1)
  pred_fake = jnp.argmax(nnx.jit(lambda m, x: m(x))(q, xt), -1)
  assert float(jnp.mean(pred_int == pred_fake)) >= 0.999


# ----------------------------------------------------------------------------- no Linen, no globals


def test_training_and_evaluation_run_no_linen(monkeypatch):
  """The quantized NNX layers compute through the core on NnxSeam: a jitted QAT step and
  an evaluation forward run no Linen entry point and build no Linen module (quantizing,
  planning and converting read the model through its Linen twin, and the spy sees that)."""
  q = mjn.quantize(_bn_stats_off_init(NNXResNet(nnx.Rngs(0))),
                   [mj.QuantRule(weight=LearnedStep(), act=mj.AffineActivation(8), fold_bn=True, bn_calib=True,
                                 bn_init_from_batch=True), *mj.iao_rules(8, 8)], X8)
  calls = []

  def spy(name):
    original = getattr(nn.Module, name)

    def wrapped(*args, **kwargs):
      calls.append(name)
      return original(*args, **kwargs)
    return wrapped

  for name in ("apply", "init", "init_with_output", "bind", "__post_init__"):
    monkeypatch.setattr(nn.Module, name, spy(name))
  q.train()
  opt = nnx.Optimizer(q, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt, x, y):
    loss, g = nnx.value_and_grad(lambda m: _ce(m(x), y))(m)
    opt.update(m, g)
    return loss

  step(q, opt, X8, Y[:6])
  q(X8)  # eager, training mode
  q.eval()
  nnx.jit(lambda m, x: m(x))(q, X8)
  assert calls == []
  mjn.plan(q, X8)  # the spy works: the plan runs the Linen twin
  assert "apply" in calls or "init" in calls


NNX_SRC = pathlib.Path(mjn.__file__).parent / "_src" / "nnx"
_MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "deque", "Counter", "bytearray"}


def _mutable_value(node: ast.AST) -> bool:
  if isinstance(node, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
    return True
  if isinstance(node, ast.Call):
    f = node.func
    return (f.id if isinstance(f, ast.Name) else getattr(f, "attr", None)) in _MUTABLE_CALLS
  return False


@pytest.mark.parametrize("path", sorted(NNX_SRC.glob("*.py")), ids=lambda p: p.name)
def test_nnx_adapter_keeps_no_module_level_mutable_state(path):
  """No module- or class-level dict/list/set (values carried between calls, as the
  former ``_PENDING``/``_CALLS``), no ``global`` statement, no private NNX attribute."""
  source = path.read_text()
  tree = ast.parse(source)
  bodies = [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
  bad = []
  for body in bodies:
    for stmt in body:
      value = stmt.value if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)) else None
      if value is not None and _mutable_value(value):
        bad.append(f"line {stmt.lineno}: {ast.unparse(stmt)[:60]}")
  bad += [f"line {n.lineno}: global" for n in ast.walk(tree) if isinstance(n, ast.Global)]
  assert not bad, bad
  assert "_pytree__" not in source


def test_the_fold_link_is_empty_between_calls_and_checks_its_array():
  q = mjn.quantize(_bn_stats_off_init(NNXResNet(nnx.Rngs(0))), mj.iao_rules(8, 8, fold_bn=True), X8)
  q.train()
  q(X8)
  assert q.stem_bn.fold_link.pending is None and q.stem.fold_link is q.stem_bn.fold_link
  c = nnx.clone(q)
  assert c.stem.fold_link is c.stem_bn.fold_link and c.stem.fold_link is not q.stem.fold_link
  z = q.stem(X8)
  with pytest.raises(ValueError, match="stem_bn is folded into stem but is not called on that conv's output"):
    q.stem_bn(z + 1)
  with pytest.raises(ValueError, match="not called on that conv's output"):
    q.stem_bn(z)  # the link is spent


# ----------------------------------------------------------------------------- parity, layer by layer


class NNXUp(nnx.Module):
  """A ConvTranspose (kernel output axis -2 with transpose_kernel), a circular conv and a
  residual add, each layer alone in Linen and NNX."""

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.ConvTranspose(3, 4, (3, 3), strides=2, transpose_kernel=True, rngs=rngs)
    self.conv = nnx.Conv(4, 4, (3, 3), padding="CIRCULAR", rngs=rngs)
    self.add = mjn.Add()
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    y = self.up(x)
    return self.head(self.add(y, nnx.relu(self.conv(y))).mean((1, 2)))


class LinenUp(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.ConvTranspose(4, (3, 3), strides=2, transpose_kernel=True, name="up")(x)
    y = ops.Add(name="add")(y, nn.relu(nn.Conv(4, (3, 3), padding="CIRCULAR", name="conv")(y)))
    return nn.Dense(3, name="head")(y.mean((1, 2)))


@pytest.mark.parametrize("rules", [
    [mj.QuantRule(weight=mj.AffineWeight(4, per_channel=True), act=mj.AffineActivation(6)),
     mj.QuantRule(act=mj.AffineActivation(8), kinds=("add",))],
    [mj.QuantRule(weight=LearnedStep(), act=LearnedStep(), kinds=("dense", "conv", "conv_transpose")),
     mj.QuantRule(act=mj.AffineActivation(8), kinds=("add",))],
], ids=["affine-per-channel", "learned"])
def test_conv_transpose_circular_conv_and_add_match_linen_values_and_gradients(rules):
  x = jax.random.normal(jax.random.key(4), (2, 4, 4, 3))
  model = NNXUp(nnx.Rngs(0))
  q = mjn.quantize(model, rules, x)
  assert isinstance(q.up, mjn.QuantConvTranspose) and isinstance(q.add, mjn.QuantAdd)
  lq = mj.quantize_model(LinenUp(), rules)
  v = mjn.linen_variables(q)
  _assert_trees_equal(v, mj.quantize_variables(lq, mjn.linen_variables(model), x))

  def linen_loss(params):
    out, upd = lq.apply({**v, "params": params}, x, mutable=["quant_stats"])
    return out.sum(), upd

  (l_lin, upd), g_lin = jax.value_and_grad(linen_loss, has_aux=True)(v["params"])
  q.train()
  l_nnx, g_nnx = nnx.value_and_grad(lambda m: m(x).sum())(q)
  assert float(l_nnx) == float(l_lin)
  _assert_trees_equal(nnx.to_pure_dict(g_nnx), g_lin)
  _assert_trees_equal(mjn.linen_variables(q)["quant_stats"], upd["quant_stats"])
