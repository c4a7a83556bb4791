"""micronet_jax.app.train: the optimizer, the jitted steps, model state, checkpoints, and a
short real-data run through micronet_jax.app.pipelines."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import optax
import pytest
from jax import monitoring

from micronet_jax import iao_rules, quantize_model, quantize_variables

from micronet_jax.app import config as config_lib
from micronet_jax.app import pipelines, recipes

from micronet_jax.app import checkpoints, train
from micronet_jax.models import LeNet

BATCH = 32


def copy_tree(tree):
  """A host copy that survives ``train_step`` (which donates, i.e. frees, its input state)."""
  return jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(tree))


def trees_equal(a, b) -> bool:
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
      np.asarray(u).dtype == np.asarray(v).dtype and np.array_equal(u, v)
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def observer_states(model_state) -> dict:
  """{layer: RangeState} of the IAO input observers."""
  return {layer: d["input"] for layer, d in model_state["quant_stats"].items()}


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(4, BATCH, 28, 28, 1)).astype(np.float32)
  ys = rng.integers(0, 10, (4, BATCH)).astype(np.int32)
  return xs, ys


@pytest.fixture(scope="module")
def qmodel():
  return quantize_model(LeNet(), iao_rules(8, 8))


@pytest.fixture(scope="module")
def tx():
  # One optimizer object for the module: train_step (static apply_fn and tx) compiles once for it.
  return train.make_optimizer(1e-3)


def small_lenet() -> LeNet:
  """A LeNet with (8, 16, 32) channels: same layer paths as LeNet(), other shapes."""
  return LeNet(cfg=(8, 16, 32))


def new_state(qmodel, tx, x, seed=0, frozen=()):
  variables = qmodel.init(jax.random.key(seed), x, train=False)
  return train.create_train_state(qmodel.apply, variables, tx, seed=seed, frozen=frozen)


# ----------------------------------------------------------------------------- optimizer


def _tree(rng):
  return {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}


def test_make_optimizer_coupled_weight_decay_first_step():
  rng = np.random.default_rng(0)
  params, grads = _tree(rng), _tree(rng)
  lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
  tx = train.make_optimizer(lr, weight_decay=wd)
  updates, _ = tx.update(grads, tx.init(params), params)
  for k in params:
    g = grads[k].astype(np.float64) + wd * params[k]  # coupled L2: wd * p joins the gradient
    m_hat = (1 - b1) * g / (1 - b1)
    v_hat = (1 - b2) * g**2 / (1 - b2)
    expected = -lr * m_hat / (np.sqrt(v_hat) + eps)  # = -lr * g / (|g| + eps) on the first step
    np.testing.assert_allclose(updates[k], expected, rtol=1e-5, atol=1e-10)
    np.testing.assert_allclose(np.abs(updates[k]), lr, rtol=1e-4)


def test_make_optimizer_matches_optax_chain_and_not_adamw():
  rng = np.random.default_rng(1)
  lr, wd = 3e-3, 0.05
  ours, ref = train.make_optimizer(lr, weight_decay=wd), optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))
  p_ours = p_ref = _tree(rng)
  s_ours, s_ref = ours.init(p_ours), ref.init(p_ref)
  for _ in range(4):
    g = _tree(rng)
    u, s_ours = ours.update(g, s_ours, p_ours)
    r, s_ref = ref.update(g, s_ref, p_ref)
    p_ours, p_ref = optax.apply_updates(p_ours, u), optax.apply_updates(p_ref, r)
  for k in p_ref:
    np.testing.assert_allclose(p_ours[k], p_ref[k], rtol=1e-6, atol=1e-7)
  # Decoupled decay (AdamW) is a different optimizer: the first updates differ.
  p0, g0 = _tree(np.random.default_rng(2)), _tree(np.random.default_rng(3))
  adamw = optax.adamw(lr, weight_decay=wd)
  u_w, _ = adamw.update(g0, adamw.init(p0), p0)
  u_c, _ = ours.update(g0, ours.init(p0), p0)
  assert not np.allclose(u_w["w"], u_c["w"])


def test_make_optimizer_without_decay_is_adam_and_takes_schedules():
  rng = np.random.default_rng(4)
  p, g = _tree(rng), _tree(rng)
  lr = 1e-3
  for tx in (train.make_optimizer(lr), train.make_optimizer(optax.constant_schedule(lr))):
    u, _ = tx.update(g, tx.init(p), p)
    r, _ = optax.adam(lr).update(g, optax.adam(lr).init(p), p)
    for k in p:
      np.testing.assert_allclose(u[k], r[k], rtol=1e-6)


def test_learning_rate_constant_and_cosine():
  const = config_lib.TrainConfig(lr=0.01)
  assert recipes.learning_rate(const, 100) == 0.01
  sched = recipes.learning_rate(config_lib.TrainConfig(lr=0.01, lr_schedule="cosine"), 100)
  # 0.01 * (1 + cos(pi t / 100)) / 2
  np.testing.assert_allclose([float(sched(t)) for t in (0, 25, 50, 100, 150)],
                             [0.01, 0.01 * (1 + np.cos(np.pi / 4)) / 2, 0.005, 0.0, 0.0], rtol=1e-6, atol=1e-9)


def test_cosine_schedule_reaches_the_optimizer():
  """The update of step t is Adam's direction times lr(t): the last step barely moves."""
  rng = np.random.default_rng(5)
  p, g = _tree(rng), _tree(rng)
  config = config_lib.TrainConfig(lr=0.01, lr_schedule="cosine")
  tx, ref = train.make_optimizer(recipes.learning_rate(config, 4)), optax.adam(0.01)
  s, r = tx.init(p), ref.init(p)
  for t in range(4):
    u, s = tx.update(g, s, p)
    v, r = ref.update(g, r, p)
    for k in p:
      np.testing.assert_allclose(u[k], v[k] * (1 + np.cos(np.pi * t / 4)) / 2, rtol=1e-5, atol=1e-12)


