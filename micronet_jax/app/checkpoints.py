"""Checkpoints with orbax: a run's final variables, and the progress of a running one.

* ``save_variables`` / ``load_variables``: the variables (params and every model-state
  collection) a finished run leaves in ``checkpoint/``, what ``train --from``, ``ptq``,
  ``prune`` and ``convert`` read.
* ``Progress``: an orbax ``CheckpointManager`` over ``progress/`` that saves the whole
  training state (step, params, optimizer state, model state, the dropout key) with the
  epoch's partial metric sums and the finished epochs' records, every N steps and at
  each epoch end. orbax writes each step into a temporary folder and renames it when
  complete, and keeps the last two, so a kill during a save leaves the previous
  checkpoint usable. ``train --resume`` restores the latest one.

Every checkpointer is closed after use (an open one leaves orbax's background event
loop to be torn down at interpreter exit, which is where "Event loop is closed"
tracebacks came from).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from micronet_jax._src.core.treeutil import shape_mismatches

CHECKPOINT_DIR, PROGRESS_DIR = "checkpoint", "progress"


def _abstract(tree: Any, sharding: Any = None) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=sharding), tree)


def save_variables(run_dir: str, variables: dict) -> str:
  """Writes ``variables`` under ``run_dir/checkpoint``; returns that path."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, jax.device_get(variables), force=True)
    ckptr.wait_until_finished()
  return path


def load_variables(run_dir: str, like: dict) -> dict:
  """Reads variables saved by ``save_variables`` into the structure of ``like``.

  ``like`` is a variables tree (or its ``jax.eval_shape``) of the model the checkpoint
  is meant for; a checkpoint from another model fails with the paths that differ.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint in {run_dir} (expected {path})")
  target = _abstract(like)
  with ocp.StandardCheckpointer() as ckptr:
    try:
      restored = ckptr.restore(path, target)
    except (ValueError, KeyError) as e:
      # chained: the message names the mismatch, the cause shows where orbax found it
      raise ValueError(f"checkpoint {path} does not fit this model: {e}") from e
  problems = shape_mismatches(target, restored)
  if problems:  # orbax restores saved shapes whatever the target says
    raise ValueError(f"checkpoint {path} does not fit this model:\n  " + "\n  ".join(problems))
  return restored


def _state_tree(state: Any) -> dict:
  """The arrays of a ``TrainState`` that resume needs (the key as its raw uint32 data)."""
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "model_state": state.model_state, "rng": jax.random.key_data(state.rng)}


class Progress:
  """Resumable training checkpoints in ``directory`` (see the module docstring).

  ``every``: also save every that many steps (0: only at epoch ends and on request).
  """

  def __init__(self, directory: str, every: int = 0):
    import orbax.checkpoint as ocp

    self.every = every
    self._ocp = ocp
    self._mgr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False, create=True),
        item_names=("state", "sums", "meta"),
    )

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, state: Any, sums: dict, meta: dict) -> None:
    """Saves ``state`` at ``state.step`` with the epoch's metric ``sums`` and JSON ``meta``."""
    ocp = self._ocp
    step = int(jax.device_get(state.step))
    if self._mgr.latest_step() == step:
      return
    self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(jax.device_get(_state_tree(state))),
        sums=ocp.args.StandardSave(jax.device_get(sums)),
        meta=ocp.args.JsonSave(meta),
    ), force=True)
    self._mgr.wait_until_finished()

  def restore(self, state: Any, sums: dict) -> tuple[Any, dict, dict] | None:
    """(state, sums, meta) of the latest checkpoint, shaped like ``state``/``sums``, or None."""
    ocp = self._ocp
    step = self._mgr.latest_step()
    if step is None:
      return None
    got = self._mgr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(_state_tree(state))),
        sums=ocp.args.StandardRestore(_abstract(sums)),
        meta=ocp.args.JsonRestore(),
    ))
    tree = got["state"]
    restored = state.replace(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                             model_state=tree["model_state"], rng=jax.random.wrap_key_data(tree["rng"]))
    return restored, dict(got["sums"]), dict(got["meta"])

  def close(self) -> None:
    self._mgr.close()

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
