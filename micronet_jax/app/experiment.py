"""Run directories: one training (or pruning) run from a frozen config, and reloading it.

This is what ``micronet-jax train|prune`` and the scripts in ``experiments/`` call. A
run directory holds ``config.json`` (a ``TrainConfig``), ``metrics.json``
(accuracies, per-epoch history, seconds per epoch, the config and the package
versions) and an orbax ``checkpoint/`` with every variable collection. ``train
--from DIR`` starts from another run's checkpoint, with that run's architecture.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from micronet_jax.app import data as data_lib
from micronet_jax._src.core import binary as binary_lib
from micronet_jax import models
from micronet_jax._src.prune import slimming as prune_lib
from micronet_jax._src.core import rules as rules_lib
from micronet_jax.app import train as train_lib
from micronet_jax._src.flax.calibrate import calibrate, make_observer
from micronet_jax.app.errors import ConfigError
from micronet_jax._src.core.observers import OBSERVERS as OBSERVER_NAMES
from micronet_jax._src.core.quantizers import MAX_BITS, MIN_BITS
from micronet_jax._src.flax.stats import model_stats
from micronet_jax._src.flax.transform import QuantizedModel, quantize_model, quantize_variables, summary

QUANT_METHODS = ("float", *rules_lib.PRESETS)
BINARY_BITS = {"binary": 1, "ternary": 2}  # weight bits of the wbwtab methods
LR_SCHEDULES = ("constant", "cosine")
# Which layers the binary preset counts: micronet's convs only, or also dense layers for
# networks with only two convs (LeNet: conv1 and the classifier float, conv2 and fc1 binary).
BINARY_LAYERS = {"lenet": "all"}
INPUT_SHAPES = {"fashion_mnist": (28, 28, 1), "mnist": (28, 28, 1)}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: str = "lenet"
  model_cfg: tuple[int, ...] | None = None  # channel widths (e.g. of a pruned network)
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  quant: str = "iao"
  w_bits: int = 8
  a_bits: int = 8
  epochs: int = 8
  batch_size: int = 128
  eval_batch_size: int = 1000
  lr: float = 1e-3
  lr_schedule: str = "constant"  # or "cosine": decays to 0 over all training steps
  weight_decay: float = 0.0
  sparsity: float = 0.0  # network-slimming L1 strength on BatchNorm scales
  observer: str = "moving_average"  # iao activation observer / calibration method
  fold_bn: bool = False  # iao: fold BatchNorms that directly consume a conv
  qaft: bool = False  # fine-tune with observers and BatchNorm statistics frozen
  seed: int = 0
  out: str = "runs/lenet-iao-w8a8"
  from_run: str | None = None
  limit_train: int | None = None
  limit_test: int | None = None

  def __post_init__(self):
    if self.model_cfg is not None:
      object.__setattr__(self, "model_cfg", tuple(int(c) for c in self.model_cfg))
    try:
      self._validate()
    except ValueError as e:
      raise ConfigError(str(e)) from None

  def _validate(self):
    if self.model not in models.MODELS:
      raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(models.MODELS)}")
    if self.dataset not in data_lib.DATASETS:
      raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {list(data_lib.DATASETS)}")
    if self.quant not in QUANT_METHODS:
      raise ValueError(f"unknown quantization method {self.quant!r}; choose one of {list(QUANT_METHODS)}")
    if self.quant in BINARY_BITS:  # fixed widths: binary W1, ternary W2 (32: float), A1 or A32
      if self.w_bits not in (BINARY_BITS[self.quant], 32):
        raise ValueError(f"{self.quant} weights are {BINARY_BITS[self.quant]} bit(s): w_bits must be "
                         f"{BINARY_BITS[self.quant]} (or 32 for float weights); got {self.w_bits}")
      if self.a_bits not in (1, 32):
        raise ValueError(f"with {self.quant} weights a_bits must be 1 (binary) or 32 (float ReLU); got {self.a_bits}")
    for name in ("w_bits", "a_bits") if self.quant not in BINARY_BITS else ():
      bits = getattr(self, name)
      if not (MIN_BITS <= bits <= MAX_BITS or bits == 32):
        raise ValueError(f"{name} must be in {MIN_BITS}..{MAX_BITS}, or 32 for float; got {bits}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
    if not self.lr > 0:
      raise ValueError(f"lr must be > 0, got {self.lr}")
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"unknown lr schedule {self.lr_schedule!r}; choose one of {list(LR_SCHEDULES)}")
    for name in ("weight_decay", "sparsity"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
    for name in ("limit_train", "limit_test"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
    if self.observer not in OBSERVER_NAMES:
      raise ValueError(f"unknown observer {self.observer!r}; choose one of {list(OBSERVER_NAMES)}")
    if self.qaft and self.quant == "float":
      raise ValueError("qaft fine-tunes a quantized model: choose --quant (and --from a QAT or PTQ run)")

  @property
  def label(self) -> str:
    if self.quant == "float":
      return "float"
    return f"{self.quant} W{self.w_bits}A{self.a_bits}"

  def example_input(self) -> jax.Array:
    return jnp.zeros((1, *INPUT_SHAPES[self.dataset]), jnp.float32)


def method_defaults(quant: str, qaft: bool = False) -> tuple[int, int, float]:
  """(w_bits, a_bits, lr) that ``micronet-jax train`` uses when they are not given.

  Binary/ternary: their fixed weight bits, binary activations and micronet's wbwtab rate
  0.01 (at 1e-3 the latent weights, clipped to [-1, 1], barely cross zero). QAFT
  fine-tunes at 1e-5. Otherwise ``TrainConfig``'s defaults.
  """
  d = TrainConfig()
  w_bits, a_bits, lr = (BINARY_BITS[quant], 1, 1e-2) if quant in BINARY_BITS else (d.w_bits, d.a_bits, d.lr)
  return w_bits, a_bits, 1e-5 if qaft else lr


def learning_rate(config: TrainConfig, total_steps: int) -> float | optax.Schedule:
  """``config.lr`` held constant, or cosine-decayed from it to 0 over ``total_steps``.

  Binary and ternary weights need the decay most: with a constant rate their latent
  weights keep crossing zero, so the sign pattern (and the test accuracy) jumps between
  epochs until the last one.
  """
  if config.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(config.lr, max(total_steps, 1))
  return config.lr


def build(config: TrainConfig, num_classes: int = 10):
  """(float model, model to train: the float one or its quantized version)."""
  kwargs = {"cfg": config.model_cfg} if config.model_cfg is not None else {}
  binary_act = config.quant in BINARY_BITS and config.a_bits == 1
  if binary_act:  # sign replaces the ReLUs in front of the binarised layers (see binary.py)
    fields = getattr(models.MODELS[config.model], "__dataclass_fields__", {})
    if "act" not in fields:
      raise ConfigError(f"model {config.model} has no `act` field to replace its ReLUs by the sign: binary "
                        "activations (a_bits 1) need lenet, nin or nin_gc (or a_bits 32)")
    kwargs["act"] = binary_lib.identity
    # Dropout in front of a sign is not dropout: sign(0) = +1, so every dropped unit
    # reads +1, a biased corruption the evaluated network never sees (LeNet W1A1 on
    # Fashion-MNIST: 79.2% with LeNet's dropout 0.5, 84.7% without).
    if "dropout_rate" in fields:
      kwargs["dropout_rate"] = 0.0
  try:
    model = models.get_model(config.model, num_classes=num_classes, **kwargs)
  except TypeError:
    raise ConfigError(f"model {config.model} takes no channel config") from None
  if config.quant in BINARY_BITS:
    rules = rules_lib.binary_rules(config.w_bits, config.a_bits, layers=BINARY_LAYERS.get(config.model, "conv"))
  elif config.quant == "iao":
    rules = rules_lib.iao_rules(config.w_bits, config.a_bits, fold_bn=config.fold_bn,
                                observer=make_observer(config.observer, config.a_bits))
  else:
    rules = rules_lib.preset(config.quant, config.w_bits, config.a_bits)
  return model, (quantize_model(model, rules) if rules else model)


def read_config(run_dir: str) -> TrainConfig:
  """The ``TrainConfig`` a run directory was made with."""
  path = os.path.join(run_dir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{run_dir} is not a run directory (no config.json)")
  with open(path) as f:
    return TrainConfig(**json.load(f))


def load_run(run_dir: str) -> tuple[TrainConfig, Any, dict]:
  """(config, model as trained, variables) of a run directory."""
  config = read_config(run_dir)
  _, net = build(config)
  x0 = config.example_input()
  like = jax.eval_shape(lambda: net.init(jax.random.key(0), x0, train=False))
  try:
    variables = train_lib.load_checkpoint(run_dir, like)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from None
  return config, net, variables


def _start_variables(config: TrainConfig, net: Any, x0: jax.Array, log: Callable) -> dict:
  """Fresh variables, or the ``from_run`` checkpoint fitted to this run's quantization."""
  if config.from_run is None:
    return jax.jit(lambda k: net.init(k, x0, train=False))(jax.random.key(config.seed))
  src, _, variables = load_run(config.from_run)
  if (src.model, src.model_cfg) != (config.model, config.model_cfg):
    raise ConfigError(f"--from {config.from_run} holds {src.model} cfg={src.model_cfg}, "
                      f"not {config.model} cfg={config.model_cfg}")
  quant_fields = lambda c: (c.quant, c.w_bits, c.a_bits, c.observer, c.fold_bn)
  same_quant = quant_fields(src) == quant_fields(config)
  if same_quant:
    log(f"starting from {config.from_run} ({src.label}), observers included")
    return variables
  variables = {k: v for k, v in variables.items() if k != "quant_stats"}
  log(f"starting from {config.from_run} ({src.label}) weights" + ("" if config.quant == "float" else
                                                                ", fresh observers"))
  if isinstance(net, QuantizedModel):
    variables = quantize_variables(net, variables, x0, train=False)
  return variables


