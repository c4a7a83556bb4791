"""NNX's other layer kinds against Linen, exactly (as ``test_nnx.py`` does for Linear/Conv):
``nnx.LinearGeneral`` (contracting two axes; a batch axis), ``nnx.Einsum`` with a bias,
``nnx.Embed`` with ``attend``, the QK^T/PV products of ``nnx.MultiHeadAttention`` and a
user subclass of ``nnx.Linear``: for the same rules and variables the NNX model's
outputs, gradients and statistics equal the Linen model's bit for bit. Also: the one
entry point ``mj.quantize_model``, and a call signature with several positional
arguments, keyword arguments and ``rngs`` passing through plan, summary, calibrate and
convert."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.core import FrozenDict

import micronet_jax as mj
import micronet_jax.nnx as mjn
from micronet_jax._src.nnx.attention import product_attention
from micronet_jax._src.nnx.layers import Quantized

X = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
TOKENS = jax.random.randint(jax.random.key(1), (2, 6), 0, 12)
SEQ = jax.random.normal(jax.random.key(2), (2, 6, 8))
RULES = {"iao": mj.iao_rules(4, 6), "lsq": mj.lsq_rules(4, 4)}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _loss(out):
  return jnp.sum(jnp.sin(out))


def _assert_parity(nnx_model: nnx.Module, linen_model: nn.Module, rules, *args):
  q = mjn.quantize(nnx_model, rules, *args)
  lq = mj.quantize_model(linen_model, rules)
  assert [(p.path, p.kind, p.weight, p.act) for p in mjn.plan(q, *args)] == \
         [(p.path, p.kind, p.weight, p.act) for p in lq.plan(*args)]
  v = mjn.linen_variables(q)
  _assert_trees_equal(v, mj.quantize_variables(lq, mjn.linen_variables(nnx_model), *args))  # the same init
  mutable = ["quant_stats"] if "quant_stats" in v else []

  def linen_loss(params):
    out, upd = lq.apply({**v, "params": params}, *args, mutable=mutable)
    return _loss(out), (out, upd)

  (l_lin, (out_lin, upd)), g_lin = jax.value_and_grad(linen_loss, has_aux=True)(v["params"])
  q.train()
  (l_nnx, out_nnx), g_nnx = nnx.value_and_grad(lambda m: (lambda o: (_loss(o), o))(m(*args)), has_aux=True)(q)
  np.testing.assert_array_equal(out_nnx, out_lin)
  assert float(l_nnx) == float(l_lin)
  _assert_trees_equal(nnx.to_pure_dict(g_nnx), g_lin)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_lin))
  for col in mutable:
    _assert_trees_equal(mjn.linen_variables(q)[col], upd[col])
  q.eval()
  np.testing.assert_array_equal(q(*args), lq.apply({**v, **upd}, *args))
  return q


class NNXGeneral(nnx.Module):
  """LinearGeneral contracting two axes into two, then one with a batch axis."""

  def __init__(self, rngs):
    self.proj = nnx.LinearGeneral((3, 4), (2, 5), axis=(-2, -1), rngs=rngs)
    self.batched = nnx.LinearGeneral(5, 3, batch_axis=FrozenDict({0: 2}), rngs=rngs)

  def __call__(self, x):
    return self.batched(nnx.relu(self.proj(x)).sum(-2))


class LinenGeneral(nn.Module):

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.DenseGeneral((2, 5), axis=(-2, -1), name="proj")(x)).sum(-2)
    return nn.DenseGeneral(3, batch_dims=(0,), name="batched")(y)


class NNXEinsumEmbed(nnx.Module):
  """Embed, an Einsum with a bias, logits from Embed.attend."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(12, 8, rngs=rngs)
    self.mix = nnx.Einsum("btd,dhk->bthk", (8, 2, 4), (2, 4), bias_init=nnx.initializers.normal(0.1), rngs=rngs)

  def __call__(self, tokens):
    y = self.mix(self.embed(tokens))
    return self.embed.attend(y.reshape(y.shape[:-2] + (8,)))


