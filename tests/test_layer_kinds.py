"""Each Flax layer kind, quantized through its operands, against the fake-quant maths
written out by hand: the weight per output channel over the right axes (several for
DenseGeneral/Einsum, rows for Embed), the input on its observed range, the bias on the
accumulator grid, CIRCULAR padding after the input quantizer, the attention products'
operands; gradients pass straight through."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import micronet_jax as mj
from micronet_jax._src.core.observers import MinMax

KEY = jax.random.key(0)
W8 = mj.AffineWeight(8)  # symmetric, per channel
A8 = mj.AffineActivation(8, observer=MinMax())


def per_channel(w, out_axes):
  """W8's fake quant with one scale per output channel over ``out_axes`` (by hand)."""
  rest = [a for a in range(w.ndim) if a not in out_axes]
  perm = rest + list(out_axes)
  flat = jnp.transpose(w, perm).reshape(-1, int(np.prod([w.shape[a] for a in out_axes])))
  q = W8.fake_quant(flat, -1).reshape([w.shape[a] for a in perm])
  return jnp.transpose(q, np.argsort(perm))


def minmax_input(x):
  """A8 on the batch's own range (MinMax, one batch: the range it observes)."""
  q, _ = A8.fake_quant(x, A8.init_state(x), update=True)
  return q


def run(model, x, rules=None):
  qmodel = mj.quantize_model(model, rules or [mj.QuantRule(weight=W8, act=A8)])
  v = model.init(KEY, x)
  v = {**v, "quant_stats": qmodel.init(KEY, x)["quant_stats"]}
  y, upd = qmodel.apply(v, x, mutable=["quant_stats"])  # one observing step: the batch's range
  return qmodel, v, y, upd


def test_dense_general_quantizes_per_output_feature_over_every_feature_axis():
  model = nn.DenseGeneral((2, 3), axis=(-2, -1), use_bias=False)
  x = jax.random.normal(KEY, (4, 5, 6))
  _, v, y, _ = run(model, x)
  w = v["params"]["kernel"]  # (5, 6, 2, 3)
  want = jnp.einsum("bij,ijkl->bkl", minmax_input(x), per_channel(w, (2, 3)))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_einsum_quantizes_the_kernel_axes_that_reach_the_output_and_the_bias_on_its_grid():
  model = nn.Einsum((2, 5, 3), "bti,hio->btho")
  x = jax.random.normal(KEY, (4, 7, 5))
  _, v, y, _ = run(model, x)
  w, b = v["params"]["kernel"], v["params"]["bias"]  # (2, 5, 3), bias (2, 3)
  s_in = A8.grid(None, mj.QState(stats=A8.fake_quant(x, A8.init_state(x), update=True)[1]), None)[0]
  s_w = W8.qparams(jnp.transpose(w, (1, 0, 2)).reshape(5, 6), -1)[0].reshape(2, 3)
  b_q = jnp.round(b / (s_in * s_w)) * (s_in * s_w)
  want = jnp.einsum("bti,hio->btho", minmax_input(x), per_channel(w, (0, 2))) + b_q
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_embed_quantizes_its_table_per_token_and_attend_its_query():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      emb = nn.Embed(11, 4)
      return emb.attend(emb(tokens) * 2.0)

  tokens = jnp.arange(10).reshape(2, 5) % 11
  qmodel, v, y, upd = run(Tied(), tokens)
  table = v["params"]["Embed_0"]["embedding"]
  t_q = per_channel(table, (0,))
  query = t_q[tokens] * 2.0
  np.testing.assert_allclose(y, minmax_input(query) @ t_q.T, rtol=1e-5, atol=1e-5)
  assert set(upd["quant_stats"]["Embed_0"]) == {"input"}  # the attend query's range
  assert qmodel.plan(tokens)["Embed_0"].kind == "embed"


def test_circular_padding_pads_the_quantized_input():
  model = nn.Conv(3, (3, 3), padding="CIRCULAR", use_bias=False)
  x = jax.random.normal(KEY, (2, 5, 5, 2))
  _, v, y, _ = run(model, x)
  x_q = jnp.pad(minmax_input(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
  want = jax.lax.conv_general_dilated(x_q, per_channel(v["params"]["kernel"], (3,)), (1, 1), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_attention_products_quantize_both_operands_and_pass_gradients_straight_through():
  model = nn.MultiHeadDotProductAttention(num_heads=2, use_bias=False)
  x = jax.random.normal(KEY, (2, 4, 8))
  rules = [mj.QuantRule(kinds=("attention",), act=A8)]  # only the products: the projections stay float
  qmodel, v, y, upd = run(model, x, rules)
  p = v["params"]
  proj = lambda name, h: jnp.einsum("btd,dhk->bthk", h, p[name]["kernel"])  # noqa: E731
  q, k, val = proj("query", x), proj("key", x), proj("value", x)
  logits = jnp.einsum("bqhd,bkhd->bhqk", minmax_input(q / jnp.sqrt(4.0)), minmax_input(k))
  w = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", minmax_input(w), minmax_input(val))
  want = jnp.einsum("bqhd,hdo->bqo", out, p["out"]["kernel"])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
  assert set(upd["quant_stats"]) == {"qk_product", "pv_product"}
  assert set(upd["quant_stats"]["qk_product"]) == {"lhs", "rhs"}


def test_an_attention_product_passes_gradients_straight_through_inside_its_ranges():
  from micronet_jax._src.flax.layers import AttentionProduct

  lhs, rhs = jax.random.normal(KEY, (2, 3, 4)), jax.random.normal(jax.random.key(1), (2, 5, 4))
  prod = AttentionProduct(act_quant=A8)
  stats = prod.init(KEY, "bqd,bkd->bqk", lhs, rhs)["quant_stats"]
  _, upd = prod.apply({"quant_stats": stats}, "bqd,bkd->bqk", lhs, rhs, mutable=["quant_stats"])
  g_lhs = jax.grad(lambda a: prod.apply(upd, "bqd,bkd->bqk", a, rhs).sum())(lhs)
  # d/d lhs of sum(lhs_q rhs_q^T) = sum_k rhs_q: the STE's identity on lhs (all inside its range)
  np.testing.assert_allclose(g_lhs, jnp.broadcast_to(minmax_input(rhs).sum(1, keepdims=True), lhs.shape),
                             rtol=1e-6, atol=1e-6)
