"""Small pytree helpers shared by the transform and the checkpoint code."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def shape_mismatches(expected: Any, got: Any, prefix: str = "") -> list[str]:
  """Every path missing from ``got``, extra in it, or of another shape, as sentences."""
  flat_e = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  flat_g = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(got)}
  problems = [f"{prefix}{k} is missing from the checkpoint" for k in flat_e if k not in flat_g]
  problems += [f"{prefix}{k} is in the checkpoint but not in the model" for k in flat_g if k not in flat_e]
  problems += [
      f"{prefix}{k} has shape {tuple(np.shape(flat_g[k]))} in the checkpoint but {tuple(np.shape(flat_e[k]))} "
      "in the model"
      for k in flat_e if k in flat_g and tuple(np.shape(flat_g[k])) != tuple(np.shape(flat_e[k]))
  ]
  return problems