def test_method_defaults():
  assert config_lib.method_defaults("iao") == (8, 8, 1e-3)
  assert config_lib.method_defaults("float") == (8, 8, 1e-3)  # bits unused for float
  assert config_lib.method_defaults("binary") == (1, 1, 1e-2)
  assert config_lib.method_defaults("ternary") == (2, 1, 1e-2)
  assert config_lib.method_defaults("iao", qaft=True) == (8, 8, 1e-5)


def test_unknown_lr_schedule_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match="unknown lr schedule 'linear'"):
    config_lib.TrainConfig(lr_schedule="linear")


# ----------------------------------------------------------------------------- steps


def test_train_step_compiles_once(qmodel, batches):
  xs, ys = batches
  x, y = xs[0, :24], ys[0, :24]  # a batch size no other test uses
  state = new_state(qmodel, train.make_optimizer(1e-3), x)  # a new tx: a new cache entry
  events = []

  def listener(name, _secs, **kw):
    if "train_step" in str(kw.get("fun_name", "train_step")):
      events.append(name)

  monitoring.register_event_duration_secs_listener(listener)
  try:
    before = train.train_step._cache_size()
    sizes, steps = [], []
    for _ in range(5):
      state, metrics = train.train_step(state, x, y)
      sizes.append(train.train_step._cache_size() - before)
      steps.append(int(state.step))
  finally:
    monitoring.unregister_event_duration_listener(listener)
  # one trace and one XLA compilation for all five steps
  assert events.count("/jax/core/compile/jaxpr_trace_duration") == 1
  assert events.count("/jax/core/compile/backend_compile_duration") == 1
  # one dispatch-cache entry for all five steps (step starts as an int32 array)
  assert sizes == [1, 1, 1, 1, 1]
  assert steps == [1, 2, 3, 4, 5]
  m = jax.device_get(metrics)
  assert float(m["count"]) == 24 and 0 <= float(m["correct"]) <= 24 and np.isfinite(m["loss"])


