"""Unmodified NNX models of every common shape (``nnx_zoo.py``: the flax MNIST CNN called
with ``rngs``, a MobileNetV2, a ViT, a decoder-only LM) under the presets, through the one
entry point ``mj.quantize_model``: every matmul/conv quantized (``summary``'s share of
MACs, attention products included), the float Params kept in the quantized copy, an
``nnx.jit`` QAT step with ``nnx.Optimizer`` lowers the loss with every LSQ step size
receiving a gradient, and PTQ calibration moves the observers (the NNX version of
``test_any_model.py``)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import micronet_jax as mj
import micronet_jax.nnx as mjn
from nnx_zoo import CNN, DecoderLM, MobileNetV2, ViT

IMAGES = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
DIGITS = jax.random.normal(jax.random.key(3), (8, 16, 16, 1))
LABELS = jnp.arange(8) % 10
TOKENS = jax.random.randint(jax.random.key(2), (4, 8), 0, 32)

# make the float model, example inputs, the call's keyword arguments, the kinds it has
MODELS = {
    "mnist_cnn": (lambda: CNN(rngs=nnx.Rngs(0)), (DIGITS,), lambda: {"rngs": nnx.Rngs(1)}, {"conv", "dense"}),
    "mobilenet_v2": (lambda: MobileNetV2(rngs=nnx.Rngs(0)), (IMAGES,), dict, {"conv", "dense"}),
    "vit": (lambda: ViT(rngs=nnx.Rngs(0)), (IMAGES,), dict, {"conv", "dense", "dense_general", "attention"}),
    "decoder_lm": (lambda: DecoderLM(rngs=nnx.Rngs(0)), (TOKENS,), dict,
                   {"embed", "dense_general", "einsum", "attention"}),
}
PRESETS = {"iao_w8a8": lambda: mj.iao_rules(8, 8), "lsq_w4a4": lambda: mj.lsq_rules(4, 4)}


def loss_fn(name, logits):
  if name == "decoder_lm":  # next-token prediction
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], TOKENS[:, 1:]).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()


@pytest.fixture(scope="module", params=[(m, p) for m in MODELS for p in PRESETS], ids=lambda mp: "-".join(mp))
def case(request):
  name, preset = request.param
  make, args, kwargs, kinds = MODELS[name]
  model = make()
  qmodel = mj.quantize_model(model, PRESETS[preset](), *args, **kwargs())
  return name, preset, model, args, kwargs, kinds, qmodel


def test_every_matmul_and_conv_is_quantized(case):
  name, _, _, args, kwargs, kinds, qmodel = case
  text = mjn.summary(qmodel, *args, **kwargs())
  assert re.search(r"quantized: 100\.0% of MACs", text.splitlines()[-1]), text
  plan = mjn.plan(qmodel, *args, **kwargs())
  assert all(p.layer is not None for p in plan.products)  # no matmul/conv outside a layer
  assert all(p.quantized for p in plan), [p.path for p in plan if not p.quantized]
  assert {p.kind for p in plan} == kinds
  if "attention" in kinds:
    assert isinstance(qmodel.encoder[0].attn if name == "vit" else qmodel.layers[0]["attn"],
                      mjn.QuantMultiHeadAttention)


def test_the_float_params_are_kept_and_a_float_checkpoint_loads(case):
  name, preset, model, args, kwargs, _, qmodel = case
  flat_f = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  flat_q = dict(nnx.to_flat_state(nnx.state(qmodel, nnx.Param)))
  for path, var in flat_f.items():  # every float Param at its path, its value untouched
    np.testing.assert_array_equal(flat_q[path].get_value(), var.get_value())
  extra = ["/".join(map(str, p)) for p in flat_q if p not in flat_f]
  assert all(re.search(r"(kernel|embedding|input|lhs|rhs)_(step|offset)$", e) for e in extra), extra
  assert bool(extra) == preset.startswith("lsq")  # only learned quantizers add Params
  other = MODELS[name][0]()  # another float checkpoint: nnx.update by the float paths
  q = nnx.clone(qmodel)
  nnx.update(q, nnx.state(other, nnx.Param))
  for path, var in nnx.to_flat_state(nnx.state(other, nnx.Param)):
    np.testing.assert_array_equal(dict(nnx.to_flat_state(nnx.state(q, nnx.Param)))[path].get_value(),
                                  var.get_value())


def test_a_jitted_qat_step_lowers_the_loss_and_every_step_size_learns(case):
  name, preset, _, args, kwargs, _, qmodel = case
  q = nnx.clone(qmodel)
  q.train()
  opt = nnx.Optimizer(q, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(m, opt, args, kwargs):  # kwargs (rngs) go through the transforms, as in the flax tutorials
    loss, g = nnx.value_and_grad(lambda m, kwargs: loss_fn(name, m(*args, **kwargs)))(m, kwargs)
    opt.update(m, g)
    return loss, g

  losses, steps = [], {}
  call_kwargs = kwargs()  # the same rngs for every step: its state moves as dropout draws
  for _ in range(4):
    loss, g = step(q, opt, args, call_kwargs)
    losses.append(float(loss))
    # the largest |gradient| of each step size over the 4 steps (a zero-initialised head
    # passes no gradient back until its quantized weights leave 0)
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(g)):
      key = jax.tree_util.keystr(path)
      if re.search(r"_step'\]$", key):
        steps[key] = max(steps.get(key, 0.0), float(jnp.abs(x).max()))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  if preset.startswith("lsq"):
    assert steps and all(s > 0 for s in steps.values()), {k: s for k, s in steps.items() if s == 0}


def test_ptq_calibration_moves_only_the_observers(case):
  name, preset, model, args, kwargs, _, qmodel = case
  q = nnx.clone(qmodel)
  values = lambda kind: jax.tree.leaves(nnx.to_pure_dict(nnx.state(q, kind)))  # noqa: E731  (arrays, now)
  before, params = values(mjn.QuantStats), values(nnx.Param)
  if not before:
    pytest.skip("no observed statistics (LSQ learns its steps)")
  mjn.calibrate(q, [args, args], **kwargs())  # a batch is the tuple of positional arguments
  assert [a for a, b in zip(values(mjn.QuantStats), before) if not np.array_equal(a, b)]
  for a, b in zip(values(nnx.Param), params):
    np.testing.assert_array_equal(a, b)
  model.eval()
  out, ref = q(*args, **kwargs()), model(*args, **kwargs())
  model.train()
  assert np.isfinite(out).all()
  # W8A8 stays close to float (the ViT's zero head makes both 0: compare what is non-trivial)
  assert float(jnp.abs(out - ref).max()) <= 0.1 * float(jnp.abs(ref).max()) + 1e-6
