"""An experiment is a list of configs: each runs through ``micronet_jax.app.pipelines``
(or is reused), and is reported as the ``micronet-jax`` command that reproduces it
(``cli.config_to_argv``), never as a command line written by hand."""

from __future__ import annotations

import json
import os
import shlex
from typing import Any

from micronet_jax.app import pipelines, runs
from micronet_jax.app.cli import config_to_argv
from micronet_jax.app.config import ConvertConfig, TrainConfig


def command(config: Any) -> str:
  """The shell command that runs ``config``."""
  return "micronet-jax " + shlex.join(config_to_argv(config))


def result_file(config: Any) -> str:
  """The JSON file ``config``'s pipeline writes its result to."""
  return os.path.join(config.out, runs.DEPLOY_FILE if isinstance(config, ConvertConfig) else runs.METRICS_FILE)


def run_step(name: str, config: Any, reuse: bool = False, progress: bool = False) -> tuple[str, dict]:
  """(command, result as JSON) of one step. With ``reuse`` a step whose result file
  exists is not run again (a training run only when it was made with exactly ``config``)."""
  cmd, path = command(config), result_file(config)
  if reuse and os.path.exists(path) and (not isinstance(config, TrainConfig) or runs.is_done(config)):
    print(f"\n=== {name}: reusing {config.out} (made by: {cmd})", flush=True)
    with open(path) as f:
      return cmd, json.load(f)
  print(f"\n=== {name}: {cmd}", flush=True)
  # an experiment owns its output folders: a step that is not reused is run again in place
  return cmd, pipelines.run(config, progress=progress, overwrite=True).to_json()
