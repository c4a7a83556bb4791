"""Training state, jitted train/eval steps with optax, the epoch loop and checkpoints.

Models are called as ``apply_fn(variables, x, train=bool, ...)``. Every collection
other than ``params`` (``batch_stats``, ``quant_stats``, ...) is model state: it is
threaded through ``mutable`` in the train step and read-only in the eval step, so
observers and BatchNorm statistics move only while training. Nothing in a step syncs
with the host: metrics come back as device arrays and are fetched once per epoch.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from micronet_jax.app import data as data_lib
from micronet_jax._src.core.treeutil import shape_mismatches

Array = jax.Array


class TrainState(train_state.TrainState):
  """Flax's TrainState plus the non-param collections and the dropout key.

  ``frozen`` names model-state collections that the train step must not update
  (e.g. ``("quant_stats",)`` for fine-tuning with frozen ranges). ``project`` is a
  params -> params function applied after every optimizer step (e.g. micronet's
  centering and clipping of binary weights, ``binary.center_clip_projection``).
  """

  model_state: Any = None
  rng: Array | None = None
  frozen: tuple[str, ...] = train_state.struct.field(pytree_node=False, default=())
  project: Callable | None = train_state.struct.field(pytree_node=False, default=None)

  @property
  def variables(self) -> dict:
    return {"params": self.params, **(self.model_state or {})}


def make_optimizer(
    learning_rate: float | optax.Schedule = 1e-3, weight_decay: float = 0.0
) -> optax.GradientTransformation:
  """Adam (b1 0.9, b2 0.999, eps 1e-8) with optional *coupled* L2 weight decay.

  As in micronet's ``torch.optim.Adam(weight_decay=wd)``: ``wd * p`` is added to the
  gradient of every parameter before the Adam moments (not AdamW's decoupled decay).
  """
  parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
  parts += [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8), optax.scale_by_learning_rate(learning_rate)]
  return optax.chain(*parts)


def _copy_arrays(tree: Any) -> Any:
  """``tree`` with every array in a new device buffer, placement and dtype kept: one
  batched transfer, no compilation (``may_alias=False`` forces the copy)."""
  return jax.device_put(tree, may_alias=False)


def create_train_state(
    apply_fn: Callable, variables: dict, tx: optax.GradientTransformation, seed: int = 0,
    frozen: Sequence[str] = (),
    project: Callable | None = None,
) -> TrainState:
  """``project`` (params -> params) is applied to the initial params and after every step.

  The state holds its own copy of ``variables``' device arrays: ``train_step`` donates
  (frees) the state, and the caller's variables must outlive it.
  """
  variables = dict(_copy_arrays(variables))
  params = variables.pop("params")
  if project is not None:
    params = jax.jit(project)(params)
  state = TrainState.create(
      apply_fn=apply_fn, params=params, tx=tx, model_state=variables,
      rng=jax.random.key(seed), frozen=tuple(frozen), project=project,
  )
  # An int32 array from the start: a Python 0 would give the first step its own
  # (weakly typed) dispatch signature.
  return state.replace(step=jnp.zeros((), jnp.int32))


def _metrics(logits: Array, labels: Array, weights: Array) -> dict[str, Array]:
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return {
      "loss": jnp.sum(losses * weights),
      "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
      "count": jnp.sum(weights),
  }


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer step on a batch. Returns the new state and summed batch metrics."""
  mutable = [c for c in state.model_state if c not in state.frozen]
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    variables = {"params": params, **state.model_state}
    if mutable:
      logits, updates = state.apply_fn(variables, x, train=True, rngs={"dropout": dropout_rng}, mutable=mutable)
    else:
      logits, updates = state.apply_fn(variables, x, train=True, rngs={"dropout": dropout_rng}), {}
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, updates)

  (_, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, model_state={**state.model_state, **updates})
  if state.project is not None:
    state = state.replace(params=state.project(state.params))
  return state, _metrics(logits, y, jnp.ones(y.shape, jnp.float32))


