"""The training loop end to end: the smoke config learns, resume is exact, bad input is one line."""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.config import Config
from lmjax.metrics import read_metrics
from lmjax.train import train
from tests.util import tree_hash

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "smoke.py"


def _load_config(path: Path, **train_overrides) -> Config:
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.from_dict(Config, module.get_config())
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_overrides))


def _tiny(**train_overrides) -> Config:
  cfg = _load_config(SMOKE, **{"progress": False, **train_overrides})
  model = dataclasses.replace(cfg.model, d_model=32, n_layers=1, n_heads=2, max_len=32)
  return dataclasses.replace(cfg, model=model, optim=dataclasses.replace(cfg.optim, warmup_steps=2),
                             train=dataclasses.replace(cfg.train, seq_len=32, global_batch=8))


def test_smoke_config_learns(tmp_path):
  cfg = _load_config(SMOKE, progress=False)
  summary = train(cfg, str(tmp_path))
  records = read_metrics(str(tmp_path))
  first, last = records[0]["loss"], records[-1]["loss"]
  # The synthetic language has 256 tokens: log(256) = 5.55 nats is "knows nothing".
  assert first > 4.5 and last < first - 1.5, (first, last)
  assert summary["final_eval_loss"] < first - 1.5
  for key in ("step", "loss", "tokens", "flops", "grad_norm", "param_norm", "lr",
              "bits_per_token"):
    assert key in records[-1]
  assert "eval_loss" in records[-1] and records[-1]["step"] == cfg.total_steps()
  saved = config_lib.load(str(tmp_path / "config.json"))
  assert saved == cfg  # the resolved config is saved with the run
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


class _Interrupt(Exception):
  pass


def test_resume_equals_uninterrupted(tmp_path):
  cfg = _tiny(steps=12, log_every=1, eval_every=6)
  cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=6))
  straight = train(cfg, str(tmp_path / "straight"))

  def stop_after_checkpoint(step, record):
    if step == 7:  # step 6 was checkpointed; steps 7+ are lost and recomputed
      raise _Interrupt()

  with pytest.raises(_Interrupt):
    train(cfg, str(tmp_path / "resumed"), on_step=stop_after_checkpoint)
  resumed = train(cfg, str(tmp_path / "resumed"))
  a = read_metrics(str(tmp_path / "straight"))
  b = read_metrics(str(tmp_path / "resumed"))
  assert [r["step"] for r in b] == list(range(1, 13))  # each step logged once
  np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
  np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a],
                             rtol=1e-6)
  assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], rel=1e-6)


def _cli(*args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "lmjax.train", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc, fragment):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert fragment in lines[0], lines[0]


def test_cli_unknown_config_key_is_one_line(tmp_path):
  proc = _cli(f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.model.d_modle=32")
  _assert_one_line_error(proc, "d_modle")
  bad = tmp_path / "bad.py"
  bad.write_text(SMOKE.read_text().replace("return c", "c.train.stepz = 3\n  return c"))
  proc = _cli(f"--config={bad}", f"--workdir={tmp_path / 'w'}")
  _assert_one_line_error(proc, "unknown config key 'train.stepz'")


def test_cli_bad_values_are_one_line(tmp_path):
  cases = [
      (["--config.model.n_heads=3"], "not divisible by model.n_heads"),
      (["--config.mesh.data=3"], "devices"),
      (["--config.train.global_batch=12", "--config.mesh.data=8"],
       "not divisible by the data-parallel size 8"),
      (["--config.data.synthetic_vocab_size=512"], "smaller than the data's vocabulary"),
  ]
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  for extra, fragment in cases:
    proc = _cli(f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}", *extra, env_extra=env)
    _assert_one_line_error(proc, fragment)
  proc = _cli(f"--workdir={tmp_path}", f"--config={tmp_path / 'missing.py'}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_incompatible_workdir_is_refused_and_untouched(tmp_path):
  cfg = _tiny(steps=4, log_every=2)
  train(cfg, str(tmp_path))
  before = tree_hash(tmp_path)
  proc = _cli(f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.model.d_model=48",
              "--config.train.progress=false")
  _assert_one_line_error(proc, "model.d_model")
  assert tree_hash(tmp_path) == before


def test_cli_trains_in_a_relative_workdir(tmp_path):
  # The README's commands use relative workdirs; orbax needs absolute checkpoint paths.
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "lmjax.train", f"--config={SMOKE}", "--workdir=runs/rel",
          "--config.train.steps=6", "--config.train.log_every=2", "--config.train.eval_every=6",
          "--config.checkpoint.every_steps=2", "--config.optim.warmup_steps=1",
          "--config.model.d_model=32", "--config.model.n_layers=1",
          "--config.train.progress=false"]
  proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = sorted(p.name for p in (tmp_path / "runs" / "rel" / "checkpoints").iterdir())
  assert "6" in saved and "4" in saved
  again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # resumes (finished): same final eval loss
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads(again.stdout)["final_eval_loss"] == pytest.approx(
      json.loads(proc.stdout)["final_eval_loss"], rel=1e-6)
