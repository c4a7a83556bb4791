"""Quantization rules: which layer gets which quantizers, as plain data.

A rule matches a layer by the regex ``pattern`` (``re.fullmatch`` on the module path,
e.g. ``"Conv_0"`` or ``"encoder/layers_2/Dense_0"``), by its kind (``LAYER_KINDS``:
``"dense"``, ``"dense_general"``, ``"einsum"``, ``"conv"``, ``"conv_transpose"``,
``"embed"``; ``ACT_ONLY_KINDS``: ``"add"``, ``"attention"``) and optionally by its ``index`` among the layers of
those kinds in call order (0 is the first, -1 the last). The first rule that matches a
layer decides it; a rule with ``weight=None`` and ``act=None`` keeps the layer float,
and a layer no rule matches stays float too. Rules that match nothing are reported.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from micronet_jax._src.core import learned
from micronet_jax._src.core import observers as obs
from micronet_jax._src.core import quantizers as qz
from micronet_jax._src.core.protocol import check_quantizer

# Layers with a weight: Flax's Dense, DenseGeneral, Einsum, Conv, ConvTranspose and Embed
# (Linen and NNX: nnx.Linear is "dense", nnx.LinearGeneral "dense_general").
LAYER_KINDS = ("dense", "dense_general", "einsum", "conv", "conv_transpose", "embed")
# Activation-only kinds: "add", the marked residual add (``ops.Add``); "attention", an
# activation x activation product inside an attention layer (QK^T, PV), both operands
# quantized by the rule's ``act``.
ACT_ONLY_KINDS = ("add", "attention")
KINDS = (*LAYER_KINDS, *ACT_ONLY_KINDS)


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """One rule. ``weight``/``act`` are quantizer specs (see ``quantizers``) or None."""

  pattern: str = ".*"
  weight: Any = None
  act: Any = None
  kinds: tuple[str, ...] = LAYER_KINDS
  index: int | None = None
  fold_bn: bool = False  # fold an nn.BatchNorm that directly consumes this conv's output
  bn_calib: bool = False  # with fold_bn: micronet's bn_fuse_calib variant
  # with fold_bn: the first training batch sets the BN running statistics (micronet's
  # pretrained_model=False, for QAT from scratch); False averages into the loaded ones
  bn_init_from_batch: bool = False

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"QuantRule.pattern {self.pattern!r} is not a valid regex: {e}") from None
    kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
    object.__setattr__(self, "kinds", kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
      raise ValueError(f"QuantRule.kinds must be a non-empty subset of {KINDS}, got {self.kinds!r}")
    if self.index is not None and not isinstance(self.index, int):
      raise ValueError(f"QuantRule.index must be an int or None, got {self.index!r}")
    for name in ("bn_calib", "bn_init_from_batch"):
      if getattr(self, name) and not self.fold_bn:
        raise ValueError(f"QuantRule.{name}=True needs fold_bn=True (it changes how a folded BatchNorm trains)")
    for name in ("weight", "act"):
      check_quantizer(f"QuantRule.{name}", getattr(self, name))

  @property
  def keeps_float(self) -> bool:
    return self.weight is None and self.act is None

  def matches(self, path: str, kind: str, position: int | None, count: int | None) -> bool:
    """Whether this rule applies to the layer at ``path``.

    ``position`` is the layer's index among the layers of ``self.kinds`` in call order
    and ``count`` their total (needed only for a negative ``index``).
    """
    if kind not in self.kinds or re.fullmatch(self.pattern, path) is None:
      return False
    if self.index is None:
      return True
    if self.index >= 0:
      return position == self.index
    return count is not None and position is not None and position - count == self.index


def first_match(rules: Sequence[QuantRule], path: str, kind: str, positions: dict, counts: dict) -> int | None:
  """Index of the first rule in ``rules`` that matches the layer, or None."""
  for i, rule in enumerate(rules):
    if rule.matches(path, kind, positions.get(rule.kinds), counts.get(rule.kinds)):
      return i
  return None


def _bits_or_float(bits: int, make):
  """micronet's convention: 32 bits means "keep float" for that part of the layer."""
  return None if bits == 32 else make(bits)


def dorefa_rules(w_bits: int = 8, a_bits: int = 8, input_scale: float = 0.1) -> tuple[QuantRule, ...]:
  """micronet's DoReFa placement: the first conv/dense layer stays float (weights and
  input), every later one, the classifier included, quantizes its weights and input."""
  return (
      QuantRule(index=0),
      QuantRule(
          weight=_bits_or_float(w_bits, qz.DoReFaWeight),
          act=_bits_or_float(a_bits, lambda b: qz.DoReFaActivation(b, input_scale)),
      ),
  )


