"""The one seam between quantizers and Flax Linen.

Everything the library needs to know about a module's scope is here: its path, whether
its statistics may move, and where a quantizer's params and stats live. Layers, the
residual add and BN folding call these functions and never touch scopes themselves, so a
second framework (NNX) is a second implementation of this module, not of the layers.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from micronet_jax._src.core.protocol import QState

Array = jax.Array
STATS = "quant_stats"


def module_path(module: nn.Module) -> str:
  """'a/b/c': the module's path in the variable tree (what rules match and plans key on)."""
  return "/".join(module.scope.path)


def stats_update(module: nn.Module) -> bool:
  """Whether observed statistics move in this call: ``quant_stats`` is mutable and the
  model is not being initialised (init creates empty observers; it does not observe)."""
  return stats_mutable(module) and not module.is_initializing()


def stored_stats(module: nn.Module, role: str) -> Any:
  """The quantizer statistics kept under ``role`` in this module, or None."""
  return module.get_variable(STATS, role) if module.has_variable(STATS, role) else None


def stat(module: nn.Module, name: str, init: Callable[[], Any]) -> Any:
  """The ``quant_stats`` variable ``name`` of ``module`` (created by ``init`` if new)."""
  return module.variable(STATS, name, init)


def stats_mutable(module: nn.Module) -> bool:
  """Whether ``quant_stats`` may be written in this call (training, calibration, init)."""
  return module.is_mutable_collection(STATS)


def apply_quantizer(module: nn.Module, role: str, q: Any, x: Array, channel_axis: int | None) -> Array:
  """Fake-quantizes ``x`` with ``q`` (None: as is), keeping its state in ``module``:
  params as ``params/<role>_<name>``, stats as ``quant_stats/<role>``. Call it inside
  one of ``module``'s methods."""
  if q is None:
    return x
  init = q.init(x, channel_axis)  # traced only; what is not stored is dead code
  params = None
  if init.params is not None:
    params = {k: module.param(f"{role}_{k}", lambda _rng, v=v: v) for k, v in init.params.items()}
  stats = None
  if init.stats is not None:
    stats = stat(module, role, lambda: init.stats)
  update = stats is not None and stats_update(module)
  x_q, new_stats = q.apply(x, QState(params, None if stats is None else stats.value),
                           channel_axis=channel_axis, update=update)
  if update:
    stats.value = new_stats
  # The maths runs in float32 (scales are float32); the layer's dtype is the user's choice.
  return x_q.astype(x.dtype)


def state_from(params: Any, stats: Any, role: str) -> QState:
  """The state of the quantizer in ``role`` ("input", "kernel") of one layer, from that
  layer's variable subtrees: ``params`` is ``params/<layer>`` (the quantizer's trainable
  leaves are stored there as ``<role>_<name>``) and ``stats`` is ``quant_stats/<layer>``
  (its observed state is ``stats[role]``). Either subtree may be None or lack the role;
  what the quantizer does not have is None in the result. Pure: no scope, no tracing."""
  prefix = f"{role}_"
  own = {k[len(prefix):]: v for k, v in (params or {}).items() if k.startswith(prefix)}
  observed = stats.get(role) if hasattr(stats, "get") else None
  return QState(own or None, observed)


def quantizer_state(module: nn.Module, role: str, q: Any) -> QState:
  """The stored state of ``q`` in ``role`` (after this call's update), for capabilities
  such as ``AffineGrid.grid``; params and stats it does not have are None."""
  del q  # the state is found by role; the spec does not change where it lives
  return state_from(module.variables.get("params", {}), module.variables.get(STATS, {}), role)
