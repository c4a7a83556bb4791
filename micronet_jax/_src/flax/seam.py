"""The seam contract (``core/seam.py``) implemented on a Flax Linen scope.

``LinenSeam(module)`` answers the four questions of the contract for a bound Linen module:
its path is its scope path, params are ``module.param``, statistics are variables of the
``quant_stats`` collection, and statistics move when that collection is mutable and the
model is not being initialised (``init`` creates empty observers; it does not observe).
Layers, the residual add and BN folding call the core functions with a ``LinenSeam`` and
never touch scopes themselves.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

from micronet_jax._src.core import seam as core
from micronet_jax._src.core.protocol import QState
from micronet_jax._src.core.seam import STATS, state_from  # noqa: F401  (re-exported for the deploy)

Array = jax.Array
BATCH_STATS = "batch_stats"  # Linen's collection of BatchNorm running statistics


class LinenSeam:
  """The seam of one bound Linen module; use it only inside one of its methods."""

  __slots__ = ("module",)

  def __init__(self, module: nn.Module):
    self.module = module

  @property
  def path(self) -> str:
    return module_path(self.module)

  def param(self, name: str, init: Callable[[], Array]) -> Array:
    # Linen refuses a second declaration of a name in one call: declare once, then read.
    # Through the scope, not ``module.param``: a quantizer may run in a method that is
    # neither ``setup`` nor ``@compact`` (``nn.Embed.attend``).
    if self.module.has_variable("params", name):
      return nn.unbox(self.module.get_variable("params", name))
    return self.module.scope.param(name, lambda _rng: init())

  def stat(self, name: str, init: Callable[[], Any]) -> core.StatRef:
    return _get_or_create(self.module, STATS, name, init)

  @property
  def stats_move(self) -> bool:
    return stats_update(self.module)

  def running(self, name: str, init: Callable[[], Array]) -> core.StatRef:
    """A BatchNorm's running statistic ``batch_stats/<path>/<name>``, got or created: the
    extension of the contract that BatchNorm folding needs (``core.bn_fold.BatchNormSeam``)."""
    return _get_or_create(self.module, BATCH_STATS, name, init)


class _LinenVariable:
  """A variable of a bound module's ``collection``, read and written by name."""

  __slots__ = ("module", "collection", "name")

  def __init__(self, module: nn.Module, collection: str, name: str):
    self.module, self.collection, self.name = module, collection, name

  @property
  def value(self) -> Any:
    return self.module.get_variable(self.collection, self.name)

  @value.setter
  def value(self, v: Any) -> None:
    self.module.put_variable(self.collection, self.name, v)


def _get_or_create(module: nn.Module, collection: str, name: str, init: Callable[[], Any]) -> _LinenVariable:
  if not module.has_variable(collection, name):
    module.scope.variable(collection, name, init)
  return _LinenVariable(module, collection, name)


def module_path(module: nn.Module) -> str:
  """'a/b/c': the module's path in the variable tree (what rules match and plans key on)."""
  return "/".join(module.scope.path)


def stats_update(module: nn.Module) -> bool:
  """Whether observed statistics move in this call: ``quant_stats`` is mutable and the
  model is not being initialised."""
  return stats_mutable(module) and not module.is_initializing()


def stat(module: nn.Module, name: str, init: Callable[[], Any]) -> Any:
  """The ``quant_stats`` variable ``name`` of ``module`` (created by ``init`` if new)."""
  return module.variable(STATS, name, init)


def stats_mutable(module: nn.Module) -> bool:
  """Whether ``quant_stats`` may be written in this call (training, calibration, init)."""
  return module.is_mutable_collection(STATS)


def apply_quantizer(module: nn.Module, role: str, q: Any, x: Array, channel_axis: int | None) -> Array:
  """``core.seam.apply_quantizer`` on ``module``'s scope (call it inside one of its methods)."""
  return core.apply_quantizer(LinenSeam(module), role, q, x, channel_axis)


def quantizer_state(module: nn.Module, role: str, q: Any) -> QState:
  """The stored state of ``q`` in ``role`` (after this call's update), for capabilities
  such as ``AffineGrid.grid``; params and stats it does not have are None."""
  del q  # the state is found by role; the spec does not change where it lives
  return state_from(module.variables.get("params", {}), module.variables.get(STATS, {}), role)