@pytest.mark.parametrize("project", [None, lambda p: p], ids=["plain", "identity-project"])
def test_callers_variables_survive_donating_train_steps(qmodel, tx, batches, project):
  # Until the fix the state held the caller's buffers, which the first donating step
  # freed: "Array has been deleted". An identity projection is jitted, and jit hands
  # inputs it returns unchanged back as the same arrays.
  xs, ys = batches
  variables = qmodel.init(jax.random.key(0), xs[0], train=False)
  saved = copy_tree(variables)
  logits = np.asarray(qmodel.apply(variables, xs[0], train=False))
  state = train.create_train_state(qmodel.apply, variables, tx, project=project)
  for i in range(3):
    state, _ = train.train_step(state, xs[i], ys[i])
  assert not any(a.is_deleted() for a in jax.tree.leaves(variables))
  assert trees_equal(jax.device_get(variables), saved)
  np.testing.assert_array_equal(np.asarray(qmodel.apply(variables, xs[0], train=False)), logits)
  assert int(state.step) == 3


def test_observers_move_in_train_step_not_in_evaluate(qmodel, tx, batches):
  xs, ys = batches
  state = new_state(qmodel, tx, xs[0])
  init = copy_tree(observer_states(state.model_state))
  assert set(init) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
  assert not any(bool(r.initialized) for r in init.values())

  state, _ = train.train_step(state, xs[0], ys[0])
  first = copy_tree(observer_states(state.model_state))
  for layer, r in first.items():
    assert bool(r.initialized), layer
    assert float(r.min) < float(r.max), layer
  # the first batch sets the range of the model input exactly
  assert float(first["Conv_0"].min) == xs[0].min() and float(first["Conv_0"].max) == xs[0].max()

  state, _ = train.train_step(state, xs[1], ys[1])
  second = copy_tree(observer_states(state.model_state))
  # moving average, momentum 0.1: v <- 0.9 v + 0.1 batch
  np.testing.assert_allclose(second["Conv_0"].min, 0.9 * first["Conv_0"].min + 0.1 * xs[1].min(), rtol=1e-6)
  np.testing.assert_allclose(second["Conv_0"].max, 0.9 * first["Conv_0"].max + 0.1 * xs[1].max(), rtol=1e-6)
  assert all(not np.array_equal(second[k].max, first[k].max) for k in first)

  before = copy_tree(state.variables)
  result = train.evaluate(state, xs[2], ys[2], batch_size=20)  # 32 = 20 + 12 padded
  assert set(result) == {"loss", "accuracy"}
  assert 0.0 <= result["accuracy"] <= 1.0 and np.isfinite(result["loss"])
  assert trees_equal(copy_tree(state.variables), before)


def test_evaluate_counts_only_unpadded_examples(qmodel, tx, batches):
  xs, ys = batches
  state = new_state(qmodel, tx, xs[0])
  state, _ = train.train_step(state, xs[0], ys[0])
  logits = qmodel.apply(state.variables, xs[2], train=False)
  expected = float(np.mean(np.argmax(np.asarray(logits), -1) == ys[2]))
  loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, ys[2]).mean())
  result = train.evaluate(state, xs[2], ys[2], batch_size=20)
  assert result["accuracy"] == pytest.approx(expected, abs=1e-6)
  assert result["loss"] == pytest.approx(loss, rel=1e-4)


def test_frozen_quant_stats_do_not_move(qmodel, tx, batches):
  xs, ys = batches
  state = new_state(qmodel, tx, xs[0])
  state, _ = train.train_step(state, xs[0], ys[0])  # initialise the ranges
  state = state.replace(frozen=("quant_stats",))
  stats, params = copy_tree(state.model_state), copy_tree(state.params)
  for i in (1, 2):
    state, _ = train.train_step(state, xs[i], ys[i])
  assert int(state.step) == 3
  assert trees_equal(copy_tree(state.model_state), stats)
  new_params = copy_tree(state.params)
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params)))


