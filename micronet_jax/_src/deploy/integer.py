"""Integer-only deployment: QAT/PTQ variables -> int8/int32 ``Deploy`` -> integer forward.

``convert(qmodel, variables, x)`` returns a ``Deploy``: one typed record per quantized
layer (``records.IntConv``/``IntDense``: int8 weights, symmetric per output channel,
int32 bias on the grid S_in * S_w, w_sum, the input's fixed-point requantization and
grid; ``records.IntAdd`` for a residual add), no float weights. The only float numbers
kept are the per-class scales that turn the final int32 accumulators into logits.

Any quantizer with the ``AffineGrid`` capability converts (``int_range()``, ``grid``):
weights need zero points 0 and codes that fit int8, inputs codes that fit uint8 or
int8. Their state is read from the variables by ``seam.state_from``.

``integer_apply(deploy, x_q)`` runs the model's own code under the deploy runtime
(``runtime.Runtime``), so values between layers are int32 accumulators (real = scale *
acc, real 0 = acc 0): ReLU, max-pooling, reshapes, channel shuffles and concatenations
act on them as on floats, and ``ops.global_avg_pool`` averages them with integer
rounding. Which producer channel feeds every element of a layer's input is found once,
in ``convert``, by the tag trace (``tags.trace_tags``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from micronet_jax._src.core import quantizers as qz
from micronet_jax._src.core.fixed_point import precise_multiplier
from micronet_jax._src.core.protocol import AffineGrid, QState
from micronet_jax._src.deploy import graph, records, runtime
from micronet_jax._src.deploy.records import (FoldedBatchNorm, InputGrid, IntAdd, IntClamp, IntConv, IntDense,
                                              Requant)
from micronet_jax._src.deploy.tags import trace_tags
from micronet_jax._src.flax import seam
from micronet_jax._src.flax.transform import LayerPlan, QuantizedModel, eval_kwargs

Array = jax.Array
INT32_MAX = 2**31 - 1
MAX_ADD_FRACTION_BITS = 16  # beyond this a pooled sum's rounding is far below the 30-bit multipliers' own


@struct.dataclass
class Deploy:
  """Integer deploy artifact. ``layers[path]``: a record per integer layer (int arrays
  only, see ``records``); ``out_scale`` (float32, the output's shape without batch) turns
  the final int32 accumulators into logits. The input grid, the model and its apply
  kwargs and the folded BatchNorms are static."""

  layers: dict[str, IntConv | IntDense | IntAdd | IntClamp]
  out_scale: Array
  input_scale: float = struct.field(pytree_node=False)
  input_zero_point: int = struct.field(pytree_node=False)
  input_range: tuple[int, int] = struct.field(pytree_node=False)
  model: nn.Module = struct.field(pytree_node=False)
  apply_kwargs: tuple = struct.field(pytree_node=False, default=())
  folded_bns: tuple[str, ...] = struct.field(pytree_node=False, default=())
  input_shape: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)  # without batch

  def quantize_input(self, x: Any) -> Array:
    """Float input -> integers on the first layer's input grid (uint8 or int8)."""
    return quantize_input(x, self.input_scale, self.input_zero_point, self.input_range)

  def nbytes(self) -> int:
    return records.nbytes((self.layers, self.out_scale))

  def flat_arrays(self) -> dict[str, np.ndarray]:
    """Every array as numpy, keyed 'layer/field' ('Conv_0/requant/m_hi'), and 'out_scale'."""
    flat = {"out_scale": np.asarray(self.out_scale)}
    for path, rec in self.layers.items():
      for keys, leaf in jax.tree_util.tree_leaves_with_path(rec):
        flat[path + "".join(f"/{k.name}" for k in keys)] = np.asarray(leaf)
    return flat


def quantize_input(x: Any, scale: float, zero_point: int, int_range: tuple[int, int]) -> Array:
  """Input quantization: clip(r(x / scale) + zero_point) as uint8 (or int8).

  Computed with the same jitted XLA division as the fake-quant forward: XLA divides by a
  broadcast scale through its reciprocal, which differs from an IEEE division at a few
  exact ties, and both paths must see the same codes.
  """
  lo, hi = int_range
  return _codes(jnp.asarray(x, jnp.float32), jnp.float32(scale), lo, hi, zero_point).astype(
      jnp.uint8 if lo >= 0 else jnp.int8)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _codes(x: Array, scale: Array, lo: int, hi: int, zero_point: int = 0) -> Array:
  """clip(r(x / scale) + zero_point, lo, hi) as int32, as the fake-quant forward rounds."""
  return jnp.clip(qz.round_half_away(x / scale) + zero_point, lo, hi).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _weight_qparams(wq: AffineGrid, w: Array, qstate: QState = QState(), out_axis: int = -1) -> tuple[Array, Array]:
  """``wq.grid`` of kernel ``w`` per output channel (axis ``out_axis``), jitted as in the
  fake-quant forward. ``wq`` is a frozen spec, hashed by value: one compilation per
  (spec, kernel shape), shared by every layer and every ``convert``."""
  return wq.grid(w, qstate, out_axis)


def integer_apply(deploy: Deploy, x_q: Array, dequantize: bool = True, capture: dict | None = None) -> Array:
  """Runs the integer network on ``x_q`` (from ``deploy.quantize_input``).

  Returns float logits ``out_scale * acc`` (the one float multiply, at the end), or the
  int32 accumulators with ``dequantize=False``. With a ``capture`` dict, every conv/dense
  layer's quantized input codes (on its [qmin, qmax] grid) are stored under its path.
  Input of another dtype (int32, or int8 for a uint8 grid) or shape, or an empty batch, is
  a ValueError (``runtime.check_input``).
  """
  runtime.check_input(x_q, deploy.input_range, deploy.input_shape)
  acc = x_q.astype(jnp.int32) - deploy.input_zero_point
  recs = {**{bn: FoldedBatchNorm() for bn in deploy.folded_bns}, **deploy.layers}
  with nn.intercept_methods(runtime.Runtime(recs, strict=True, capture=capture)):
    out = deploy.model.apply({}, acc, **dict(deploy.apply_kwargs))
  if not runtime.is_int(out):
    raise ValueError(f"the model's output is {out.dtype} in integer inference: an op after the last layer is "
                     "float-only (use micronet_jax._src.flax.ops.global_avg_pool for averages)")
  return out * deploy.out_scale if dequantize else out


def fake_quant_codes(qmodel: QuantizedModel, variables: dict, x: Array, **apply_kwargs: Any) -> dict[str, Array]:
  """The integer codes r(x / S) + Z that the fake-quant eval forward gives every conv/dense
  layer's input, by path: what ``integer_apply(..., capture=...)`` must reproduce."""
  apply_kwargs = eval_kwargs(qmodel.model, apply_kwargs)
  plan = qmodel.plan(x[:1], **apply_kwargs)
  seen: dict[str, Array] = {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    path = seam.module_path(m)
    if (context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.Conv, nn.ConvTranspose))
        and plan.get(path) is not None
        and not hasattr(m, "act_quant")):
      seen[path] = args[0]  # the last call is the swapping pass's (not the discovery pass's)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # outermost: sees the float layers' inputs
    qmodel.apply(variables, x, **apply_kwargs)
  codes = {}
  for path, xin in seen.items():
    q = plan[path].act
    scale, zp = q.grid(None, _state(variables, path, "input"), None)
    qmin, qmax = q.int_range()
    codes[path] = jnp.clip(qz.round_half_away(xin / scale) + zp, qmin, qmax).astype(jnp.int32)
  return codes


