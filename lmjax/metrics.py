"""Where training metrics go: WORKDIR/metrics.jsonl, TensorBoard events, a progress line."""
from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import logging


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard.

  On resume from step k, records of steps after k (logged before the interruption, then
  recomputed) are dropped so the file holds each step once.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, truncate_after_step: int = 0):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.workdir = workdir
    self._file = None
    self.truncate(truncate_after_step)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      logging.warning("tensorboardX is not installed: no TensorBoard events are written.")

  def truncate(self, step: int) -> None:
    """Drops records after `step` (they are about to be recomputed: resume or rollback)."""
    if not self.enabled:
      return
    if self._file is not None:
      self._file.close()
    if os.path.exists(self.path):
      kept = [r for r in read_metrics(self.workdir) if r["step"] <= step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key, value, record["step"])

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressLine:
  """`step 120/400  loss 3.214  eval 3.301  41.2k tok/s  ETA 1m05s` on stderr."""

  def __init__(self, total_steps: int, *, enabled: bool = True):
    self.total, self.enabled = total_steps, enabled
    self.tty = sys.stderr.isatty()
    self.start = time.time()
    self.first_step = None

  def update(self, record: dict) -> None:
    if not self.enabled:
      return
    step = record["step"]
    if self.first_step is None:
      self.first_step, self.start = step, time.time()
    rate = (step - self.first_step) / max(time.time() - self.start, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    loss = record.get("loss")
    parts = [f"step {step}/{self.total}",
             f"loss {loss:.4f}" if loss is not None else "loss (all skipped)"]
    if record.get("eval_loss") is not None:
      parts.append(f"eval {record['eval_loss']:.4f}")
    if record.get("tokens_per_s"):
      parts.append(f"{record['tokens_per_s'] / 1e3:.1f}k tok/s")
    if math.isfinite(eta):
      parts.append(f"ETA {_duration(eta)}")
    line = "  ".join(parts)
    if self.tty:
      sys.stderr.write("\r" + line.ljust(78))
    else:
      sys.stderr.write(line + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      sys.stderr.write("\n")