@jax.jit
def eval_step(state: TrainState, x: Array, y: Array, mask: Array) -> dict[str, Array]:
  logits = state.apply_fn(state.variables, x, train=False)
  return _metrics(logits, y, mask)


def _summarise(batches: list[dict[str, Array]]) -> dict[str, float]:
  totals = jax.device_get(jax.tree.map(lambda *a: jnp.sum(jnp.stack(a)), *batches))
  n = float(totals["count"])
  return {"loss": float(totals["loss"]) / n, "accuracy": float(totals["correct"]) / n}


def evaluate(state: TrainState, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> dict[str, float]:
  """Loss and accuracy over all of (x, y), in fixed-size padded batches."""
  return _summarise([eval_step(state, xb, yb, m) for xb, yb, m in data_lib.eval_batches(x, y, batch_size)])


def fit(
    state: TrainState,
    dataset: data_lib.Dataset,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    eval_batch_size: int = 1000,
    progress: bool = True,
    log: Callable[[str], Any] | None = print,
) -> tuple[TrainState, list[dict[str, float]]]:
  """Trains for ``epochs`` epochs, evaluating on the test split after each one.

  Returns the final state and one record per epoch: train loss/accuracy, test
  loss/accuracy and wall-clock seconds (the first epoch includes compilation).
  """
  history = []
  steps = len(dataset.x_train) // batch_size
  for epoch in range(1, epochs + 1):
    start = time.perf_counter()
    batches = data_lib.train_batches(dataset.x_train, dataset.y_train, batch_size, seed=seed * 100_003 + epoch)
    metrics = []
    for x, y in tqdm(batches, total=steps, desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False):
      state, m = train_step(state, x, y)
      metrics.append(m)
    train = _summarise(metrics)
    seconds = time.perf_counter() - start  # _summarise waited for the last step
    test = evaluate(state, dataset.x_test, dataset.y_test, eval_batch_size)
    record = {
        "epoch": epoch, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
        "test_loss": test["loss"], "test_accuracy": test["accuracy"], "seconds": seconds,
    }
    history.append(record)
    if log is not None:
      log(f"epoch {epoch:3d}  train loss {train['loss']:.4f}  train acc {train['accuracy']:.4f}  "
          f"test acc {test['accuracy']:.4f}  ({seconds:.1f}s)")
  return state, history


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_DIR = "checkpoint"


def save_checkpoint(run_dir: str, variables: dict) -> str:
  """Writes ``variables`` (params and every model-state collection) with orbax."""
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, jax.device_get(variables), force=True)
  ckptr.wait_until_finished()
  return path


def load_checkpoint(run_dir: str, like: dict) -> dict:
  """Reads variables saved by ``save_checkpoint`` into the structure of ``like``.

  ``like`` is a variables tree (or its ``jax.eval_shape``) of the model the checkpoint
  is meant for; a checkpoint from another model fails with the paths that differ.
  """
  import orbax.checkpoint as ocp

  path = os.path.abspath(os.path.join(run_dir, CHECKPOINT_DIR))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint in {run_dir} (expected {path})")
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
  try:
    restored = ocp.StandardCheckpointer().restore(path, target)
  except (ValueError, KeyError) as e:
    # chained: the message names the mismatch, the cause shows where orbax found it
    raise ValueError(f"checkpoint {path} does not fit this model: {e}") from e
  problems = shape_mismatches(target, restored)
  if problems:  # orbax restores saved shapes whatever the target says
    raise ValueError(f"checkpoint {path} does not fit this model:\n  " + "\n  ".join(problems))
  return restored


def write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def package_versions() -> dict[str, str]:
  import importlib.metadata as md
  import platform

  out = {"python": platform.python_version()}
  for pkg in ("micronet-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = "not installed"
  out["backend"] = jax.default_backend()
  out["devices"] = ", ".join(sorted({d.device_kind for d in jax.devices()}))
  return out
