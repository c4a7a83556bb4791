"""Quantized NNX layers: NNX's own layer code on operands quantized through the core.

``QuantLinear``, ``QuantConv`` and ``QuantConvTranspose`` subclass ``nnx.Linear``,
``nnx.Conv`` and ``nnx.ConvTranspose`` and are made *from* a float layer: they take its
public attributes, its ``kernel`` and ``bias`` ``nnx.Param`` objects included, so the
graph state keeps its paths and a float checkpoint loads unchanged. They add

* the quantizer specs ``weight_quant``/``act_quant`` (static) and ``path``, the layer's
  Linen module path (what the seam reports; rules and plans key on it);
* the quantizers' trainable params as ``nnx.Param`` attributes ``<role>_<name>``
  (``kernel_step``), which ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` trains;
* their observed statistics as one ``QuantStats`` attribute, ``quant_stats``, holding
  ``{role: stats}`` (``{'input': RangeState}``);
* ``use_running_average``: as for ``nnx.BatchNorm``, True freezes the statistics, False
  (``model.train()``, the default) lets them move; ``model.eval()`` freezes them.

The forward is the float layer's own ``__call__`` (padding modes, masks, batch axes and
dtypes are NNX's code): every NNX layer with a weight hands ``(inputs, kernel, bias)``
to ``self.promote_dtype`` right before its matmul/conv, and in a quantized layer that is
a method that fake-quantizes them through ``NnxSeam`` (the input by ``act_quant``, the
kernel per output channel by ``weight_quant``, the bias onto the int32 accumulator grid)
and then calls the float layer's ``promote_dtype`` (kept as ``float_promote_dtype``). These
are the core functions Linen's ``QuantOperands`` calls on a ``LinenSeam``, so the two
frameworks compute the same numbers and gradients, and no Linen code runs.

BatchNorm folding: a conv that a rule folds (``fold_into``: its BatchNorm's path)
returns its float output z (the batch statistics are those of z), and hands its
quantized input, its kernel and bias and a ``kernel -> conv(x_q, kernel)`` function to
the ``FoldedBatchNorm`` through a ``FoldLink`` both hold: a state-less node of the
model, so it follows ``nnx.split``/``merge``/``clone`` and transforms like the layers
do, holds a value only between the conv's call and the BatchNorm's, and adds no state.
The BatchNorm checks it is called on that very z, then runs
``core.bn_fold.folded_conv_bn`` on its own seam, as Linen's BatchNorm call does.

No module-level mutable state and no private NNX attribute: the layers are built with
public attributes, ``nnx.data`` and ``nnx.Param``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from micronet_jax._src.core import seam as core
from micronet_jax._src.core.bn_fold import BN_INIT_FLAG, BatchNormParams, folded_conv_bn
from micronet_jax._src.core.seam import INPUT_STATS
from micronet_jax._src.nnx.seam import NnxSeam, QuantStats

Array = jax.Array
# Attributes that the flax layers declare data even when None (``self.bias = nnx.data(None)``):
# copied as data so the quantized layer's graph has the float one's shape.
_DATA_WHEN_NONE = ("bias", "scale")


def copy_layer(new: nnx.Module, old: nnx.Module, keep_promote_dtype: bool = False) -> None:
  """Gives ``new`` every public attribute of ``old`` (the same ``Variable`` objects).
  Its ``promote_dtype`` is kept as ``float_promote_dtype`` (a quantized layer's
  ``promote_dtype`` is a method) unless ``keep_promote_dtype``. Arrays, Variables and
  modules are data, as NNX decides on assignment."""
  for k, v in vars(old).items():
    if k.startswith("_"):  # NNX's own bookkeeping: the new layer has its own
      continue
    if k == "promote_dtype" and not keep_promote_dtype:
      new.float_promote_dtype = v
    else:
      setattr(new, k, nnx.data(v) if v is None and k in _DATA_WHEN_NONE else v)


def add_quant_state(m: nnx.Module, params: dict | None, stats: Any, float_names: tuple[str, ...]) -> None:
  """Quantizer params (every entry of ``params`` not in ``float_names``) as ``nnx.Param``
  attributes, the statistics ``{role: stats}`` as the ``quant_stats`` attribute."""
  for k in sorted(params or {}):
    if k not in float_names:
      setattr(m, k, nnx.Param(params[k]))
  if stats:
    m.quant_stats = QuantStats(dict(stats))


# ----------------------------------------------------------------------------- conv -> BN hand-off


class FoldInput(NamedTuple):
  """What a folded conv hands its BatchNorm in one forward."""

  z: Array  # the conv's float output (the BatchNorm must be called on this array)
  kernel: Array  # the conv's float kernel
  bias: Array | None  # the conv's float bias
  conv: Callable[[Array], Array]  # kernel -> conv(x_q, kernel), no bias
  input_scale: Array | None  # S_in of the conv's affine input quantizer, or None


class FoldLink(nnx.Pytree):
  """The hand-off from a folded conv to its BatchNorm, a node both hold.

  It holds no ``Variable`` (so no state and no path of its own in ``nnx.state``) and is
  empty between forwards; within one, ``give`` (the conv) sets ``pending`` and ``take``
  (the BatchNorm) empties it. Being a graph node, it is shared by the conv and the
  BatchNorm of every copy that ``nnx.split``/``merge``, ``nnx.clone`` or a transform
  makes, and by no other model.
  """

  def __init__(self):
    self.pending = nnx.data(None)

  def give(self, fold: FoldInput) -> None:
    self.pending = fold  # a conv called again replaces it: its BatchNorm takes the latest

  def take(self, x: Array, bn_path: str, conv_path: str) -> FoldInput:
    fold, self.pending = self.pending, None
    if fold is None or fold.z is not x:
      raise ValueError(f"BatchNorm {bn_path} is folded into {conv_path} but is not called on that conv's "
                       "output: quantize the model with inputs that take the same path")
    return fold


class _ConvWithKernel:
  """A conv seen with another kernel and neither bias nor mask: ``nnx.Conv.__call__`` on
  it is the conv's own forward (padding, dilation, groups, batch axes) on that kernel."""

  bias = None
  use_bias = False
  mask = None

  def __init__(self, conv: nnx.Conv, kernel: Array):
    self._conv, self.kernel = conv, kernel

  @property
  def promote_dtype(self) -> Callable:
    return self._conv.float_promote_dtype

  def __getattr__(self, name: str) -> Any:
    return getattr(self._conv, name)


