"""Deploying binary/ternary networks: BN -> bias fusion, bit packing, packed inference.

1. ``fuse_bn(qmodel, variables, x)`` turns a trained binary/ternary ``QuantizedModel`` into a
   ``FusedModel`` whose binary/ternary kernels are stored already quantized (codes x alpha)
   and whose BatchNorms are gone:

   * a BN that feeds a sign (micronet's rule: the first k BNs in call order, k = the number
     of layers with a binary input; or the paths given as ``sign_bns``) is folded into the
     preceding conv's **bias only** (``fold_batch_norm(..., feeds_sign=True)``). With k = gamma / sqrt(var + eps) (flax's multiplier),
     sign+(k (z - mu) + beta) = sign+(s (z - mu + beta / k)) for s = sign(k), so the conv
     keeps its codes (k > 0) or flips them (k < 0; codes, not float weights, so the flip is
     exact even for w = 0) and gets the bias s (b - mu + beta / k). gamma = 0 makes the
     output the constant sign+(beta): the channel's alpha (or float kernel) becomes 0 and
     its bias beta (micronet copies w and b unchanged there, which is wrong).
     Max-pools and channel shuffles between the BN and the sign commute with this, because
     the fused pre-activation is a positive multiple of the BN output;
   * every other BN that directly consumes a conv/dense output (the plan's ``follows``) is
     folded normally,
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
import jax
import jax.numpy as jnp

from micronet_jax._src.core import binary as bn_lib
from micronet_jax._src.core.rules import QuantRule
from micronet_jax._src.deploy import graph, records
from micronet_jax._src.deploy.graph import get_path, set_path
from micronet_jax._src.deploy.packing import PackedKernel, pack, unpack, unpack_codes, unpack_tree  # noqa: F401
from micronet_jax._src.deploy.records import FoldedBatchNorm, Xnor
from micronet_jax._src.deploy.runtime import Runtime, xnor_conv, xnor_conv_record, xnor_dense  # noqa: F401
from micronet_jax._src.flax.transform import QuantizedModel, quantize_model

Array = jax.Array
WEIGHT_KINDS = {bn_lib.BinaryWeight: "binary", bn_lib.TernaryWeight: "ternary"}
deploy_bytes = records.nbytes  # bytes of a deploy artifact, packed kernels at their packed size


def _quantized_kernel(wq: Any, kernel: Array, axis: int) -> Array:
  """codes * alpha of a binary/ternary kernel, per output channel on ``axis``."""
  if WEIGHT_KINDS[type(wq)] == "binary":
    return bn_lib.sign_plus(kernel) * bn_lib.binary_alpha(kernel, axis)
  delta = bn_lib.ternary_delta(kernel, axis, wq.threshold)
  return bn_lib.ternary_codes(kernel, delta) * bn_lib.ternary_alpha(kernel, delta, axis)


def fuse_bn(qmodel: QuantizedModel, variables: dict, *args, sign_bns: Sequence[str] | None = None,
            **kwargs) -> tuple["FusedModel", dict]:
  """(fused model, fused variables) for a trained binary/ternary model; see the module doc.

  ``args``/``kwargs`` are example inputs for the model (e.g. ``x, train=False``). The
  kernels of ``BinaryWeight``/``TernaryWeight`` layers are quantized once here (give the
  params as trained, i.e. already centered and clipped). ``sign_bns`` overrides which
  BatchNorm paths feed a sign (default: micronet's counting rule). Layers and BatchNorms
  come from the model plan.
  """
  if not isinstance(qmodel, QuantizedModel):
    raise TypeError(f"fuse_bn expects a QuantizedModel, got {type(qmodel).__name__}")
  plan = qmodel.plan(*args, **kwargs)
  bn_paths = [b.path for b in plan.batch_norms]
  if sign_bns is None:
    k = sum(isinstance(p.act, bn_lib.BinaryActivation) for p in plan)
    sign_bns = bn_paths[:k]
  sign_bns = set(sign_bns)
  unknown = sign_bns - set(bn_paths)
  if unknown:
    raise ValueError(f"sign_bns: no BatchNorm at {sorted(unknown)}; BatchNorms: {bn_paths}")

  params, stats = variables["params"], variables.get("batch_stats", {})
  new_params, new_stats = params, stats
  packed: dict[str, tuple[str, int]] = {}
  fused_bns, bias_on_bn = [], []
  fed = graph.batch_norm_fed_by(plan)
  for lp in plan:
    if lp.kind == "add":
      continue
    wq, bn = lp.weight, fed.get(lp.path)
    if wq is not None and type(wq) not in WEIGHT_KINDS:
      if bn is not None:
        raise ValueError(f"fuse_bn: layer {lp.path} has weight quantizer {type(wq).__name__}; only float, "
                         "BinaryWeight and TernaryWeight layers can be fused")
      continue
    if wq is None and bn is None:
      continue
    kernel = jnp.asarray(get_path(params, f"{lp.path}/kernel"), jnp.float32)
    axis = lp.out_axis % kernel.ndim
    if wq is not None:
      kernel = _quantized_kernel(wq, kernel, axis)
      packed[lp.path] = (WEIGHT_KINDS[type(wq)], axis)
    if bn is not None:
      bias = get_path(params, f"{lp.path}/bias") if lp.use_bias else None
      # a binary kernel times sign(k) (or |k| k / |k|) stays codes * alpha: it packs exactly
      kernel, new_b = graph.fold_into(kernel, bias, bn, params, stats, axis, feeds_sign=bn.path in sign_bns)
      fused_bns.append(bn.path)
      if lp.use_bias:
        new_params = set_path(set_path(new_params, f"{lp.path}/bias", new_b), bn.path, None)
      else:
        new_params = set_path(new_params, bn.path, {"bias": new_b})
        bias_on_bn.append(bn.path)
      new_stats = set_path(new_stats, bn.path, None)
    new_params = set_path(new_params, f"{lp.path}/kernel", kernel)

  rules = [QuantRule(pattern=re.escape(p.path), weight=None if p.path in packed else p.weight, act=p.act)
           for p in plan if p.quantized or p.path in packed]
  xnor = tuple(p for p, (kind, _) in packed.items()
               if kind == "binary" and plan[p].kind in ("conv", "dense")
               and isinstance(plan[p].act, bn_lib.BinaryActivation))
  fused = FusedModel(quantize_model(qmodel.model, rules), tuple(fused_bns), tuple(bias_on_bn),
                     tuple((p, kind, axis) for p, (kind, axis) in packed.items()), xnor)
  out = {**variables, "params": new_params}
  if "batch_stats" in variables:
    out["batch_stats"] = new_stats
  return fused, out


@dataclasses.dataclass(frozen=True)
class FusedModel:
  """A binary/ternary network after ``fuse_bn``: pre-quantized kernels, BatchNorms gone.

  ``apply(variables, *args, xnor=False, **kwargs)`` takes the fused variables, or the
  packed ones from ``pack_variables`` (kernels unpacked on the fly, or XNOR/popcount with
  ``xnor``).
  """

  qmodel: QuantizedModel  # rules: the binary layers' activations; their weights are pre-quantized
  fused_bns: tuple[str, ...]
  bias_on_bn: tuple[str, ...]  # fused BNs of bias-free convs: they add their "bias" param
  packed: tuple[tuple[str, str, int], ...]  # (layer path, "binary" | "ternary", output axis)
  xnor_layers: tuple[str, ...] = ()  # binary weights and binary input: XNOR/popcount-able

  def records(self, xnor: bool = False) -> dict[str, Any]:
    """The runtime records: a ``FoldedBatchNorm`` per fused BN and, with ``xnor``, an
    ``Xnor`` per XNOR layer."""
    recs: dict[str, Any] = {bn: FoldedBatchNorm(adds_bias=bn in self.bias_on_bn) for bn in self.fused_bns}
    if xnor:
      recs.update({p: Xnor() for p in self.xnor_layers})
    return recs

  def apply(self, variables: dict, *args, xnor: bool = False, **kwargs):
    xnor_paths = set(self.xnor_layers) if xnor else set()
    params = variables["params"]
    for path, _, _ in self.packed:
      if path not in xnor_paths:  # the others run as dense/conv on their unpacked kernel
        params = set_path(params, f"{path}/kernel", unpack_tree(get_path(params, f"{path}/kernel")))
    with nn.intercept_methods(Runtime(self.records(xnor))):
      return self.qmodel.apply({**variables, "params": params}, *args, **kwargs)


def pack_variables(fused: FusedModel, variables: dict) -> dict:
  """The fused variables with every binary/ternary kernel as a ``PackedKernel``."""
  params = variables["params"]
  for path, kind, out_axis in fused.packed:
    params = set_path(params, f"{path}/kernel", pack(get_path(params, f"{path}/kernel"), kind, out_axis))
  return {**variables, "params": params}


def deploy_binary(qmodel: QuantizedModel, variables: dict, *args, **kwargs) -> tuple[FusedModel, dict]:
  """``fuse_bn`` then ``pack_variables``: the deploy artifact of a trained binary/ternary model."""
  fused, fv = fuse_bn(qmodel, variables, *args, **kwargs)
  return fused, pack_variables(fused, fv)
