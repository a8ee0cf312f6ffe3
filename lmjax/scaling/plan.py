"""Plan a scaling sweep: which models, for how many tokens, with which hyperparameters.

A sweep is a model *family* (one shape rule, so size is the only thing that varies), a list
of compute budgets, and per-size hyperparameter rules. `plan` turns it into complete run
configs, each with a stable id (a hash of its config), in one of two designs:

  isoflop  for each budget C, `sizes_per_budget` family members whose N spreads over
           `size_span` (about a decade) around the expected optimum N* = sqrt(C / (6 r)),
           r = `tokens_per_param`; each trains for the tokens D = C / (FLOPs per token).
  ladder   every family member in `ladder_widths` x every multiple m in `token_multiples`,
           D = m * N.

Shape rule (documented in docs/scaling.md): width d, head size `head_dim`
(heads = d / head_dim), layers = max(1, round(d / aspect_ratio)), d_ff = mlp_ratio * d.

Hyperparameter rules (Porian et al. 2024 showed these corrections move the fitted
compute-optimal exponent from Kaplan's towards Chinchilla's):
  learning rate  lr(d) = lr_base * (lr_base_width / d) ** lr_width_exponent
  warmup         warmup_tokens_per_param * N tokens (at most a quarter of the run)
  schedule       cosine to final_lr_frac, its length matched to each run
  beta2          0.99 when a step sees fewer than `small_batch_tokens` tokens, else 0.95
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np

from lmjax import config as config_lib
from lmjax import flops as flops_lib
from lmjax.config import Config
from lmjax.errors import ConfigError, check_choice, check_positive, require
from lmjax.model import ModelConfig

DESIGNS = ("isoflop", "ladder")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  design: str = "isoflop"
  budgets: tuple[float, ...] = (1e11, 2e11, 4e11, 8e11)   # training FLOPs per run
  sizes_per_budget: int = 4
  size_span: float = 10.0           # max N / min N within one budget's grid
  tokens_per_param: float = 20.0    # where the grid is centred (Chinchilla's ~20)
  widths: tuple[int, ...] = tuple(range(16, 1025, 16))   # the family's members
  ladder_widths: tuple[int, ...] = (32, 64, 128)
  token_multiples: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0)
  # Shape rule.
  head_dim: int = 16
  aspect_ratio: float = 32.0
  mlp_ratio: int = 4
  # Hyperparameter rules.
  lr_base: float = 1e-2
  lr_base_width: int = 64
  lr_width_exponent: float = 0.5
  warmup_tokens_per_param: float = 1.0
  small_batch_tokens: int = 100_000
  evals_per_run: int = 8            # eval points along each learning curve
  # Replicas: each planned (size, budget) point is trained `seeds` times, replica r with
  # train.seed and data.seed offset by r (replica 0 is the base run, so its id does not
  # change). The fit averages replicas into one point and reports their spread.
  seeds: int = 1
  # Running.
  # Up to this many claimable runs that differ only in seeds or lr (one
  # lmjax.multirun.group_key) train together as one compiled group; 1 trains every run alone.
  group_size: int = 8
  workers: int = 0                  # 0: runs in this process; k: k worker processes
  # Each worker on its own equal share of the parent's CPU cores (Linux), so its XLA:CPU
  # pools size to that share. Off by default: fewer threads split XLA:CPU's sums
  # differently, so pinned runs round apart from unpinned and one-process runs (recorded in
  # their `software`), and on the 2-core AVX2 EPYC pinning was no faster (docs/performance.md,
  # eighteenth pass).
  pin_workers: bool = False
  # Compile the next model size's programs in a background thread while a run trains.
  compile_ahead: bool = True
  max_attempts: int = 2             # a failed run is retried until this many attempts
  stale_after_s: float = 900.0      # a 'running' run with no heartbeat this long is reclaimed
  compilation_cache: str = "~/.cache/lmjax/jax_cache"   # persistent XLA cache ("" disables)
  # Fitting.
  holdout_budgets: int = 1          # refit without the largest budget(s) and predict them
  bootstrap: int = 1000
  fit_seed: int = 0
  # The template every run starts from (data, sequence length, batch, optimizer...).
  base: Config = Config()

  def __post_init__(self):
    check_choice("sweep.design", self.design, DESIGNS)
    require(len(self.budgets) >= 1 and all(isinstance(b, (int, float)) and b > 0
                                          for b in self.budgets),
            f"sweep.budgets={self.budgets!r} must be a non-empty list of positive FLOP counts.")
    for name in ("sizes_per_budget", "head_dim", "mlp_ratio", "lr_base_width",
                 "evals_per_run", "max_attempts", "bootstrap", "seeds", "group_size"):
      check_positive(f"sweep.{name}", getattr(self, name))
    for name in ("size_span", "tokens_per_param", "aspect_ratio", "lr_base",
                 "warmup_tokens_per_param", "stale_after_s"):
      check_positive(f"sweep.{name}", getattr(self, name))
    check_positive("sweep.workers", self.workers, allow_zero=True)
    check_positive("sweep.holdout_budgets", self.holdout_budgets, allow_zero=True)
    require(all(w % self.head_dim == 0 for w in self.widths),
            f"every sweep.widths entry must be a multiple of sweep.head_dim={self.head_dim}.")
    require(self.size_span >= 1, f"sweep.size_span={self.size_span} must be >= 1.")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  id: str
  budget: float          # nominal compute budget (the IsoFLOP group), FLOPs
  config: Config
  n_params: int          # N under the flops convention (6N: non-embedding + head)
  tokens: int            # D actually trained: steps * tokens per step
  flops: float           # C actually spent under the convention: >= budget by < one step

  @property
  def config_dict(self) -> dict:
    return config_lib.to_dict(self.config)


def family_member(sweep: SweepConfig, width: int) -> ModelConfig:
  base = sweep.base.model
  return dataclasses.replace(
      base, d_model=width, n_heads=width // sweep.head_dim, n_kv_heads=0, d_head=0,
      n_layers=max(1, round(width / sweep.aspect_ratio)), d_ff=sweep.mlp_ratio * width,
      max_len=max(base.max_len, sweep.base.train.seq_len))


def flops_n(model: ModelConfig) -> int:
  """N as the 6N convention counts it: non-embedding parameters plus the V x D head."""
  return flops_lib.param_counts(model).non_embedding + model.vocab_size * model.d_model


def run_id(cfg: Config) -> str:
  blob = json.dumps(config_lib.to_dict(dataclasses.replace(cfg, name="")), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_config(sweep: SweepConfig, model: ModelConfig, steps: int) -> Config:
  base = sweep.base
  tokens_per_step = base.train.global_batch * base.train.seq_len
  n = flops_n(model)
  warmup = min(math.ceil(sweep.warmup_tokens_per_param * n / tokens_per_step), steps // 4)
  lr = sweep.lr_base * (sweep.lr_base_width / model.d_model) ** sweep.lr_width_exponent
  b2 = 0.99 if tokens_per_step < sweep.small_batch_tokens else 0.95
  optim = dataclasses.replace(base.optim, lr=lr, warmup_steps=warmup, b2=b2,
                              schedule="cosine")
  eval_every = max(1, steps // sweep.evals_per_run)
  train = dataclasses.replace(base.train, steps=steps, tokens=0.0, flops=0.0,
                              eval_every=eval_every, log_every=min(base.train.log_every,
                                                                   eval_every),
                              progress=False)
  every = base.checkpoint.every_steps
  ckpt = dataclasses.replace(base.checkpoint,
                             every_steps=max(1, steps // 4) if every else None)
  return dataclasses.replace(base, model=model, optim=optim, train=train, checkpoint=ckpt)


def planned_run(sweep: SweepConfig, model: ModelConfig, budget: float, tokens: float,
                replica: int = 0) -> PlannedRun:
  base = sweep.base
  tokens_per_step = base.train.global_batch * base.train.seq_len
  steps = max(1, math.ceil(tokens / tokens_per_step))
  cfg = run_config(sweep, model, steps)
  if replica:
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + replica),
        data=dataclasses.replace(cfg.data, seed=cfg.data.seed + replica))
  rid = run_id(cfg)
  cfg = dataclasses.replace(cfg, name=rid)
  D = steps * tokens_per_step
  C = flops_lib.run_flops(model, base.train.seq_len, D, base.train.flops_convention)
  return PlannedRun(id=rid, budget=float(budget), config=cfg, n_params=flops_n(model),
                    tokens=D, flops=C)


def isoflop_sizes(sweep: SweepConfig, budget: float) -> list[ModelConfig]:
  """Family members spread log-uniformly over size_span around N* = sqrt(C / (6 r))."""
  members = [family_member(sweep, w) for w in sweep.widths]
  ns = np.array([flops_n(m) for m in members], dtype=np.float64)
  n_star = math.sqrt(budget / (6.0 * sweep.tokens_per_param))
  targets = n_star * np.geomspace(sweep.size_span ** -0.5, sweep.size_span ** 0.5,
                                  sweep.sizes_per_budget)
  chosen: list[int] = []
  for t in targets:  # nearest unused member in log N
    order = np.argsort(np.abs(np.log(ns) - math.log(t)))
    pick = next((int(i) for i in order if int(i) not in chosen), None)
    if pick is not None:
      chosen.append(pick)
  return [members[i] for i in sorted(chosen)]


def plan(sweep: SweepConfig) -> list[PlannedRun]:
  """Every run of the sweep, smallest budget first (replicas of a point adjacent); ids are
  unique and stable."""
  conv, T = sweep.base.train.flops_convention, sweep.base.train.seq_len
  points: list[tuple[ModelConfig, float, float]] = []   # (model, budget, tokens)
  if sweep.design == "isoflop":
    for budget in sorted(sweep.budgets):
      for model in isoflop_sizes(sweep, budget):
        points.append((model, budget, flops_lib.tokens_for_budget(model, T, budget, conv)))
  else:
    for width in sweep.ladder_widths:
      model = family_member(sweep, width)
      for m in sweep.token_multiples:
        tokens = m * flops_n(model)
        points.append((model, flops_lib.run_flops(model, T, tokens, conv), tokens))
  runs = [planned_run(sweep, model, budget, tokens, replica)
          for model, budget, tokens in points for replica in range(sweep.seeds)]
  ids = [r.id for r in runs]
  require(len(set(ids)) == len(ids),
          "the sweep plans the same run twice (two budgets round to the same model and "
          "steps); spread sweep.budgets further apart or use finer sweep.widths.", ConfigError)
  return runs
