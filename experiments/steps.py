"""An experiment is a list of configs: each runs through ``micronet_jax.app.pipelines``
(or is reused), and is reported as the ``micronet-jax`` command that reproduces it
(``cli.config_to_argv``), never as a command line written by hand. The compression
table's step runner (``micronet_jax.app.table.run_step``) does the work."""

from __future__ import annotations

from typing import Any

from micronet_jax.app import table


def run_step(name: str, config: Any, reuse: bool = False, progress: bool = False) -> tuple[str, dict]:
  """(command, result as JSON) of one step. With ``reuse`` a step whose result file
  exists is not run again (a training run only when it was made with exactly ``config``);
  otherwise it is run again in place: an experiment owns its output folders."""
  cmd, result, _ = table.run_step(name, config, reuse=reuse, progress=progress)
  return cmd, result