# ----------------------------------------------------------------------------- conversion


def _state(variables: dict, path: str, role: str) -> QState:
  return seam.state_from(graph.get_path(variables.get("params", {}), path),
                         graph.get_path(variables.get(seam.STATS, {}), path), role)


def _affine(q: Any, path: str, role: str) -> AffineGrid:
  if not isinstance(q, AffineGrid):
    raise ValueError(f"integer conversion needs affine quantizers (the AffineGrid capability: int_range, grid); "
                     f"layer {path}'s {role} uses {type(q).__name__}")
  return q


def _input_grid(lp: LayerPlan, variables: dict) -> tuple[float, int, int, int]:
  """(S_in, Z, qmin, qmax) of a layer's input from its stored quantizer state."""
  q = _affine(lp.act, lp.path, "input")
  qmin, qmax = (int(v) for v in q.int_range())
  if not (0 <= qmin and qmax <= 255 or -128 <= qmin and qmax <= 127):
    raise ValueError(f"integer conversion needs input codes in uint8 or int8; {lp.path} has [{qmin}, {qmax}]")
  state = _state(variables, lp.path, "input")
  if not bool(getattr(state.stats, "initialized", True)):
    raise ValueError("observer never saw data: train or calibrate before converting")
  scale, zp = q.grid(None, state, None)
  if np.size(scale) != 1 or np.size(zp) != 1:
    raise ValueError(f"integer conversion needs one input scale per layer; {lp.path} has {np.shape(scale)}")
  return float(np.asarray(scale).reshape(())), int(np.asarray(zp).reshape(())), qmin, qmax