def conv_with_kernel(conv: nnx.Conv, x: Array, kernel: Array) -> Array:
  """conv(x, kernel) with ``conv``'s configuration, no bias (the folded conv: as Linen's
  folding, which runs ``nn.Conv`` with the float conv's fields, the conv's mask does not
  apply to the folded kernel)."""
  return nnx.Conv.__call__(_ConvWithKernel(conv, kernel), x)


# ----------------------------------------------------------------------------- layers


class _QuantOperands:
  """The shared part of the three quantized layers (a mixin before the nnx class)."""

  def _setup(self, layer: nnx.Module, weight_quant: Any, act_quant: Any, params: dict | None, stats: Any,
             path: str, out_axis: int, fold_into: str | None = None, fold_link: FoldLink | None = None) -> None:
    copy_layer(self, layer)
    self.weight_quant, self.act_quant, self.path, self.out_axis = weight_quant, act_quant, path, out_axis
    self.fold_into, self.fold_link = fold_into, fold_link
    self.use_running_average = False
    add_quant_state(self, params, stats, ("kernel", "bias"))

  def promote_dtype(self, operands: tuple, /, **kwargs: Any) -> tuple:
    """``(inputs, kernel, bias)`` fake-quantized (see the module docstring), then the
    float layer's ``promote_dtype``. A folded conv's own call is float."""
    if self.fold_link is not None:
      return self.float_promote_dtype(operands, **kwargs)
    x, w, b = operands
    seam = NnxSeam(self)
    x = core.apply_quantizer(seam, INPUT_STATS, self.act_quant, x, None)
    w_q = core.quantize_weight(seam, "kernel", self.weight_quant, w, (self.out_axis,))
    b = core.quantize_bias(seam, b, self.weight_quant, w, self.act_quant, self.out_axis)
    return self.float_promote_dtype((x, w_q, b), **kwargs)


class QuantLinear(_QuantOperands, nnx.Linear):
  """``nnx.Linear`` with a fake-quantized input and kernel (kernel (in, out)).

  Args:
    layer: the float ``nnx.Linear`` (its attributes and Params are taken over).
    weight_quant: the kernel quantizer, or None.
    act_quant: the input quantizer, or None.
    params: the layer's Linen ``params`` subtree: entries other than ``kernel``/``bias``
      become the quantizer params (None: created on the first call).
    stats: the layer's ``quant_stats`` subtree ``{role: stats}`` (None: created on the
      first call).
    path: the layer's module path.
  """

  def __init__(self, layer: nnx.Linear, weight_quant: Any, act_quant: Any, params: dict | None = None,
               stats: Any = None, *, path: str = ""):
    self._setup(layer, weight_quant, act_quant, params, stats, path, -1)


class QuantConv(_QuantOperands, nnx.Conv):
  """``nnx.Conv`` with a fake-quantized input and kernel (HWIO, output axis -1).

  Args as ``QuantLinear``, and ``fold_into``/``fold_link``: the path of the BatchNorm
  folded into this conv and the ``FoldLink`` it shares with that ``FoldedBatchNorm``
  (None: not folded).
  """

  def __init__(self, layer: nnx.Conv, weight_quant: Any, act_quant: Any, params: dict | None = None,
               stats: Any = None, *, path: str = "", fold_into: str | None = None,
               fold_link: FoldLink | None = None):
    if (fold_into is None) != (fold_link is None):
      raise ValueError(f"{path}: fold_into and fold_link go together")
    self._setup(layer, weight_quant, act_quant, params, stats, path, -1, fold_into, fold_link)

  def __call__(self, inputs: Array, out_sharding: Any = None) -> Array:
    if self.fold_link is None:
      return super().__call__(inputs, out_sharding)
    seam = NnxSeam(self)
    x_q = core.apply_quantizer(seam, INPUT_STATS, self.act_quant, inputs, None)
    z = super().__call__(inputs, out_sharding)  # float: the batch statistics are taken of it
    self.fold_link.give(FoldInput(
        z, self.kernel.get_value(), self.bias.get_value() if self.use_bias else None,
        functools.partial(conv_with_kernel, self, x_q), core.input_scale(seam, self.act_quant)))
    return z


