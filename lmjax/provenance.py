"""What a run trained on: the software versions recorded with its results.

setup.py admits jax 0.10 to 0.12 (by Python version), and a sweep can be resumed or extended
after an upgrade, so one fit may hold runs compiled by different XLA versions. Each run's
summary and manifest row carry this string, and the sweep says when its runs disagree.

On CPU the string also names how many threads XLA:CPU's pools had: some of its kernels
(the Eigen dots of weight gradients, large reductions) split their sums over the threads,
so the same program rounds differently on 1 core than on 2, and a pinned sweep worker
trains the same run to another loss in the third decimal (docs/performance.md,
eighteenth pass).
"""
from __future__ import annotations

import functools
import os
import platform
from importlib import metadata

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")


@functools.lru_cache(maxsize=None)
def versions() -> dict[str, str]:
  """{'python': '3.11.7', 'jax': '0.10.2', ...} for this process."""
  found = {"python": platform.python_version()}
  for name in PACKAGES:
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:  # run from a tree without that package installed
      found[name] = "?"
  return found


def cpu_threads() -> int:
  """The CPUs this process may run on, to which XLA:CPU sizes its thread pools."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def software(*, on_cpu: bool, onednn_dots: bool = False) -> str:
  """'python 3.11.7, jax 0.10.2, jaxlib 0.10.2, flax 0.12.8, ...': the manifest's column.
  A run that trained `on_cpu` adds ', N cpu threads'; one whose CPU dots ran on oneDNN
  (lmjax.train.uses_onednn) adds ', onednn dots'. Both change how XLA rounds."""
  extra = []
  if on_cpu:
    n = cpu_threads()
    extra.append(f"{n} cpu thread{'s' if n != 1 else ''}")
  if onednn_dots:
    extra.append("onednn dots")
  return ", ".join([*(f"{name} {v}" for name, v in versions().items()), *extra])