def run(config: TrainConfig, progress: bool = True, log: Callable[[str], Any] = print) -> dict:
  """Trains as ``config`` says and writes the run directory. Returns metrics.json's dict."""
  dataset = data_lib.load(config.dataset, config.data_dir)
  dataset = data_lib.subset(dataset, config.limit_train, config.limit_test)
  if config.batch_size > len(dataset.x_train):
    raise ConfigError(f"batch size {config.batch_size} is larger than the training set "
                      f"({len(dataset.x_train)} examples)")
  _, net = build(config, dataset.num_classes)
  x0 = config.example_input()
  try:  # micronet's centering and clipping of binary weights, after every step
    project = binary_lib.center_clip_projection(net, x0, train=False)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  variables = _start_variables(config, net, x0, log)
  if isinstance(net, QuantizedModel):
    log(summary(net, x0, train=False))
  total_steps = config.epochs * (len(dataset.x_train) // config.batch_size)
  tx = train_lib.make_optimizer(learning_rate(config, total_steps), config.weight_decay)
  if config.sparsity:
    tx = optax.chain(prune_lib.bn_sparsity(config.sparsity), tx)
  # QAFT: observers and BatchNorm statistics stay as the QAT/PTQ run left them.
  frozen = ("quant_stats", "batch_stats") if config.qaft else ()
  state = train_lib.create_train_state(net.apply, variables, tx, seed=config.seed, frozen=frozen, project=project)
  log(f"{config.label}: {config.model} on {config.dataset} ({len(dataset.x_train)} train / "
      f"{len(dataset.x_test)} test, from {dataset.source}), {config.epochs} epochs, batch {config.batch_size}")
  start = time.perf_counter()
  state, history = train_lib.fit(
      state, dataset, config.epochs, config.batch_size, config.seed, config.eval_batch_size,
      progress=progress, log=log,
  )
  accs = [h["test_accuracy"] for h in history]
  steady = [h["seconds"] for h in history[1:]] or [history[0]["seconds"]]
  metrics = {
      "label": config.label,
      "test_accuracy": accs[-1],
      "best_test_accuracy": max(accs),
      "epochs": config.epochs,
      "seconds_per_epoch": sum(steady) / len(steady),
      "first_epoch_seconds": history[0]["seconds"],
      "total_seconds": time.perf_counter() - start,
      "history": history,
      "model_stats": model_stats(net, state.variables, x0, train=False).row(),
      "config": dataclasses.asdict(config),
      "versions": train_lib.package_versions(),
  }
  write_run(config.out, config, state.variables, metrics)
  return metrics


def write_run(out: str, config: TrainConfig, variables: dict, metrics: dict) -> None:
  os.makedirs(out, exist_ok=True)
  train_lib.write_json(os.path.join(out, "config.json"), dataclasses.asdict(config))
  train_lib.write_json(os.path.join(out, "metrics.json"), metrics)
  train_lib.save_checkpoint(out, variables)


def prune_run(from_run: str, out: str, percent: float, regular: int = 1, compensate_beta: bool = True,
              data_dir: str | None = None, log: Callable[[str], Any] = print) -> dict:
  """Slims a float run and writes a run directory that ``train --from`` accepts.

  Reports test accuracy of the original, of the masked original (pruned channels'
  gamma zeroed, and beta too unless ``compensate_beta``: the network the pruned one
  reproduces) and of the pruned network, with parameters and size.
  """
  src, model, variables = load_run(from_run)
  if src.quant != "float":
    raise ConfigError(f"{from_run} is a {src.label} run; prune a float run, then quantize the pruned one")
  try:
    new_model, new_vars, plan = prune_lib.prune(model, variables, percent, regular, compensate_beta)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  dataset = data_lib.load(src.dataset, data_dir or src.data_dir)
  x0 = src.example_input()

  def accuracy(m, v):
    state = train_lib.create_train_state(m.apply, v, optax.identity())
    return train_lib.evaluate(state, dataset.x_test, dataset.y_test, src.eval_batch_size)["accuracy"]

  before, after = model_stats(model, variables, x0, train=False), model_stats(new_model, new_vars, x0, train=False)
  metrics = {
      "label": f"pruned {percent:.0%}" + (f" (regular {regular})" if regular > 1 else ""),
      "percent": percent, "regular": regular, "threshold": plan.threshold,
      "cfg_before": list(src.model_cfg or models.get_model(src.model).cfg), "cfg": list(plan.cfg),
      "test_accuracy_before": accuracy(model, variables),
      # what the pruned network reproduces: pruned channels' beta kept (folded into the next
      # bias) with compensation, zeroed as micronet does without it
      "test_accuracy_masked": accuracy(model, prune_lib.mask_variables(model, variables, plan,
                                                                        zero_beta=not compensate_beta)),
      "test_accuracy": accuracy(new_model, new_vars),
      "model_stats_before": before.row(), "model_stats": after.row(),
      "params_removed": 1 - after.params / before.params,
      "versions": train_lib.package_versions(),
  }
  config = dataclasses.replace(src, model_cfg=tuple(plan.cfg), from_run=from_run, out=out, sparsity=0.0)
  metrics["config"] = dataclasses.asdict(config)
  write_run(out, config, new_vars, metrics)
  log(f"threshold |gamma| > {plan.threshold:.4g}; cfg {metrics['cfg_before']} -> {list(plan.cfg)}\n"
      f"| model | params | MMACs | test acc |\n|---|---|---|---|\n"
      f"| original | {before.params:,} | {before.macs / 1e6:.2f} | {100 * metrics['test_accuracy_before']:.2f}% |\n"
      f"| masked (pruned gamma = 0{'' if compensate_beta else ', beta = 0'}) | {before.params:,} | "
      f"{before.macs / 1e6:.2f} | "
      f"{100 * metrics['test_accuracy_masked']:.2f}% |\n"
      f"| pruned | {after.params:,} | {after.macs / 1e6:.2f} | {100 * metrics['test_accuracy']:.2f}% |")
  return metrics


def ptq_run(from_run: str, out: str, method: str = "percentile", w_bits: int = 8, a_bits: int = 8,
            num_batches: int = 200, batch_size: int = 32, fold_bn: bool = True, data_dir: str | None = None,
            seed: int = 0, progress: bool = True, log: Callable[[str], Any] = print) -> dict:
  """Post-training quantization of a float run: calibrate IAO observers, freeze, report.

  Calibration batches are ``num_batches`` shuffled training batches of ``batch_size``
  (no augmentation). Reports test accuracy of the float and of the quantized model.
  """
  src, model, variables = load_run(from_run)
  if src.quant != "float":
    raise ConfigError(f"{from_run} is a {src.label} run; PTQ starts from a float run")
  config = dataclasses.replace(src, quant="iao", w_bits=w_bits, a_bits=a_bits, observer=method, fold_bn=fold_bn,
                               from_run=from_run, out=out, data_dir=data_dir or src.data_dir, seed=seed)
  dataset = data_lib.load(config.dataset, config.data_dir)
  _, qmodel = build(config, dataset.num_classes)
  x0 = config.example_input()
  qvars = quantize_variables(qmodel, variables, x0, train=False)
  if num_batches * batch_size > len(dataset.x_train):
    raise ConfigError(f"{num_batches} batches of {batch_size} exceed the training set ({len(dataset.x_train)})")
  batches = (x for x, _ in data_lib.train_batches(dataset.x_train, dataset.y_train, batch_size, seed=seed))
  start = time.perf_counter()
  qvars = calibrate(qmodel, qvars, batches, num_batches, progress=progress)
  seconds = time.perf_counter() - start

  def accuracy(m, v):
    state = train_lib.create_train_state(m.apply, v, optax.identity())
    return train_lib.evaluate(state, dataset.x_test, dataset.y_test, src.eval_batch_size)["accuracy"]

  metrics = {
      "label": f"PTQ {method} W{w_bits}A{a_bits}" + (", BN folding on" if fold_bn else ""),
      "method": method, "calibration_batches": num_batches, "calibration_batch_size": batch_size,
      "calibration_seconds": seconds,
      "float_test_accuracy": accuracy(model, variables),
      "test_accuracy": accuracy(qmodel, qvars),
      "model_stats": model_stats(qmodel, qvars, x0, train=False).row(),
      "config": dataclasses.asdict(config), "versions": train_lib.package_versions(),
  }
  metrics["best_test_accuracy"] = metrics["test_accuracy"]
  write_run(out, config, qvars, metrics)
  log(f"| model | test acc |\n|---|---|\n| float | {100 * metrics['float_test_accuracy']:.2f}% |\n"
      f"| {metrics['label']} | {100 * metrics['test_accuracy']:.2f}% |")
  return metrics


ARTIFACT_FILE = "integer_model.jax"


def convert_run(from_run: str, out: str, data_dir: str | None = None, batch_size: int = 500,
                log: Callable[[str], Any] = print) -> dict:
  """Integer deploy of an IAO run: ``deploy.npz`` (int8/int32 arrays), a serialized
  ``jax.export`` of ``integer_apply`` with the arrays baked in (``integer_model.jax``,
  any batch size), ``deploy.json``; reports sizes and fake-quant vs integer accuracy."""
  from micronet_jax._src.deploy.integer import convert, integer_apply
  from micronet_jax._src.deploy.serialize import export

  src, qmodel, variables = load_run(from_run)
  if src.quant != "iao":
    raise ConfigError(f"{from_run} is a {src.label} run; integer conversion needs an iao (QAT or PTQ) run")
  dataset = data_lib.load(src.dataset, data_dir or src.data_dir)
  try:
    deploy = convert(qmodel, variables, jnp.asarray(dataset.x_test[:2]))
  except ValueError as e:
    raise ConfigError(f"cannot convert {from_run}: {e}") from None
  int_fn = jax.jit(lambda xq: integer_apply(deploy, xq))
  fq_fn = jax.jit(lambda x: qmodel.apply(variables, x, train=False))
  agree = int_correct = fq_correct = 0
  for i in range(0, len(dataset.x_test), batch_size):
    x, y = dataset.x_test[i : i + batch_size], dataset.y_test[i : i + batch_size]
    p_int = np.asarray(int_fn(deploy.quantize_input(x))).argmax(-1)
    p_fq = np.asarray(fq_fn(jnp.asarray(x))).argmax(-1)
    agree += int((p_int == p_fq).sum())
    int_correct += int((p_int == y).sum())
    fq_correct += int((p_fq == y).sum())
  n = len(dataset.x_test)

  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, "deploy.npz"), **deploy.flat_arrays())
  exported = export(deploy, dataset.x_test.shape[1:])
  with open(os.path.join(out, ARTIFACT_FILE), "wb") as f:
    f.write(exported.serialize())
  float_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables["params"]))
  metrics = {
      "from_run": from_run, "label": src.label, "dataset": src.dataset,
      "input_scale": deploy.input_scale, "input_zero_point": deploy.input_zero_point,
      "input_range": list(deploy.input_range), "input_shape": list(dataset.x_test.shape[1:]),
      "deploy_bytes": deploy.nbytes(), "deploy_npz_bytes": os.path.getsize(os.path.join(out, "deploy.npz")),
      "artifact_bytes": os.path.getsize(os.path.join(out, ARTIFACT_FILE)),
      "float_params_bytes": 4 * float_params,
      "fake_quant_test_accuracy": fq_correct / n, "integer_test_accuracy": int_correct / n,
      "prediction_agreement": agree / n, "test_images": n, "versions": train_lib.package_versions(),
  }
  train_lib.write_json(os.path.join(out, "deploy.json"), metrics)
  log(f"| artifact | bytes |\n|---|---|\n| float params (float32) | {metrics['float_params_bytes']:,} |\n"
      f"| deploy arrays (int8 weights, int32 bias/multipliers) | {metrics['deploy_bytes']:,} |\n"
      f"| {ARTIFACT_FILE} (StableHLO, arrays included) | {metrics['artifact_bytes']:,} |\n\n"
      f"| forward | test acc |\n|---|---|\n| fake-quant ({src.label}) | {100 * fq_correct / n:.2f}% |\n"
      f"| integer-only | {100 * int_correct / n:.2f}% |\n"
      f"same predicted class on {agree}/{n} test images ({100 * agree / n:.2f}%)")
  return metrics


