"""Training state, jitted train/eval steps with optax, the epoch loop and checkpoints.

Models are called as ``apply_fn(variables, x, train=bool, ...)``. Every collection
other than ``params`` (``batch_stats``, ``quant_stats``, ...) is model state: it is
threaded through ``mutable`` in the train step and read-only in the eval step, so
observers and BatchNorm statistics move only while training. Nothing in a step syncs
with the host: metrics come back as device arrays and are fetched once per epoch.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from micronet_jax.app import data as data_lib
from micronet_jax.app import parallel
from micronet_jax.app.errors import Interrupted

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


def _step(state: TrainState, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
  """One optimizer step on a batch: the new state and the batch's summed metrics."""
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


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
  """One jitted optimizer step on a batch (donates ``state``): the new state and the
  batch's summed metrics. ``fit`` runs the same step inside ``train_chunk``'s scan."""
  return _step(state, x, y)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("batch_sharding",))
def train_chunk(state: TrainState, x: Array, y: Array, order: Array,
                batch_sharding: Any = None) -> tuple[TrainState, dict[str, Array]]:
  """``len(order)`` optimizer steps in one ``lax.scan``, on a dataset held on device.

  ``x``: (N, ...) and ``y``: (N,) the whole training set; ``order``: (steps, batch) int32
  example indices, step ``i`` trains on ``x[order[i]]``. Returns the state and the
  metrics summed over the steps. ``batch_sharding`` places each gathered batch (the
  batch axis over the data mesh); the dataset itself is replicated.
  """
  def body(state, idx):
    xb, yb = x[idx], y[idx]
    if batch_sharding is not None:
      xb = jax.lax.with_sharding_constraint(xb, batch_sharding)
      yb = jax.lax.with_sharding_constraint(yb, batch_sharding)
    return _step(state, xb, yb)

  state, metrics = jax.lax.scan(body, state, order)
  return state, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)


@functools.partial(jax.jit, donate_argnums=0, static_argnames=("batch_sharding",))
def train_indexed_step(state: TrainState, x: Array, y: Array, order: Array, i: Array,
                       batch_sharding: Any = None) -> tuple[TrainState, dict[str, Array]]:
  """One step of ``train_chunk`` on its own: trains on ``x[order[i]]`` (dataset on device).

  XLA:CPU runs a convolution's weight gradient several times slower inside a while loop
  (``lax.scan``) than as a top-level computation (benchmarks/RESULTS.md), so on CPU
  ``fit`` dispatches these one by one; the gather stays on device either way."""
  idx = jax.lax.dynamic_index_in_dim(order, i, keepdims=False)
  xb, yb = x[idx], y[idx]
  if batch_sharding is not None:
    xb = jax.lax.with_sharding_constraint(xb, batch_sharding)
    yb = jax.lax.with_sharding_constraint(yb, batch_sharding)
  return _step(state, xb, yb)


@functools.partial(jax.jit, static_argnames=("n", "steps", "batch_size"))
def epoch_order(seed: int, epoch: int, *, n: int, steps: int, batch_size: int) -> Array:
  """(steps, batch_size) indices of epoch ``epoch`` (0-based): a permutation of range(n)
  drawn from (seed, epoch) on device, its remainder dropped. A function of (seed, epoch)
  only, so a resumed run sees the same batches."""
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  return jax.random.permutation(key, n)[: steps * batch_size].reshape(steps, batch_size).astype(jnp.int32)


@jax.jit
def eval_step(state: TrainState, x: Array, y: Array, mask: Array) -> dict[str, Array]:
  logits = state.apply_fn(state.variables, x, train=False)
  return _metrics(logits, y, mask)


def _summarise(totals: dict[str, Any]) -> dict[str, float]:
  totals = jax.device_get(totals)
  n = float(totals["count"])
  return {"loss": float(totals["loss"]) / n, "accuracy": float(totals["correct"]) / n}


def _add(a: dict[str, Array], b: dict[str, Array]) -> dict[str, Array]:
  return jax.tree.map(jnp.add, a, b)


def _zero_sums() -> dict[str, Array]:
  return {k: jnp.zeros((), jnp.float32) for k in ("loss", "correct", "count")}


def evaluate(state: TrainState, x: np.ndarray, y: np.ndarray, batch_size: int = 1000,
             mesh: Any = None) -> dict[str, float]:
  """Loss and accuracy over all of (x, y), in fixed-size padded batches (sharded over
  ``mesh``'s data axis when given)."""
  totals = _zero_sums()
  for xb, yb, m in data_lib.eval_batches(x, y, batch_size):
    if mesh is not None:
      xb, yb, m = parallel.put((xb, yb, m), parallel.batch_sharded(mesh))
    totals = _add(totals, eval_step(state, xb, yb, m))
  return _summarise(totals)


