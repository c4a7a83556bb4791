"""Integer-only deployment: QAT/PTQ variables -> int8/int32 deploy pytree -> integer forward.

``convert(qmodel, variables, x)`` returns a ``Deploy``: per quantized layer int8 weights
(symmetric, per output channel), int32 biases (scale S_in * S_w), the input zero point
and int32 fixed-point requantization multipliers and shifts; no float weights. The only
float numbers kept are the per-class scales that turn the final int32 accumulators into
logits at the very end.

``integer_apply(deploy, x_q)`` runs the model's own code with every quantized layer
answered by integer arithmetic:

* values between layers are int32 accumulators (real = scale * acc, real 0 = acc 0),
  so ReLU, max-pooling, reshapes, channel shuffles and concatenations act on them as
  they do on floats, and ``ops.global_avg_pool`` averages them with integer rounding;
* a layer requantizes its input from the producer's scale to its own input grid with
  ``q = clip(round(acc * M) + Z)`` with a 30-bit fixed-point M in int32 arithmetic only
  (see ``precise_mul_shift``), moves it
  to int8, pads with the zero point and runs ``lax.conv_general_dilated`` /
  ``lax.dot_general`` on int8 with int32 accumulation, then subtracts Z * sum(w) and
  adds the int32 bias;
* ``ops.Add`` requantizes both inputs to its shared grid and adds in int32;
* a BatchNorm folded during QAT is already inside its conv's weights and bias.

Which producer (and which of its channels) feeds every element of a layer's input is
found once, in ``convert``, by running the model on "tag" tensors: each producer emits
a distinct integer per channel, and the ops in between carry the tags to the consumer.
An op that does not (a float-only op, a zero-padded average) is reported by name.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.linen.linear import canonicalize_padding

from micronet_jax._src.flax import ops
from micronet_jax._src.core import quantizers as qz
from micronet_jax._src.core.fixed_point import precise_mul_shift, precise_multiplier
from micronet_jax._src.flax.bn_fold import fold_batch_norm
from micronet_jax._src.flax.transform import LayerPlan, QuantizedModel

Array = jax.Array
TAG = 4096  # tag = producer * TAG + channel + 1: exact in float32 up to 4096 producers/channels
ADD_FRACTION_BITS = 8  # an ops.Add's int32 sum is kept at 1/256 of its input step


# ----------------------------------------------------------------------------- deploy pytree


@struct.dataclass
class Deploy:
  """Integer deploy artifact. ``layers[path]`` holds int arrays only; ``out_scale`` turns
  the final int32 accumulators into logits. ``model`` and ``apply_kwargs`` are static."""

  layers: dict[str, dict[str, Array]]
  out_scale: Array
  input_scale: float = struct.field(pytree_node=False)
  input_zero_point: int = struct.field(pytree_node=False)
  input_range: tuple[int, int] = struct.field(pytree_node=False)
  model: nn.Module = struct.field(pytree_node=False)
  apply_kwargs: tuple = struct.field(pytree_node=False, default=())
  folded_bns: tuple[str, ...] = struct.field(pytree_node=False, default=())

  def quantize_input(self, x: Any) -> Array:
    """Float input -> integers on the first layer's input grid (uint8 or int8)."""
    return quantize_input(x, self.input_scale, self.input_zero_point, self.input_range)

  def nbytes(self) -> int:
    return int(sum(np.asarray(a).nbytes for a in jax.tree.leaves((self.layers, self.out_scale))))


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


@functools.partial(jax.jit, static_argnums=0)
def _weight_qparams(wq: qz.AffineWeight, w: Array) -> tuple[Array, Array]:
  """``wq.qparams`` of kernel ``w`` (..., C_out) per output channel, jitted as in the
  fake-quant forward. ``wq`` is a frozen spec, hashed by value: one compilation per
  (spec, kernel shape), shared by every layer and every ``convert``."""
  return wq.qparams(w, -1)


def _is_int(x: Array) -> bool:
  return jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer)


