"""SIGINT / SIGTERM as a request to stop at the next safe point.

A signal that lands while a jitted step runs or orbax writes cannot be acted on there
(raising KeyboardInterrupt inside native code is what crashed runs at shutdown). So the
handler only records the signal; the training loop looks at ``requested`` between
chunks of steps, saves a resumable checkpoint and raises ``Interrupted``, which the CLI
turns into exit status 128 + signal (130 for Ctrl-C, 143 for SIGTERM). A second Ctrl-C
while the loop is finishing interrupts at once.
"""

from __future__ import annotations

import signal
import threading

from micronet_jax.app.errors import Interrupted

__all__ = ["StopOnSignal", "Interrupted"]


class StopOnSignal:
  """Context manager installing the handlers (in the main thread; elsewhere a no-op)."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame) -> None:
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self) -> "StopOnSignal":
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
