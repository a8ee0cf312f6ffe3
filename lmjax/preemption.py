"""Graceful stops: SIGTERM / SIGINT finish the current step, checkpoint, and exit to requeue.

Preemptible TPU VMs get a SIGTERM shortly before they are taken away; a user's Ctrl-C is a
SIGINT. Both set a flag that the training loop reads after each step (a Python bool, no
device sync); the loop saves a checkpoint and raises `Preempted`, and the entry point exits
with EXIT_REQUEUE, which launchers treat as "run me again" (the run resumes from there).
A second SIGINT while stopping falls back to Python's KeyboardInterrupt.
"""
from __future__ import annotations

import signal
import threading

EXIT_REQUEUE = 75  # EX_TEMPFAIL from sysexits.h: "try again later"


class Preempted(Exception):
  """Raised by the training loop after it checkpointed in response to a stop request."""

  def __init__(self, step: int, signum: int | None):
    name = signal.Signals(signum).name if signum else "a stop request"
    super().__init__(f"stopped at step {step} by {name}; checkpoint saved, rerun to resume")
    self.step, self.signum = step, signum


class StopFlag:
  """Set by a signal (or by hand); read by the loop at step boundaries."""

  def __init__(self):
    self.signum: int | None = None
    self._event = threading.Event()

  def request(self, signum: int | None = None) -> None:
    self.signum = signum
    self._event.set()

  def __bool__(self) -> bool:
    return self._event.is_set()


class handle_signals:
  """Context manager: while active, SIGTERM and SIGINT set `flag` instead of killing."""

  def __init__(self, flag: StopFlag, signals=(signal.SIGTERM, signal.SIGINT)):
    self.flag, self.signals, self._old = flag, signals, {}

  def _handler(self, signum, frame):
    if self.flag and signum == signal.SIGINT:
      raise KeyboardInterrupt  # asked twice: stop now
    self.flag.request(signum)

  def __enter__(self) -> StopFlag:
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._old[s] = signal.signal(s, self._handler)
    return self.flag

  def __exit__(self, *exc) -> None:
    for s, old in self._old.items():
      signal.signal(s, old)