def _requantize(acc: Array, p: dict) -> Array:
  """int32 accumulators -> int8 codes minus the int8 offset on this layer's input grid."""
  q = precise_mul_shift(acc, p["req_m"], p["req_m_lo"], p["req_s"]) + p["in_zp"]
  q = jnp.clip(q, p["in_qmin"], p["in_qmax"])
  return (q - p["in_offset"]).astype(jnp.int8)


def _int_layer(module: nn.Module, p: dict, x_acc: Array) -> Array:
  q8 = _requantize(x_acc, p)
  zp8 = (p["in_zp"] - p["in_offset"]).astype(jnp.int8)
  w = p["w"]
  if isinstance(module, nn.Dense):
    acc = jax.lax.dot_general(q8, w, (((q8.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
  else:
    rank = w.ndim - 2
    strides, dil = _per_dim(module.strides, rank), _per_dim(module.kernel_dilation, rank)
    pad = canonicalize_padding(module.padding, rank)
    if pad in ("SAME", "VALID"):
      window = [(k - 1) * d + 1 for k, d in zip(w.shape[:rank], dil)]
      pad = jax.lax.padtype_to_pads(q8.shape[1:1 + rank], window, strides, pad)
    q8 = jnp.pad(q8, [(0, 0), *pad, (0, 0)], constant_values=zp8)  # real zero, as in float
    nd = q8.ndim
    spatial = tuple(range(1, nd - 1))
    dn = jax.lax.ConvDimensionNumbers((0, nd - 1, *spatial), (nd - 1, nd - 2, *range(nd - 2)), (0, nd - 1, *spatial))
    acc = jax.lax.conv_general_dilated(q8, w, strides, "VALID", rhs_dilation=dil, dimension_numbers=dn,
                                       feature_group_count=module.feature_group_count,
                                       preferred_element_type=jnp.int32)
  return acc - zp8.astype(jnp.int32) * p["w_sum"] + p["bias"]


def _per_dim(v: Any, rank: int) -> tuple[int, ...]:
  if v is None:
    return (1,) * rank
  return tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank


def _int_add(p: dict, a: Array, b: Array) -> Array:
  per = lambda t: {**p, "req_m": p[f"req_m_{t}"], "req_m_lo": p[f"req_m_lo_{t}"], "req_s": p[f"req_s_{t}"]}
  qa = _requantize(a, per("a")).astype(jnp.int32)
  qb = _requantize(b, per("b")).astype(jnp.int32)
  zp8 = p["in_zp"] - p["in_offset"]
  # ADD_FRACTION_BITS extra bits: a pool that averages the sum keeps its fraction
  return ((qa - zp8) + (qb - zp8)) << ADD_FRACTION_BITS


class _IntegerInterceptor:

  def __init__(self, deploy: Deploy, capture: dict | None = None):
    self.d = deploy
    self.capture = capture

  def __call__(self, next_fun, args, kwargs, context):
    module, path = context.module, "/".join(context.module.scope.path)
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm) and path in self.d.folded_bns:
      return args[0]
    if isinstance(module, ops.Add) and path in self.d.layers:
      for v in args:
        _check_int(v, path)
      return _int_add(self.d.layers[path], *args)
    if isinstance(module, (nn.Dense, nn.Conv, nn.ConvTranspose)):
      if path not in self.d.layers:
        raise ValueError(f"layer {path} has no integer version (it is float in the quantized model)")
      _check_int(args[0], path)
      p = self.d.layers[path]
      if self.capture is not None:
        self.capture[path] = _requantize(args[0], p).astype(jnp.int32) + p["in_offset"]
      return _int_layer(module, p, args[0])
    return next_fun(*args, **kwargs)


def _check_int(x: Array, path: str) -> None:
  if not _is_int(x):
    raise ValueError(f"layer {path} receives a {jnp.asarray(x).dtype} tensor in integer inference: an op "
                     "before it is float-only (use micronet_jax._src.flax.ops helpers for averages and residual adds)")


def integer_apply(deploy: Deploy, x_q: Array, dequantize: bool = True, capture: dict | None = None) -> Array:
  """Runs the integer network on ``x_q`` (from ``deploy.quantize_input``).

  Returns float logits ``out_scale * acc`` (the one float multiply, at the end), or the
  int32 accumulators with ``dequantize=False``. With a ``capture`` dict, every conv/dense
  layer's quantized input codes (on its [qmin, qmax] grid) are stored under its path.
  """
  if not _is_int(x_q):
    raise ValueError(f"integer_apply expects uint8/int8 input (deploy.quantize_input), got {x_q.dtype}")
  acc = x_q.astype(jnp.int32) - deploy.input_zero_point
  with nn.intercept_methods(_IntegerInterceptor(deploy, capture)):
    out = deploy.model.apply({}, acc, **dict(deploy.apply_kwargs))
  if not _is_int(out):
    raise ValueError(f"the model's output is {out.dtype} in integer inference: an op after the last layer is "
                     "float-only (use micronet_jax._src.flax.ops.global_avg_pool for averages)")
  return out * deploy.out_scale if dequantize else out


def fake_quant_codes(qmodel: QuantizedModel, variables: dict, x: Array, **apply_kwargs: Any) -> dict[str, Array]:
  """The integer codes r(x / S) + Z that the fake-quant eval forward gives every conv/dense
  layer's input, by path: what ``integer_apply(..., capture=...)`` must reproduce."""
  apply_kwargs = {"train": False, **apply_kwargs}
  plans = {p.path: p for p in qmodel.plan(x[:1], **apply_kwargs)}
  seen: dict[str, Array] = {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    path = "/".join(m.scope.path)
    if (context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.Conv)) and path in plans
        and not hasattr(m, "act_quant")):
      seen[path] = args[0]  # the last call is the swapping pass's (not the discovery pass's)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # outermost: sees the float layers' inputs
    qmodel.apply(variables, x, **apply_kwargs)
  codes = {}
  for path, xin in seen.items():
    q = plans[path].act
    state = variables["quant_stats"]
    for k in path.split("/"):
      state = state[k]
    scale, zp = q.qparams(state["input"])
    qmin, qmax = q.int_range()
    codes[path] = jnp.clip(qz.round_half_away(xin / scale) + zp, qmin, qmax).astype(jnp.int32)
  return codes


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class _Producer:
  name: str
  scale: np.ndarray  # per output channel, float64


class _TagTracer:
  """Runs the float-shaped model on tags to find, for every consumer, which producer
  channel feeds each element of its input."""

  def __init__(self, plans: dict[str, LayerPlan]):
    self.plans = plans
    self.producers: list[str] = ["<input>"]
    self.inputs: dict[str, list[np.ndarray]] = {}  # consumer path -> decoded (producer, channel) per input
    self.modules: dict[str, nn.Module] = {}
    self.skip_bn: set[str] = {p.folded_bn for p in plans.values() if p.folded_bn}
    self.bn_eps: dict[str, float] = {}

  def _decode(self, x: Array, path: str) -> np.ndarray:
    t = np.asarray(x[0], np.float64) - 1
    prod, chan = np.floor_divide(t, TAG), np.mod(t, TAG)
    if np.any(t < 0) or np.any(t != np.round(t)) or np.any(prod >= len(self.producers)):
      raise ValueError(f"the input of {path} is not a quantized tensor carried unchanged from a layer: an op "
                       "between layers is not integer-exact (e.g. a BatchNorm that is not folded: use "
                       "iao_rules(fold_bn=True); a float multiply; a zero-padded average: use micronet_jax._src.flax.ops "
                       "helpers)")
    return np.stack([prod, chan], -1).astype(np.int64)

  def _emit(self, path: str, shape: tuple[int, ...]) -> Array:
    k = len(self.producers)
    self.producers.append(path)
    return jnp.broadcast_to(jnp.arange(shape[-1], dtype=jnp.float32) + k * TAG + 1, shape)

  def __call__(self, next_fun, args, kwargs, context):
    module, path = context.module, "/".join(context.module.scope.path)
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm) and path in self.skip_bn:
      self.bn_eps[path] = module.epsilon
      return args[0]
    is_add = isinstance(module, ops.Add)
    if not is_add and not isinstance(module, (nn.Dense, nn.Conv, nn.ConvTranspose)):
      return next_fun(*args, **kwargs)
    plan = self.plans.get(path)
    if plan is None or plan.act is None or (not is_add and plan.weight is None):
      raise ValueError(f"layer {path} is not fully quantized; integer conversion needs weights and inputs "
                       "of every layer quantized")
    self.modules[path] = module
    self.inputs[path] = [self._decode(a, path) for a in (args if is_add else args[:1])]
    out = args[0] if is_add else next_fun(*args, **kwargs)
    return self._emit(path, out.shape)


def _input_qparams(plan: LayerPlan, stats: Any) -> tuple[float, int, int, int]:
  q = plan.act
  if not isinstance(q, qz.AffineActivation):
    raise ValueError(f"integer conversion supports affine (IAO) activations, not {type(q).__name__}")
  if q.bits > 8:
    raise ValueError(f"integer conversion needs activations of at most 8 bits, got {q.bits}")
  if not bool(stats.initialized):
    raise ValueError("observer never saw data: train or calibrate before converting")
  scale, zp = q.qparams(stats)
  qmin, qmax = q.int_range()
  return float(scale), int(zp), qmin, qmax


def convert(qmodel: QuantizedModel, variables: dict, x: Array, **apply_kwargs: Any) -> Deploy:
  """QAT/PTQ variables -> ``Deploy`` (see the module docstring). ``x``: an example input."""
  apply_kwargs = {"train": False, **apply_kwargs}
  plans = {p.path: p for p in qmodel.plan(x[:1], **apply_kwargs)}
  for p in plans.values():  # name the quantizer when it is the reason
    for q in (p.weight, p.act):
      if q is not None and not isinstance(q, (qz.AffineWeight, qz.AffineActivation)):
        raise ValueError(f"integer conversion supports affine (IAO) quantizers; layer {p.path} uses "
                         f"{type(q).__name__}")
  tracer = _TagTracer(plans)
  x_tag = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.float32) + 1, (1, *x.shape[1:]))
  with nn.intercept_methods(tracer):
    out = qmodel.model.apply(variables, x_tag, **apply_kwargs)
  out_map = tracer._decode(out, "the output")
  stats = variables.get("quant_stats", {})
  params = variables["params"]
  bstats = variables.get("batch_stats", {})

  def lookup(tree, path):
    for k in path.split("/"):
      tree = tree[k]
    return tree

  producers: dict[str, _Producer] = {}
  layers: dict[str, dict[str, Any]] = {}
  first = None
  for path in tracer.producers[1:]:
    plan, module = plans[path], tracer.modules[path]
    if not isinstance(plan.act, qz.AffineActivation):
      raise ValueError(f"integer conversion supports affine (IAO) activations; {path} has "
                       f"{type(plan.act).__name__}")
    s_in, zp, qmin, qmax = _input_qparams(plan, lookup(stats, path)["input"])
    offset = 128 if qmin >= 0 else 0
    entry: dict[str, Any] = {"in_zp": np.int32(zp), "in_qmin": np.int32(qmin), "in_qmax": np.int32(qmax),
                             "in_offset": np.int32(offset)}
    decoded = tracer.inputs[path]
    if first is None and any((d[..., 0] == 0).any() for d in decoded):
      first = (s_in, zp, (qmin, qmax))  # the network input arrives on this layer's grid
    if plan.kind == "add":
      for tag, d in zip("ab", decoded):
        entry[f"req_m_{tag}"], entry[f"req_m_lo_{tag}"], entry[f"req_s_{tag}"] = _requant_arrays(
            d, producers, s_in, first)
      layers[path] = entry
      channels = decoded[0].shape[-2]  # decoded: (..., C, 2)
      producers[path] = _Producer(path, np.full(channels, s_in / 2**ADD_FRACTION_BITS, np.float64))
      continue
    w = np.asarray(lookup(params, path)["kernel"], np.float32)
    b = lookup(params, path).get("bias") if module.use_bias else None
    if plan.folded_bn:
      bn_p, bn_s = lookup(params, plan.folded_bn), lookup(bstats, plan.folded_bn)
      c = w.shape[-1]
      w, b = fold_batch_norm(jnp.asarray(w), None if b is None else jnp.asarray(b), bn_p.get("scale", jnp.ones(c)),
                             bn_p.get("bias", jnp.zeros(c)), bn_s["mean"], bn_s["var"],
                             tracer.bn_eps[plan.folded_bn])
      w = np.asarray(w)
    wq = plan.weight
    if not (isinstance(wq, qz.AffineWeight) and wq.symmetric and wq.bits <= 8):
      raise ValueError(f"integer conversion of {path} needs symmetric affine weights of at most 8 bits, got {wq}")
    if isinstance(module, nn.ConvTranspose):
      raise ValueError(f"integer conversion does not support conv-transpose layers yet ({path})")
    w_scale, _ = _weight_qparams(wq, jnp.asarray(w))
    w_scale = np.asarray(w_scale, np.float32).reshape(-1) * np.ones(w.shape[-1], np.float32)
    # the codes, float32 scales and bias of the fake-quant forward, computed the same way
    w_int = np.asarray(_codes(jnp.asarray(w), jnp.asarray(w_scale), *wq.int_range())).astype(np.int8)
    acc_scale32 = np.float32(s_in) * w_scale
    acc_scale = acc_scale32.astype(np.float64)
    bias = np.zeros(w.shape[-1], np.float32) if b is None else np.asarray(b, np.float32)
    entry.update(
        w=w_int, w_sum=w_int.astype(np.int32).sum(axis=tuple(range(w_int.ndim - 1))).astype(np.int32),
        bias=np.asarray(_codes(jnp.asarray(bias), jnp.asarray(acc_scale32), -(2**30), 2**30)),
    )
    entry["req_m"], entry["req_m_lo"], entry["req_s"] = _requant_arrays(decoded[0], producers, s_in, first)
    layers[path] = entry
    producers[path] = _Producer(path, acc_scale)
  if first is None:
    raise ValueError("no quantized layer reads the network input")
  out_scale = _element_scale(out_map, producers, first)
  s_first, zp_first, rng = first
  return Deploy(
      layers=jax.tree.map(jnp.asarray, layers), out_scale=jnp.asarray(out_scale, jnp.float32),
      input_scale=s_first, input_zero_point=zp_first, input_range=rng, model=qmodel.model,
      apply_kwargs=tuple(sorted(apply_kwargs.items())),
      folded_bns=tuple(p.folded_bn for p in plans.values() if p.folded_bn),
  )


def _element_scale(decoded: np.ndarray, producers: dict[str, _Producer], first) -> np.ndarray:
  """Real scale of every element of a decoded input (producer 0 is the network input)."""
  scales = np.empty(decoded.shape[:-1], np.float64)
  for k in np.unique(decoded[..., 0]):
    sel = decoded[..., 0] == k
    if k == 0:
      scales[sel] = first[0]
    else:
      name = list(producers)[k - 1]
      scales[sel] = producers[name].scale[decoded[..., 1][sel]]
  return scales


def _requant_arrays(decoded: np.ndarray, producers, s_in: float, first) -> tuple[np.ndarray, ...]:
  """(m_hi, m_lo, s) per element of a layer's input, per channel when that suffices."""
  parts = precise_multiplier(_element_scale(decoded, producers, first) / s_in)
  flat = [a.reshape(-1, a.shape[-1]) for a in parts]
  if all((f == f[:1]).all() for f in flat):  # the multiplier only varies along channels
    return tuple(f[0] for f in flat)
  return parts
