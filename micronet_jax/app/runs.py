"""Run directories and artifact directories: their files, writing and reading them.

A run directory holds ``config.json`` (a ``TrainConfig``), ``metrics.json`` (the
pipeline's result: accuracies, history, seconds, the config and package versions),
``metrics.jsonl`` (a training run's epoch records, one JSON object a line, written as
they come), an orbax ``checkpoint/`` with every variable collection, and
``manifest.json`` (the SHA-256 of every file, checked before anything is read).
Directories are written through ``rundir.RunWriter``: never in place, never over an
existing run without ``overwrite``. ``train --from DIR`` starts
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

from micronet_jax.app import checkpoints, recipes, rundir
from micronet_jax.app.config import TrainConfig, method_defaults
from micronet_jax.app.errors import ConfigError

CONFIG_FILE, METRICS_FILE, EPOCHS_FILE = "config.json", "metrics.json", "metrics.jsonl"
DEPLOY_FILE, ARRAYS_FILE, ARTIFACT_FILE = "deploy.json", "deploy.npz", "integer_model.jax"


def _read_json(path: str) -> dict:
  """A JSON object from ``path``; a file that is not one is a ConfigError naming it."""
  try:
    with open(path) as f:
      obj = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is corrupted (not valid JSON: {e})") from None
  if not isinstance(obj, dict):
    raise ConfigError(f"{path} is corrupted (a JSON {type(obj).__name__}, not an object)")
  return obj


def _config_from(path: str, obj: dict) -> TrainConfig:
  known = {f.name for f in dataclasses.fields(TrainConfig)}
  unknown = sorted(set(obj) - known)
  if unknown:
    raise ConfigError(f"{path} has unknown keys {unknown} (not a micronet-jax run config, or from a newer version)")
  try:
    return TrainConfig(**obj)
  except (TypeError, ValueError) as e:  # ConfigError is a ValueError: its text names the field
    raise ConfigError(f"{path} holds an invalid run config: {e}") from None


def read_config(run_dir: str) -> TrainConfig:
  """The ``TrainConfig`` a run directory (or an interrupted run's ``.incomplete``) was made with."""
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
  return _config_from(path, _read_json(path))


def read_metrics(run_dir: str) -> dict[str, Any]:
  """A run's ``metrics.json`` (give it to the result type's ``from_json``)."""
  return _read_json(os.path.join(run_dir, METRICS_FILE))


def read_epochs(run_dir: str) -> list[dict[str, Any]]:
  """A run's epoch records from ``metrics.jsonl`` (or, for older runs, ``metrics.json``'s history)."""
  path = os.path.join(run_dir, EPOCHS_FILE)
  if not os.path.exists(path):
    return list(read_metrics(run_dir).get("history", []))
  with open(path) as f:
    try:
      return [json.loads(line) for line in f if line.strip()]
    except ValueError as e:
      raise ConfigError(f"{path} is corrupted (a line is not JSON: {e})") from None


def write_epochs(run_dir: str, history: list[dict[str, Any]]) -> None:
  """(Re)writes ``metrics.jsonl`` with ``history``, one record a line."""
  with open(os.path.join(run_dir, EPOCHS_FILE), "w") as f:
    for record in history:
      f.write(json.dumps(record, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())


def is_done(config: TrainConfig) -> bool:
  """Whether ``config.out`` already holds a finished run made with exactly ``config``."""
  return (os.path.exists(os.path.join(config.out, METRICS_FILE))
          and os.path.exists(os.path.join(config.out, CONFIG_FILE)) and read_config(config.out) == config)


def write_config(path: str, config: TrainConfig) -> None:
  rundir.write_json(os.path.join(path, CONFIG_FILE), dataclasses.asdict(config))


def write_run_files(path: str, config: TrainConfig, variables: dict, metrics: dict) -> None:
  """Writes a run's config, metrics and variables' checkpoint into ``path`` (a
  ``RunWriter``'s directory, renamed into place by its ``commit``)."""
  write_config(path, config)
  rundir.write_json(os.path.join(path, METRICS_FILE), metrics)
  checkpoints.save_variables(path, variables)


def write_run(out: str, config: TrainConfig, variables: dict, metrics: dict, *, overwrite: bool = False) -> None:
  """Writes a whole run directory at once, through a ``RunWriter`` (for variables made
  outside a pipeline: a converted checkpoint, a test's fixture)."""
  with rundir.RunWriter(out, overwrite=overwrite) as writer:
    write_run_files(writer.path, config, variables, metrics)
    writer.commit()


def load_run(run_dir: str) -> tuple[TrainConfig, Any, dict]:
  """(config, model as trained, variables) of a run directory, checked against its manifest."""
  if not os.path.isdir(run_dir):
    hint = (f" (an interrupted run is in {rundir.incomplete_dir(run_dir)}: `micronet-jax train --resume {run_dir}`)"
            if os.path.isdir(rundir.incomplete_dir(run_dir)) else "")
    raise ConfigError(f"{run_dir} does not exist{hint}")
  rundir.verify(run_dir)
  config = read_config(run_dir)
  _, net = recipes.build(config)
  x0 = config.example_input()
  like = jax.eval_shape(lambda: net.init(jax.random.key(0), x0, train=False))
  try:
    variables = checkpoints.load_variables(run_dir, like)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from e  # the message says what; the cause, where orbax found it
  except Exception as e:  # orbax/tensorstore errors on unreadable files: never a traceback, never used
    raise ConfigError(f"checkpoint in {run_dir} is corrupted or unreadable ({type(e).__name__}: {e})") from e
  return config, net, variables


def read_deploy(artifact_dir: str) -> dict[str, Any]:
  """An artifact directory's ``deploy.json``, after checking the directory's manifest."""
  path = os.path.join(artifact_dir, DEPLOY_FILE)
  if not os.path.exists(path):
    raise ConfigError(f"{artifact_dir} holds no converted model (no {DEPLOY_FILE})")
  rundir.verify(artifact_dir)
  return _read_json(path)


def read_exported(artifact_dir: str) -> jax.export.Exported:
  """The serialized deploy forward of an artifact directory."""
  path = os.path.join(artifact_dir, ARTIFACT_FILE)
  try:
    with open(path, "rb") as f:
      return jax.export.deserialize(bytearray(f.read()))
  except OSError as e:
    raise ConfigError(f"cannot read {path}: {e.strerror}") from None
  except Exception as e:  # flatbuffer / StableHLO parse errors of a damaged file
    raise ConfigError(f"{path} is corrupted ({type(e).__name__}: {e})") from None


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
  per_channel = given.pop("per_channel", False)  # the same
  model = given.pop("model", None) or src.model
  w_bits, a_bits, lr = method_defaults(quant, qaft)
  fields = dict(
      model=model, model_cfg=src.model_cfg if model == src.model else None, dataset=src.dataset,
      quant=quant, qaft=qaft, w_bits=w_bits, a_bits=a_bits, lr=lr, from_run=from_run,
      fold_bn=bool(fold_bn) or (src.fold_bn and quant == src.quant),
      per_channel=bool(per_channel) or (src.per_channel and quant == src.quant),
      observer=src.observer if quant == src.quant else d.observer,
  )
  fields.update({k: v for k, v in given.items() if v is not None})
  if "out" not in fields:
    fields["out"] = f"runs/{model}-{quant}" + ("" if quant == "float" else f"-w{fields['w_bits']}a{fields['a_bits']}")
  return TrainConfig(**fields)
