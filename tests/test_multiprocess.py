"""Two JAX processes on localhost train exactly like one process with the same devices."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from lmjax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "smoke.py"
ARGS = ["--config.train.steps=12", "--config.train.log_every=1", "--config.train.eval_every=6",
        "--config.train.progress=false", "--config.checkpoint.every_steps=6",
        "--config.model.d_model=32", "--config.model.n_layers=1",
        "--config.optim.warmup_steps=2", "--config.mesh.data=2", "--config.mesh.fsdp=2"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def test_two_processes_equal_one(tmp_path):
  cmd = [sys.executable, "-m", "lmjax.train", f"--config={SMOKE}"]
  single = subprocess.run(cmd + [f"--workdir={tmp_path / 'single'}", *ARGS], cwd=ROOT,
                          env=_env(4), capture_output=True, text=True, timeout=300)
  assert single.returncode == 0, single.stderr[-3000:]

  def run_two_processes():
    port = _free_port()
    procs = [subprocess.Popen(cmd + [f"--workdir={tmp_path / 'multi'}", *ARGS,
                                     f"--coordinator_address=localhost:{port}",
                                     "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
      assert p.returncode == 0, err[-3000:]

  def check_equal():
    a, b = read_metrics(str(tmp_path / "single")), read_metrics(str(tmp_path / "multi"))
    assert [r["step"] for r in b] == list(range(1, 13))  # process 0 alone writes metrics
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)
    np.testing.assert_allclose([r["eval_loss"] for r in b if "eval_loss" in r],
                               [r["eval_loss"] for r in a if "eval_loss" in r], rtol=1e-5)

  run_two_processes()
  check_equal()
  # Resume both processes from step 6 (each restores its own data position): same result.
  final = tmp_path / "multi" / "checkpoints" / "12"
  assert final.is_dir()
  shutil.rmtree(final)
  run_two_processes()
  check_equal()