def fit(
    state: TrainState,
    dataset: data_lib.Dataset,
    epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    eval_batch_size: int = 1000,
    progress: bool = True,
    log: Callable[[str], Any] | None = print,
    *,
    mesh: Any = None,
    chunk_steps: int = 100,
    checkpoints: Any = None,
    on_epoch: Callable[[list[dict[str, float]]], Any] | None = None,
    stop: Any = None,
    resume_hint: str = "",
    scan: bool | None = None,
) -> tuple[TrainState, list[dict[str, float]]]:
  """Trains for ``epochs`` epochs, evaluating on the test split after each one.

  The training set is put on device once; every epoch is ``epoch_order``'s batches run
  as chunks of at most ``chunk_steps`` steps inside one jitted ``lax.scan``
  (``train_chunk``), so the host dispatches once per chunk. Chunks are aligned to
  multiples of ``chunk_steps`` within each epoch, so where a run stops and resumes does
  not change which steps are compiled together.

  ``mesh``: a data mesh (``parallel.data_mesh``; default: one over every device); the
  batch is sharded over it and the state replicated. ``checkpoints``: a
  ``checkpoints.Progress``; with one, the run continues from its latest checkpoint when
  there is one, saves every ``checkpoints.every`` steps and at each epoch end, and on a
  ``stop`` request (``interrupt.StopOnSignal``) saves and raises ``Interrupted``.
  ``on_epoch`` gets the records so far after each epoch (and once after a resume).
  ``scan``: run each chunk as one ``lax.scan`` (default: on accelerators) or as its steps
  dispatched one by one (``train_indexed_step``, the default on CPU, where XLA runs conv
  gradients inside a loop several times slower); both keep the data on device.

  Returns the final state and one record per epoch: train loss/accuracy, test
  loss/accuracy and wall-clock seconds (the first epoch includes compilation).
  """
  mesh = parallel.data_mesh() if mesh is None else mesh
  # On CPU, steps inside a scan run slower than dispatched ones (``train_indexed_step``).
  use_scan = mesh.devices.flat[0].platform != "cpu" if scan is None else scan
  parallel.check_divisible(mesh, batch_size)
  parallel.check_divisible(mesh, eval_batch_size, "eval batch size")
  n = len(dataset.x_train)
  steps_per_epoch = n // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch size {batch_size} is larger than the training set ({n} examples)")
  total = epochs * steps_per_epoch
  repl, shard = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  state = parallel.put(state, repl)
  x_all, y_all = parallel.put((dataset.x_train, dataset.y_train), repl)
  sums, history, seconds = _zero_sums(), [], 0.0
  if checkpoints is not None:
    restored = checkpoints.restore(state, sums)
    if restored is not None:
      state, sums, meta = restored
      state, sums = parallel.put((state, sums), repl)
      history, seconds = list(meta["history"]), float(meta["epoch_seconds"])
      if log is not None:
        log(f"resuming at step {int(state.step)} of {total} (epoch {len(history) + 1})")
      if on_epoch is not None:
        on_epoch(list(history))

  def meta(epoch_seconds):
    return {"history": history, "epoch_seconds": epoch_seconds}

  step = int(jax.device_get(state.step))
  last_saved, order = step, None
  bar = tqdm(total=total, initial=step, desc="training", unit="step", disable=not progress, leave=False)
  try:
    while step < total:
      epoch, offset = divmod(step, steps_per_epoch)
      if order is None or offset == 0:
        order = jax.device_put(epoch_order(seed, epoch, n=n, steps=steps_per_epoch, batch_size=batch_size),
                               parallel.batch_sharded(mesh, batch_axis=1))
      end = min((offset // chunk_steps + 1) * chunk_steps, steps_per_epoch)
      bar.set_description(f"epoch {epoch + 1}/{epochs}")
      start = time.perf_counter()
      if use_scan:
        state, m = train_chunk(state, x_all, y_all, order[offset:end], batch_sharding=shard)
        sums = _add(sums, m)
      else:
        for i in range(offset, end):
          state, m = train_indexed_step(state, x_all, y_all, order, np.int32(i), batch_sharding=shard)
          sums = _add(sums, m)
      jax.block_until_ready(sums)
      seconds += time.perf_counter() - start
      step += end - offset
      bar.update(end - offset)
      if end == steps_per_epoch:
        train = _summarise(sums)
        test = evaluate(state, dataset.x_test, dataset.y_test, eval_batch_size, mesh)
        record = {
            "epoch": epoch + 1, "train_loss": train["loss"], "train_accuracy": train["accuracy"],
            "test_loss": test["loss"], "test_accuracy": test["accuracy"], "seconds": seconds,
        }
        history.append(record)
        sums, seconds = _zero_sums(), 0.0
        if log is not None:
          log(f"epoch {epoch + 1:3d}  train loss {train['loss']:.4f}  train acc {train['accuracy']:.4f}  "
              f"test acc {test['accuracy']:.4f}  ({record['seconds']:.1f}s)")
        if on_epoch is not None:
          on_epoch(list(history))
      stopping = stop is not None and stop.requested
      due = checkpoints is not None and (end == steps_per_epoch or stopping or
                                         (checkpoints.every and step - last_saved >= checkpoints.every))
      if due:
        checkpoints.save(state, sums, meta(seconds))
        last_saved = step
      if stopping:
        raise Interrupted(stop.signum, step, resume_hint)
  finally:
    bar.close()
  return state, history


# ----------------------------------------------------------------------------- run metadata


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
