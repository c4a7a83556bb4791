"""Quantized NNX layers: NNX's own layer code on operands quantized through the core.

``QuantLinear``, ``QuantLinearGeneral``, ``QuantEinsum``, ``QuantEmbed``, ``QuantConv``
and ``QuantConvTranspose`` subclass ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``,
``nnx.Embed``, ``nnx.Conv`` and ``nnx.ConvTranspose`` and are made *from* a float layer:
they take its public attributes, its ``kernel``/``embedding`` and ``bias`` ``nnx.Param``
objects included, so the graph state keeps its paths and a float checkpoint loads
unchanged. A user subclass (``class MyLinear(nnx.Linear)``) is quantized like its base by
a subclass of it made the same way (``quantized_type``), so its own code still runs. They
add

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
(``(embedding,)`` for a lookup, ``(query, embedding)`` for ``Embed.attend``) to
``self.promote_dtype`` right before its matmul/conv, and in a quantized layer that is a
method that fake-quantizes them through ``NnxSeam`` (the input by ``act_quant``, the
weight per output channel by ``weight_quant``, the bias onto the int32 accumulator grid)
and then calls the float layer's ``promote_dtype`` (kept as ``float_promote_dtype``). It
is the rule Linen's ``QuantOperands`` applies on a ``LinenSeam`` (``quantize_operands``),
with the same output-channel axes (every output and batch axis of a ``LinearGeneral``
kernel, the kernel axes an ``Einsum`` keeps, the rows of an ``Embed`` table), so the two
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
import types
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from micronet_jax._src.core import seam as core
from micronet_jax._src.core.bn_fold import BN_INIT_FLAG, BatchNormParams, folded_conv_bn
from micronet_jax._src.core.seam import INPUT_STATS
from micronet_jax._src.flax.layers import einsum_kernel_out_axes
from micronet_jax._src.nnx.seam import NnxSeam, QuantStats

Array = jax.Array
# Attributes that the flax layers declare data even when None (``self.bias = nnx.data(None)``),
# for a module that is not a JAX pytree (``pytree=False``), whose data attributes cannot be read.
_DATA_WHEN_NONE = ("bias", "scale", "query_ln", "key_ln", "cached_key", "cached_value", "cache_index")


def data_attributes(m: nnx.Module) -> frozenset[str] | None:
  """The names of ``m``'s data attributes (its pytree children, ``None`` ones included),
  read through the public JAX pytree API; None when ``m`` is not a JAX pytree."""
  leaves = jax.tree_util.tree_flatten_with_path(m, is_leaf=lambda x: x is not m)[0]
  names = frozenset(getattr(path[0], "name", None) for path, _ in leaves if path)
  return names or None


def copy_layer(new: nnx.Module, old: nnx.Module, hooks: tuple[str, ...] = ("promote_dtype",)) -> None:
  """Gives ``new`` every public attribute of ``old`` (the same ``Variable`` objects and
  submodules), data where ``old`` has it as data (``self.bias = nnx.data(None)`` stays
  data). An attribute named in ``hooks`` is kept as ``float_<name>``: the quantized class
  defines that name as a method (``promote_dtype``, ``attention_fn``)."""
  data = data_attributes(old)
  for k, v in vars(old).items():
    if k.startswith("_"):  # NNX's own bookkeeping: the new layer has its own
      continue
    is_data = k in data if data is not None else (v is None and k in _DATA_WHEN_NONE) or nnx.is_data(v)
    if k in hooks:
      k = f"float_{k}"
    setattr(new, k, nnx.data(v) if is_data else nnx.static(v))


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


def weight_out_axes(m: nnx.Module) -> tuple[int, ...]:
  """The output-channel axes of a layer's weight, as Linen's ``kernel_out_axes`` finds
  them for the Linen equivalent (a per-channel quantizer keeps one scale per channel)."""
  if isinstance(m, nnx.Embed):
    return (0,)
  if isinstance(m, nnx.ConvTranspose):
    return (-2,) if m.transpose_kernel else (-1,)
  if isinstance(m, nnx.LinearGeneral):
    ndim = len(m.batch_axis) + len(m.in_features) + len(m.out_features)
    return tuple(range(len(m.batch_axis))) + tuple(range(ndim - len(m.out_features), ndim))
  if isinstance(m, nnx.Einsum):
    return einsum_kernel_out_axes(m.einsum_str, len(m.kernel_shape))
  return (-1,)


class Quantized:
  """Marks the quantized NNX modules (``model`` holds one: it is already quantized)."""


class QuantOperands(Quantized):
  """The quantized layer (a mixin before the nnx class; see the module docstring).

  Args:
    layer: the float layer (its attributes and Params are taken over).
    weight_quant: the weight quantizer, or None.
    act_quant: the input quantizer, or None.
    params: the layer's Linen ``params`` subtree: entries other than the weight and
      ``bias`` become the quantizer params (None: created on the first call).
    stats: the layer's ``quant_stats`` subtree ``{role: stats}`` (None: created on the
      first call).
    path: the layer's module path.
  """

  def __init__(self, layer: nnx.Module, weight_quant: Any, act_quant: Any, params: dict | None = None,
               stats: Any = None, *, path: str = ""):
    self._setup(layer, weight_quant, act_quant, params, stats, path)

  def _setup(self, layer: nnx.Module, weight_quant: Any, act_quant: Any, params: dict | None, stats: Any,
             path: str, fold_into: str | None = None, fold_link: FoldLink | None = None) -> None:
    copy_layer(self, layer)
    self.weight_quant, self.act_quant, self.path = weight_quant, act_quant, path
    self.out_axes = weight_out_axes(layer)
    self.weight_name = "embedding" if isinstance(layer, nnx.Embed) else "kernel"
    self.fold_into, self.fold_link = fold_into, fold_link
    self.use_running_average = False
    add_quant_state(self, params, stats, (self.weight_name, "bias"))

  def promote_dtype(self, operands: tuple, /, **kwargs: Any) -> tuple:
    """The operands fake-quantized (see the module docstring), then the float layer's
    ``promote_dtype``. A folded conv's own call is float."""
    if self.fold_link is None:
      operands = core.quantize_operands(NnxSeam(self), tuple(operands), self.weight_quant, self.act_quant,
                                        self.out_axes, self.weight_name)
    return self.float_promote_dtype(operands, **kwargs)


