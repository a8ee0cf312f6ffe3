"""Fault injection: NaNs, divergence, SIGTERM, corrupt checkpoints. Runs must survive or stop
cleanly with a reason, and never report a broken run as a data point."""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmjax.config import Config
from lmjax.data import pipeline as data_lib
from lmjax.metrics import read_metrics
from lmjax.preemption import EXIT_REQUEUE
from lmjax.train import Diverged, train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "smoke.py"


def _tiny(steps=24, **kw) -> Config:
  from tests.test_train import _tiny as tiny  # the same small model the training tests use
  cfg = tiny(steps=steps, log_every=1, eval_every=steps)
  cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=4))
  return dataclasses.replace(cfg, **kw)


def _change_batch_at(monkeypatch, step, change):
  """Wraps make_pipeline so that the training batch of one step is replaced by change(batch)."""
  real = data_lib.make_pipeline

  def make(*args, **kwargs):
    pipe = real(*args, **kwargs)
    inner_next = pipe.next

    def next_batch():
      position = pipe.get_state()["step"]
      batch = inner_next()
      if kwargs.get("split", "train") == "train" and position + 1 == step:
        batch = change(batch)
      return batch

    pipe.next = next_batch
    return pipe

  monkeypatch.setattr(data_lib, "make_pipeline", make)


def _nan_at(monkeypatch, step):
  """The batch of `step` gets a NaN loss mask: a non-finite loss and gradient."""
  _change_batch_at(monkeypatch, step,
                   lambda b: dict(b, mask=np.full_like(b["mask"], np.nan)))


def _losses(records):
  """Logged losses; an interval whose steps were all skipped logs None (no loss to report)."""
  return np.array([np.nan if r["loss"] is None else r["loss"] for r in records])


def _skip_list(workdir):
  path = Path(workdir) / "skip_list.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_nan_batch_is_skipped_and_stays_skipped_after_resume(tmp_path, monkeypatch):
  cfg = _tiny(steps=40)
  clean = train(cfg, str(tmp_path / "clean"))
  with monkeypatch.context() as m:
    _nan_at(m, step=10)
    poisoned = train(cfg, str(tmp_path / "poisoned"))
  assert np.isfinite(poisoned["final_eval_loss"])
  assert abs(poisoned["final_eval_loss"] / clean["final_eval_loss"] - 1) < 0.01
  skips = _skip_list(tmp_path / "poisoned")
  assert [(s["step"], s["reason"]) for s in skips] == [(10, "nonfinite")]
  assert skips[0]["data"]["step"] == 9  # the data position of that batch
  records = {r["step"]: r for r in read_metrics(str(tmp_path / "poisoned"))}
  assert records[10]["skipped"] == 1 and records[9]["skipped"] == 0

  # Interrupt after the NaN step, drop the checkpoint taken after it, and resume from step 8
  # with clean data: the skip list makes step 10 a skip again, so the resumed run ends
  # exactly like the uninterrupted poisoned one.
  def stop_at_13(step, record):
    if step == 13:
      raise KeyboardInterrupt
  work = tmp_path / "resumed"
  with monkeypatch.context() as m:
    _nan_at(m, step=10)
    with pytest.raises(KeyboardInterrupt):
      train(cfg, str(work), on_step=stop_at_13)
  import shutil
  shutil.rmtree(work / "checkpoints" / "12")
  resumed = train(cfg, str(work))  # restores step 8; the data at step 10 is clean now
  records = {r["step"]: r for r in read_metrics(str(work))}
  assert records[10]["skipped"] == 1
  a, b = read_metrics(str(tmp_path / "poisoned")), read_metrics(str(work))
  assert records[10]["loss"] is None  # the only step of its interval was skipped
  np.testing.assert_allclose(_losses(b), _losses(a), rtol=1e-6)
  assert resumed["final_eval_loss"] == pytest.approx(poisoned["final_eval_loss"], rel=1e-6)


def test_persistent_divergence_rolls_back_then_stops_as_diverged(tmp_path):
  cfg = _tiny(steps=60)
  cfg = dataclasses.replace(
      cfg, optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr * 1e4),
      guard=dataclasses.replace(cfg.guard, max_consecutive_bad=3, max_rollbacks=2))
  with pytest.raises(Diverged, match="after 2 rollback"):
    train(cfg, str(tmp_path))
  events = [json.loads(l) for l in (tmp_path / "events.jsonl").read_text().splitlines()]
  kinds = [e["event"] for e in events]
  assert kinds == ["rollback", "rollback", "diverged"]
  assert [e["lr_scale"] for e in events[:2]] == [0.5, 0.25]