def eval_artifact(artifact_dir: str, data_dir: str | None = None, batch_size: int = 500,
                  limit_test: int | None = None, log: Callable[[str], Any] = print) -> dict:
  """Evaluates a ``convert_run`` artifact without the model's Python code."""
  meta_path = os.path.join(artifact_dir, "deploy.json")
  if not os.path.exists(meta_path):
    raise ConfigError(f"{artifact_dir} holds no converted model (no deploy.json)")
  with open(meta_path) as f:
    meta = json.load(f)
  with open(os.path.join(artifact_dir, ARTIFACT_FILE), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  dataset = data_lib.subset(data_lib.load(meta["dataset"], data_dir), None, limit_test)
  from micronet_jax._src.deploy.integer import quantize_input

  correct = 0
  for i in range(0, len(dataset.x_test), batch_size):
    x, y = dataset.x_test[i : i + batch_size], dataset.y_test[i : i + batch_size]
    q = quantize_input(x, meta["input_scale"], meta["input_zero_point"], tuple(meta["input_range"]))
    correct += int((np.asarray(exported.call(q)).argmax(-1) == y).sum())
  acc = correct / len(dataset.x_test)
  log(f"{meta['label']} integer artifact: test accuracy {100 * acc:.2f}% on {len(dataset.x_test)} images")
  return {"test_accuracy": acc, "test_images": len(dataset.x_test)}