class QuantLinear(QuantOperands, nnx.Linear):
  """``nnx.Linear`` with a fake-quantized input and kernel (kernel (in, out)); args as
  ``QuantOperands``."""


class QuantLinearGeneral(QuantOperands, nnx.LinearGeneral):
  """``nnx.LinearGeneral`` with a fake-quantized input and kernel (per channel: every
  output and batch axis of the kernel)."""


class QuantEinsum(QuantOperands, nnx.Einsum):
  """``nnx.Einsum`` with a fake-quantized input and kernel (per channel: the kernel axes
  the output keeps); its bias on the accumulator grid."""


class QuantEmbed(QuantOperands, nnx.Embed):
  """``nnx.Embed`` with a fake-quantized table (per channel: one scale per row); ``attend``
  also quantizes its query by ``act_quant``."""


class _FoldableConv(QuantOperands):
  """A quantized conv that may have a BatchNorm folded into it: ``fold_into``/``fold_link``
  are the BatchNorm's path and the ``FoldLink`` it shares with that ``FoldedBatchNorm``
  (None: not folded)."""

  def __init__(self, layer: nnx.Conv, weight_quant: Any, act_quant: Any, params: dict | None = None,
               stats: Any = None, *, path: str = "", fold_into: str | None = None,
               fold_link: FoldLink | None = None):
    if (fold_into is None) != (fold_link is None):
      raise ValueError(f"{path}: fold_into and fold_link go together")
    self._setup(layer, weight_quant, act_quant, params, stats, path, fold_into, fold_link)

  def __call__(self, inputs: Array, *args: Any, **kwargs: Any) -> Array:
    if self.fold_link is None:
      return super().__call__(inputs, *args, **kwargs)
    seam = NnxSeam(self)
    x_q = core.apply_quantizer(seam, INPUT_STATS, self.act_quant, inputs, None)
    z = super().__call__(inputs, *args, **kwargs)  # float: the batch statistics are taken of it
    self.fold_link.give(FoldInput(
        z, self.kernel.get_value(), self.bias.get_value() if self.use_bias else None,
        functools.partial(conv_with_kernel, self, x_q), core.input_scale(seam, self.act_quant)))
    return z


class QuantConv(_FoldableConv, nnx.Conv):
  """``nnx.Conv`` with a fake-quantized input and kernel (HWIO, output axis -1); args as
  ``_FoldableConv``."""


class QuantConvTranspose(QuantOperands, nnx.ConvTranspose):
  """``nnx.ConvTranspose`` with a fake-quantized input and kernel; the kernel's output
  axis is -1, or -2 with ``transpose_kernel=True``."""


# float base -> its quantized layer (a subclass before its base: LinearGeneral is no Linear)
QUANT_LAYERS = ((nnx.LinearGeneral, QuantLinearGeneral), (nnx.Linear, QuantLinear), (nnx.Einsum, QuantEinsum),
                (nnx.Embed, QuantEmbed), (nnx.ConvTranspose, QuantConvTranspose), (nnx.Conv, QuantConv))


def subclass_with(mixin: type, cls: type, made: dict) -> type:
  """``cls`` with ``mixin`` in front (``class Quant<cls>(mixin, cls)``), made once per
  ``made`` (a dict the caller keeps for one transform)."""
  key = (mixin, cls)
  if key not in made:
    made[key] = types.new_class(f"{mixin.__name__.lstrip('_')}_{cls.__name__}", (mixin, cls),
                                exec_body=lambda ns: ns.update(__module__=cls.__module__, __doc__=cls.__doc__))
  return made[key]


def quantized_type(cls: type, made: dict) -> type:
  """The quantized layer for float layers of type ``cls``: ``QuantLinear`` for
  ``nnx.Linear`` (and so on), a subclass of ``cls`` for a user subclass of one of them."""
  for base, quant in QUANT_LAYERS:
    if issubclass(cls, base):
      return quant if cls is base else subclass_with(quant.__bases__[0], cls, made)
  raise TypeError(f"no quantized NNX layer for {cls.__name__}")


class FoldedBatchNorm(Quantized, nnx.BatchNorm):
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
    copy_layer(self, bn, hooks=())
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


class QuantAdd(Quantized, Add):
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
