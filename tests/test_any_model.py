"""Unmodified Flax models of every common shape (``linen_zoo.py``: a ResNet, a
MobileNetV2, a ViT, a decoder-only LM) under the presets: every matmul/conv quantized
(``summary``'s share of MACs), the float checkpoint loads as it is, a jitted QAT step
lowers the loss with every LSQ step size receiving a gradient, PTQ calibrates, and a
partitioned model trains under a mesh with its logical axis rules."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import micronet_jax as mj
from linen_zoo import VAE, DecoderLM, MobileNetV2, ResNet, ViT

KEY = jax.random.key(0)
IMAGES = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
LABELS = jnp.arange(8) % 10
TOKENS = jax.random.randint(jax.random.key(2), (4, 8), 0, 32)

# model, example inputs, training kwargs, evaluation kwargs
MODELS = {
    "resnet": (ResNet(), (IMAGES,), {"train": True}, {"train": False}),
    "mobilenet_v2": (MobileNetV2(), (IMAGES,), {"train": True}, {"train": False}),
    "vit": (ViT(), (IMAGES,), {"train": True}, {"train": False}),
    "decoder_lm": (DecoderLM(), (TOKENS,), {}, {}),
}
PRESETS = {"iao_w8a8": lambda: mj.iao_rules(8, 8), "lsq_w4a4": lambda: mj.lsq_rules(4, 4)}


def loss_fn(name, logits):
  if name == "decoder_lm":  # next-token prediction
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], TOKENS[:, 1:]).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()


@pytest.fixture(scope="module", params=[(m, p) for m in MODELS for p in PRESETS], ids=lambda mp: "-".join(mp))
def case(request):
  name, preset = request.param
  model, args, train_kw, eval_kw = MODELS[name]
  qmodel = mj.quantize_model(model, PRESETS[preset]())
  float_vars = model.init(KEY, *args, **eval_kw)
  qvars = mj.quantize_variables(qmodel, float_vars, *args, **train_kw)
  return name, preset, model, args, train_kw, eval_kw, qmodel, float_vars, qvars


def test_every_matmul_and_conv_is_quantized(case):
  name, preset, model, args, _, eval_kw, qmodel, *_ = case
  text = mj.summary(qmodel, *args, **eval_kw)
  total = text.splitlines()[-1]
  assert re.search(r"quantized: 100\.0% of MACs", total), text
  plan = qmodel.plan(*args, **eval_kw)
  assert all(p.layer is not None for p in plan.products)  # no matmul/conv outside a layer
  assert all(p.quantized for p in plan), [p.path for p in plan if not p.quantized]
  kinds = {p.kind for p in plan}
  expected = {"resnet": {"conv", "dense"}, "mobilenet_v2": {"conv", "dense"},
              "vit": {"conv", "dense", "dense_general", "attention"},
              "decoder_lm": {"embed", "dense_general", "einsum", "attention"}}[name]
  assert kinds == expected


def test_the_float_checkpoint_loads_unchanged(case):
  *_, float_vars, qvars = case
  flat_f = dict(jax.tree_util.tree_leaves_with_path(float_vars["params"]))
  flat_q = dict(jax.tree_util.tree_leaves_with_path(qvars["params"]))
  for path, leaf in flat_f.items():  # every float leaf, boxed ones included, at its path, untouched
    np.testing.assert_array_equal(flat_q[path], leaf)
  extra = [jax.tree_util.keystr(p) for p in flat_q if p not in flat_f]
  assert all(re.search(r"'(kernel|embedding|input|lhs|rhs)_(step|offset)'\]$", e) for e in extra), extra
  boxed = [x for x in jax.tree.leaves(qvars["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
           if isinstance(x, nn.LogicallyPartitioned)]
  assert bool(boxed) == (case[0] in ("vit", "decoder_lm"))  # the partitioning metadata is kept


def test_a_jitted_qat_step_lowers_the_loss_and_every_step_size_learns(case):
  name, preset, model, args, train_kw, _, qmodel, _, qvars = case
  tx = optax.adam(1e-2)
  mutable = [c for c in ("batch_stats", "quant_stats") if c in qvars]

  @jax.jit
  def step(v, opt_state):
    def loss(params):
      logits, upd = qmodel.apply({**v, "params": params}, *args, mutable=mutable, **train_kw)
      return loss_fn(name, logits), upd
    (l, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
    u, opt_state = tx.update(g, opt_state, v["params"])
    return {**v, **upd, "params": optax.apply_updates(v["params"], u)}, opt_state, l, g

  v, opt_state = qvars, tx.init(qvars["params"])
  losses, steps = [], {}
  for _ in range(4):
    v, opt_state, l, g = step(v, opt_state)
    losses.append(float(l))
    # the largest |gradient| of each step size over the 4 steps (a zero-initialised head
    # passes no gradient back until its quantized weights leave 0)
    for p, x in jax.tree_util.tree_leaves_with_path(g):
      if re.search(r"_step'\]$", jax.tree_util.keystr(p)):
        steps[jax.tree_util.keystr(p)] = max(steps.get(jax.tree_util.keystr(p), 0.0), float(jnp.abs(x).max()))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  if preset.startswith("lsq"):
    assert steps and all(s > 0 for s in steps.values()), {k: s for k, s in steps.items() if s == 0}


def test_ptq_calibration_moves_only_the_observers(case):
  name, preset, model, args, _, eval_kw, qmodel, _, qvars = case
  if "quant_stats" not in qvars:
    pytest.skip("no observed statistics (LSQ learns its steps)")
  cal = mj.calibrate(qmodel, qvars, [args], **eval_kw)
  moved = [a for a, b in zip(jax.tree.leaves(cal["quant_stats"]), jax.tree.leaves(qvars["quant_stats"]))
           if not np.array_equal(a, b)]
  assert moved
  for a, b in zip(jax.tree.leaves(cal["params"]), jax.tree.leaves(qvars["params"])):
    np.testing.assert_array_equal(a, b)
  out = qmodel.apply(cal, *args, **eval_kw)
  ref = model.apply(qvars, *args, **eval_kw)
  assert np.isfinite(out).all()
  # W8A8 stays close to float (the ViT's zero head makes both 0: compare what is non-trivial)
  assert float(jnp.abs(out - ref).max()) <= 0.1 * float(jnp.abs(ref).max()) + 1e-6


@pytest.mark.filterwarnings("ignore:.*with mesh.*:DeprecationWarning")
def test_a_partitioned_model_trains_under_a_mesh_with_its_logical_axis_rules():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
  rules = (("embed", None), ("heads", "model"), ("kv", None), ("mlp", "model"), ("vocab", "model"))
  qmodel = mj.quantize_model(DecoderLM(), mj.iao_rules(8, 8))
  v = mj.quantize_variables(qmodel, DecoderLM().init(KEY, TOKENS), TOKENS)
  specs = nn.get_partition_spec(v)
  # ``with mesh`` (not jax.set_mesh): under set_mesh, flax's own DenseGeneral init applies a
  # 3-axis logical constraint to its 2-D flat kernel and fails, with or without quantization.
  with mesh, nn.logical_axis_rules(rules):
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    v = jax.device_put(v, shardings)
    assert v["params"]["up_0"]["kernel"].value.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)

    @jax.jit
    def step(v):
      def loss(params):
        logits, upd = qmodel.apply({**v, "params": params}, TOKENS, mutable=["quant_stats"])
        return loss_fn("decoder_lm", logits), upd
      (l, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
      return {**v, **upd, "params": jax.tree.map(lambda p, d: p - 0.05 * d, v["params"], g)}, l

    v1, l0 = step(v)
    _, l1 = step(v1)
  assert float(l1) < float(l0)
  assert isinstance(v1["params"]["up_0"]["kernel"], nn.LogicallyPartitioned)


def test_a_model_called_with_its_own_arguments_calibrates_with_them():
  """The VAE is called as ``vae(x, z_rng)``: plan, summary and calibrate take its
  positional arguments (a batch is a tuple of them) and add no ``train``."""
  vae = VAE()
  x = jax.random.uniform(KEY, (8, 12))
  qmodel = mj.quantize_model(vae, mj.iao_rules(8, 8))
  assert "quantized: 100.0% of MACs" in mj.summary(qmodel, x, KEY).splitlines()[-1]
  v = mj.quantize_variables(qmodel, vae.init(KEY, x, KEY), x, KEY)
  cal = mj.calibrate(qmodel, v, [(x, jax.random.key(i)) for i in range(2)])
  assert bool(cal["quant_stats"]["dec_fc1"]["input"].initialized)
  recon, _, _ = qmodel.apply(cal, x, KEY)
  np.testing.assert_allclose(recon, vae.apply(v, x, KEY)[0], atol=0.1)
