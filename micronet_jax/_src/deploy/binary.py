"""Deploying binary/ternary networks: BN -> bias fusion, bit packing, packed inference.

1. ``fuse_bn(qmodel, variables, x)`` turns a trained binary/ternary ``QuantizedModel`` into a
   ``FusedModel`` whose binary/ternary kernels are stored already quantized (codes x alpha)
   and whose BatchNorms are gone:

   * a BN that feeds a sign (micronet's rule: the first k BNs in call order, k = the number
     of layers with a binary input; or the paths given as ``sign_bns``) is folded into the
     preceding conv's **bias only**. With k = gamma / sqrt(var + eps) (flax's multiplier),
     sign+(k (z - mu) + beta) = sign+(s (z - mu + beta / k)) for s = sign(k), so the conv
     keeps its codes (k > 0) or flips them (k < 0; codes, not float weights, so the flip is
     exact even for w = 0) and gets the bias s (b - mu + beta / k). gamma = 0 makes the
     output the constant sign+(beta): the channel's alpha (or float kernel) becomes 0 and
     its bias beta (micronet copies w and b unchanged there, which is wrong).
     Max-pools and channel shuffles between the BN and the sign commute with this, because
     the fused pre-activation is a positive multiple of the BN output;
   * every other BN that directly consumes a conv/dense output is folded normally,
     W' = W k, b' = beta + (b - mu) k (for binary/ternary layers: alpha' = alpha |k| and the
     codes flip where k < 0).

2. ``pack(fused, variables)`` replaces each binary kernel by a ``PackedKernel`` of 1 bit per
   weight (2 bits for ternary: 0 -> 00, +1 -> 01, -1 -> 11) plus one float32 alpha per
   output channel; ``unpack`` restores the fused kernel exactly.

3. ``FusedModel.apply(deploy_variables, x, xnor=False)`` runs packed variables (unpacking
   kernels on the fly); with ``xnor=True`` every layer with binary weights and a binary
   input computes ``alpha * (n_valid - 2 popcount((x XOR w) AND valid)) + b`` with
   ``jnp`` bit operations on 32-bit words (``valid`` masks zero padding, which is neither
   +1 nor -1). Both agree with the fake-quant model (tests).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from micronet_jax._src.core import binary as bn_lib
from micronet_jax._src.flax.layers import LAYER_KIND, QuantConv, QuantDense
from micronet_jax._src.core.rules import QuantRule
from micronet_jax._src.flax.transform import QuantizedModel, quantize_model

Array = jax.Array
WEIGHT_KINDS = {bn_lib.BinaryWeight: "binary", bn_lib.TernaryWeight: "ternary"}

# ----------------------------------------------------------------------------- packing


@flax.struct.dataclass
class PackedKernel:
  """A binary (1 bit) or ternary (2 bit) kernel: ``bits`` (uint8, one row per output
  channel, little-endian within a byte), ``alpha`` (float32, one per output channel)."""

  bits: Array
  alpha: Array
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  out_axis: int = flax.struct.field(pytree_node=False)
  kind: str = flax.struct.field(pytree_node=False)

  @property
  def nbytes(self) -> int:
    return int(self.bits.size * self.bits.dtype.itemsize + self.alpha.size * self.alpha.dtype.itemsize)


def _to_rows(w: Array, out_axis: int) -> Array:
  return jnp.moveaxis(w, out_axis, 0).reshape(w.shape[out_axis], -1)


def _from_rows(rows: Array, shape: tuple[int, ...], out_axis: int) -> Array:
  moved = (shape[out_axis], *[d for i, d in enumerate(shape) if i != out_axis % len(shape)])
  return jnp.moveaxis(rows.reshape(moved), 0, out_axis)


def _pack_fields(fields: np.ndarray, width: int) -> np.ndarray:
  """(O, n) unsigned fields of ``width`` bits -> (O, ceil(n * width / 8)) uint8 (numpy)."""
  per = 8 // width
  o, n = fields.shape
  fields = np.pad(fields.astype(np.uint8), ((0, 0), (0, -n % per))).reshape(o, -1, per)
  shifts = (np.arange(per) * width).astype(np.uint8)
  return np.bitwise_or.reduce(fields << shifts, axis=-1).astype(np.uint8)


def _unpack_fields(packed: Array, width: int, n: int) -> Array:
  per = 8 // width
  shifts = jnp.arange(per, dtype=jnp.uint8) * width
  fields = (packed[..., None] >> shifts) & jnp.uint8(2**width - 1)
  return fields.reshape(packed.shape[0], -1)[:, :n]


def pack(kernel: Array, kind: str, out_axis: int = -1) -> PackedKernel:
  """Packs an already quantized kernel (codes x alpha per output channel), in numpy.

  Raises ValueError if the kernel is not binary (|w| = alpha everywhere in a channel) or
  ternary (|w| in {0, alpha}).
  """
  if kind not in ("binary", "ternary"):
    raise ValueError(f"pack: kind must be 'binary' or 'ternary', got {kind!r}")
  k = np.asarray(kernel, np.float32)
  axis = out_axis % k.ndim
  rows = np.moveaxis(k, axis, 0).reshape(k.shape[axis], -1)
  mag = np.abs(rows)
  alpha = mag.max(axis=1)
  ok = (mag == alpha[:, None]) | (alpha[:, None] == 0)
  if kind == "ternary":
    ok |= mag == 0
  if not ok.all():
    raise ValueError(f"pack: kernel of shape {k.shape} is not {kind} per output channel")
  if kind == "binary":
    bits = _pack_fields(rows > 0, 1)
  else:
    bits = _pack_fields(np.where(rows > 0, 1, np.where(rows < 0, 3, 0)), 2)
  return PackedKernel(jnp.asarray(bits), jnp.asarray(alpha), k.shape, axis, kind)


def unpack_codes(pk: PackedKernel) -> Array:
  """The codes, in {-1, +1} (binary) or {-1, 0, +1} (ternary), float32, kernel-shaped."""
  n = int(np.prod(pk.shape)) // pk.shape[pk.out_axis]
  if pk.kind == "binary":
    codes = _unpack_fields(pk.bits, 1, n).astype(jnp.float32) * 2 - 1
  else:
    f = _unpack_fields(pk.bits, 2, n).astype(jnp.int8)
    codes = jnp.where(f >= 2, f - 4, f).astype(jnp.float32)
  return _from_rows(codes, pk.shape, pk.out_axis)


def unpack(pk: PackedKernel) -> Array:
  """The kernel, codes x alpha, bit-identical to the kernel that was packed."""
  shape = [1] * len(pk.shape)
  shape[pk.out_axis] = -1
  return unpack_codes(pk) * pk.alpha.reshape(shape)


def _is_packed(v) -> bool:
  return isinstance(v, PackedKernel)


def unpack_tree(tree: Any) -> Any:
  """Every ``PackedKernel`` in ``tree`` replaced by its float kernel."""
  return jax.tree.map(lambda v: unpack(v) if _is_packed(v) else v, tree, is_leaf=_is_packed)


def deploy_bytes(variables: Any) -> int:
  """Bytes of every array in ``variables`` (packed kernels at their packed size)."""
  leaves = jax.tree.leaves(variables, is_leaf=_is_packed)
  return sum(v.nbytes if _is_packed(v) else int(np.asarray(v).nbytes) for v in leaves)


# ----------------------------------------------------------------------------- tree helpers


def _get(tree: dict, path: str, default=None):
  for k in path.split("/"):
    if not hasattr(tree, "keys") or k not in tree:
      return default
    tree = tree[k]
  return tree


def _set(tree: dict, path: str, value) -> dict:
  """A copy of ``tree`` with ``path`` (a/b/c) set to ``value`` (None deletes it)."""
  head, _, rest = path.partition("/")
  out = dict(tree)
  if rest:
    out[head] = _set(tree.get(head, {}), rest, value)
    if not out[head]:
      del out[head]
  elif value is None:
    out.pop(head, None)
  else:
    out[head] = value
  return out


# ----------------------------------------------------------------------------- fusion


@dataclasses.dataclass(frozen=True)
class _Layer:
  path: str
  kind: str  # dense / conv / conv_transpose
  out_axis: int
  use_bias: bool


def _discover(qmodel: QuantizedModel, variables: dict, args, kwargs):
  """(layers by path, BN calls in order as (path, epsilon, paired layer path or None))."""
  layers: dict[str, _Layer] = {}
  outputs: dict[int, tuple[str, Any]] = {}
  bns: list[tuple[str, float, str | None]] = []

  def recorder(next_fun, a, kw, context):
    m = context.module
    if context.method_name != "__call__":
      return next_fun(*a, **kw)
    if isinstance(m, nn.BatchNorm):
      x = a[0] if a else kw.get("x")
      hit = outputs.get(id(x))
      paired = hit[0] if hit is not None and hit[1] is x and m.axis in (-1, x.ndim - 1) else None
      bns.append(("/".join(m.scope.path), m.epsilon, paired, m.use_scale, m.use_bias))
      return next_fun(*a, **kw)
    out = next_fun(*a, **kw)
    if isinstance(m, tuple(LAYER_KIND)):
      path = "/".join(m.scope.path)
      base = next(b for b in LAYER_KIND if isinstance(m, b))
      transposed = isinstance(m, nn.ConvTranspose) and m.transpose_kernel
      layers[path] = _Layer(path, LAYER_KIND[base], -2 if transposed else -1, m.use_bias)
      outputs[id(out)] = (path, out)
    return out

  with nn.intercept_methods(recorder):
    jax.eval_shape(lambda v: qmodel.apply(v, *args, **kwargs), variables)
  return layers, bns


def _channel(v: Array, ndim: int, out_axis: int) -> Array:
  shape = [1] * ndim
  shape[out_axis] = -1
  return v.reshape(shape)


def fuse_bn(qmodel: QuantizedModel, variables: dict, *args, sign_bns: Sequence[str] | None = None,
            **kwargs) -> tuple["FusedModel", dict]:
  """(fused model, fused variables) for a trained binary/ternary model; see the module doc.

  ``args``/``kwargs`` are example inputs for the model (e.g. ``x, train=False``). The
  kernels of ``BinaryWeight``/``TernaryWeight`` layers are quantized once here (give the
  params as trained, i.e. already centered and clipped). ``sign_bns`` overrides which
  BatchNorm paths feed a sign (default: micronet's counting rule).
  """
  if not isinstance(qmodel, QuantizedModel):
    raise TypeError(f"fuse_bn expects a QuantizedModel, got {type(qmodel).__name__}")
  plans = {p.path: p for p in qmodel.plan(*args, **kwargs)}
  layers, bns = _discover(qmodel, variables, args, kwargs)
  if sign_bns is None:
    k = sum(isinstance(p.act, bn_lib.BinaryActivation) for p in plans.values())
    sign_bns = [b[0] for b in bns[:k]]
  sign_bns = set(sign_bns)
  unknown = sign_bns - {b[0] for b in bns}
  if unknown:
    raise ValueError(f"sign_bns: no BatchNorm at {sorted(unknown)}; BatchNorms: {[b[0] for b in bns]}")

  params = variables["params"]
  stats = variables.get("batch_stats", {})
  new_params, new_stats = params, stats
  packed: dict[str, str] = {}
  fused_bns, bias_on_bn = [], []
  by_layer = {b[2]: b for b in bns if b[2] is not None}
  for path, layer in layers.items():
    plan = plans.get(path)
    wq = plan.weight if plan is not None else None
    bn = by_layer.get(path)
    if wq is not None and type(wq) not in WEIGHT_KINDS:
      if bn is not None:
        raise ValueError(f"fuse_bn: layer {path} has weight quantizer {type(wq).__name__}; only float, "
                         "BinaryWeight and TernaryWeight layers can be fused")
      continue
    if wq is None and bn is None:
      continue
    kernel = jnp.asarray(_get(params, f"{path}/kernel"), jnp.float32)
    ndim, axis = kernel.ndim, layer.out_axis % kernel.ndim
    bias = _get(params, f"{path}/bias") if layer.use_bias else None
    if wq is not None:
      kind = WEIGHT_KINDS[type(wq)]
      if kind == "binary":
        codes, alpha = bn_lib.sign_plus(kernel), bn_lib.binary_alpha(kernel, axis)
      else:
        delta = bn_lib.ternary_delta(kernel, axis, wq.threshold)
        codes, alpha = bn_lib.ternary_codes(kernel, delta), bn_lib.ternary_alpha(kernel, delta, axis)
      packed[path] = (kind, axis)
    if bn is not None:
      bn_path, eps, _, use_scale, use_bias = bn
      c = kernel.shape[axis]
      gamma = _get(params, f"{bn_path}/scale") if use_scale else jnp.ones((c,), jnp.float32)
      beta = _get(params, f"{bn_path}/bias") if use_bias else jnp.zeros((c,), jnp.float32)
      mean, var = _get(stats, f"{bn_path}/mean"), _get(stats, f"{bn_path}/var")
      mul = jax.lax.rsqrt(var + eps) * gamma  # flax's BatchNorm multiplier
      b = jnp.zeros((c,), jnp.float32) if bias is None else bias
      flip = jnp.where(mul < 0, -1.0, 1.0)
      if bn_path in sign_bns:
        dead = mul == 0
        safe = jnp.where(dead, 1.0, mul)
        new_b = jnp.where(dead, beta, flip * (b - mean + beta / safe))
        scale = jnp.where(dead, 0.0, flip)  # per-channel factor on the kernel
      else:
        new_b = beta + (b - mean) * mul
        scale = mul
      if wq is not None:
        codes = codes * _channel(flip, ndim, axis)
        alpha = alpha * _channel(jnp.abs(scale), ndim, axis)
      else:
        kernel = kernel * _channel(scale, ndim, axis)
      fused_bns.append(bn_path)
      if layer.use_bias:
        new_params = _set(new_params, f"{path}/bias", new_b)
        new_params = _set(new_params, bn_path, None)
      else:
        new_params = _set(new_params, bn_path, {"bias": new_b})
        bias_on_bn.append(bn_path)
      new_stats = _set(new_stats, bn_path, None)
    if wq is not None:
      kernel = codes * alpha
    new_params = _set(new_params, f"{path}/kernel", kernel)

  rules = []
  for path, p in plans.items():
    if p.quantized or path in packed:
      rules.append(QuantRule(pattern=re.escape(path), weight=None if path in packed else p.weight, act=p.act))
  xnor = tuple(p for p, (kind, _) in packed.items()
               if kind == "binary" and layers[p].kind in ("conv", "dense")
               and isinstance(plans[p].act, bn_lib.BinaryActivation))
  fused = FusedModel(quantize_model(qmodel.model, rules), tuple(fused_bns), tuple(bias_on_bn),
                     tuple((p, kind, axis) for p, (kind, axis) in packed.items()), xnor)
  out = {**variables, "params": new_params}
  if "batch_stats" in variables:
    out["batch_stats"] = new_stats
  return fused, out


# ----------------------------------------------------------------------------- inference


def _pack32(bits: Array) -> Array:
  """(..., n) booleans -> (..., ceil(n / 32)) uint32 words, little-endian."""
  n = bits.shape[-1]
  bits = jnp.pad(bits.astype(jnp.uint32), [(0, 0)] * (bits.ndim - 1) + [(0, -n % 32)])
  bits = bits.reshape(*bits.shape[:-1], -1, 32)
  return jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def _popcount(words: Array) -> Array:
  return jnp.sum(jax.lax.population_count(words).astype(jnp.int32), axis=-1)


def xnor_dense(x: Array, pk: PackedKernel) -> Array:
  """sign+(x) @ (codes * alpha) for binary weights, by XNOR and popcount (no bias)."""
  n = x.shape[-1]
  xw = _pack32(x >= 0)  # (..., words)
  ww = _pack32(jnp.moveaxis(unpack_codes(pk), -1, 0) > 0)  # (out, words)
  mism = _popcount(jnp.bitwise_xor(xw[..., None, :], ww))
  return (n - 2 * mism).astype(jnp.float32) * pk.alpha


def xnor_conv(x: Array, pk: PackedKernel, module: nn.Conv) -> Array:
  """conv(sign+(x), codes * alpha) for binary HWIO weights by XNOR and popcount (no bias).

  The conv's zero padding is masked out (it is neither +1 nor -1); strides, padding,
  dilations and feature groups are ``module``'s.
  """
  from flax.linen.linear import canonicalize_padding

  kh, kw, cg, o = pk.shape
  groups = module.feature_group_count
  padding = canonicalize_padding(module.padding, 2)
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    raise NotImplementedError(f"xnor_conv: padding {padding!r}")
  pair = lambda v: (1, 1) if v is None else (v, v) if isinstance(v, int) else tuple(v)
  kwargs = dict(filter_shape=(kh, kw), window_strides=pair(module.strides), padding=padding,
                lhs_dilation=pair(module.input_dilation), rhs_dilation=pair(module.kernel_dilation),
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  xb = jax.lax.conv_general_dilated_patches((x >= 0).astype(jnp.float32), **kwargs)
  valid = jax.lax.conv_general_dilated_patches(jnp.ones((1, *x.shape[1:]), jnp.float32), **kwargs)
  lead = xb.shape[:-1]
  xw = _pack32(xb.reshape(*lead, groups, -1) > 0.5)  # (N, H, W, G, words)
  vw = _pack32(valid.reshape(*valid.shape[:-1], groups, -1) > 0.5)  # (1, H, W, G, words)
  codes = jnp.transpose(unpack_codes(pk), (3, 2, 0, 1)).reshape(groups, o // groups, -1)  # (G, Og, cg*kh*kw)
  ww = _pack32(codes > 0)  # (G, Og, words)
  mism = _popcount(jnp.bitwise_xor(xw[..., None, :], ww) & vw[..., None, :])  # (N, H, W, G, Og)
  n_valid = _popcount(vw)[..., None]  # (1, H, W, G, 1)
  dot = (n_valid - 2 * mism).reshape(*lead, o)
  return dot.astype(jnp.float32) * pk.alpha


@dataclasses.dataclass(frozen=True)
class FusedModel:
  """A binary/ternary network after ``fuse_bn``: pre-quantized kernels, BatchNorms gone.

  ``apply(variables, *args, xnor=False, **kwargs)`` takes the fused variables, or the
  packed ones from ``pack`` (kernels unpacked on the fly, or XNOR/popcount with ``xnor``).
  """

  qmodel: QuantizedModel  # rules: the binary layers' activations; their weights are pre-quantized
  fused_bns: tuple[str, ...]
  bias_on_bn: tuple[str, ...]  # fused BNs of bias-free convs: they add their "bias" param
  packed: tuple[tuple[str, str, int], ...]  # (layer path, "binary" | "ternary", output axis)
  xnor_layers: tuple[str, ...] = ()  # binary weights and binary input: XNOR/popcount-able

  def apply(self, variables: dict, *args, xnor: bool = False, **kwargs):
    xnor_paths = set(self.xnor_layers) if xnor else set()
    params = variables["params"]
    for p in self.packed:
      if p[0] not in xnor_paths:
        params = _set(params, f"{p[0]}/kernel", unpack_tree(_get(params, f"{p[0]}/kernel")))
    variables = {**variables, "params": params}
    fused, on_bn = set(self.fused_bns), set(self.bias_on_bn)

    def interceptor(next_fun, a, kw, context):
      m = context.module
      if context.method_name != "__call__":
        return next_fun(*a, **kw)
      path = "/".join(m.scope.path)
      if isinstance(m, nn.BatchNorm) and path in fused:
        x = a[0] if a else kw["x"]
        return x + m.get_variable("params", "bias") if path in on_bn else x
      if path in xnor_paths and isinstance(m, (QuantConv, QuantDense)):
        pk = m.get_variable("params", "kernel")
        if not _is_packed(pk):
          raise ValueError(f"xnor=True needs packed variables (pack_variables); {path}'s kernel is not packed")
        x = a[0] if a else kw["inputs"]
        y = xnor_conv(x, pk, m) if isinstance(m, QuantConv) else xnor_dense(x, pk)
        return y + m.get_variable("params", "bias") if m.use_bias else y
      return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
      return self.qmodel.apply(variables, *args, **kwargs)


def pack_variables(fused: FusedModel, variables: dict) -> dict:
  """The fused variables with every binary/ternary kernel as a ``PackedKernel``."""
  params = variables["params"]
  for path, kind, out_axis in fused.packed:
    params = _set(params, f"{path}/kernel", pack(_get(params, f"{path}/kernel"), kind, out_axis))
  return {**variables, "params": params}


def deploy_binary(qmodel: QuantizedModel, variables: dict, *args, **kwargs) -> tuple[FusedModel, dict]:
  """``fuse_bn`` then ``pack_variables``: the deploy artifact of a trained binary/ternary model."""
  fused, fv = fuse_bn(qmodel, variables, *args, **kwargs)
  return fused, pack_variables(fused, fv)
