"""Network slimming (Liu et al. 2017), as micronet does it, with the pruned network built.

1. Sparse training: ``bn_sparsity(s)`` is an optax transformation that adds
   ``s * sign(gamma)`` to the gradient of every BatchNorm scale (L1 subgradient). Put it
   first in any optax chain.
2. Channel selection: one global threshold on |gamma| over the prunable BatchNorms (the
   classifier's is never pruned): ``thr = sort(|gamma|)[int(total * percent)]`` and a
   channel survives if ``|gamma| > thr`` (micronet's rule). Counts are then rounded to
   what the network's structure needs: a multiple of ``regular`` (micronet's regular
   pruning) and, for group convolutions and channel shuffles, a multiple of the unit
   that keeps every group of this conv and of the next one equally filled.
3. Shrinking: a new channel config and a smaller params/batch_stats pytree with the
   kept channels copied and the next layer's inputs sliced to match, so that in eval
   mode the pruned network computes exactly what the masked original computes.

Differences from micronet, all deliberate: a layer whose count is below the regular
base is rounded *up* to it (micronet leaves it unrounded, which can break group
divisibility); exactly ``count`` channels are kept even on ties; the fallback for a
layer with no survivor is the largest |gamma| (micronet: the largest signed gamma);
group-aware pruning copies weights instead of retraining from scratch; and the constant
ReLU(beta) that a pruned channel still feeds forward is folded into the next conv's bias
(``compensate_beta=True``), exact away from zero-padded borders.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Protocol, Sequence, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax


# ----------------------------------------------------------------------------- sparsity


def bn_scale_mask(params: Any) -> Any:
  """True for every BatchNorm scale (gamma) in a Flax params tree, False elsewhere.

  A leaf is a BatchNorm scale when it is named ``scale`` and its module's name contains
  ``bn`` or ``BatchNorm`` (Flax's default name), as in every model of this package.
  """

  def is_bn_scale(path, _):
    keys = [getattr(k, "key", str(k)) for k in path]
    return len(keys) >= 2 and keys[-1] == "scale" and ("bn" in keys[-2] or "BatchNorm" in keys[-2])

  return jax.tree_util.tree_map_with_path(is_bn_scale, params)


def bn_sparsity(strength: float, mask: Any = None) -> optax.GradientTransformation:
  """g <- g + strength * sign(gamma) for every BatchNorm scale (network slimming's L1).

  ``mask`` is a params-shaped tree of bools, or a function of params giving one
  (default ``bn_scale_mask``). sign(0) = 0. Stateless; needs ``params`` in ``update``.
  """
  if strength < 0:
    raise ValueError(f"sparsity strength must be >= 0, got {strength}")
  mask_fn = mask if callable(mask) else (lambda _: mask) if mask is not None else bn_scale_mask

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("bn_sparsity needs params: call tx.update(grads, state, params)")
    m = mask_fn(params)
    updates = jax.tree.map(lambda g, p, on: g + strength * jnp.sign(p) if on else g, updates, params, m)
    return updates, state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


# ----------------------------------------------------------------------------- structure


class SlimLayer(NamedTuple):
  """One conv+BN block of a prunable chain, in order.

  ``groups``: this conv's feature groups; ``shuffle``: channel-shuffle groups applied to
  this block's *input* (0 or 1: none).
  """

  name: str
  groups: int = 1
  shuffle: int = 0


@runtime_checkable
class Slimmable(Protocol):
  """A model network slimming can prune: a chain of conv+BatchNorm blocks named
  ``slim_layout()[i].name``, each conv reading the previous block's output (after an
  optional channel shuffle), the last block being the classifier. ``cfg`` holds the
  widths of the blocks before the last, and the model rebuilt with a smaller ``cfg`` is
  the pruned network."""

  cfg: Sequence[int]

  def slim_layout(self) -> tuple[SlimLayer, ...]:
    ...


def slimming_layout(model: Any) -> tuple[SlimLayer, ...]:
  """The conv+BN chain of a model that declares one (``Slimmable``; the zoo's NIN and
  NIN-GC do). The last block is the classifier and is never pruned."""
  if not isinstance(model, Slimmable):
    raise ValueError(
        f"network slimming needs a chain of conv+BatchNorm blocks declared by the model's slim_layout() "
        f"(as micronet_jax.models.NIN and NINGC do); {type(model).__name__} has none")
  return tuple(model.slim_layout())


def _shuffle_position(c: np.ndarray, width: int, groups: int) -> np.ndarray:
  """Where channel c lands after ``channel_shuffle(x, groups)`` of a ``width``-channel x."""
  if groups <= 1:
    return c
  per = width // groups
  return (c % per) * groups + c // per


def channel_units(width: int, groups: int, shuffle_next: int, groups_next: int) -> np.ndarray:
  """Partition of a layer's channels into the units that pruning must respect.

  Returns ``units`` of shape (cells, cell_len, tied): every cell must keep the same
  number of rows, and the ``tied`` channels of a row are kept or dropped together.
  Without a shuffle, cells are the blocks of size width / lcm(groups, groups_next), so
  that every group of this conv and of the next keeps the same number of channels.
  With a shuffle (its groups equal this conv's groups, as in NIN-GC), a row ties the
  same local index of every group (so shuffling and pruning commute) and the cells
  split the local indices into the next conv's groups.
  """
  if shuffle_next > 1:
    if shuffle_next != groups:
      raise ValueError(f"channel shuffle with {shuffle_next} groups after a conv with {groups} groups "
                       "is not supported by pruning")
    if width % (groups * groups_next):
      raise ValueError(f"width {width} is not divisible by groups {groups} x next groups {groups_next}")
    per, cell = width // groups, width // (groups * groups_next)
    j, k, g = np.meshgrid(np.arange(groups_next), np.arange(cell), np.arange(groups), indexing="ij")
    return g * per + j * cell + k
  lcm = math.lcm(groups, groups_next)
  if width % lcm:
    raise ValueError(f"width {width} is not divisible by lcm(groups {groups}, next groups {groups_next})")
  return np.arange(width).reshape(lcm, width // lcm, 1)


def round_count(r: int, base: int, width: int) -> int:
  """Nearest multiple of ``base`` to ``r`` (ties up), at least ``base``, at most ``width``.

  micronet's rule, except that r < base gives base rather than r.
  """
  if base >= width:
    return width
  if r % base == 0 and r > 0:
    return min(r, width)
  upper = -(-r // base) * base
  lower = upper - base
  v = lower if (r - lower) < (upper - r) and lower > 0 else upper
  return max(base, min(v, width - width % base))


def global_threshold(gammas: Sequence[np.ndarray], percent: float) -> float:
  """micronet's global threshold: sorted |gamma| at index int(total * percent)."""
  if not 0.0 <= percent < 1.0:
    raise ValueError(f"prune percent must be in [0, 1), got {percent}")
  flat = np.sort(np.concatenate([np.abs(np.asarray(g)).ravel() for g in gammas]))
  k = min(int(len(flat) * percent), len(flat) - 1)
  return float(flat[k])


@dataclasses.dataclass(frozen=True)
class PrunePlan:
  threshold: float
  cfg: tuple[int, ...]  # new widths of the prunable blocks
  keep: tuple[np.ndarray, ...]  # kept channel indices (sorted) per prunable block


def select_channels(
    gammas: Sequence[np.ndarray], layout: Sequence[SlimLayer], percent: float, regular: int = 1,
) -> PrunePlan:
  """Global-threshold slimming of the prunable blocks (all but the last in ``layout``).

  ``percent`` 0 keeps every channel (micronet's rule would still drop the smallest |gamma|,
  and regular rounding some more)."""
  if regular < 1:
    raise ValueError(f"regular pruning base must be >= 1, got {regular}")
  thr = global_threshold(gammas, percent)
  if percent == 0:  # remove nothing, whatever the rounding: the threshold is just below every |gamma|
    lowest = min(float(np.min(np.abs(np.asarray(g)))) for g in gammas)
    return PrunePlan(float(np.nextafter(lowest, -np.inf)), tuple(len(g) for g in gammas),
                     tuple(np.arange(len(g)) for g in gammas))
  cfg, keep = [], []
  for i, gamma in enumerate(gammas):
    score = np.abs(np.asarray(gamma, np.float64))
    width = len(score)
    nxt = layout[i + 1]
    units = channel_units(width, layout[i].groups, nxt.shuffle, nxt.groups)
    cells, _, tied = units.shape
    step = math.lcm(cells * tied, regular)
    r = max(int((score > thr).sum()), 1)
    count = round_count(r, step, width) if step > 1 else r
    per_cell = count // (cells * tied)
    rows = score[units].sum(-1)  # (cells, cell_len)
    top = np.argsort(-rows, axis=1, kind="stable")[:, :per_cell]
    kept = np.sort(np.take_along_axis(units, top[..., None], axis=1).ravel())
    cfg.append(int(count))
    keep.append(kept)
  return PrunePlan(thr, tuple(cfg), tuple(keep))


# ----------------------------------------------------------------------------- shrinking


def _in_positions(prev_keep: np.ndarray, prev_width: int, shuffle: int) -> np.ndarray:
  """Input-channel positions of the kept channels after this block's input shuffle."""
  return np.sort(_shuffle_position(prev_keep, prev_width, shuffle))


def _slice_conv(kernel: np.ndarray, in_pos: np.ndarray, out_keep: np.ndarray, groups: int) -> np.ndarray:
  """Kernel (kh, kw, Cin/g, Cout) restricted to kept input positions and outputs."""
  cin = kernel.shape[2] * groups
  cout = kernel.shape[3]
  cols = []
  for o in out_keep:
    g = o // (cout // groups)
    local = in_pos[(in_pos // (cin // groups)) == g] % (cin // groups)
    cols.append(kernel[:, :, local, o])
  return np.stack(cols, axis=-1)


def prune_variables(
    model, variables: dict, plan: PrunePlan, compensate_beta: bool = True
) -> tuple[Any, dict]:
  """(pruned model, its variables) for a NIN/NIN-GC model and a ``PrunePlan``."""
  layout = slimming_layout(model)
  params = jax.device_get(variables["params"])
  stats = jax.device_get(variables["batch_stats"])
  new_params, new_stats = {}, {}
  widths = [len(k) for k in plan.keep]
  full_widths = [params[l.name]["bn"]["scale"].shape[0] for l in layout]
  prev_keep = None
  for i, layer in enumerate(layout):
    p, s = params[layer.name], stats[layer.name]
    kernel = np.asarray(p["conv"]["kernel"])
    out_keep = plan.keep[i] if i < len(plan.keep) else np.arange(kernel.shape[-1])
    if prev_keep is None:
      in_pos = np.arange(kernel.shape[2] * layer.groups)
    else:
      in_pos = _in_positions(prev_keep, full_widths[i - 1], layer.shuffle)
    bias = np.asarray(p["conv"]["bias"], np.float32).copy()
    if compensate_beta and prev_keep is not None:
      bias += _pruned_input_constant(params[layout[i - 1].name]["bn"], prev_keep, full_widths[i - 1],
                                     layer.shuffle, kernel, layer.groups)
    new_params[layer.name] = {
        "conv": {"kernel": _slice_conv(kernel, in_pos, out_keep, layer.groups), "bias": bias[out_keep]},
        "bn": {k: np.asarray(v)[out_keep] for k, v in p["bn"].items()},
    }
    new_stats[layer.name] = {"bn": {k: np.asarray(v)[out_keep] for k, v in s["bn"].items()}}
    prev_keep = out_keep
  new_model = model.clone(cfg=tuple(widths))
  out = {**variables, "params": new_params, "batch_stats": new_stats}
  return new_model, jax.tree.map(jnp.asarray, out)


def _pruned_input_constant(prev_bn, prev_keep, prev_width, shuffle, kernel, groups) -> np.ndarray:
  """What the pruned channels of the previous block still add to this conv's output.

  A pruned channel has gamma ~ 0, so its BN output is the constant beta and its ReLU
  output ReLU(beta); through max-pools and shuffles it stays that constant, and this
  conv adds sum_{kh,kw} W[kh, kw, c, o] * ReLU(beta_c) to every output o of c's group.
  """
  dropped = np.setdiff1d(np.arange(prev_width), prev_keep)
  const = np.maximum(np.asarray(prev_bn["bias"], np.float32)[dropped], 0.0)
  pos = _shuffle_position(dropped, prev_width, shuffle)
  cin_g = kernel.shape[2]
  cout_g = kernel.shape[3] // groups
  w_sum = kernel.sum(axis=(0, 1))  # (Cin/g, Cout)
  extra = np.zeros(kernel.shape[3], np.float32)
  for p, a in zip(pos, const):
    if a == 0.0:
      continue
    g = p // cin_g
    extra[g * cout_g : (g + 1) * cout_g] += w_sum[p % cin_g, g * cout_g : (g + 1) * cout_g] * a
  return extra


def mask_variables(model, variables: dict, plan: PrunePlan, zero_beta: bool = True) -> dict:
  """The original variables with pruned channels' gamma (and beta) set to zero."""
  layout = slimming_layout(model)
  params = jax.tree.map(np.array, jax.device_get(variables["params"]))
  for layer, keep in zip(layout, plan.keep):
    bn = params[layer.name]["bn"]
    drop = np.setdiff1d(np.arange(bn["scale"].shape[0]), keep)
    bn["scale"][drop] = 0.0
    if zero_beta:
      bn["bias"][drop] = 0.0
  return {**variables, "params": jax.tree.map(jnp.asarray, params)}


def prunable_gammas(model, variables: dict) -> list[np.ndarray]:
  layout = slimming_layout(model)
  return [np.asarray(variables["params"][l.name]["bn"]["scale"]) for l in layout[:-1]]


def prune(model, variables: dict, percent: float, regular: int = 1, compensate_beta: bool = True):
  """Slims ``model`` by ``percent`` of its prunable channels. Returns (model, variables, plan)."""
  layout = slimming_layout(model)
  plan = select_channels(prunable_gammas(model, variables), layout, percent, regular)
  new_model, new_vars = prune_variables(model, variables, plan, compensate_beta)
  return new_model, new_vars, plan