@pytest.mark.parametrize("first_nan,every_steps,rollback", [(9, 4, (11, 8)), (2, 100, (4, 0))])
def test_rollback_after_a_resume_inside_a_bad_streak_lands_where_uninterrupted_does(
    tmp_path, monkeypatch, first_nan, every_steps, rollback):
  # Four NaN batches in a row from `first_nan`; 3 bad steps in a row roll back.
  # Uninterrupted, the run rolls back at the third (to the step-8 checkpoint, or to the
  # initial state when nothing was saved yet), replays those steps as listed skips, which
  # are not evidence, and the fourth starts a new streak of one. Stopped at the second bad
  # step, the run saves there inside the streak (healthy: false); resumed, its rollback
  # must go back past that save. Restoring the newest save instead brings back a streak of
  # 2, which the fourth NaN pushes to 3: a second rollback, a lower lr, a different run.
  from lmjax.preemption import Preempted, StopFlag
  cfg = _tiny(steps=24)
  cfg = dataclasses.replace(cfg, guard=dataclasses.replace(cfg.guard, max_consecutive_bad=3),
                            checkpoint=dataclasses.replace(cfg.checkpoint,
                                                           every_steps=every_steps))
  bad_steps = range(first_nan, first_nan + 4)

  def poison(m):
    for step in bad_steps:
      _nan_at(m, step)
  with monkeypatch.context() as m:
    poison(m)
    straight = train(cfg, str(tmp_path / "straight"))
  work = tmp_path / "stopped"
  flag = StopFlag()

  def stop_in_streak(step, record):
    if step == first_nan + 1:
      flag.request()
  with monkeypatch.context() as m:
    poison(m)
    with pytest.raises(Preempted):
      train(cfg, str(work), on_step=stop_in_streak, stop=flag)
    resumed = train(cfg, str(work))

  def rollbacks(d):
    events = [json.loads(l) for l in (d / "events.jsonl").read_text().splitlines()]
    return [(e["step"], e["to_step"]) for e in events if e["event"] == "rollback"]
  assert rollbacks(work) == rollbacks(tmp_path / "straight") == [rollback]
  assert resumed["rollbacks"] == straight["rollbacks"] == 1
  assert [s["step"] for s in _skip_list(work)] == list(bad_steps)
  np.testing.assert_allclose(_losses(read_metrics(str(work))),
                             _losses(read_metrics(str(tmp_path / "straight"))), rtol=1e-6)
  assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], rel=1e-6)
  # The unhealthy save was set aside, not deleted.
  assert (work / "checkpoints" / f"{first_nan + 1}.rejected").is_dir()
  assert not (work / "checkpoints" / f"{first_nan + 1}").exists()


def test_sweep_records_a_diverged_run_and_finishes_the_others(tmp_path):
  from lmjax.scaling import manifest as manifest_lib
  from lmjax.scaling.plan import PlannedRun, SweepConfig
  from lmjax.preemption import StopFlag
  from lmjax.sweep import drain
  good = _tiny(steps=12)
  bad = dataclasses.replace(good, optim=dataclasses.replace(good.optim, lr=good.optim.lr * 1e4),
                            guard=dataclasses.replace(good.guard, max_consecutive_bad=3,
                                                      max_rollbacks=1))
  runs = [PlannedRun(id=name, budget=1.0, config=c, n_params=1, tokens=1, flops=6.0)
          for name, c in (("good", good), ("bad", bad))]
  m = manifest_lib.Manifest(str(tmp_path / "manifest.sqlite"))
  m.add(runs)
  drain(m, ["bad", "good"], SweepConfig(), str(tmp_path), StopFlag())
  rows = {r["id"]: r for r in m.rows()}
  assert rows["bad"]["status"] == "diverged" and "rollback" in rows["bad"]["reason"]
  assert rows["bad"]["attempts"] == 1  # not retried
  assert rows["good"]["status"] == "done" and np.isfinite(rows["good"]["final_eval_loss"])
  assert manifest_lib.load_records(str(tmp_path / "manifest.sqlite"))[0]["id"] == "good"


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "lmjax.train", f"--config={SMOKE}", f"--workdir={workdir}",
          "--config.train.steps=40", "--config.train.log_every=1", "--config.train.eval_every=40",
          "--config.train.progress=false", "--config.checkpoint.every_steps=1000",
          "--config.model.d_model=32", "--config.model.n_layers=1", "--config.optim.warmup_steps=4",
          *extra]


