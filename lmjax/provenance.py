"""What a run trained on: the software versions recorded with its results.

setup.py admits jax 0.10 to 0.12 (by Python version), and a sweep can be resumed or extended
after an upgrade, so one fit may hold runs compiled by different XLA versions. Each run's
summary and manifest row carry this string, and the sweep says when its runs disagree.
"""
from __future__ import annotations

import functools
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


def software(onednn_dots: bool = False) -> str:
  """'python 3.11.7, jax 0.10.2, jaxlib 0.10.2, flax 0.12.8, ...': the manifest's column.
  With `onednn_dots` (the run's CPU dots ran on oneDNN: lmjax.train.uses_onednn) it ends
  in ', onednn dots', since those kernels round differently from XLA's own."""
  return (", ".join(f"{name} {v}" for name, v in versions().items())
          + (", onednn dots" if onednn_dots else ""))