def _grid_record(zp: int, qmin: int, qmax: int) -> InputGrid:
  offset = 128 if qmin >= 0 else 0  # uint8 codes -> int8 for the int8 x int8 kernels
  return InputGrid(*(np.int32(v) for v in (zp, qmin, qmax, offset)))


def _element_scale(decoded: np.ndarray, scales: dict[str, np.ndarray], producers: list[str]) -> np.ndarray:
  """Real scale of every element of a decoded input (producer 0 is the network input)."""
  out = np.empty(decoded.shape[:-1], np.float64)
  for k in np.unique(decoded[..., 0]):
    sel = decoded[..., 0] == k
    out[sel] = scales[producers[k]][decoded[..., 1][sel]]
  return out


def _requant(decoded: np.ndarray, scales: dict, producers: list[str], s_in: float) -> Requant:
  """The multipliers S_producer / S_in per element of a layer's input, per channel when
  that suffices."""
  parts = precise_multiplier(_element_scale(decoded, scales, producers) / s_in)
  flat = [a.reshape(-1, a.shape[-1]) for a in parts]
  if all((f == f[:1]).all() for f in flat):  # the multiplier only varies along channels
    return Requant(*(f[0] for f in flat))
  return Requant(*parts)


def add_fraction_bits(span: int, out_shape: tuple[int, ...]) -> int:
  """Fraction bits F of an ``ops.Add``'s int32 sum: the most (at most 16) for which an
  average over all its positions per channel stays in int32, span 2^F prod(positions)
  <= 2^31 - 1 (|sum| <= span = 2 (qmax - qmin)). The pool's rounding error is then
  2^-(F+1) of the add's step: with 8 bits it moved ~0.4% of a trained ResNet's pooled
  classifier codes by one (tests/test_convert.py), with 16 none."""
  positions = int(np.prod(out_shape[1:-1], dtype=np.int64))
  return int(max(0, min(MAX_ADD_FRACTION_BITS, np.floor(np.log2(INT32_MAX / (span * positions))))))


