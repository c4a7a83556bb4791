"""Errors a run reports to its user as one message."""

import signal


class ConfigError(ValueError):
  """A run cannot start with these settings or inputs (bad value, wrong run directory...).
  The CLI exits with status 2."""


class Interrupted(Exception):
  """Training stopped on a signal after saving a resumable checkpoint. The CLI exits
  with status 128 + ``signum`` (130 for SIGINT, 143 for SIGTERM)."""

  def __init__(self, signum: int, step: int, resume_hint: str = ""):
    self.signum, self.step = signum, step
    name = signal.Signals(signum).name
    super().__init__(f"stopped by {name} at step {step}; progress saved" + (f": {resume_hint}" if resume_hint else ""))

  @property
  def exit_status(self) -> int:
    return 128 + self.signum