def test_sigterm_checkpoints_within_a_step_and_resume_is_exact(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  straight = subprocess.run(_train_cmd(tmp_path / "straight"), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
  assert straight.returncode == 0, straight.stderr[-2000:]
  kill_after = random.Random(0).randint(5, 30)
  work = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(work), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics = work / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
      break
    time.sleep(0.05)
  logged = len(metrics.read_text().splitlines())
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == EXIT_REQUEUE, err[-2000:]
  saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and logged <= saved[-1] <= logged + 1  # within one step of the signal
  events = [json.loads(l) for l in (work / "events.jsonl").read_text().splitlines()]
  assert events[-1]["event"] == "preempted" and events[-1]["signal"] == signal.SIGTERM
  resumed = subprocess.run(_train_cmd(work), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  a, b = read_metrics(str(tmp_path / "straight")), read_metrics(str(work))
  assert [r["step"] for r in b] == list(range(1, 41))
  np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
  assert json.loads(resumed.stdout)["final_eval_loss"] == pytest.approx(
      json.loads(straight.stdout)["final_eval_loss"], rel=1e-6)


def _flip_a_bit(step_dir: Path) -> Path:
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 256
           and "metadata" not in p.name.lower()]
  target = max(files, key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x10
  target.write_bytes(bytes(data))
  return target


@pytest.mark.parametrize("fault", ["bit_flip", "empty_step", "truncated"])
def test_corrupt_latest_checkpoint_falls_back_and_run_continues(tmp_path, fault):
  cfg = _tiny(steps=16)
  straight = train(cfg, str(tmp_path / "straight"))

  def stop_at_9(step, record):
    if step == 9:
      raise KeyboardInterrupt
  work = tmp_path / "run"
  with pytest.raises(KeyboardInterrupt):
    train(cfg, str(work), on_step=stop_at_9)
  latest = work / "checkpoints" / "8"
  assert latest.exists()
  if fault == "bit_flip":
    _flip_a_bit(latest)
  elif fault == "empty_step":
    import shutil
    shutil.rmtree(latest)
    latest.mkdir()
  else:
    target = _flip_a_bit(latest)  # pick the biggest array file, then cut it in half
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
  resumed = train(cfg, str(work))  # restores step 4 (logged), continues to 16
  assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], rel=1e-6)
  a, b = read_metrics(str(tmp_path / "straight")), read_metrics(str(work))
  np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)


def test_listed_skips_are_not_evidence_of_divergence(tmp_path):
  # Batches in the skip list are skipped on purpose: a run replaying three listed steps in a
  # row must not mistake them for a divergence streak and roll back.
  cfg = _tiny(steps=12)
  cfg = dataclasses.replace(cfg, guard=dataclasses.replace(cfg.guard, max_consecutive_bad=3))
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / "skip_list.jsonl").write_text(
      "".join(json.dumps({"step": s, "reason": "nonfinite"}) + "\n" for s in (3, 4, 5)))
  summary = train(cfg, str(tmp_path))
  assert summary["rollbacks"] == 0 and np.isfinite(summary["final_eval_loss"])
  records = {r["step"]: r for r in read_metrics(str(tmp_path))}
  assert [records[s]["skipped"] for s in (2, 3, 4, 5, 6)] == [0, 1, 1, 1, 0]
  assert not (tmp_path / "events.jsonl").exists()


def test_loss_spike_is_detected_and_skipped(tmp_path, monkeypatch):
  cfg = _tiny(steps=30)
  cfg = dataclasses.replace(cfg, guard=dataclasses.replace(cfg.guard, spike_window=5,
                                                           spike_k=4.0))
  rng = np.random.default_rng(0)  # step 25's targets are shuffled: a finite loss spike
  _change_batch_at(monkeypatch, 25, lambda b: dict(
      b, targets=rng.integers(0, 256, b["targets"].shape).astype(np.int32)))
  train(cfg, str(tmp_path))
  assert [(s["step"], s["reason"]) for s in _skip_list(tmp_path)] == [(25, "spike")]


def test_cli_exits_3_with_one_line_when_the_run_diverges(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.run(_train_cmd(tmp_path, "--config.optim.lr=100",
                                   "--config.guard.max_consecutive_bad=3",
                                   "--config.guard.max_rollbacks=1"),
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  # Rollback warnings come first (they are the history); the verdict is the last line.
  assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert lines[-1].startswith("lmjax: run diverged") and "rolled back" in proc.stderr
