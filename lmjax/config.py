"""One typed config per run: validated up front, saved with the run, compared on resume.

Each module owns the dataclass of its settings (ModelConfig in model.py, OptimConfig in
optim.py, ...); `Config` composes them. Experiment files (experiments/configs/*.py) return an
ml_collections ConfigDict built from `Config` defaults, so `--config.model.d_model=64`
overrides work through absl's config_flags, and `from_dict` turns the result back into the
typed, validated Config, rejecting unknown keys with one line.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from typing import Any

from lmjax.checkpoint import CheckpointConfig
from lmjax.data.config import DataConfig
from lmjax.errors import ConfigError, check_choice, check_positive, require
from lmjax.flops import CONVENTIONS
from lmjax.model import ModelConfig
from lmjax.optim import OptimConfig
from lmjax.sharding import MeshConfig

CPU_DOTS = ("auto", "onednn", "xla")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Run length is given by exactly one of steps, tokens or flops (the others 0)."""
  seed: int = 0
  global_batch: int = 16          # sequences per optimizer step, over all devices/processes
  seq_len: int = 128
  steps: int = 0
  tokens: float = 0.0             # converted to steps: ceil(tokens / (global_batch * seq_len))
  flops: float = 0.0              # a FLOP budget, converted with lmjax/flops.py
  flops_convention: str = "6N"    # how `flops` and the logged cumulative FLOPs are counted
  z_loss: float = 0.0             # weight of the log(Z)^2 term (PaLM), 0 to disable
  eval_every: int = 0             # 0: evaluate only at the end
  log_every: int = 10
  progress: bool = True           # the live step/total, loss, tokens/s, ETA line on stderr
  cpu_splits: int = 0             # CPU only: sequential pieces per microbatch; 0 auto (lmjax.train.cpu_splits)
  cpu_dots: str = "auto"          # CPU only: auto, onednn or xla dots (lmjax.train.uses_onednn)

  def __post_init__(self):
    check_positive("train.global_batch", self.global_batch)
    check_positive("train.seq_len", self.seq_len)
    for name in ("steps", "tokens", "flops", "z_loss", "eval_every"):
      check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
    check_positive("train.log_every", self.log_every)
    require(isinstance(self.cpu_splits, int) and not isinstance(self.cpu_splits, bool)
            and self.cpu_splits >= 0,
            f"train.cpu_splits={self.cpu_splits!r} is invalid: use 0 (auto) or a whole number "
            "of sequential pieces >= 1.")
    check_choice("train.flops_convention", self.flops_convention, CONVENTIONS)
    check_choice("train.cpu_dots", self.cpu_dots, CPU_DOTS)
    given = [n for n in ("steps", "tokens", "flops") if getattr(self, n)]
    require(len(given) == 1,
            f"give the run length as exactly one of train.steps, train.tokens, train.flops "
            f"(got {given or 'none'}); set the others to 0.")


