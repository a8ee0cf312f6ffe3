"""The process's malloc: mimalloc for lmjax's command lines on Linux, glibc's on request.

Why: every execution of an XLA:CPU program takes its temporaries as one fresh block (1.1 GiB
for nanoGPT 'small' unsplit, ~320 MiB in its 4 pieces). glibc serves blocks that large by
`mmap` and returns them by `munmap`, so every step page-faults all of it in again (~84,000
minor faults and ~0.3 s of system CPU a 'small' step). mimalloc, told never to hand memory
back (`MIMALLOC_PURGE_DELAY=-1`), reuses blocks of up to several hundred MiB: no faults,
~0.02 s of system CPU, a step ~9% faster. (It takes a 1.1 GiB block from the OS afresh each
step; the CPU splits keep blocks smaller, with a threshold per allocator: lmjax/train.py.)
docs/performance.md, eleventh pass, has the measurements.

The allocator must be chosen before the process starts (LD_PRELOAD), so lmjax's command lines
re-execute themselves once, with the same interpreter and arguments, as the first statement
of their module (before jax is imported: doing it later cost ~2 s of imports twice) and
again, as a no-op by then, in `run_main`. They do so when all of these hold:
  * Linux, and `LMJAX_MALLOC` is unset or "mimalloc" ("system" keeps glibc's malloc);
  * JAX will run on the CPU: no accelerator device file (/dev/nvidia*, /dev/accel*,
    /dev/vfio/*), or JAX_PLATFORMS=cpu. It was measured on XLA:CPU only, where the temp block
    lives in host memory; on GPU/TPU hosts the runtime's own allocators are left alone;
  * LD_PRELOAD is empty (someone who preloads tcmalloc or jemalloc keeps it);
  * the mimalloc library is installed (`cmeel-mimalloc`, a dependency on Linux x86_64);
  * the process was started as `python -m <the module now running>` or `python <script>`,
    so re-executing `sys.orig_argv` repeats exactly this command (not a test harness that
    runs a CLI module inside itself).
The new process inherits the environment plus LD_PRELOAD, and finds LD_PRELOAD set, so it
runs on without re-executing again.
"""
from __future__ import annotations

import functools
import glob
import os
import sys
from typing import Mapping, Sequence

from lmjax.errors import ConfigError, run_cli

ENV = "LMJAX_MALLOC"
CHOICES = ("mimalloc", "system")
# Keep freed memory mapped: XLA:CPU frees its temp block after each step and asks for the
# same size again at the next; returning it to the kernel is what costs the faults.
MIMALLOC_DEFAULTS = {"MIMALLOC_PURGE_DELAY": "-1"}


def mimalloc_library() -> str | None:
  """Path of the installed libmimalloc.so (cmeel-mimalloc's wheel), or None."""
  for site in sys.path:
    hits = sorted(glob.glob(os.path.join(site or ".", "cmeel.prefix", "lib", "libmimalloc.so")))
    if hits:
      return hits[0]
  return None


def choice(environ: Mapping[str, str]) -> str:
  value = environ.get(ENV, "mimalloc").strip().lower() or "mimalloc"
  if value not in CHOICES:
    raise ConfigError(f"{ENV}={environ.get(ENV)!r} is not a known allocator; set it to "
                      f"{' or '.join(CHOICES)} (or unset it for mimalloc).")
  return value


def accelerator_present() -> bool:
  """Whether this host has a GPU or TPU device file (cheap: JAX is not initialised)."""
  return any(glob.glob(p) for p in ("/dev/nvidia[0-9]*", "/dev/accel*", "/dev/vfio/[0-9]*"))


def reexec_env(environ: Mapping[str, str], library: str | None,
               platform: str = sys.platform,
               accelerator: bool = False) -> dict[str, str] | None:
  """The environment to re-execute with, or None to run on in this process as it is."""
  cpu_only = not accelerator or environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu"
  if (not platform.startswith("linux") or choice(environ) != "mimalloc" or not cpu_only
      or environ.get("LD_PRELOAD", "").strip() or library is None):
    return None
  env = {**MIMALLOC_DEFAULTS, **environ}  # the user's MIMALLOC_* settings win
  env["LD_PRELOAD"] = library
  return env


def own_command_line(orig_argv: Sequence[str], main_module) -> list[str] | None:
  """`orig_argv` when re-running it would start `main_module` again, else None."""
  argv = list(orig_argv)
  spec = getattr(main_module, "__spec__", None)
  if spec is not None and "-m" in argv[1:]:
    i = argv.index("-m", 1)
    return argv if i + 1 < len(argv) and argv[i + 1] == spec.name else None
  main_file = getattr(main_module, "__file__", None)
  # Not "the first argument without a dash": interpreter options such as `-W ignore` and
  # `-X importtime` take a value of their own.
  if spec is None and main_file and any(
      os.path.realpath(a) == os.path.realpath(main_file) for a in argv[1:]):
    return argv
  return None


def maybe_reexec() -> None:
  """Re-executes this command line under mimalloc when the rules above say so; a bad
  LMJAX_MALLOC is one line on stderr and exit status 2."""
  run_cli(_maybe_reexec)


def _maybe_reexec() -> None:
  env = reexec_env(os.environ, mimalloc_library(), accelerator=accelerator_present())
  if env is None:
    return
  argv = own_command_line(getattr(sys, "orig_argv", []), sys.modules.get("__main__"))
  if argv is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, env)


@functools.lru_cache(maxsize=1)  # fixed when the process starts
def current() -> str:
  """The allocator this process runs on, for run records: 'mimalloc' or 'system'."""
  try:
    with open("/proc/self/maps") as f:
      return "mimalloc" if "libmimalloc" in f.read() else "system"
  except OSError:  # not Linux
    return "system"
