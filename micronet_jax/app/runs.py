"""Run directories and artifact directories: their files, writing and reading them.

A run directory holds ``config.json`` (a ``TrainConfig``), ``metrics.json`` (the
pipeline's result: accuracies, history, seconds, the config and package versions) and
an orbax ``checkpoint/`` with every variable collection. ``train --from DIR`` starts
from another run's checkpoint, with that run's architecture (``train_config``).

An artifact directory (``convert``) holds ``deploy.json`` (a ``ConvertResult``),
``deploy.npz`` (the deploy arrays) and ``ARTIFACT_FILE`` (a ``jax.export`` of the deploy
forward, arrays included), which ``eval`` runs without the model's code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from micronet_jax.app import recipes
from micronet_jax.app import train as train_lib
from micronet_jax.app.config import TrainConfig, method_defaults
from micronet_jax.app.errors import ConfigError

CONFIG_FILE, METRICS_FILE = "config.json", "metrics.json"
DEPLOY_FILE, ARRAYS_FILE, ARTIFACT_FILE = "deploy.json", "deploy.npz", "integer_model.jax"


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def read_config(run_dir: str) -> TrainConfig:
  """The ``TrainConfig`` a run directory was made with."""
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
  return TrainConfig(**_read_json(path))


def read_metrics(run_dir: str) -> dict[str, Any]:
  """A run's ``metrics.json`` (give it to the result type's ``from_json``)."""
  return _read_json(os.path.join(run_dir, METRICS_FILE))


def is_done(config: TrainConfig) -> bool:
  """Whether ``config.out`` already holds a finished run made with exactly ``config``."""
  return (os.path.exists(os.path.join(config.out, METRICS_FILE))
          and os.path.exists(os.path.join(config.out, CONFIG_FILE)) and read_config(config.out) == config)


def write_run(out: str, config: TrainConfig, variables: dict, metrics: dict) -> None:
  """Writes a run directory: the config, the metrics and the variables' checkpoint."""
  os.makedirs(out, exist_ok=True)
  train_lib.write_json(os.path.join(out, CONFIG_FILE), dataclasses.asdict(config))
  train_lib.write_json(os.path.join(out, METRICS_FILE), metrics)
  train_lib.save_checkpoint(out, variables)


def load_run(run_dir: str) -> tuple[TrainConfig, Any, dict]:
  """(config, model as trained, variables) of a run directory."""
  config = read_config(run_dir)
  _, net = recipes.build(config)
  x0 = config.example_input()
  like = jax.eval_shape(lambda: net.init(jax.random.key(0), x0, train=False))
  try:
    variables = train_lib.load_checkpoint(run_dir, like)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from e  # the message says what; the cause, where orbax found it
  return config, net, variables


def read_deploy(artifact_dir: str) -> dict[str, Any]:
  """An artifact directory's ``deploy.json``."""
  path = os.path.join(artifact_dir, DEPLOY_FILE)
  if not os.path.exists(path):
    raise ConfigError(f"{artifact_dir} holds no converted model (no {DEPLOY_FILE})")
  return _read_json(path)


def read_exported(artifact_dir: str) -> jax.export.Exported:
  """The serialized deploy forward of an artifact directory."""
  with open(os.path.join(artifact_dir, ARTIFACT_FILE), "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))


def write_exported(artifact_dir: str, exported: jax.export.Exported) -> int:
  """Writes the deploy forward; returns its size in bytes."""
  path = os.path.join(artifact_dir, ARTIFACT_FILE)
  with open(path, "wb") as f:
    f.write(exported.serialize())
  return os.path.getsize(path)


def train_config(from_run: str | None = None, **given: Any) -> TrainConfig:
  """The config ``micronet-jax train`` runs: the ``given`` fields, the rest inherited.

  With ``from_run``: model, channel config and dataset of that run (the cfg only for the
  same model), its observer and BN folding when the method is the same. Bits and lr:
  the method's defaults (``method_defaults``). ``out``: runs/MODEL-QUANT[-wWaA].
  Experiments call it when the step runs, so a step may start from a run made by the
  step before it.
  """
  d = TrainConfig()
  src = read_config(from_run) if from_run else d
  quant, qaft = given.pop("quant", d.quant), given.pop("qaft", False)
  fold_bn = given.pop("fold_bn", False)  # a flag: it adds folding, never removes the inherited one
  model = given.pop("model", None) or src.model
  w_bits, a_bits, lr = method_defaults(quant, qaft)
  fields = dict(
      model=model, model_cfg=src.model_cfg if model == src.model else None, dataset=src.dataset,
      quant=quant, qaft=qaft, w_bits=w_bits, a_bits=a_bits, lr=lr, from_run=from_run,
      fold_bn=bool(fold_bn) or (src.fold_bn and quant == src.quant),
      observer=src.observer if quant == src.quant else d.observer,
  )
  fields.update({k: v for k, v in given.items() if v is not None})
  if "out" not in fields:
    fields["out"] = f"runs/{model}-{quant}" + ("" if quant == "float" else f"-w{fields['w_bits']}a{fields['a_bits']}")
  return TrainConfig(**fields)