@dataclasses.dataclass(frozen=True)
class GuardConfig:
  """Bad updates are skipped inside the step; persistent trouble rolls back (docs/reliability.md).

  A step is bad if its loss or gradient norm is not finite, if its loss is worse than
  `max_loss_factor` times uniform guessing (log V: a diverged model), if its loss exceeds the
  exponential moving mean of recent good losses by more than `spike_k` standard deviations
  (after `spike_window` good steps), or if it is in the workdir's skip list. Bad steps consume
  their batch but leave parameters and optimizer state unchanged.
  """
  skip_nonfinite: bool = True
  max_loss_factor: float = 2.0       # a loss above this x log(vocab) (uniform guessing) is bad; 0: off
  spike_k: float = 6.0               # 0 disables spike detection
  spike_window: int = 50             # EMA span of the loss statistics (steps)
  max_consecutive_bad: int = 10      # K: roll back to the last healthy checkpoint (0: never)
  max_rollbacks: int = 3             # R: after this many rollbacks the run stops as diverged
  rollback_lr_factor: float = 0.5    # peak learning rate multiplier at each rollback

  def __post_init__(self):
    require(isinstance(self.skip_nonfinite, bool),
            f"guard.skip_nonfinite={self.skip_nonfinite!r} must be true or false.")
    check_positive("guard.spike_k", self.spike_k, allow_zero=True)
    check_positive("guard.max_loss_factor", self.max_loss_factor, allow_zero=True)
    check_positive("guard.spike_window", self.spike_window)
    check_positive("guard.max_consecutive_bad", self.max_consecutive_bad, allow_zero=True)
    check_positive("guard.max_rollbacks", self.max_rollbacks, allow_zero=True)
    check_positive("guard.rollback_lr_factor", self.rollback_lr_factor)
    require(self.rollback_lr_factor <= 1,
            f"guard.rollback_lr_factor={self.rollback_lr_factor} must be <= 1 (a reduction).")


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  train: TrainConfig = TrainConfig(steps=100)
  checkpoint: CheckpointConfig = CheckpointConfig()
  guard: GuardConfig = GuardConfig()
  name: str = ""                  # free text, e.g. the sweep's run id

  def __post_init__(self):
    require(self.train.seq_len <= self.model.max_len,
            f"train.seq_len={self.train.seq_len} exceeds model.max_len={self.model.max_len}; "
            "raise model.max_len or lower train.seq_len.")
    require(self.train.global_batch % self.optim.grad_accum == 0,
            f"train.global_batch={self.train.global_batch} is not divisible by "
            f"optim.grad_accum={self.optim.grad_accum}; pick a batch that is a multiple of it.")

  def total_steps(self) -> int:
    from lmjax import flops  # local: keeps config import light
    t = self.train
    tokens_per_step = t.global_batch * t.seq_len
    if t.steps:
      return int(t.steps)
    tokens = t.tokens or flops.tokens_for_budget(self.model, t.seq_len, t.flops,
                                                 t.flops_convention)
    return max(1, math.ceil(tokens / tokens_per_step))


# ----------------------------------------------------------------------------- conversion

def _is_dataclass_type(tp: Any) -> bool:
  return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, path: str) -> Any:
  """Casts plain values (from JSON or ConfigDict) to the annotated field type."""
  origin = typing.get_origin(tp)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value is None:
      return None
    return _coerce(value, args[0], path)
  if tp is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if tp is int and isinstance(value, float) and value.is_integer():
    return int(value)
  if tp in (int, float, str, bool):
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    require(ok, f"config key {path}={value!r} has the wrong type: expected {tp.__name__}.")
  if origin is tuple:
    return tuple(value)
  return value


def from_dict(cls: type, data: Any, path: str = "config") -> Any:
  """Builds a (nested) config dataclass from a mapping; unknown keys are one-line errors."""
  if hasattr(data, "to_dict"):
    data = data.to_dict()
  require(isinstance(data, dict), f"{path} must be a mapping of keys to values, got {data!r}.")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    prefix = "" if path == "config" else path.removeprefix("config.") + "."
    raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; known keys of "
                      f"{path}: {', '.join(sorted(fields))}.")
  kwargs = {}
  for name, value in data.items():
    tp = hints[name]
    sub = f"{path}.{name}"
    kwargs[name] = (from_dict(tp, value, sub) if _is_dataclass_type(tp)
                    else _coerce(value, tp, sub.removeprefix("config.")))
  try:
    return cls(**kwargs)
  except TypeError as e:  # e.g. a value of the wrong type reaching a comparison
    raise ConfigError(f"invalid {path}: {e}; check the types of its values.") from None


def to_dict(cfg: Any) -> dict:
  return dataclasses.asdict(cfg)


def to_config_dict(cfg: Config | None = None):
  """An ml_collections ConfigDict of `cfg` (default: all defaults), for experiment files."""
  import ml_collections
  return ml_collections.ConfigDict(to_dict(cfg or Config()))


def save(cfg: Config, path: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
  os.replace(tmp, path)  # never a half-written config


def load(path: str) -> Config:
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"cannot read config {path}: {e}; fix or remove the file.") from None
  return from_dict(Config, data)
