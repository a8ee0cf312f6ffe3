"""Runs many lmjax command lines cheaply: import the heavy libraries once, fork per case.

Input (stdin): JSON list of {"module": "lmjax.train", "argv": [...], "env": {...}}.
Output (stdout): JSON list of {"rc": int, "stderr": str}. Each case runs in a fresh forked
child as `python -m module argv...` would (runpy), so flag definitions never collide.
"""
import json
import os
import runpy
import sys
import tempfile

# Heavy imports that every CLI needs; lmjax's CLI modules are NOT imported here (they
# define absl flags at import time, which the children do themselves).
import flax.linen  # noqa: F401
import jax  # noqa: F401
import matplotlib  # noqa: F401
import ml_collections  # noqa: F401
import numpy  # noqa: F401
import optax  # noqa: F401
import orbax.checkpoint  # noqa: F401
import scipy.optimize  # noqa: F401

import lmjax.config  # noqa: F401  (pulls in the model, data, optimizer and checkpoint modules)


def run_case(case: dict) -> dict:
  with tempfile.TemporaryFile("w+") as err:
    pid = os.fork()
    if pid == 0:  # child
      os.dup2(err.fileno(), 2)
      os.environ.update(case.get("env", {}))
      sys.argv = [case["module"]] + case["argv"]
      code = 0
      try:
        runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:  # noqa: BLE001 - report it like Python would
        import traceback
        traceback.print_exc()
        code = 1
      sys.stderr.flush()
      os._exit(code)
    _, status = os.waitpid(pid, 0)
    err.seek(0)
    return {"rc": os.waitstatus_to_exitcode(status), "stderr": err.read()}


if __name__ == "__main__":
  print(json.dumps([run_case(c) for c in json.load(sys.stdin)]))
