"""Wall time spent making XLA programs: tracing, lowering, compiling or loading from the cache.

A run's first-step time is not its compile time: it misses the init, eval and checkpoint
programs, and it includes one step of work. `CompileClock` listens to the time spans jax
itself records around each phase of every jit (in any thread) and returns the length of
their union, so a trace nested in another trace is counted once.

  with CompileClock() as clock:
    ...                    # anything that may compile
  clock.seconds            # wall seconds inside jax's compile pipeline

Compiles done ahead of a run in a thread marked `off_the_clock` (lmjax.train.CompileAhead)
do not hold anyone up and are not counted; a run that has to wait for one records the wait
(`record_wait`), and that is counted.
"""
from __future__ import annotations

import contextlib
import threading
import time

from jax import monitoring

# Recorded by jax around: tracing to a jaxpr, lowering to StableHLO, and the backend compile
# (which includes a persistent-cache lookup and, on a hit, the load).
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
# lmjax's own: a run waiting for its programs, which another thread is compiling ahead.
WAIT_EVENT = "/lmjax/compile/wait_for_ahead"
EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                    "/jax/core/compile/jaxpr_to_mlir_module_duration", BACKEND_EVENT,
                    WAIT_EVENT})

_off_clock: set[int] = set()   # idents of threads inside `off_the_clock`


@contextlib.contextmanager
def off_the_clock():
  """Compiles in this thread, inside this block, are counted by no CompileClock."""
  ident = threading.get_ident()
  _off_clock.add(ident)
  try:
    yield
  finally:
    _off_clock.discard(ident)


def is_off_the_clock() -> bool:
  return threading.get_ident() in _off_clock


def record_wait(start: float) -> None:
  """Counts [start, now] as compile time on the open clocks: a run waited for programs."""
  monitoring.record_event_time_span(WAIT_EVENT, start, time.time())


def union_seconds(spans: list[tuple[float, float]]) -> float:
  """Length of the union of [start, end] intervals."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(spans):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


class CompileClock:
  """Context manager measuring compile wall time while it is open (see the module doc)."""

  def __init__(self):
    self._spans: list[tuple[float, float]] = []
    self._programs = 0
    self._lock = threading.Lock()

  def _listen(self, event: str, start: float, end: float, **_) -> None:
    if event in EVENTS and threading.get_ident() not in _off_clock:
      with self._lock:
        self._spans.append((start, end))
        self._programs += event == BACKEND_EVENT

  def __enter__(self) -> CompileClock:
    monitoring.register_event_time_span_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    monitoring.unregister_event_time_span_listener(self._listen)

  @property
  def seconds(self) -> float:
    with self._lock:
      return union_seconds(list(self._spans))

  @property
  def programs(self) -> int:
    """Backend compiles (or persistent-cache loads) seen: one per new program."""
    with self._lock:
      return self._programs
