"""Errors a run reports to its user as one message (the CLI exits with status 2)."""


class ConfigError(ValueError):
  """A run cannot start with these settings or inputs (bad value, wrong run directory...)."""