class LinenEinsumEmbed(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(12, 8, name="embed")
    y = nn.Einsum((8, 2, 4), "btd,dhk->bthk", bias_init=nn.initializers.normal(0.1), name="mix")(embed(tokens))
    return embed.attend(y.reshape(y.shape[:-2] + (8,)))


MASK = nnx.make_causal_mask(TOKENS)


class NNXAttention(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=rngs)

  def __call__(self, x):
    return self.attn(x, mask=MASK)


class LinenAttention(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(2, qkv_features=8, name="attn")(x, mask=MASK)


class ScaledLinear(nnx.Linear):
  """A user subclass with its own __call__."""

  def __call__(self, x):
    return 2.0 * super().__call__(x)


class ScaledDense(nn.Dense):

  @nn.compact
  def __call__(self, x):
    return 2.0 * super().__call__(x)


class NNXSub(nnx.Module):

  def __init__(self, rngs):
    self.fc = ScaledLinear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc(x)


class LinenSub(nn.Module):

  @nn.compact
  def __call__(self, x):
    return ScaledDense(3, name="fc")(x)


CASES = {
    "linear_general": (NNXGeneral, LinenGeneral, (X,)),
    "einsum_embed_attend": (NNXEinsumEmbed, LinenEinsumEmbed, (TOKENS,)),
    "attention_products": (NNXAttention, LinenAttention, (SEQ,)),
    "subclass": (NNXSub, LinenSub, (SEQ,)),
}


@pytest.mark.filterwarnings("ignore:quantization rule .* matched no layer")  # lsq_rules' on a 2-layer model
@pytest.mark.parametrize("rules", list(RULES))
@pytest.mark.parametrize("case", list(CASES))
def test_nnx_layer_kinds_match_linen_values_gradients_and_statistics(case, rules):
  make, linen_model, args = CASES[case]
  q = _assert_parity(make(nnx.Rngs(0)), linen_model(), RULES[rules], *args)
  if case == "attention_products":
    assert isinstance(q.attn, mjn.QuantMultiHeadAttention) and isinstance(q.attn.qk_product, mjn.QuantProduct)
    assert isinstance(q.attn.query, mjn.QuantLinearGeneral)
  if case == "einsum_embed_attend":
    assert isinstance(q.embed, mjn.QuantEmbed) and isinstance(q.mix, mjn.QuantEinsum)
  if case == "subclass":  # quantized like its base, its own code still runs
    assert isinstance(q.fc, ScaledLinear) and isinstance(q.fc, Quantized)


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_product_attention_is_nnx_dot_product_attention(kv_heads):
  """With plain einsums, ``product_attention`` computes what NNX's own attention does
  (grouped-query heads, a mask, ``is_causal``)."""
  ks = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(ks[0], (2, 5, 2, 4))
  k, v = (jax.random.normal(key, (2, 5, kv_heads, 4)) for key in ks[1:])
  mask = jax.random.bernoulli(jax.random.key(4), 0.8, (2, 1, 5, 5)).at[..., 0].set(True)
  for kwargs in ({}, {"mask": mask}, {"is_causal": True}, {"mask": mask, "is_causal": True}):
    want = nnx.dot_product_attention(q, k, v, **kwargs)
    got = product_attention(jnp.einsum, jnp.einsum, q, k, v, **kwargs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


class TwoInputs(nnx.Module):
  """Called as ``model(x, deterministic, rngs=rngs, scale=2.0)``: a second positional
  argument (a Python bool), a keyword argument and dropout drawing from the call's ``rngs``."""

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.drop = nnx.Dropout(0.5)
    self.fc2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x, deterministic, *, rngs=None, scale: float = 1.0):
    y = self.fc2(self.drop(nnx.relu(self.fc1(x)), deterministic=deterministic, rngs=rngs))
    return y if scale == 1.0 else scale * y


def test_any_call_signature_passes_through():
  x = SEQ[:, 0]
  model = TwoInputs(nnx.Rngs(0))
  q = mj.quantize_model(model, mj.iao_rules(8, 8), x, True, rngs=nnx.Rngs(1), scale=2.0)
  assert isinstance(q.fc1, mjn.QuantLinear)
  assert "quantized: 100.0% of MACs" in mjn.summary(q, x, True, rngs=nnx.Rngs(1), scale=2.0)
  assert [p.path for p in mjn.plan(q, x, True, rngs=nnx.Rngs(1), scale=2.0)] == ["fc1", "fc2"]
  rngs = nnx.Rngs(2)
  mjn.calibrate(q, [(x, False), (2 * x, False)], rngs=rngs, scale=2.0)  # dropout draws from rngs
  assert int(rngs.default.count.get_value()) == 2  # ...under jit, its state moved
  assert bool(q.fc2.quant_stats.get_value()["input"].initialized)
  d = mjn.convert(q, x, True, rngs=rngs)
  np.testing.assert_allclose(mj.integer_apply(d, d.quantize_input(x)), q(x, True), atol=0.05)
  assert not np.array_equal(q(x, False, rngs=nnx.Rngs(3)), q(x, False, rngs=nnx.Rngs(4)))


def test_quantize_model_is_the_one_entry_point():
  linen = mj.quantize_model(LinenSub(), mj.iao_rules(8, 8))  # Linen: unchanged, no example inputs needed
  assert isinstance(linen, mj.QuantizedModel)
  assert mj.quantize_model(LinenSub(), mj.iao_rules(8, 8), SEQ) == linen
  q = mj.quantize_model(NNXSub(nnx.Rngs(0)), mj.iao_rules(8, 8), SEQ)
  assert isinstance(q, NNXSub) and isinstance(q.fc, Quantized)
  with pytest.raises(TypeError, match="example inputs"):
    mj.quantize_model(NNXSub(nnx.Rngs(0)), mj.iao_rules(8, 8))
  with pytest.raises(TypeError, match="flax.linen or a flax.nnx Module"):
    mj.quantize_model(lambda x: x, mj.iao_rules(8, 8))