def test_frozen_from_init_keeps_observers_empty(qmodel, tx, batches):
  xs, ys = batches
  state = new_state(qmodel, tx, xs[0], frozen=("quant_stats",))
  stats = copy_tree(state.model_state)
  state, _ = train.train_step(state, xs[0], ys[0])
  assert trees_equal(copy_tree(state.model_state), stats)
  assert not any(bool(r.initialized) for r in observer_states(state.model_state).values())


def _three_steps(qmodel, tx, batches, seed):
  xs, ys = batches
  state = new_state(qmodel, tx, xs[0], seed=seed)
  for i in range(3):
    state, _ = train.train_step(state, xs[i], ys[i])
  return copy_tree(state.variables)


def test_determinism(qmodel, tx, batches):
  a, b, c = (_three_steps(qmodel, tx, batches, s) for s in (0, 0, 1))
  assert trees_equal(a, b)
  assert all(not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(c["params"])))


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def trained_qat(qmodel, tx, batches):
  """Variables (params + initialised quant_stats) after 3 QAT steps."""
  return _three_steps(qmodel, tx, batches, seed=0)


def test_checkpoint_round_trip_qat(tmp_path, qmodel, trained_qat, batches):
  x = batches[0][0]
  path = checkpoints.save_variables(str(tmp_path), trained_qat)
  assert path == str(tmp_path / checkpoints.CHECKPOINT_DIR) and os.path.isdir(path)
  like = qmodel.init(jax.random.key(7), x, train=False)  # same structure, other values
  restored = checkpoints.load_variables(str(tmp_path), like)
  assert trees_equal(restored, trained_qat)  # values, dtypes (bool initialized) and RangeState nodes
  assert all(bool(r.initialized) for r in observer_states(restored).values())
  # an abstract target works too
  abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), x, train=False))
  assert trees_equal(checkpoints.load_variables(str(tmp_path), abstract), trained_qat)
  # the restored model computes what the saved one did
  np.testing.assert_array_equal(qmodel.apply(restored, x, train=False), qmodel.apply(trained_qat, x, train=False))