def iao_rules(
    w_bits: int = 8,
    a_bits: int = 8,
    *,
    per_channel: bool = True,
    weight_symmetric: bool = True,
    act_symmetric: bool = False,
    observer: obs.Observer = obs.MovingAverageMinMax(),
    fold_bn: bool = False,
    bn_calib: bool = False,
    bn_init_from_batch: bool = False,
) -> tuple[QuantRule, ...]:
  """micronet's IAO placement: every conv/dense layer ("full quantization"), the image
  input of the first layer included. Weights symmetric per output channel, activations
  asymmetric per tensor with a moving-average observer by default; residual adds
  (``ops.Add``) quantize both inputs on one scale. ``fold_bn`` folds
  every BatchNorm that directly consumes a conv into it (see ``bn_fold``);
  ``bn_init_from_batch`` (micronet's default, ``pretrained_model=False``) lets the first
  training batch set the folded BatchNorms' running statistics: use it to train from
  scratch, leave it off to start from a float checkpoint's statistics."""
  return (
      QuantRule(
          weight=_bits_or_float(w_bits, lambda b: qz.AffineWeight(b, weight_symmetric, per_channel)),
          act=_bits_or_float(a_bits, lambda b: qz.AffineActivation(b, act_symmetric, observer)),
          kinds=KINDS, fold_bn=fold_bn, bn_calib=bn_calib, bn_init_from_batch=bn_init_from_batch,
      ),
  )


def binary_rules(w_bits: int = 1, a_bits: int = 1, *, layers: str = "conv", center_clip: bool = True,
                 threshold: float = 0.7) -> tuple[QuantRule, ...]:
  """micronet's wbwtab placement. ``w_bits``: 1 binary (``BinaryWeight``), 2 ternary
  (``TernaryWeight``), 32 float; ``a_bits``: 1 binary activations, 32 float (ReLU).

  ``layers="conv"`` (micronet's): the first and the last conv stay float, every conv in
  between gets the weight quantizer, and with ``a_bits=1`` every conv after the first,
  the last included, binarises its input (micronet turns the ReLUs between the first and
  the last conv into sign). Dense layers stay float. ``layers="all"`` counts dense layers
  too (for networks such as LeNet with two convs): first and last layer float, every
  layer between binarised. With ``a_bits=1`` the model must not apply ReLU in front of
  the binarised layers (see ``micronet_jax._src.core.binary``: build it with ``act=identity``).
  """
  from micronet_jax._src.core import binary

  if w_bits not in (1, 2, 32):
    raise ValueError(f"binary/ternary rules: w_bits must be 1 (binary), 2 (ternary) or 32 (float), got {w_bits!r}")
  if a_bits not in (1, 32):
    raise ValueError(f"binary/ternary rules: a_bits must be 1 (binary) or 32 (float), got {a_bits!r}")
  if layers not in ("conv", "all"):
    raise ValueError(f"binary_rules: layers must be 'conv' or 'all', got {layers!r}")
  weight = {1: binary.BinaryWeight(center_clip), 2: binary.TernaryWeight(threshold), 32: None}[w_bits]
  act = binary.BinaryActivation() if a_bits == 1 else None
  kinds = ("conv", "conv_transpose") if layers == "conv" else ("dense", "conv", "conv_transpose")
  return (
      QuantRule(kinds=kinds, index=0),
      QuantRule(kinds=kinds, index=-1, act=act),
      QuantRule(kinds=kinds, weight=weight, act=act),
  )


def ternary_rules(w_bits: int = 2, a_bits: int = 1, **kwargs) -> tuple[QuantRule, ...]:
  """``binary_rules`` with ternary weights (``w_bits`` 2, or 32 for float)."""
  if w_bits not in (2, 32):
    raise ValueError(f"ternary rules: w_bits must be 2 (ternary) or 32 (float), got {w_bits!r}")
  return binary_rules(w_bits, a_bits, **kwargs)


