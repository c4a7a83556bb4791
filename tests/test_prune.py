"""Network slimming: the sparsity transformation, channel selection (threshold, regular
rounding, group-aware units), the pruned network against the masked original, run
directories written by ``prune_run`` and the ``prune`` command."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from micronet_jax import models


from micronet_jax.app import pipelines, recipes, runs
from micronet_jax.app.config import PruneConfig, TrainConfig
from micronet_jax.app.errors import ConfigError
from micronet_jax._src.prune import slimming as P
from micronet_jax.models import nin as nin_lib
from conftest import make_idx_dir, run_cli

NIN_SMALL = (24, 20, 12, 24, 24, 24, 24, 24)
NIN_GC_SMALL = (64, 64, 64, 128, 128, 128, 256, 256)
IMG = (1, 28, 28, 1)


# ----------------------------------------------------------------------------- helpers


def random_variables(model, seed: int, shape=IMG) -> dict:
  """Variables of a NIN/NIN-GC with random weights and BN statistics: gamma ~ N(0, 1),
  beta ~ N(0, 1), running mean ~ N(0, 0.5), running var ~ U(0.5, 1.5)."""
  like = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))
  rng = np.random.default_rng(seed)
  f32 = lambda a: np.asarray(a, np.float32)
  params, stats = {}, {}
  for name, p in like["params"].items():
    kshape = p["conv"]["kernel"].shape
    c = kshape[-1]
    params[name] = {
        "conv": {"kernel": f32(rng.normal(size=kshape) / np.sqrt(np.prod(kshape[:-1]))),
                 "bias": f32(rng.normal(0, 0.1, c))},
        "bn": {"scale": f32(rng.normal(size=c)), "bias": f32(rng.normal(size=c))},
    }
    stats[name] = {"bn": {"mean": f32(rng.normal(0, 0.5, c)), "var": f32(rng.uniform(0.5, 1.5, c))}}
  return {"params": params, "batch_stats": stats}


_JITTED: dict = {}


def logits(model, variables, x) -> np.ndarray:
  """Eval-mode logits, one compiled function per architecture."""
  key = (type(model).__name__, tuple(model.cfg))
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.asarray(_JITTED[key](variables, x))


@pytest.fixture(scope="module")
def x28():
  return jnp.asarray(np.random.default_rng(123).normal(size=(2, 28, 28, 1)), jnp.float32)


def chain(n: int) -> tuple[P.SlimLayer, ...]:
  """A plain chain of n prunable conv+BN blocks plus the classifier block."""
  return tuple(P.SlimLayer(f"block{i}") for i in range(n + 1))


# ----------------------------------------------------------------------------- sparsity


def toy_params():
  return {
      "block0": {"conv": {"kernel": np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 1, 2, 3),
                          "bias": np.array([0.5, -0.5, 0.0], np.float32)},
                 "bn": {"scale": np.array([1.5, -0.2, 0.0], np.float32),
                        "bias": np.array([0.3, -0.1, 0.0], np.float32)}},
      "BatchNorm_0": {"scale": np.array([-2.0, 0.0, 0.7, 1e-3], np.float32),
                      "bias": np.array([1.0, 1.0, 1.0, 1.0], np.float32)},
      "LayerNorm_0": {"scale": np.array([1.0, -1.0], np.float32)},  # not a BatchNorm
      "Dense_0": {"kernel": np.array([[0.0, -3.0]], np.float32)},
  }


def toy_grads(seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), toy_params())


def test_bn_scale_mask_marks_only_batchnorm_scales():
  mask = P.bn_scale_mask(toy_params())
  on = {"/".join(k.key for k in path) for path, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  assert on == {"block0/bn/scale", "BatchNorm_0/scale"}


def test_bn_scale_mask_on_nin_marks_the_nine_bn_scales():
  params = jax.eval_shape(lambda: models.NIN().init(jax.random.key(0), jnp.zeros(IMG)))["params"]
  mask = P.bn_scale_mask(params)
  on = {"/".join(k.key for k in path) for path, m in jax.tree_util.tree_leaves_with_path(mask) if m}
  assert on == {f"block{i}/bn/scale" for i in range(9)}
  assert len(jax.tree.leaves(mask)) == 9 * 4  # conv kernel, conv bias, bn scale, bn bias


def test_bn_scale_mask_on_resnet18_uses_flax_default_names():
  params = jax.eval_shape(lambda: models.resnet18().init(jax.random.key(0), jnp.zeros(IMG)))["params"]
  assert sum(jax.tree.leaves(P.bn_scale_mask(params))) == 1 + 8 * 2 + 3  # stem, blocks, shortcuts


def test_bn_sparsity_adds_s_sign_gamma_to_bn_scale_grads_only():
  s = 1e-2
  params, grads = toy_params(), toy_grads()
  updates, state = P.bn_sparsity(s).update(grads, optax.EmptyState(), params)
  assert state == optax.EmptyState()
  np.testing.assert_array_equal(updates["block0"]["bn"]["scale"],
                                grads["block0"]["bn"]["scale"] + np.float32(s) * np.array([1, -1, 0], np.float32))
  np.testing.assert_array_equal(updates["BatchNorm_0"]["scale"],
                                grads["BatchNorm_0"]["scale"] + np.float32(s) * np.array([-1, 0, 1, 1], np.float32))
  # sign(0) = 0: a zero gamma gets exactly its own gradient.
  assert updates["block0"]["bn"]["scale"][2] == grads["block0"]["bn"]["scale"][2]
  assert updates["BatchNorm_0"]["scale"][1] == grads["BatchNorm_0"]["scale"][1]
  for path in (("block0", "conv", "kernel"), ("block0", "conv", "bias"), ("block0", "bn", "bias"),
               ("BatchNorm_0", "bias"), ("LayerNorm_0", "scale"), ("Dense_0", "kernel")):
    u, g = updates, grads
    for k in path:
      u, g = u[k], g[k]
    np.testing.assert_array_equal(u, g)


def test_bn_sparsity_explicit_mask_and_missing_params():
  params, grads = toy_params(), toy_grads()
  only_dense = jax.tree.map(lambda _: False, params)
  only_dense["Dense_0"]["kernel"] = True
  updates, _ = P.bn_sparsity(0.5, mask=only_dense).update(grads, optax.EmptyState(), params)
  np.testing.assert_array_equal(updates["Dense_0"]["kernel"], grads["Dense_0"]["kernel"] + np.float32([[0.0, -0.5]]))
  np.testing.assert_array_equal(updates["block0"]["bn"]["scale"], grads["block0"]["bn"]["scale"])
  with pytest.raises(ValueError, match="params"):
    P.bn_sparsity(0.5).update(grads, optax.EmptyState())


@pytest.mark.parametrize("strength", [-1e-4, -1.0])
def test_bn_sparsity_negative_strength_raises(strength):
  with pytest.raises(ValueError, match="strength"):
    P.bn_sparsity(strength)


def test_bn_sparsity_then_adam_one_step_by_hand():
  s, lr, eps = 1e-3, 1e-2, 1e-8
  params, grads = toy_params(), toy_grads(1)
  grads["block0"]["bn"]["scale"][:] = 0.0  # the push alone moves these gammas
  tx = optax.chain(P.bn_sparsity(s), optax.adam(lr, b1=0.9, b2=0.999, eps=eps))
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)

  def adam_first_step(p, g):  # m_hat = g, v_hat = g^2 after one step
    g = np.asarray(g, np.float64)
    return p - lr * g / (np.sqrt(g * g) + eps)

  for key in ("block0", "BatchNorm_0"):
    bn = params[key]["bn"] if key == "block0" else params[key]
    g = grads[key]["bn"]["scale"] if key == "block0" else grads[key]["scale"]
    got = new[key]["bn"]["scale"] if key == "block0" else new[key]["scale"]
    np.testing.assert_allclose(got, adam_first_step(bn["scale"], g + s * np.sign(bn["scale"])), rtol=1e-6, atol=1e-7)
  # Gammas with zero gradient move by ~lr against their sign; the zero gamma stays put.
  np.testing.assert_allclose(new["block0"]["bn"]["scale"] - params["block0"]["bn"]["scale"],
                             [-lr * s / (s + eps), lr * s / (s + eps), 0.0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["Dense_0"]["kernel"], adam_first_step(params["Dense_0"]["kernel"],
                                                                       grads["Dense_0"]["kernel"]), rtol=1e-6, atol=1e-7)


def test_bn_sparsity_in_a_jitted_train_step():
  """As ``train --sparsity`` uses it: first in the chain, params passed by the TrainState.
  With a push much larger than the loss gradient, Adam's first step moves every gamma
  (the classifier's included, as in micronet) by lr against the sign of gamma, not of
  its loss gradient."""
  from micronet_jax.app import train as train_lib

  model = models.NIN(cfg=(4, 4, 4, 4, 4, 4, 4, 4))
  variables = random_variables(model, seed=4)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 1)), jnp.float32)
  lr = 1e-2
  tx = optax.chain(P.bn_sparsity(1e3), train_lib.make_optimizer(lr))
  state = train_lib.create_train_state(model.apply, jax.tree.map(jnp.array, variables), tx)
  state, _ = train_lib.train_step(state, x, jnp.array([3, 7]))
  for i in range(9):
    gamma = variables["params"][f"block{i}"]["bn"]["scale"]
    np.testing.assert_allclose(np.asarray(state.params[f"block{i}"]["bn"]["scale"]) - gamma,
                               -lr * np.sign(gamma), rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- selection


def test_global_threshold_is_micronets_sorted_index():
  gammas = [np.array([0.1, -0.5, 0.3, 0.0]), np.array([0.2, -0.05, -0.9])]
  # sorted |gamma| = [0, .05, .1, .2, .3, .5, .9]; index int(7 * p)
  assert P.global_threshold(gammas, 0.0) == 0.0  # (select_channels keeps every channel at percent 0)
  assert P.global_threshold(gammas, 0.5) == pytest.approx(0.2)  # int(3.5) = 3
  assert P.global_threshold(gammas, 0.42) == pytest.approx(0.1)  # int(2.94) = 2
  assert P.global_threshold(gammas, 0.99) == pytest.approx(0.9)  # int(6.93) = 6
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match="percent"):
      P.global_threshold(gammas, bad)


def test_normal_pruning_keeps_exactly_above_threshold():
  rng = np.random.default_rng(0)
  gammas = [rng.normal(size=w) for w in (24, 20, 12, 24)]
  for percent in (0.1, 0.3, 0.5, 0.7):
    plan = P.select_channels(gammas, chain(4), percent)
    thr = P.global_threshold(gammas, percent)
    assert plan.threshold == thr
    for g, c, keep in zip(gammas, plan.cfg, plan.keep):
      expected = np.flatnonzero(np.abs(g) > thr)
      assert expected.size > 0  # (no fallback case here)
      np.testing.assert_array_equal(keep, expected)
      assert c == expected.size


def test_normal_pruning_counts_by_hand():
  gammas = [np.array([0.1, -0.5, 0.3, 0.0]), np.array([0.2, -0.05, -0.9])]
  plan = P.select_channels(gammas, chain(2), 0.5)  # thr = 0.2
  assert plan.cfg == (2, 1)
  np.testing.assert_array_equal(plan.keep[0], [1, 2])
  np.testing.assert_array_equal(plan.keep[1], [2])


@pytest.mark.parametrize("base, cases", [
    (8, {12: 16, 11: 8, 13: 16, 20: 24, 4: 8, 3: 8, 1: 8, 0: 8, 8: 8, 16: 16, 92: 96, 91: 88, 95: 96, 96: 96}),
    (16, {24: 32, 23: 16, 25: 32, 8: 16, 5: 16, 1: 16, 16: 16, 40: 48, 39: 32, 90: 96, 88: 96, 87: 80}),
])
def test_round_count_nearest_multiple_ties_up(base, cases):
  for r, expected in cases.items():
    assert P.round_count(r, base, 96) == expected, (r, base)


def test_round_count_caps_at_width():
  assert P.round_count(100, 8, 100) == 96  # the largest multiple of 8 that fits
  assert P.round_count(99, 16, 100) == 96
  assert P.round_count(5, 8, 8) == 8
  assert P.round_count(3, 16, 12) == 12  # base wider than the layer: keep it all


def test_regular_rounding_reproduces_micronets_verified_cfgs():
  """micronet section 7.2: percent 0.5 on synthetic gammas gave these cfgs."""
  normal = [94, 81, 51, 97, 81, 98, 90, 111]
  n8 = [96, 80, 48, 96, 80, 96, 88, 112]
  n16 = [96, 80, 48, 96, 80, 96, 96, 112]
  assert [P.round_count(r, 8, w) for r, w in zip(normal, nin_lib.NIN_CFG)] == n8
  assert [P.round_count(r, 16, w) for r, w in zip(normal, nin_lib.NIN_CFG)] == n16


@pytest.mark.parametrize("regular", [8, 16])
def test_regular_pruning_keeps_the_top_count(regular):
  rng = np.random.default_rng(1)
  gammas = [rng.normal(size=w) for w in nin_lib.NIN_CFG]
  plan = P.select_channels(gammas, chain(8), 0.5, regular)
  for g, c, keep in zip(gammas, plan.cfg, plan.keep):
    r = int((np.abs(g) > plan.threshold).sum())
    assert c == P.round_count(max(r, 1), regular, len(g)) and c % regular == 0
    assert len(keep) == c and np.all(np.diff(keep) > 0)
    np.testing.assert_array_equal(keep, np.sort(np.argsort(-np.abs(g), kind="stable")[:c]))


def test_zero_survivors_keeps_largest_abs_gamma():
  gammas = [np.array([-0.05, 0.01, 0.02, 0.0]), np.array([1.0, 2.0, -3.0, 4.0])]
  # total 8, percent 0.5 -> thr = sorted[4] = 1.0: layer 0 has no survivor.
  plan = P.select_channels(gammas, chain(2), 0.5)
  assert plan.cfg == (1, 3)
  np.testing.assert_array_equal(plan.keep[0], [0])  # |-0.05| (micronet: argmax signed gamma = 2)
  plan = P.select_channels(gammas, chain(2), 0.5, regular=2)
  assert plan.cfg == (2, 4)  # 1 -> base 2; 3 -> 4 (tie rounds up)
  np.testing.assert_array_equal(plan.keep[0], [0, 2])


def test_exact_count_with_tied_gammas():
  g = np.array([0.5] * 10 + [0.01] * 6)
  other = np.full(16, 1.0)
  plan = P.select_channels([g, other], chain(2), 0.1, regular=8)  # thr = 0.01 -> r = 10 -> 8
  assert plan.cfg[0] == 8 and len(plan.keep[0]) == 8
  assert set(plan.keep[0]) <= set(range(10))  # 8 of the 10 tied channels, not all 10
  # all tied at thr (a percent that rounds to index 0: percent 0 itself keeps everything)
  plan = P.select_channels([np.full(16, 0.3), other], chain(2), 1e-6, regular=8)
  assert plan.cfg[0] == len(plan.keep[0]) == 8  # r = 0 -> 1 -> 8


def test_select_channels_rejects_bad_regular():
  with pytest.raises(ValueError, match="regular"):
    P.select_channels([np.ones(4)], chain(1), 0.5, regular=0)


# ----------------------------------------------------------------------------- groups


def shuffle_positions(width: int, groups: int) -> np.ndarray:
  """pos[c] = where channel c lands after ``channel_shuffle`` (computed with the model's op)."""
  if groups <= 1:
    return np.arange(width)
  perm = np.asarray(nin_lib.channel_shuffle(jnp.arange(width, dtype=jnp.float32).reshape(1, 1, 1, width), groups))
  perm = perm.ravel().astype(int)  # output position j holds channel perm[j]
  pos = np.empty(width, int)
  pos[perm] = np.arange(width)
  return pos


def group_counts(idx: np.ndarray, width: int, groups: int) -> np.ndarray:
  return np.bincount(idx // (width // groups), minlength=groups)


def check_balanced(plan, layout, widths):
  for i, (keep, width) in enumerate(zip(plan.keep, widths)):
    g, nxt = layout[i].groups, layout[i + 1]
    assert len(keep) == plan.cfg[i] and len(set(keep)) == len(keep)
    counts = group_counts(keep, width, g)
    assert np.all(counts == counts[0]), (i, counts)
    pos = shuffle_positions(width, nxt.shuffle)[keep]
    counts = group_counts(pos, width, nxt.groups)
    assert np.all(counts == counts[0]), (i, "next", counts)
    if nxt.shuffle > 1:  # the same local indices in every group
      per = width // g
      local = [tuple(np.sort(keep[keep // per == j] % per)) for j in range(g)]
      assert len(set(local)) == 1, i


# The unit a NIN-GC count must be a multiple of, per prunable block: lcm(groups, next
# groups) without a shuffle after; groups x next groups with one (rows tie a local index
# across this conv's groups, cells split them over the next conv's groups).
NIN_GC_UNITS = (2, 2 * 2, 2 * 16, 16 * 4, 4 * 4, 4 * 32, 32 * 8, 8)


def test_nin_gc_channel_units():
  layout = P.slimming_layout(models.NINGC())
  for i, (width, unit) in enumerate(zip(nin_lib.NIN_GC_CFG, NIN_GC_UNITS)):
    units = P.channel_units(width, layout[i].groups, layout[i + 1].shuffle, layout[i + 1].groups)
    assert units.shape[0] * units.shape[2] == unit
    np.testing.assert_array_equal(np.sort(units.ravel()), np.arange(width))  # a partition


@pytest.mark.parametrize("cfg", [nin_lib.NIN_GC_CFG, NIN_GC_SMALL], ids=["default", "small"])
@pytest.mark.parametrize("regular", [1, 8])
@pytest.mark.parametrize("percent", [0.2, 0.5, 0.8])
def test_group_aware_pruning_is_balanced(cfg, regular, percent):
  layout = P.slimming_layout(models.NINGC(cfg=cfg))
  rng = np.random.default_rng(int(percent * 10) + regular)
  gammas = [rng.normal(size=w) * rng.uniform(0.01, 1.0) for w in cfg]
  plan = P.select_channels(gammas, layout, percent, regular)
  for c, unit, width in zip(plan.cfg, NIN_GC_UNITS, cfg):
    step = math.lcm(unit, regular)
    assert c % unit == 0 and (c % step == 0 or c == width) and 0 < c <= width
  check_balanced(plan, layout, cfg)
  models.NINGC(cfg=plan.cfg)  # a valid config ...
  jax.eval_shape(lambda: models.NINGC(cfg=plan.cfg).init(jax.random.key(0), jnp.zeros(IMG)))  # ... that builds


# ----------------------------------------------------------------------------- shrinking


CASES = {
    "nin-normal": (models.NIN(cfg=NIN_SMALL), 0.5, 1),
    "nin-regular8": (models.NIN(cfg=NIN_SMALL), 0.5, 8),
    "nin_gc": (models.NINGC(cfg=NIN_GC_SMALL), 0.4, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pruned_equals_masked_original(case, x28):
  model, percent, regular = CASES[case]
  variables = random_variables(model, seed=0)
  new_model, new_vars, plan = P.prune(model, variables, percent, regular, compensate_beta=False)
  assert new_model.cfg == plan.cfg and type(new_model) is type(model)
  assert sum(plan.cfg) < sum(model.cfg)
  if regular > 1:
    assert all(c % regular == 0 or c == w for c, w in zip(plan.cfg, model.cfg))
  for layer, keep in zip(P.slimming_layout(model), plan.keep):
    np.testing.assert_array_equal(new_vars["params"][layer.name]["bn"]["scale"],
                                  variables["params"][layer.name]["bn"]["scale"][keep])
    np.testing.assert_array_equal(new_vars["batch_stats"][layer.name]["bn"]["var"],
                                  variables["batch_stats"][layer.name]["bn"]["var"][keep])
  pruned = logits(new_model, new_vars, x28)
  masked = logits(model, P.mask_variables(model, variables, plan, zero_beta=True), x28)
  assert pruned.shape == (2, 10) and np.abs(masked).max() > 0.1
  np.testing.assert_allclose(pruned, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_beta_compensation_beats_dropping_beta(case, x28):
  """Pruned channels keep feeding ReLU(beta): folding it into the next bias is exact
  away from the zero-padded borders of the 5x5/3x3 convs. Measured max |logit error|
  against mask_variables(zero_beta=False), compensated vs not: nin-normal 0.028 vs 0.56,
  nin-regular8 0.028 vs 0.50, nin_gc 0.0042 vs 0.56 (logits up to ~3)."""
  model, percent, regular = CASES[case]
  variables = random_variables(model, seed=0)
  reference = logits(model, P.mask_variables(model, variables, P.prune(model, variables, percent, regular)[2],
                                             zero_beta=False), x28)
  errors = {}
  for compensate in (True, False):
    new_model, new_vars, _ = P.prune(model, variables, percent, regular, compensate_beta=compensate)
    errors[compensate] = np.abs(logits(new_model, new_vars, x28) - reference).max()
  assert errors[False] > 0.05
  assert errors[True] < 0.2 * errors[False], errors


def test_beta_compensation_is_exact_for_1x1_consumers(x28):
  """Only block1 has pruned (exactly zero) gammas; block2 is a 1x1 conv, which sees no
  padding, so the compensated network equals the original exactly."""
  model = models.NIN(cfg=NIN_SMALL)
  variables = random_variables(model, seed=1)
  rng = np.random.default_rng(2)
  params = variables["params"]
  for i in range(8):
    g = params[f"block{i}"]["bn"]["scale"]
    g[:] = np.sign(g) * rng.uniform(0.5, 1.5, g.shape)  # clearly non-zero
  dropped = np.array([1, 4, 5, 9, 13, 17])
  params["block1"]["bn"]["scale"][dropped] = 0.0
  params["block1"]["bn"]["bias"][dropped] = rng.uniform(0.5, 2.0, dropped.size)  # ReLU(beta) > 0
  params["block1"]["bn"]["bias"][dropped[:2]] = -1.0  # and two that ReLU zeroes anyway

  new_model, new_vars, plan = P.prune(model, variables, 1e-6, compensate_beta=True)  # index 0: thr = 0
  assert plan.threshold == 0.0
  assert plan.cfg == (24, 20 - dropped.size, 12, 24, 24, 24, 24, 24)
  np.testing.assert_array_equal(plan.keep[1], np.setdiff1d(np.arange(20), dropped))
  masked = P.mask_variables(model, variables, plan, zero_beta=False)
  jax.tree.map(np.testing.assert_array_equal, masked["params"], params)  # nothing to mask

  original = logits(model, variables, x28)
  np.testing.assert_allclose(logits(new_model, new_vars, x28), original, rtol=1e-5, atol=1e-5)
  _, plain_vars, _ = P.prune(model, variables, 1e-6, compensate_beta=False)
  assert np.abs(logits(new_model, plain_vars, x28) - original).max() > 1e-2


def test_prune_rejects_unsupported_models():
  with pytest.raises(ValueError, match="NIN"):
    P.slimming_layout(models.LeNet())
  with pytest.raises(ValueError, match="NIN"):
    P.slimming_layout(models.resnet18())


# ----------------------------------------------------------------------------- run directories


def write_fake_run(out, model="nin", quant="float", model_cfg=NIN_SMALL, seed=0) -> TrainConfig:
  """A run directory with random variables (no training)."""
  config = TrainConfig(model=model, model_cfg=model_cfg, quant=quant, epochs=1,
                       eval_batch_size=8, out=str(out))
  float_model, net = recipes.build(config)
  x0 = config.example_input()
  if model == "nin" and quant == "float":
    variables = random_variables(float_model, seed)
  else:
    like = jax.eval_shape(lambda: net.init(jax.random.key(0), x0, train=False))
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), like)
  runs.write_run(str(out), config, variables, {"label": config.label})
  return config


def test_prune_run_writes_a_reloadable_smaller_run(tmp_path):
  src, out, data_dir = tmp_path / "src", tmp_path / "pruned", tmp_path / "idx"
  make_idx_dir(data_dir, n_train=12, n_test=10)
  write_fake_run(src)
  lines = []
  metrics = pipelines.prune(PruneConfig(str(src), str(out), 0.5, regular=1, compensate_beta=True,
                                        data_dir=str(data_dir)), log=lines.append).to_json()

  _, model, variables = runs.load_run(str(src))
  new_model, new_vars, plan = P.prune(model, variables, 0.5, 1, compensate_beta=True)
  config, net, loaded = runs.load_run(str(out))
  assert config.model == "nin" and config.quant == "float"
  assert config.model_cfg == plan.cfg == new_model.cfg and net.cfg == plan.cfg
  assert config.from_run == str(src) and config.sparsity == 0.0 and config.out == str(out)
  assert jax.tree.structure(loaded) == jax.tree.structure(new_vars)
  jax.tree.map(np.testing.assert_array_equal, loaded, new_vars)

  assert metrics["cfg_before"] == list(NIN_SMALL) and metrics["cfg"] == list(plan.cfg)
  assert metrics["threshold"] == plan.threshold
  assert metrics["model_stats"]["params"] < metrics["model_stats_before"]["params"]
  assert 0.0 < metrics["params_removed"] < 1.0
  for key in ("test_accuracy_before", "test_accuracy_masked", "test_accuracy"):
    assert 0.0 <= metrics[key] <= 1.0
  assert os.path.exists(out / "metrics.json") and len(lines) == 1 and "pruned" in lines[0]


def test_prune_run_rejects_quantized_runs(tmp_path):
  write_fake_run(tmp_path / "iao", quant="iao")
  with pytest.raises(ConfigError, match="float"):
    pipelines.prune(PruneConfig(str(tmp_path / "iao"), str(tmp_path / "out"), 0.5), log=lambda _: None)
  assert not (tmp_path / "out").exists()


def test_prune_run_rejects_lenet(tmp_path):
  write_fake_run(tmp_path / "lenet", model="lenet", model_cfg=None)
  with pytest.raises(ConfigError, match="NIN"):
    pipelines.prune(PruneConfig(str(tmp_path / "lenet"), str(tmp_path / "out"), 0.5), log=lambda _: None)
  assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- command line



def error_lines(err: str) -> list[str]:
  assert "Traceback" not in err
  return [line for line in err.splitlines() if "error:" in line]


def test_cli_prune_bad_percent(capsys, tmp_path):
  rc, out, err = run_cli(capsys, "prune", "--from", tmp_path, "--percent", "1.5", "--out", tmp_path / "o")
  assert rc == 2
  (line,) = error_lines(err)
  assert line.startswith("micronet-jax prune: error: ") and "--percent" in line
  assert not (tmp_path / "o").exists()


def test_cli_prune_missing_run(capsys, tmp_path):
  missing = tmp_path / "no-such-run"
  rc, out, err = run_cli(capsys, "prune", "--from", missing, "--out", tmp_path / "o")
  assert rc == 2
  (line,) = error_lines(err)
  assert str(missing) in line and "does not exist" in line
  assert not (tmp_path / "o").exists()
