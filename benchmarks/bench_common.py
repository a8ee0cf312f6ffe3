"""What every benchmark script reports the same way: the machine, and the JSON it prints."""
from __future__ import annotations

import json
import os
import platform
from typing import Any

import jax


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
  import flax
  import optax
  return {
      "cpu": cpu or platform.machine(),
      "cores": os.cpu_count(),
      "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "isa": sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "flax": flax.__version__,
      "optax": optax.__version__,
  }


def emit(report: dict, out: str = "") -> None:
  """Prints the report as JSON, and writes it to `out` too when given."""
  text = json.dumps(report, indent=1)
  print(text)
  if out:
    with open(out, "w") as f:
      f.write(text + "\n")