def test_load_checkpoint_missing(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoints.load_variables(str(tmp_path), {"params": {}})


def test_load_checkpoint_other_structure_raises(tmp_path, qmodel, trained_qat, batches):
  checkpoints.save_variables(str(tmp_path), {"params": trained_qat["params"]})  # float: no quant_stats
  like = qmodel.init(jax.random.key(0), batches[0][0], train=False)
  with pytest.raises(ValueError, match="does not fit this model"):
    checkpoints.load_variables(str(tmp_path), like)


def test_load_checkpoint_other_shapes_raises(tmp_path, trained_qat, batches):
  # Regression: until f34231f orbax restored the saved shapes whatever the target said, and
  # a LeNet() checkpoint "loaded" into a LeNet with (8, 16, 32) channels.
  checkpoints.save_variables(str(tmp_path), trained_qat)
  other = quantize_model(small_lenet(), iao_rules(8, 8))
  like = jax.eval_shape(lambda: other.init(jax.random.key(0), batches[0][0], train=False))
  with pytest.raises(ValueError, match="does not fit this model") as e:
    checkpoints.load_variables(str(tmp_path), like)
  assert "['params']['Conv_0']['kernel'] has shape (5, 5, 1, 10) in the checkpoint but (5, 5, 1, 8)" in str(e.value)


def _float_checkpoint(tmp_path, model, batches, steps=3):
  xs, ys = batches
  key = jax.random.key(0)
  state = train.create_train_state(model.apply, model.init(key, xs[0]), train.make_optimizer(1e-3))
  for i in range(steps):
    state, _ = train.train_step(state, xs[i], ys[i])
  saved = copy_tree(state.variables)
  checkpoints.save_variables(str(tmp_path), state.variables)
  like = jax.eval_shape(lambda: model.init(key, xs[0]))
  restored = checkpoints.load_variables(str(tmp_path), like)
  assert trees_equal(restored, saved)
  return restored


def test_float_checkpoint_into_quantized_model(tmp_path, qmodel, tx, batches):
  xs, ys = batches
  fmodel = LeNet()
  float_vars = _float_checkpoint(tmp_path, fmodel, batches)
  assert set(float_vars) == {"params"}
  qvars = quantize_variables(qmodel, float_vars, xs[0], train=False)
  assert set(qvars) == {"params", "quant_stats"}
  assert trees_equal(qvars["params"], float_vars["params"])
  assert not any(bool(r.initialized) for r in observer_states(qvars).values())

  q_logits = np.asarray(qmodel.apply(qvars, xs[0], train=False))
  f_logits = np.asarray(fmodel.apply(float_vars, xs[0], train=False))
  assert q_logits.shape == (BATCH, 10) and np.isfinite(q_logits).all()
  assert not np.array_equal(q_logits, f_logits)  # quantization is applied...
  assert np.abs(q_logits - f_logits).max() < 0.05 * np.abs(f_logits).max() + 1e-3  # ...at 8 bits, close

  # and QAT can go on from it
  state = train.create_train_state(qmodel.apply, qvars, tx)
  state, _ = train.train_step(state, xs[1], ys[1])
  assert all(bool(r.initialized) for r in observer_states(state.model_state).values())


def test_float_checkpoint_of_other_lenet_is_rejected(tmp_path, qmodel, batches):
  other_vars = _float_checkpoint(tmp_path, small_lenet(), batches, steps=1)
  with pytest.raises(ValueError) as e:
    quantize_variables(qmodel, other_vars, batches[0][0], train=False)
  msg = str(e.value)
  assert "do not fit LeNet" in msg
  assert "params['Conv_0']['kernel'] has shape (5, 5, 1, 8) in the checkpoint but (5, 5, 1, 10)" in msg
  assert "Dense_1" in msg  # its kernel is (32, 10) instead of (50, 10): every mismatch is listed


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_short_real_run_learns(tmp_path, fashion_mnist_small):
  out = tmp_path / "run"
  lines = []
  config = config_lib.TrainConfig(
      quant="iao", w_bits=8, a_bits=8, epochs=1, limit_train=300 * 128, limit_test=1000, out=str(out),
      data_dir=fashion_mnist_small.source,
  )
  metrics = pipelines.train(config, progress=False, log=lines.append)
  assert metrics.test_accuracy > 0.75, metrics.history
  assert metrics.best_test_accuracy == metrics.test_accuracy
  assert any("4 of 4 layers quantized" in line for line in lines)

  with open(out / "metrics.json") as f:
    written = json.load(f)
  for key in ("test_accuracy", "best_test_accuracy", "epochs", "seconds_per_epoch", "config", "versions"):
    assert key in written, key
  assert written.pop("data_source") == fashion_mnist_small.source  # the data used, beside the result
  assert written == metrics.to_json()
  assert written["epochs"] == 1 and written["seconds_per_epoch"] > 0
  assert written["config"]["quant"] == "iao" and written["config"]["limit_train"] == 38400
  assert written["versions"]["jax"] == jax.__version__
  assert len(written["history"]) == 1
  with open(out / "config.json") as f:
    assert json.load(f) == written["config"]
  assert os.path.isdir(out / checkpoints.CHECKPOINT_DIR)

  # The checkpoint holds the trained QAT model: it scores the reported accuracy again.
  _, net = recipes.build(config)
  x0 = fashion_mnist_small.x_train[:1]
  restored = checkpoints.load_variables(str(out), jax.eval_shape(lambda: net.init(jax.random.key(0), x0, train=False)))
  assert all(bool(r.initialized) for r in observer_states(restored).values())
  state = train.create_train_state(net.apply, restored, train.make_optimizer())
  again = train.evaluate(state, fashion_mnist_small.x_test, fashion_mnist_small.y_test)
  assert again["accuracy"] == pytest.approx(metrics.test_accuracy, abs=1e-9)
