"""What every benchmark script reports the same way: the machine, and the JSON it prints."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
from typing import Any

import jax
import numpy as np

from lmjax import allocator
from lmjax import config as config_lib
from lmjax import flops as flops_lib
from lmjax import provenance
from lmjax.config import Config
from lmjax.scaling.plan import SweepConfig, plan


def machine_info() -> dict[str, Any]:
  """CPU model and the ISA features that pick the matmul kernels, cores, software versions."""
  cpu = platform.processor()
  flags = []
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name") and cpu in ("", platform.machine()):
          cpu = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
          flags = line.split(":", 1)[1].split()
  except OSError:
    pass
  return {
      "cpu": cpu or platform.machine(),
      "cores": os.cpu_count(),
      "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "isa": sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")),
      **provenance.versions(),   # python, jax, jaxlib, flax, optax, orbax-checkpoint
      "jax_backend": jax.default_backend(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "malloc": allocator.current(),  # this process's; lmjax's CLIs run on mimalloc
  }


def emit(report: dict, out: str = "") -> None:
  """Prints the report as JSON, and writes it to `out` too when given."""
  text = json.dumps(report, indent=1)
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")


def make_batches(shape: dict, n: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """n host batches of random tokens for shape's batch, seq_len and vocab."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tok = rng.integers(0, shape["vocab"], (shape["batch"], shape["seq_len"] + 1), np.int32)
    out.append({"inputs": tok[:, :-1], "targets": tok[:, 1:],
                "mask": np.ones((shape["batch"], shape["seq_len"]), np.float32)})
  return out


def load_average() -> list[float] | None:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def sweep_shapes(path: str, widths: list[int] | None) -> list[Config]:
  """One planned config per distinct model shape of the sweep, smallest first."""
  spec = importlib.util.spec_from_file_location("sweep_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sweep = config_lib.from_dict(SweepConfig, module.get_config())
  by_shape: dict[str, Config] = {}
  for run in plan(sweep):
    key = json.dumps(dataclasses.asdict(run.config.model), sort_keys=True)
    by_shape.setdefault(key, run.config)
  cfgs = sorted(by_shape.values(), key=lambda c: flops_lib.param_counts(c.model).total)
  if widths:
    missing = sorted(set(widths) - {c.model.d_model for c in cfgs})
    if missing:
      raise SystemExit(f"the sweep has no model of width {missing}; it has "
                       f"{sorted({c.model.d_model for c in cfgs})}")
    cfgs = [c for c in cfgs if c.model.d_model in widths]
  return cfgs
