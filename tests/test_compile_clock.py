"""CompileClock: the union of jax's own compile-phase time spans."""
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.compile_clock import CompileClock, off_the_clock, record_wait, union_seconds


def test_union_of_spans_equals_a_brute_force_count():
  rng = np.random.default_rng(0)
  for _ in range(50):
    starts = rng.integers(0, 90, size=rng.integers(1, 8))
    spans = [(int(s), int(s + rng.integers(0, 15))) for s in starts]
    covered = np.zeros(120, bool)
    for s, e in spans:
      covered[s:e] = True  # unit cells [t, t+1) inside [s, e)
    assert union_seconds([(float(s), float(e)) for s, e in spans]) == covered.sum()
  assert union_seconds([]) == 0.0


def test_clock_counts_new_programs_once_and_cached_calls_not_at_all():
  scale = np.float32(time.time() % 1 + 2)  # a constant no other test compiled
  f = jax.jit(lambda x: jnp.tanh(x * scale) @ x.T)
  g = jax.jit(lambda x: f(x).sum() + scale)  # traces f again inside g: nested spans
  x = jnp.ones((48, 48))
  with CompileClock() as clock:
    t0 = time.perf_counter()
    f(x).block_until_ready()
    g(x).block_until_ready()
    wall = time.perf_counter() - t0
    after_new, programs = clock.seconds, clock.programs
    f(x).block_until_ready()
    g(x).block_until_ready()
  assert programs == 2 and 0 < after_new <= wall
  assert clock.seconds == after_new and clock.programs == 2  # cached: nothing new
  f2 = jax.jit(lambda x: x + scale)
  f2(x).block_until_ready()  # after the clock closed: not counted
  assert clock.seconds == after_new and clock.programs == 2


def test_compiles_off_the_clock_are_not_counted_but_waiting_for_them_is():
  scale = np.float32(time.time() % 1 + 3)
  x = jnp.ones((32, 32))

  def in_thread(fn, off: bool):
    def body():
      if off:
        with off_the_clock():
          fn(x).block_until_ready()
      else:
        fn(x).block_until_ready()
    t = threading.Thread(target=body)
    t.start()
    t.join()

  with CompileClock() as clock:
    in_thread(jax.jit(lambda x: jnp.sin(x) * scale), off=True)   # compiled ahead of a run
    assert clock.programs == 0 and clock.seconds == 0.0
    start = time.time()
    time.sleep(0.05)
    record_wait(start)                                           # a run waiting for it
    assert clock.programs == 0 and clock.seconds >= 0.05
    waited = clock.seconds
    in_thread(jax.jit(lambda x: jnp.cos(x) * scale), off=False)  # any other thread counts
  assert clock.programs == 1 and clock.seconds > waited
