"""One training run from a frozen config: data, model, quantization, fit, artifacts.

This is what ``micronet-jax train`` and the scripts in ``experiments/`` call. A run
directory holds ``config.json``, ``metrics.json`` (accuracies, per-epoch history,
seconds per epoch, the config and the package versions) and an orbax ``checkpoint/``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from micronet_jax import data as data_lib
from micronet_jax import models, rules as rules_lib, train as train_lib
from micronet_jax.quantizers import MAX_BITS, MIN_BITS
from micronet_jax.transform import quantize_model, summary

QUANT_METHODS = ("float", *rules_lib.PRESETS)


class ConfigError(ValueError):
  """A run cannot start with these settings (the CLI reports it and exits with 2)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  model: str = "lenet"
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  quant: str = "iao"
  w_bits: int = 8
  a_bits: int = 8
  epochs: int = 8
  batch_size: int = 128
  eval_batch_size: int = 1000
  lr: float = 1e-3
  weight_decay: float = 0.0
  seed: int = 0
  out: str = "runs/lenet-iao-w8a8"
  limit_train: int | None = None
  limit_test: int | None = None

  def __post_init__(self):
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
    for name in ("w_bits", "a_bits"):
      bits = getattr(self, name)
      if not (MIN_BITS <= bits <= MAX_BITS or bits == 32):
        raise ValueError(f"{name} must be in {MIN_BITS}..{MAX_BITS}, or 32 for float; got {bits}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
    if not self.lr > 0:
      raise ValueError(f"lr must be > 0, got {self.lr}")
    if self.weight_decay < 0:
      raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
    for name in ("limit_train", "limit_test"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

  @property
  def label(self) -> str:
    if self.quant == "float":
      return "float"
    return f"{self.quant} W{self.w_bits}A{self.a_bits}"


def build(config: TrainConfig, num_classes: int = 10):
  """(float model, model to train: the float one or its quantized version)."""
  model = models.get_model(config.model, num_classes=num_classes)
  rules = rules_lib.preset(config.quant, config.w_bits, config.a_bits)
  return model, (quantize_model(model, rules) if rules else model)


def run(config: TrainConfig, progress: bool = True, log: Callable[[str], Any] = print) -> dict:
  """Trains as ``config`` says and writes the run directory. Returns metrics.json's dict."""
  dataset = data_lib.load(config.dataset, config.data_dir)
  dataset = data_lib.subset(dataset, config.limit_train, config.limit_test)
  if config.batch_size > len(dataset.x_train):
    raise ConfigError(f"batch size {config.batch_size} is larger than the training set "
                      f"({len(dataset.x_train)} examples)")
  _, net = build(config, dataset.num_classes)
  x0 = jnp.asarray(dataset.x_train[:1])
  variables = jax.jit(lambda k: net.init(k, x0, train=False))(jax.random.key(config.seed))
  if config.quant != "float":
    log(summary(net, x0, train=False, print_fn=None))
  state = train_lib.create_train_state(
      net.apply, variables, train_lib.make_optimizer(config.lr, config.weight_decay), seed=config.seed
  )
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
      "config": dataclasses.asdict(config),
      "versions": train_lib.package_versions(),
  }
  os.makedirs(config.out, exist_ok=True)
  train_lib.write_json(os.path.join(config.out, "config.json"), dataclasses.asdict(config))
  train_lib.write_json(os.path.join(config.out, "metrics.json"), metrics)
  train_lib.save_checkpoint(config.out, state.variables)
  return metrics