class QuantConvTranspose(_QuantOperands, nnx.ConvTranspose):
  """``nnx.ConvTranspose`` with a fake-quantized input and kernel; the kernel's output
  axis is -1, or -2 with ``transpose_kernel=True``. Args as ``QuantLinear``."""

  def __init__(self, layer: nnx.ConvTranspose, weight_quant: Any, act_quant: Any, params: dict | None = None,
               stats: Any = None, *, path: str = ""):
    self._setup(layer, weight_quant, act_quant, params, stats, path, -2 if layer.transpose_kernel else -1)


class FoldedBatchNorm(nnx.BatchNorm):
  """``nnx.BatchNorm`` folded into the conv whose output it consumes (``conv_path``): it
  computes conv(Aq(x), Wq(W_fold)) + b_fold (``core.bn_fold``). The folded kernel's
  quantizer params live here, as in Linen (``kernel_<name>``), and so does the
  init-from-batch flag (``quant_stats``). Statistics move when ``use_running_average``
  is False.

  Args:
    bn: the float ``nnx.BatchNorm`` (its attributes and variables are taken over).
    path: its module path.
    conv_path: the module path of the conv folded into it.
    weight_quant: the folded kernel's quantizer, or None.
    calib: micronet's ``bn_fuse_calib``.
    init_from_batch: the first training batch sets the running statistics.
    params: its Linen ``params`` subtree (the folded kernel quantizer's params).
    stats: its ``quant_stats`` subtree.
  """

  def __init__(self, bn: nnx.BatchNorm, path: str, conv_path: str, weight_quant: Any, calib: bool,
               init_from_batch: bool, params: dict | None = None, stats: Any = None):
    copy_layer(self, bn, keep_promote_dtype=True)
    self.path, self.conv_path = path, conv_path
    self.weight_quant, self.calib, self.init_from_batch = weight_quant, calib, init_from_batch
    self.fold_link = FoldLink()
    add_quant_state(self, params, stats, ("scale", "bias"))

  def __call__(self, x: Array, use_running_average: bool | None = None, *, mask: Array | None = None) -> Array:
    if mask is not None:
      raise NotImplementedError(f"BatchNorm {self.path} is folded into {self.conv_path}: a mask is not supported")
    fold = self.fold_link.take(x, self.path, self.conv_path)
    ura = self.use_running_average if use_running_average is None else use_running_average
    seam = NnxSeam(self, stats_move=not ura)
    c = fold.kernel.shape[-1]
    scale = self.scale.get_value() if self.use_scale else jnp.ones((c,))
    beta = self.bias.get_value() if self.use_bias else jnp.zeros((c,))
    flag = seam.stat(BN_INIT_FLAG, lambda: jnp.zeros((), jnp.bool_)) if self.init_from_batch else None
    norm = BatchNormParams(scale, beta, self.epsilon, self.momentum, self.use_fast_variance)
    # NNX has no init call and no immutable collections: the mode alone decides
    return folded_conv_bn(seam, x, fold.kernel, fold.bias, fold.conv, self.weight_quant, norm, calib=self.calib,
                          batch_statistics=not ura, update=not ura, first_batch=flag, input_scale=fold.input_scale)


class Add(nnx.Module):
  """``a + b``, marked for quantization as Linen's ``ops.Add``: a rule of kind ``"add"``
  makes it a ``QuantAdd`` (both inputs on one shared scale, integer add in deploy)."""

  def __call__(self, a: Array, b: Array) -> Array:
    return a + b


class QuantAdd(Add):
  """``Add`` with both inputs fake-quantized on the union of their ranges
  (``core.seam.shared_scale_add``, as Linen's ``ops.Add``); statistics in ``quant_stats``
  (``input``, ``input_a``, ``input_b``).

  Args:
    act_quant: an activation quantizer with a range observer.
    stats: the add's ``quant_stats`` subtree (None: created on the first call).
    path: its module path.
  """

  def __init__(self, act_quant: Any, stats: Any = None, *, path: str = ""):
    self.act_quant, self.path = act_quant, path
    self.use_running_average = False
    if stats:
      self.quant_stats = QuantStats(dict(stats))

  def __call__(self, a: Array, b: Array) -> Array:
    return core.shared_scale_add(NnxSeam(self), self.act_quant, a, b)