def lsq_rules(w_bits: int = 4, a_bits: int = 4, *, first_last_bits: int | None = 8, per_channel: bool = False,
              plus: bool = False, fold_bn: bool = False) -> tuple[QuantRule, ...]:
  """LSQ (Esser et al. 2020) on every conv/dense layer, its image input included, so the
  model converts to integers. As in the paper the first and the last layer use
  ``first_last_bits`` (8; None: the same bits as the others) for their weights and input.
  Weights ``LsqWeight`` (per tensor, or ``per_channel``). Inputs ``LsqPlusActivation``
  (a learned step and offset): the first layer's (the image) from the batch's min and
  max, every other one ``start="lsq"``, LSQ's step on the grid the first batch's sign
  calls for (unsigned after a ReLU; signed, zero point 2^(b-1), after a linear
  bottleneck, a residual add, a LayerNorm), since a rule cannot know which inputs are
  signed and an unsigned grid clips half of a signed input to 0. ``plus``: the LSQ+
  paper's min/max start on every input. The activation x activation products of
  attention (kind ``"attention"``: QK^T, PV) quantize both operands the same way at
  ``a_bits``. Residual adds (``ops.Add``) stay float. ``fold_bn`` as in ``iao_rules``.
  The first and the last layer are counted among the layers with weights
  (``LAYER_KINDS``) in call order."""
  def layer(wb: int, ab: int, first: bool = False, **kw) -> QuantRule:
    act = _bits_or_float(ab, lambda b: learned.LsqPlusActivation(b, start="minmax" if first or plus else "lsq"))
    return QuantRule(weight=_bits_or_float(wb, lambda b: learned.LsqWeight(b, per_channel)), act=act,
                     fold_bn=fold_bn, **kw)

  edge_w, edge_a = (w_bits, a_bits) if first_last_bits is None else (first_last_bits, first_last_bits)
  products = () if a_bits == 32 else (
      QuantRule(kinds=("attention",), act=learned.LsqPlusActivation(a_bits, start="minmax" if plus else "lsq")),)
  return (layer(edge_w, edge_a, first=True, index=0), layer(edge_w, edge_a, index=-1), layer(w_bits, a_bits),
          *products)


PACT_WEIGHTS = ("lsq", "dorefa")  # pact_rules(weight=...)


def pact_rules(w_bits: int = 4, a_bits: int = 4, *, weight: str = "lsq", alpha_init: float | None = None,
               per_channel: bool = False) -> tuple[QuantRule, ...]:
  """PACT (Choi et al. 2018) activations in micronet's DoReFa placement: the first
  conv/dense layer stays float, every later one quantizes its weights and its input
  (``PactActivation``: inputs that follow a ReLU; PACT's clip at 0 is that ReLU).

  ``weight``: ``"lsq"`` (the default) learned-step weights (``LsqWeight``, per tensor or
  ``per_channel``), which keep the float weights' scale and put the model on an affine
  grid; ``"dorefa"``: DoReFa weights, the PACT paper's pairing. DoReFa weights lie in
  [-1, 1] whatever the float weights' scale (mean |w| ~0.5 against LeNet's 0.05-0.12),
  so each quantized layer multiplies the activations' scale by ~5-10 and, with no
  BatchNorm to undo it, LeNet's initial logits are ~180 times the float model's. PACT's
  clip follows that scale (alpha starts from the first batch, and Adam moves it by ~lr a
  step), unlike DoReFa's activations, whose fixed ``input_scale`` 0.1 cancels it: on a
  BN-free LeNet PACT with DoReFa weights does not train (train loss 3-14). The PACT
  paper's networks have a BatchNorm after every conv, where the pairing works."""
  if weight not in PACT_WEIGHTS:
    raise ValueError(f"pact_rules: weight must be one of {PACT_WEIGHTS}, got {weight!r}")
  if per_channel and weight != "lsq":
    raise ValueError("pact_rules: per_channel sets LSQ weight steps; DoReFa weights have none")
  make_weight = (lambda b: learned.LsqWeight(b, per_channel)) if weight == "lsq" else qz.DoReFaWeight
  return (
      QuantRule(index=0),
      QuantRule(
          weight=_bits_or_float(w_bits, make_weight),
          act=_bits_or_float(a_bits, lambda b: learned.PactActivation(b, alpha_init)),
      ),
  )


PRESETS = {"dorefa": dorefa_rules, "iao": iao_rules, "binary": binary_rules, "ternary": ternary_rules,
           "lsq": lsq_rules, "pact": pact_rules}


def preset(name: str, w_bits: int = 8, a_bits: int = 8) -> tuple[QuantRule, ...]:
  """Rules of a named preset (``"dorefa"``, ``"iao"``, ``"lsq"``, ``"pact"``, ...; ``"float"``
  gives no rules)."""
  if name == "float":
    return ()
  if name not in PRESETS:
    raise ValueError(f"unknown quantization method {name!r}; choose one of {['float', *PRESETS]}")
  return PRESETS[name](w_bits, a_bits)