def _weights(lp: LayerPlan, variables: dict, bn: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(int8 codes, float32 scale per output channel, float32 bias) of a layer's kernel,
  BatchNorm folded, on its weight quantizer's grid (zero point 0 required); the codes
  keep the kernel's layout (output channels on ``lp.out_axis``)."""
  wq = _affine(lp.weight, lp.path, "kernel")
  lo, hi = (int(v) for v in wq.int_range())
  if lo < -128 or hi > 127:
    raise ValueError(f"integer conversion of {lp.path} needs weight codes in int8, got [{lo}, {hi}] from {wq}")
  p = graph.get_path(variables["params"], lp.path)
  w, b = jnp.asarray(p["kernel"], jnp.float32), p.get("bias") if lp.use_bias else None
  if bn is not None:
    w, b = graph.fold_into(w, b, bn, variables["params"], variables.get("batch_stats", {}), out_axis=lp.out_axis)
  # a folded conv's kernel quantizer keeps its state under the BatchNorm (bn_fold.py)
  w_scale, zp = _weight_qparams(wq, w, _state(variables, lp.folded_bn or lp.path, "kernel"), lp.out_axis)
  if np.any(np.asarray(zp) != 0):
    raise ValueError(f"integer conversion of {lp.path} needs symmetric weights (zero point 0), got {wq}")
  c = w.shape[lp.out_axis]
  w_scale = np.asarray(w_scale, np.float32).reshape(-1) * np.ones(c, np.float32)
  per_channel = w_scale.reshape((c,) + (1,) * (-lp.out_axis - 1))  # broadcasts along out_axis
  # the codes, float32 scales and bias of the fake-quant forward, computed the same way
  w_int = np.asarray(_codes(w, jnp.asarray(per_channel), lo, hi)).astype(np.int8)
  bias = np.zeros(c, np.float32) if b is None else np.asarray(b, np.float32)
  return w_int, w_scale, bias


def convert(qmodel: QuantizedModel, variables: dict, x: Array, **apply_kwargs: Any) -> Deploy:
  """QAT/PTQ variables -> ``Deploy`` (see the module docstring). ``x``: an example input."""
  apply_kwargs = eval_kwargs(qmodel.model, apply_kwargs)
  plan = qmodel.plan(x[:1], **apply_kwargs)
  for lp in plan:  # name the quantizer when it is the reason
    for role, q in (("kernel", lp.weight), ("input", lp.act)):
      if q is not None:
        _affine(q, lp.path, role)
  trace = trace_tags(qmodel.model, plan, variables, x, **apply_kwargs)
  bns = {b.path: b for b in plan.batch_norms}
  scales: dict[str, np.ndarray] = {}  # producer -> real scale per output channel (float64)
  layers: dict[str, Any] = {}
  first = None
  for path in trace.producers[1:]:
    lp = plan[path]
    s_in, zp, qmin, qmax = _input_grid(lp, variables)
    grid = _grid_record(zp, qmin, qmax)
    decoded = trace.inputs[path]
    if first is None and any((d[..., 0] == 0).any() for d in decoded):
      first = (s_in, zp, (qmin, qmax))  # the network input arrives on this layer's grid
      scales["<input>"] = np.full(x.shape[-1], s_in, np.float64)
    req = [_requant(d, scales, trace.producers, s_in) for d in decoded]
    if lp.kind == "add":
      bits = add_fraction_bits(2 * (qmax - qmin), trace.out_shapes[path])
      layers[path] = IntAdd(req[0], req[1], grid, bits)
      scales[path] = np.full(trace.out_shapes[path][-1], s_in / 2**bits, np.float64)
      continue
    w_int, w_scale, bias = _weights(lp, variables, bns.get(lp.folded_bn))
    if lp.kind == "conv_transpose" and trace.geometry[path].transpose_kernel:
      # as lax.conv_transpose runs it: spatially flipped, in/out swapped (output channels last)
      w_int = np.swapaxes(np.flip(w_int, tuple(range(w_int.ndim - 2))), -1, -2).copy()
    acc_scale32 = np.float32(s_in) * w_scale
    fields = dict(w=w_int, bias=np.asarray(_codes(jnp.asarray(bias), jnp.asarray(acc_scale32), -(2**30), 2**30)),
                  w_sum=w_int.astype(np.int32).sum(axis=tuple(range(w_int.ndim - 1))).astype(np.int32),
                  requant=req[0], grid=grid)
    if lp.kind == "dense":
      layers[path] = IntDense(**fields)
    else:
      g = trace.geometry[path]
      layers[path] = IntConv(**fields, strides=g.strides, padding=g.padding, dilation=g.dilation, groups=g.groups,
                             input_dilation=g.input_dilation)
    scales[path] = acc_scale32.astype(np.float64)
  for path, decoded in trace.clamps.items():  # ReLU6: 6 on the grid of each element's producer
    hi = np.minimum(np.round(6.0 / _element_scale(decoded, scales, trace.producers)), INT32_MAX)
    flat = hi.reshape(-1, hi.shape[-1])
    layers[path] = IntClamp((flat[0] if (flat == flat[:1]).all() else hi).astype(np.int32))
  if first is None:
    raise ValueError("no quantized layer reads the network input")
  return Deploy(
      layers=jax.tree.map(jnp.asarray, layers), out_scale=jnp.asarray(_element_scale(trace.output, scales,
                                                                                     trace.producers), jnp.float32),
      input_scale=first[0], input_zero_point=first[1], input_range=first[2], model=qmodel.model,
      apply_kwargs=tuple(sorted(apply_kwargs.items())), folded_bns=plan.folded_bns,
      input_shape=tuple(int(d) for d in x.shape[1:]),
  )
