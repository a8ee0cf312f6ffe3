"""Training: a pure, jit-compiled step, and the loop around it.

The step (`make_train_step`) is a pure function (state, batch) -> (state, metrics) with
explicit in/out shardings and the old state's buffers donated. Everything with effects
(data, logging, checkpoints, signals) lives in `train`, which touches the host only at log,
eval and checkpoint steps, so the device never waits on Python between them.

  python -m lmjax.train --config=experiments/configs/smoke.py --workdir=/tmp/smoke \
      --config.model.d_model=64
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: maybe re-execute on mimalloc
  from lmjax.allocator import maybe_reexec
  maybe_reexec()

import collections
import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import platform
import re
import sys
import threading
import time
import warnings
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lmjax import allocator
from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import flops as flops_lib
from lmjax import provenance
from lmjax import sharding
from lmjax.compile_clock import CompileClock, is_off_the_clock, off_the_clock, record_wait
from lmjax.config import Config
from lmjax.data import pipeline as data_lib
from lmjax.errors import CheckpointError, ConfigError, require
from lmjax.metrics import MetricsWriter, ProgressLine
from lmjax.model import Transformer, cpu_flags, init_params
from lmjax.optim import accumulate_gradients, make_optimizer, make_schedule, schedule_value
from lmjax.preemption import EXIT_REQUEUE, Preempted, StopFlag, handle_signals

State = dict  # {"step": int32[], "params": ..., "opt_state": ..., "rng": key data}

# Config keys a resumed run may change: where and how it runs, its length, its mesh.
RESUMABLE_CHANGES = ckpt_lib.DEFAULT_KEYS_THAT_MAY_CHANGE


# ------------------------------------------------------------------------------ pure core

def make_loss_fn(cfg: Config) -> Callable:
  """(params, batch) -> (sum of per-token losses, (tokens, {"ce_sum": ...}))."""
  model = Transformer(cfg.model)
  z_weight = cfg.train.z_loss

  def loss_fn(params, batch):
    logits_BTV = model.apply({"params": params}, batch["inputs"],
                             segment_ids_BT=batch.get("segment_ids"))
    log_z = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], -1)[..., 0]
    ce = log_z - target_logit
    mask = batch["mask"].astype(jnp.float32)
    loss = ce + z_weight * jnp.square(log_z) if z_weight else ce
    return jnp.sum(loss * mask), (jnp.sum(mask), {"ce_sum": jnp.sum(ce * mask)})

  return loss_fn


def make_train_step(cfg: Config, tx: optax.GradientTransformation,
                    splits: int = 1) -> Callable:
  """(state, batch, hparams) -> (state, metrics), with the guards of cfg.guard inside.

  The batch is processed as cfg.optim.grad_accum x `splits` sequential microbatches (see
  `cpu_splits`); the gradient is the same up to summation order.

  `tx` excludes the learning rate, which comes from `hparams` (total_steps, warmup_steps,
  peak_lr as arrays): runs that differ only in those share one compiled program. A bad step
  (non-finite loss or gradient, a loss spike, or hparams["skip"]) keeps the old parameters
  and optimizer state; the verdict travels in the metrics, so no host sync is needed.
  """
  grad_fn = jax.value_and_grad(make_loss_fn(cfg), has_aux=True)
  g = cfg.guard
  ema = 2.0 / (g.spike_window + 1.0)

  def train_step(state: State, batch: dict, hparams: dict) -> tuple[State, dict]:
    acc = accumulate_gradients(grad_fn, state["params"], batch,
                               cfg.optim.grad_accum * splits)
    updates, opt_state = tx.update(acc.grads, state["opt_state"], state["params"])
    lr = schedule_value(cfg.optim, state["step"], hparams["total_steps"],
                        hparams["warmup_steps"], hparams["peak_lr"])
    params = jax.tree.map(lambda p, u: p - lr * u, state["params"], updates)
    loss = acc.aux["ce_sum"] / jnp.maximum(acc.num_tokens, 1.0)
    grad_norm = optax.global_norm(acc.grads)

    guard = state["guard"]
    nonfinite = ~(jnp.isfinite(acc.loss) & jnp.isfinite(grad_norm))
    if not g.skip_nonfinite:
      nonfinite = jnp.zeros((), bool)
    std = jnp.sqrt(jnp.maximum(guard["var"], 0.0))
    spike = ((guard["count"] >= g.spike_window) & (loss > guard["mean"] + g.spike_k * std)
             if g.spike_k else jnp.zeros((), bool))
    # Worse than uniform guessing by this factor: the model has diverged.
    exploded = (loss > g.max_loss_factor * math.log(cfg.model.vocab_size)
                if g.max_loss_factor else jnp.zeros((), bool))
    bad = nonfinite | spike | exploded        # evidence about this run's health
    listed = hparams["skip"]                  # a batch known to be bad: skipped, not evidence
    skip = bad | listed
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skip, o, n), new, old)
    params = keep_old(params, state["params"])
    opt_state = keep_old(opt_state, state["opt_state"])
    delta = loss - guard["mean"]
    first = guard["count"] == 0
    new_guard = {  # exponentially weighted mean/variance of good losses
        "mean": jnp.where(skip, guard["mean"],
                          jnp.where(first, loss, guard["mean"] + ema * delta)),
        "var": jnp.where(skip | first, guard["var"],
                         (1 - ema) * (guard["var"] + ema * delta ** 2)),
        "count": guard["count"] + jnp.where(skip, 0, 1),
        "bad_streak": jnp.where(listed, guard["bad_streak"],
                                jnp.where(bad, guard["bad_streak"] + 1, 0)),
    }
    metrics = {
        "loss": loss, "grad_norm": grad_norm, "param_norm": optax.global_norm(params),
        "lr": lr, "real_tokens": acc.num_tokens, "skipped": skip, "nonfinite": nonfinite,
        "spike": spike, "exploded": exploded, "bad_streak": new_guard["bad_streak"],
    }
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state,
                     guard=new_guard)
    return new_state, metrics

  return train_step


def init_guard_state() -> dict:
  return {"mean": jnp.zeros((), jnp.float32), "var": jnp.zeros((), jnp.float32),
          "count": jnp.zeros((), jnp.int32), "bad_streak": jnp.zeros((), jnp.int32)}


class Diverged(Exception):
  """The run kept producing bad steps after the allowed rollbacks."""


EXIT_DIVERGED = 3  # python -m lmjax.train: 0 done, 2 bad input, 3 diverged, 75 requeue


def make_eval_step(cfg: Config) -> Callable:
  loss_fn = make_loss_fn(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                            z_loss=0.0)))

  def eval_step(params, batch):
    _, (tokens, aux) = loss_fn(params, batch)
    return aux["ce_sum"], tokens

  return eval_step


# ----------------------------------------------------------------------- state and sharding

# XLA:CPU options for the compiled steps. Its concurrency-optimised scheduler lets
# independent dots (q, k, v projections; a weight gradient and its input gradient) run at
# once, and each also splits itself over the same two cores: 'small' f32 steps took
# 2,535 ms with it and 2,370 ms without (7 alternating process pairs; 'baby' unchanged).
CPU_STEP_COMPILER_OPTIONS = {"xla_cpu_enable_concurrency_optimized_scheduler": False}


@functools.lru_cache(maxsize=None)
def _accepted(options_key: tuple) -> bool:
  """Whether this jaxlib compiles with these options (experimental flags come and go)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options_key)).lower(
        jax.ShapeDtypeStruct((), np.float32)).compile()
    return True
  except Exception:  # pylint: disable=broad-except - any rejection means "compile without"
    logging.warning("this jaxlib rejects XLA options %s; compiling without them", options_key)
    return False


def cpu_compiler_options(mesh: jax.sharding.Mesh, *extra: dict,
                         base: dict = CPU_STEP_COMPILER_OPTIONS) -> dict | None:
  """`base` plus `extra` on a CPU mesh whose jaxlib accepts them, else None (XLA's
  defaults; accelerators always get those)."""
  if not sharding.is_cpu(mesh):
    return None
  options = dict(base)
  for e in extra:
    options.update(e)
  return options if _accepted(tuple(sorted(options.items()))) else None


# XLA:CPU can hand dots to oneDNN ("oneDNN fusions"), whose f32 matmuls are MKL's kernels:
# faster than YNNPACK's f32 microkernel (0.83-0.88x MKL's per core on an AMX Xeon), and they
# take the transposed operands of weight gradients, which YNNPACK refuses and leaves to
# Eigen. f32 train steps ran 1.10x ('baby') to 1.12x ('small') faster with them on jaxlib
# 0.12.0.1 (1.04x 'small' on 0.11.2); bf16 steps 1.6-2.2x slower (YNNPACK's AMX kernels
# win), so only f32 models use them (docs/performance.md, sixteenth pass). jaxlib 0.10.2
# fails to partition the train step for oneDNN and dies of SIGILL, which no probe in this
# process would survive: hence the version gate rather than a trial compile. Its one-dot
# fusions (LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT) compile but made 'baby' 1.21x slower
# (seventeenth pass).
ONEDNN_DOT_OPTIONS = {"xla_cpu_use_onednn": True,
                      "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
ONEDNN_MIN_JAXLIB = (0, 11)


def _jaxlib_version() -> tuple[int, ...]:
  return tuple(int(p) for p in re.findall(r"\d+", provenance.versions()["jaxlib"])[:3])


def onednn_dots_supported() -> str | None:
  """None if this jaxlib and CPU run f32 dots on oneDNN in the train step, else why not."""
  if _jaxlib_version() < ONEDNN_MIN_JAXLIB:
    return (f"jaxlib {'.'.join(map(str, _jaxlib_version()))} crashes compiling oneDNN "
            f"dots (needs >= {'.'.join(map(str, ONEDNN_MIN_JAXLIB))}, Python >= 3.12)")
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return f"XLA:CPU builds oneDNN only for x86-64, not {platform.machine()}"
  return None


def uses_onednn(cfg: Config, mesh: jax.sharding.Mesh) -> bool:
  """Whether cfg's CPU steps run their dots on oneDNN (train.cpu_dots): "xla" never;
  "onednn" always (a ConfigError where unsupported); "auto" for f32 models on a
  supporting jaxlib and an AVX-512 CPU, the one kind measured (AVX2 CPUs keep YNNPACK and
  Eigen, already 1.02-1.17x torch on 'small' there)."""
  if not sharding.is_cpu(mesh) or cfg.train.cpu_dots == "xla":
    return False
  why_not = onednn_dots_supported()
  if cfg.train.cpu_dots == "onednn":
    if why_not:
      raise ConfigError(f"train.cpu_dots='onednn' cannot run here: {why_not}; use "
                        "train.cpu_dots='auto' or 'xla'.")
    return True
  return why_not is None and cfg.model.dtype == "float32" and "avx512f" in cpu_flags()


def check_cpu_dots(cfg: Config) -> None:
  """uses_onednn's ConfigError, up front, where the runs will train on this process's
  default devices (a sweep checks its base config before it plans anything)."""
  if jax.default_backend() == "cpu":
    uses_onednn(cfg, sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1]))


def runs_onednn_dots(compiler_options: dict | None) -> bool:
  """Whether programs compiled with these options run their dots on oneDNN."""
  return bool(compiler_options and compiler_options.get("xla_cpu_use_onednn"))


def dot_options(cfg: Config, mesh: jax.sharding.Mesh) -> dict:
  """The XLA:CPU options that pick the library for cfg's dots (see uses_onednn)."""
  if not uses_onednn(cfg, mesh):
    return {}
  _onednn_programs_are_not_cached()
  return dict(ONEDNN_DOT_OPTIONS)


@functools.lru_cache(maxsize=None)
def _onednn_programs_are_not_cached() -> None:
  """XLA cannot serialise oneDNN fusions yet ("ToProto is not implemented for thunk kind:
  onednn-fusion"), so the persistent compilation cache keeps none of these programs, and
  jax warns at every one. Say it once instead: in-process reuse (cached_programs,
  CompileAhead) still holds, but another process compiles them afresh."""
  warnings.filterwarnings("ignore", category=UserWarning,
                          message=r"Error writing persistent compilation cache entry.*onednn")
  if jax.config.jax_compilation_cache_dir:
    logging.info("f32 CPU programs with oneDNN dots are not kept in the persistent "
                 "compilation cache (XLA cannot serialise them); each process compiles "
                 "them once (train.cpu_dots='xla' keeps them cacheable)")


# The init program runs once per run, so compiling it fast beats running it fast: at O0 the
# default sweep's inits compiled in 0.9-1.0 s instead of 2.6 s, and ran in 4.4 ms instead of
# 2.8. The parameters differ from an optimised compile's by one ulp in ~4% of elements (XLA
# rounds some RNG arithmetic differently); every init of a config is still the same.
CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


# XLA:CPU gives every execution its temporaries as one block, and a block the allocator does
# not reuse is paged in afresh every step: for nanoGPT 'small' (B 16, T 256, D 384) 1.18 GB,
# ~300,000 page faults and ~1 s of system CPU per step under glibc. Cutting the batch into
# sequential pieces (gradient accumulation) shrinks the block. The largest block that comes
# back without fresh pages depends on the allocator (lmjax/allocator.py):
#  * glibc: its largest mmap threshold, 32 MiB on 64-bit; nanoGPT 'baby' (47 MiB, ~12,600
#    faults and ~42 ms of system time per 75 ms step) ran 1.22x faster as 2 pieces of 25 MiB;
#  * mimalloc with MIMALLOC_PURGE_DELAY=-1, what lmjax's CLIs run on: it keeps blocks of
#    hundreds of MiB mapped (0 faults, ~15 ms of system time a 'small' step in 2 or 4
#    pieces), but the 1,130 MiB of an unsplit 'small' step cost 1.4 s of system time each
#    step (1.51x slower than 4 pieces). Measured with it, the fastest pieces of six shapes
#    were whole for 'baby' at 4, 8 and 16 layers (47-177 MiB; 1.11-1.29x faster than the
#    glibc rule's 2-4 pieces), 4 for 'small' (319 MiB; 1.10x faster than 2 pieces of 557,
#    1.06x than 8 of 182) and 4 for 'small' at d_model 256 (202 MiB; 1.06x faster than 2
#    of 383). By the estimate below, a threshold in [330, 403) MiB picks all six
#    (benchmarks/step_ab.py; docs/performance.md, eleventh pass).
CPU_REUSED_BLOCK_BYTES = {"system": 32 << 20, "mimalloc": 384 << 20}
# Smaller pieces cost more in matmul efficiency than the faults they save. nanoGPT 'baby'
# widened to 8 and to 16 layers (d_model 128) ran fastest in 192-token pieces, 1.08x faster
# than in 256-token ones at 8 layers; 128-token pieces lost again (benchmarks/step_ab.py).
CPU_MIN_PIECE_TOKENS = 192
# Scanned layers want bigger pieces. A scan's iterations run one after another, and small
# pieces leave the two cores idle between them (CPU-busy/wall fell from 1.84 to 1.63 at 4
# pieces), while a scanned step keeps more temporaries than an unrolled one (stacked
# residuals), so its pieces rarely get under the 32 MiB threshold. 'baby' at 24 layers,
# scanned, ran 1.03-1.26x faster whole than in 4 pieces of 192 tokens (remat none, dots,
# full); at 4 and 8 layers they tied; 'small' (1,024-token pieces) still ran 1.76x faster in
# 4 pieces than whole (benchmarks/step_ab.py; docs/performance.md, tenth pass).
CPU_MIN_SCAN_PIECE_TOKENS = 1024
# Where no piece fits under the threshold, pieces trade page faults (measured 3.2-3.6 us a
# 4 KiB page on 'small' and 'baby' at 16 layers) against matmul efficiency. The fewest
# pieces whose faults cost at most 15% of the step's matmuls at 100 GFLOP/s (2 cores)
# were the fastest or within 3% of it for five shapes; the tokens x d_model rule it
# replaces left three of them 1.03-1.15x slower (docs/performance.md, ninth pass).
CPU_FAULT_SECONDS_PER_BYTE = 3.5e-6 / 4096
CPU_MATMUL_FLOPS_PER_S = 1e11
CPU_FAULT_BUDGET = 0.15


def step_temp_bytes(cfg: Config, tokens: int, pieces: int = 1) -> int:
  """Rough f32 temporaries of a train step whose pieces have `tokens` tokens (what XLA:CPU's
  memory_analysis reports, within ~15%): per layer ~28 floats per token and model
  dimension plus one attention row per head, the logits' softmax, and with more than one
  piece the gradient they accumulate into (one float per parameter)."""
  m = cfg.model
  per_token = m.n_layers * (28 * m.d_model + m.n_heads * cfg.train.seq_len) + 2 * m.vocab_size
  accumulator = flops_lib.param_counts(m).total if pieces > 1 else 0
  return 4 * (tokens * per_token + accumulator)


def rows_per_device(cfg: Config, mesh: jax.sharding.Mesh) -> int:
  """Rows of one grad-accumulation microbatch on one data-parallel shard; a ConfigError
  unless the global batch divides evenly."""
  dp = sharding.data_parallel_size(mesh)
  require(cfg.train.global_batch % (dp * cfg.optim.grad_accum) == 0,
          f"train.global_batch={cfg.train.global_batch} is not divisible by the data-parallel "
          f"size {dp} (mesh data*fsdp) x optim.grad_accum={cfg.optim.grad_accum}; use a "
          f"multiple of {dp * cfg.optim.grad_accum}.", ConfigError)
  return cfg.train.global_batch // (dp * cfg.optim.grad_accum)


def cpu_splits(cfg: Config, mesh: jax.sharding.Mesh, malloc: str | None = None) -> int:
  """Sequential pieces per grad-accumulation microbatch: 1 off CPU, cfg.train.cpu_splits if
  set, else auto, among the divisors of the per-device rows that leave pieces of at least
  CPU_MIN_PIECE_TOKENS tokens:
    * the fewest whose step temporaries fit CPU_REUSED_BLOCK_BYTES of this process's
      allocator (`malloc`, default allocator.current(); glibc: 'baby' 2, at 8 layers 4;
      mimalloc: 'baby' 1 at 4-16 layers, 'small' 4; both: the default sweep's models 1);
    * otherwise the fewest whose page faults cost at most CPU_FAULT_BUDGET of the step's
      matmul time ('small': 4);
    * otherwise the most ('baby' at 16 layers: 4).
  With model.scan_layers the pieces must have CPU_MIN_SCAN_PIECE_TOKENS ('baby' at any
  depth: 1; 'small': 4).
  """
  rows = rows_per_device(cfg, mesh)
  if not sharding.is_cpu(mesh):
    return 1
  if cfg.train.cpu_splits:
    require(rows % cfg.train.cpu_splits == 0,
            f"train.cpu_splits={cfg.train.cpu_splits} does not divide the {rows} rows per device "
            f"and microbatch; use a divisor of {rows}, or 0 (auto).", ConfigError)
    return cfg.train.cpu_splits
  T = cfg.train.seq_len
  min_tokens = CPU_MIN_SCAN_PIECE_TOKENS if cfg.model.scan_layers else CPU_MIN_PIECE_TOKENS
  pieces = [k for k in range(1, rows + 1)
            if rows % k == 0 and (k == 1 or rows // k * T >= min_tokens)]
  temp = {k: step_temp_bytes(cfg, rows // k * T, k) for k in pieces}
  reused = CPU_REUSED_BLOCK_BYTES[malloc or allocator.current()]
  for k in pieces:
    if temp[k] <= reused:
      return k
  matmul_s = (flops_lib.flops_per_token(cfg.model, T, "matmul") * rows * cfg.optim.grad_accum
              * T / CPU_MATMUL_FLOPS_PER_S)
  for k in pieces:
    if temp[k] * CPU_FAULT_SECONDS_PER_BYTE <= CPU_FAULT_BUDGET * matmul_s:
      return k
  return pieces[-1]


# Config fields a run's programs never see: they reach the step as traced hparams (lr,
# warmup and total steps), the init as its key (seed), or live outside the step.
NOT_IN_PROGRAMS = ("name", "data", "checkpoint", "train.seed", "train.steps", "train.tokens",
                   "train.flops", "train.flops_convention", "train.eval_every",
                   "train.log_every", "train.progress", "optim.lr", "optim.warmup_steps",
                   "guard.max_consecutive_bad", "guard.max_rollbacks",
                   "guard.rollback_lr_factor")


def program_key(cfg: Config) -> str:
  """Equal for configs whose init, train and eval programs are the same: an IsoFLOP
  sweep's runs of one model size at different budgets, or seed replicas."""
  d = config_lib.to_dict(cfg)
  for path in NOT_IN_PROGRAMS:
    *parents, leaf = path.split(".")
    node = d
    for key in parents:
      node = node[key]
    node.pop(leaf)
  return json.dumps(d, sort_keys=True)


class _Programs(NamedTuple):
  tx: optax.GradientTransformation
  state_shardings: Any
  abstract_state: Any
  init: Callable
  train_step: Callable
  eval_step: Callable
  step_options: dict | None   # the XLA options the train and eval steps compile with


# Recently built programs, so that a sweep's later runs of a shape skip tracing, lowering
# and compiling (the persistent cache skips only the compiling): on the default CPU sweep
# that took 0.8-1.8 s a run. Keyed by everything the programs depend on. Groups of runs
# (lmjax.multirun) keep theirs here too, under keys of their own. CompileAhead's thread
# fills it as well, hence the lock.
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
PROGRAMS_KEPT = 16
_PROGRAMS_LOCK = threading.Lock()
_AHEAD: dict[tuple, threading.Event] = {}   # keys CompileAhead is compiling -> set when done


def _compiler_options(cfg: Config, mesh: jax.sharding.Mesh) -> tuple[dict | None, dict | None]:
  """(train and eval step options, init options)."""
  return (cpu_compiler_options(mesh, dot_options(cfg, mesh)),
          cpu_compiler_options(mesh, base=CPU_INIT_COMPILER_OPTIONS))


def _cache_key(cfg: Config, mesh: jax.sharding.Mesh, splits: int) -> tuple:
  # The builders' identities too: a test or benchmark that swaps one gets fresh programs.
  return (program_key(cfg), mesh, splits, repr(_compiler_options(cfg, mesh)),
          Transformer, make_train_step, make_eval_step, make_optimizer)


def wait_for_ahead(key: tuple) -> None:
  """Returns once CompileAhead is not compiling the programs under `key` (at once if it is
  not); the wait counts as compile time. Waiting beats compiling them a second time."""
  with _PROGRAMS_LOCK:
    ahead = _AHEAD.get(key)
  if ahead is not None and not is_off_the_clock():
    start = time.time()
    ahead.wait()
    record_wait(start)


def cached_programs(key: tuple, build: Callable[[], Any]) -> Any:
  """The programs cached under `key`, else build()'s, which are cached. If CompileAhead is
  building them right now, waits for those instead."""
  wait_for_ahead(key)
  with _PROGRAMS_LOCK:
    if key in _PROGRAMS:
      _PROGRAMS.move_to_end(key)
      return _PROGRAMS[key]
  programs = build()
  with _PROGRAMS_LOCK:
    _PROGRAMS[key] = programs
    while len(_PROGRAMS) > PROGRAMS_KEPT:
      _PROGRAMS.popitem(last=False)
  return programs


def _programs(cfg: Config, mesh: jax.sharding.Mesh, splits: int) -> _Programs:
  return cached_programs(_cache_key(cfg, mesh, splits),
                         lambda: _build_programs(cfg, mesh, splits))


def _build_programs(cfg: Config, mesh: jax.sharding.Mesh, splits: int) -> _Programs:
  step_options, init_options = _compiler_options(cfg, mesh)
  if cfg.model.remat != "none" and not cfg.model.scan_layers and sharding.is_cpu(mesh):
    # XLA:CPU expands jax.checkpoint's optimization barriers before it schedules, and then
    # runs each unrolled block's recomputation during the forward pass: the step keeps every
    # activation and does the work twice ('small': 315 vs 319 MiB of temporaries). Inside a
    # scan the loop orders it (scan_layers: 535 -> 139 MiB). docs/performance.md, eighth pass.
    logging.warning("model.remat=%s saves no memory on XLA:CPU while model.scan_layers=False "
                    "(the recomputation is scheduled early); set model.scan_layers=True to "
                    "save memory, or model.remat='none' to save the time", cfg.model.remat)
  # Init traces one row, which an explicit attention_chunks > 1 cannot split; the chunks
  # schedule attention and make no parameters, so init runs with the auto count.
  init_cfg = dataclasses.replace(cfg.model, attention_chunks=0)

  def init_boxed(rng):
    params_rng, rng = jax.random.split(rng)
    params = init_params(init_cfg, params_rng, 1, cfg.train.seq_len)
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": tx.init(params), "rng": jax.random.key_data(rng),
            "guard": init_guard_state()}

  abstract_params = jax.eval_shape(
      lambda: init_params(init_cfg, jax.random.key(0), 1, cfg.train.seq_len))
  # Without the lr (scale_by_lr=False) the optimizer does not use the schedule's length.
  tx = make_optimizer(cfg.optim, cfg.total_steps(), abstract_params,
                      scale_by_lr=False)
  boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  state_shardings = sharding.tree_shardings(boxed, mesh)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.meta.unbox(boxed), state_shardings)
  init = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=state_shardings,
                 compiler_options=init_options)
  batch_sh = sharding.batch_sharding(mesh)
  rules = sharding.activation_rules(mesh)

  def with_rules(fn):
    def wrapped(*args):
      with nn.logical_axis_rules(rules):
        return fn(*args)
    return wrapped

  train_step = jax.jit(with_rules(make_train_step(cfg, tx, splits)),
                       in_shardings=(state_shardings, batch_sh, sharding.replicated(mesh)),
                       out_shardings=(state_shardings, sharding.replicated(mesh)),
                       donate_argnums=0, compiler_options=step_options)
  eval_step = jax.jit(with_rules(make_eval_step(cfg)),
                      in_shardings=(state_shardings["params"], batch_sh),
                      out_shardings=sharding.replicated(mesh), compiler_options=step_options)
  return _Programs(tx, state_shardings, abstract_state, init, train_step, eval_step,
                   step_options)


class Trainer:
  """Compiled, sharded steps for one config on one mesh (shared with earlier Trainers of
  the same `program_key`)."""

  def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
    self.cfg, self.mesh = cfg, mesh
    self.splits = cpu_splits(cfg, mesh)   # checks that the batch divides over the mesh
    self.total_steps = cfg.total_steps()
    make_schedule(cfg.optim, self.total_steps)  # checks warmup and decay fit this run
    self.lr_scale = 1.0  # lowered by rollbacks
    self._hparams = {"total_steps": np.int32(self.total_steps),
                     "warmup_steps": np.int32(cfg.optim.warmup_steps)}
    (self.tx, self.state_shardings, self.abstract_state, self._init, self.train_step,
     self.eval_step, step_options) = _programs(cfg, mesh, self.splits)
    self.onednn_dots = runs_onednn_dots(step_options)

  def init_state(self, seed: int | None = None) -> State:
    with jax.set_mesh(self.mesh):
      return self._init(jax.random.key(self.cfg.train.seed if seed is None else seed))

  def hparams(self, skip: bool = False) -> dict:
    """The train step's traced hyperparameters (numpy scalars: one program for all values)."""
    return dict(self._hparams, peak_lr=np.float32(self.cfg.optim.lr * self.lr_scale),
                skip=np.bool_(skip))

  def compiled_temp_bytes(self, state: State, batch: dict) -> int | None:
    """Temporaries XLA assigns the compiled train step (None where the backend does not
    say); on XLA:CPU each step takes them as one fresh block (see cpu_splits)."""
    with jax.set_mesh(self.mesh):
      analysis = self.train_step.lower(state, batch, self.hparams(False)).compile(
          ).memory_analysis()
    return None if analysis is None else analysis.temp_size_in_bytes

  def step(self, state: State, batch: dict, skip: bool = False) -> tuple[State, dict]:
    with jax.set_mesh(self.mesh):
      return self.train_step(state, batch, self.hparams(skip))

  def evaluate(self, params, batches: list[dict]) -> float:
    with jax.set_mesh(self.mesh):
      sums = [self.eval_step(params, b) for b in batches]
    ce, n = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    return float(ce / max(n, 1.0))


class CompileAhead:
  """Compiles the programs of runs that have not started, in one background thread.

  A sweep trains one run while this compiles the next model size (`submit`) or the next
  group's programs (lmjax.multirun.compile_group_ahead), so that they start without
  compiling. Compiles here are on no CompileClock: they do not hold up a
  run. A run that arrives while its programs are still compiling waits for them (that wait
  is on its clock) rather than compiling them a second time. Single-process only: several
  processes must compile in step. Use as a context manager; leaving it waits for the
  compile under way and drops the queued ones.

    with CompileAhead() as ahead:
      ahead.submit(next_cfg)      # returns at once
      train(cfg, workdir)         # meanwhile
  """

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="lmjax-compile-ahead")
    self._keys: list[tuple] = []
    self.seconds = 0.0   # background wall time spent compiling
    self.compiled = 0    # program sets compiled whole: a lone config's or a group's

  def submit(self, cfg: Config) -> bool:
    """Queues cfg's init, train and eval programs. False, and nothing queued, if they are
    built or queued already, if the config is unusable (its run will say why), or under
    several processes."""
    try:
      mesh = sharding.make_mesh(cfg.mesh)
      key = _cache_key(cfg, mesh, cpu_splits(cfg, mesh))
    except Exception:  # pylint: disable=broad-except - the run reports its own bad config
      return False
    return self.submit_programs(key, functools.partial(_compile_lone, cfg, mesh))

  def submit_programs(self, key: tuple, compile_fn: Callable[[], None]) -> bool:
    """Queues compile_fn(), which builds the programs `cached_programs` keeps under `key`
    and compiles them (lmjax.multirun's groups come in here). False, and nothing queued,
    if they are built or queued already, or under several processes."""
    if jax.process_count() > 1:
      return False
    with _PROGRAMS_LOCK:
      if key in _PROGRAMS or key in _AHEAD:
        return False
      _AHEAD[key] = threading.Event()  # before the thread starts: a run must find it
    self._keys.append(key)
    self._pool.submit(self._compile, compile_fn, key)
    return True

  def _compile(self, compile_fn: Callable[[], None], key: tuple) -> None:
    start = time.time()
    try:
      with off_the_clock():
        compile_fn()
      self.compiled += 1
    except Exception as e:  # pylint: disable=broad-except - the run meets and reports it
      logging.info("compiling ahead failed (the run will compile for itself): %s", e)
    finally:
      self.seconds += time.time() - start
      self._release(key)

  @staticmethod
  def _release(key: tuple) -> None:
    with _PROGRAMS_LOCK:
      event = _AHEAD.pop(key, None)
    if event is not None:
      event.set()

  def __enter__(self) -> CompileAhead:
    return self

  def __exit__(self, *exc) -> None:
    self._pool.shutdown(wait=True, cancel_futures=True)
    for key in self._keys:  # cancelled before they started: nobody may wait on them
      self._release(key)


def _compile_lone(cfg: Config, mesh: jax.sharding.Mesh) -> None:
  """Builds and compiles cfg's init, train and eval programs (CompileAhead's thread)."""
  trainer = Trainer(cfg, mesh)
  with jax.set_mesh(mesh):
    trainer._init.lower(jax.random.key(0)).compile()  # pylint: disable=protected-access
    batch = abstract_batch(cfg, mesh)
    trainer.train_step.lower(trainer.abstract_state, batch, trainer.hparams()).compile()
    trainer.eval_step.lower(trainer.abstract_state["params"], batch).compile()


def abstract_batch(cfg: Config, mesh: jax.sharding.Mesh) -> dict:
  """The shapes, dtypes and sharding of the batches train() feeds (its first one)."""
  local = data_lib.make_pipeline(cfg.data, seq_len=cfg.train.seq_len,
                                 global_batch=cfg.train.global_batch).next()
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
          for k, v in local.items()}


# ------------------------------------------------------------------------------ the loop

def _check_workdir_config(cfg: Config, workdir: str) -> None:
  """A workdir belongs to one run: refuse (and touch nothing) if its config differs."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is unreadable ({e}); restore it or use a new --workdir.")
  ckpt_lib.check_compatible(saved, config_lib.to_dict(cfg), RESUMABLE_CHANGES, workdir=workdir)


def train(cfg: Config, workdir: str, *, mesh: jax.sharding.Mesh | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          stop: StopFlag | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns its summary. Effects live here.

  If `stop` becomes true (a signal handler sets it), the loop checkpoints after the
  current step and raises Preempted; running again resumes from that step. Persistent bad
  steps roll back to the last healthy checkpoint; too many rollbacks raise Diverged.

  The summary's `compile_s` is all the time this call spent making programs (train, eval,
  init, checkpoint fingerprints; see lmjax.compile_clock); `first_step_s` is the first
  step's wall time, compile included.
  """
  with CompileClock() as clock:
    return _train(cfg, workdir, mesh=mesh, on_step=on_step, stop=stop, clock=clock)


def _train(cfg: Config, workdir: str, *, mesh, on_step, stop, clock: CompileClock) -> dict:
  t_start = time.time()
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  is_main = jax.process_index() == 0
  _check_workdir_config(cfg, workdir)
  data_lib.check_vocab(cfg.data, cfg.model.vocab_size)
  trainer = Trainer(cfg, mesh)
  total = trainer.total_steps
  pipeline = data_lib.make_pipeline(cfg.data, seq_len=cfg.train.seq_len,
                                    global_batch=cfg.train.global_batch, split="train",
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  eval_local = data_lib.eval_batches(cfg.data, seq_len=cfg.train.seq_len,
                                     global_batch=cfg.train.global_batch,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
  eval_set = [sharding.global_batch_from_local(b, mesh) for b in eval_local]
  # Everything a user can get wrong has been checked: only now touch the workdir.
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    config_lib.save(cfg, os.path.join(workdir, "config.json"))
  skips = SkipList(os.path.join(workdir, "skip_list.jsonl"), enabled=is_main)
  events = EventLog(os.path.join(workdir, "events.jsonl"), enabled=is_main)

  checkpointer = ckpt_lib.Checkpointer(workdir, cfg.checkpoint,
                                       keys_that_may_change=RESUMABLE_CHANGES)
  cfg_dict = config_lib.to_dict(cfg)

  def restore(accept=None):
    """(state, step, rollbacks) of the newest checkpoint that `accept` takes; the initial
    state, with the data back at its start, where there is none."""
    restored = None
    if checkpointer.latest_step() is not None:
      restored = checkpointer.restore(abstract_state=trainer.abstract_state,
                                      current_config=cfg_dict, accept=accept)
    if restored is None:  # nothing saved, or every step rejected (and set aside)
      pipeline.set_state(initial_position)
      return trainer.init_state(), 0, 0
    state, extras = restored
    per_process = extras.get("data_per_process") or []
    same_topology = len(per_process) == jax.process_count()
    pipeline.set_state(per_process[jax.process_index()] if same_topology else extras["data"])
    return state, int(jax.device_get(state["step"])), int(extras.get("rollbacks", 0))

  initial_position = pipeline.get_state()
  state, start_step, rollbacks = restore()
  trainer.lr_scale = cfg.guard.rollback_lr_factor ** rollbacks
  if start_step:
    logging.info("resumed %s at step %d", workdir, start_step)

  tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
  flops_per_token = flops_lib.flops_per_token(cfg.model, cfg.train.seq_len,
                                              cfg.train.flops_convention)
  hw_flops_per_token = flops_lib.flops_per_token(cfg.model, cfg.train.seq_len, "matmul")
  peak = _peak_flops(jax.devices()[0].device_kind, cfg.model.dtype) * jax.device_count()
  writer = MetricsWriter(workdir, enabled=is_main, truncate_after_step=start_step)
  progress = ProgressLine(total, enabled=is_main and cfg.train.progress)

  pending: list[tuple[int, dict, dict]] = []   # (step, data position, device metrics)
  interval_start, interval_steps = time.time(), 0
  last_eval = None
  first_step_s = None
  step = start_step

  def flush() -> tuple[dict, int]:
    """Fetches the pending steps' metrics (the only host sync), records their skips, and
    returns the log record of the interval and the current bad-step streak."""
    nonlocal pending
    host = jax.device_get([m for _, _, m in pending])
    for (s, pos, _), m in zip(pending, host):
      if m["skipped"]:
        skips.add(s, pos, skip_reason(m), float(m["loss"]))
    pending = []
    elapsed = max(time.time() - interval_start, 1e-9)
    record = interval_record(host, step, tokens_per_step=tokens_per_step,
                             flops_per_token=flops_per_token,
                             hw_flops_per_token=hw_flops_per_token, peak=peak,
                             interval_steps=interval_steps, elapsed=elapsed)
    return record, int(host[-1]["bad_streak"])

  try:
    while step < total:
      t0 = time.time()
      position = pipeline.get_state()
      batch = sharding.global_batch_from_local(pipeline.next(), mesh)
      state, metrics = trainer.step(state, batch, skip=step + 1 in skips)
      if first_step_s is None:
        jax.block_until_ready(metrics)
        first_step_s = time.time() - t0
        interval_start = time.time()  # keep compilation out of tokens/s
      else:
        interval_steps += 1
      step += 1
      pending.append((step, position, metrics))
      is_eval = step == total or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
      if step % cfg.train.log_every == 0 or is_eval:
        record, streak = flush()
        if cfg.guard.max_consecutive_bad and streak >= cfg.guard.max_consecutive_bad:
          # K bad steps in a row: back to the newest (healthy) checkpoint, with a lower lr.
          if rollbacks >= cfg.guard.max_rollbacks:
            reason = (f"{streak} consecutive bad steps (non-finite, spiking or exploded loss) "
                      f"at step {step} after {rollbacks} rollback(s)")
            events.write({"event": "diverged", "step": step, "reason": reason})
            raise Diverged(reason)
          bad_step = step
          # Only interval saves are healthy by construction; a save on a stop signal may
          # sit inside the streak, and a rollback must go back past it, as an uninterrupted
          # run would. With no healthy save the initial state is the last healthy one.
          state, step, _ = restore(accept=lambda extras: extras.get("healthy", True))
          rollbacks += 1
          trainer.lr_scale = cfg.guard.rollback_lr_factor ** rollbacks
          events.write({"event": "rollback", "step": bad_step, "to_step": step,
                        "bad_streak": streak, "lr_scale": trainer.lr_scale})
          logging.warning("%d bad steps in a row at step %d: rolled back to step %d, lr x %.3g",
                          streak, bad_step, step, trainer.lr_scale)
          writer.truncate(step)
          interval_start, interval_steps = time.time(), 0
          continue
        if is_eval:
          last_eval = trainer.evaluate(state["params"], eval_set)
          record.update(_eval_record(last_eval, eval_local))
        writer.write(record)
        progress.update(record)
        interval_start, interval_steps = time.time(), 0
        if on_step:
          on_step(step, record)
      if step == total or stop or checkpointer.due(step):  # save() itself costs ms: ask first
        healthy = int(jax.device_get(state["guard"]["bad_streak"])) == 0
        if healthy or step == total or stop:  # rollbacks must land on a healthy state
          positions = _all_processes(pipeline.get_state())  # TFDS positions are per process
          checkpointer.save(step, state, checkpoint_extras(positions, cfg_dict, rollbacks, healthy),
                            force=bool(stop), final=step == total)
        if stop and step < total:
          if pending:  # steps since the last log are not recomputed after resume: keep them
            writer.write(flush()[0])
          events.write({"event": "preempted", "step": step, "signal": stop.signum})
          raise Preempted(step, stop.signum)
  finally:  # an interrupted run still finishes its async save and closes its files
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    progress.close()

  if last_eval is None:  # the run had already finished before this call
    last_eval = trainer.evaluate(state["params"], eval_set)
  return {
      "steps": total, "tokens": total * tokens_per_step,
      "flops": total * tokens_per_step * flops_per_token,
      "final_eval_loss": last_eval, "wall_s": time.time() - t_start,
      "compile_s": clock.seconds, "first_step_s": first_step_s,
      "skipped_steps": len(skips), "rollbacks": rollbacks,
      "malloc": allocator.current(),  # it moves CPU step times ~10% (lmjax/allocator.py)
      "software": provenance.software(on_cpu=sharding.is_cpu(trainer.mesh),
                                      onednn_dots=trainer.onednn_dots),
  }


def checkpoint_extras(positions: list, cfg_dict: dict, rollbacks: int, healthy: bool) -> dict:
  """What a run's checkpoint holds besides its state: the data position of every process
  (and process 0's, for a resume on another topology), the config, and the guard's record."""
  return {"data": positions[0], "data_per_process": positions, "config": cfg_dict,
          "rollbacks": rollbacks, "healthy": healthy}


def skip_reason(m: dict) -> str:
  """Why the guard skipped a step, from its host metrics (for the skip list)."""
  return ("nonfinite" if m["nonfinite"] else "exploded" if m["exploded"]
          else "spike" if m["spike"] else "listed")


def interval_record(host: list[dict], step: int, *, tokens_per_step: int,
                    flops_per_token: float, hw_flops_per_token: float, peak: float,
                    interval_steps: int, elapsed: float) -> dict:
  """The log record of one logging interval from its steps' host metrics (oldest first)."""
  good = [m for m in host if not m["skipped"]]
  record = {
      "step": step,
      "loss": float(np.mean([m["loss"] for m in good])) if good else None,
      "grad_norm": float(host[-1]["grad_norm"]),
      "param_norm": float(host[-1]["param_norm"]),
      "lr": float(host[-1]["lr"]),
      "tokens": step * tokens_per_step,
      "flops": step * tokens_per_step * flops_per_token,
      "skipped": int(sum(bool(m["skipped"]) for m in host)),
  }
  if record["loss"] is not None:
    record["bits_per_token"] = record["loss"] / math.log(2)
  if interval_steps:
    tps = interval_steps * tokens_per_step / elapsed
    record["tokens_per_s"] = tps
    if math.isfinite(peak):
      record["mfu"] = tps * hw_flops_per_token / peak
  return record


def _all_processes(obj: Any) -> list:
  """Every process's JSON-able `obj`, in process order (an all-gather of its bytes)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(raw.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  everyone = np.asarray(multihost_utils.process_allgather(padded))
  return [json.loads(bytes(everyone[i, :sizes[i]]).decode()) for i in range(len(sizes))]


class SkipList:
  """WORKDIR/skip_list.jsonl: steps whose batches were skipped; a resumed run skips them too."""

  def __init__(self, path: str, enabled: bool = True):
    self.path, self.enabled = path, enabled
    self.steps: set[int] = set()
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          if line.strip():
            self.steps.add(int(json.loads(line)["step"]))

  def __contains__(self, step: int) -> bool:
    return step in self.steps

  def __len__(self) -> int:
    return len(self.steps)

  def add(self, step: int, position: dict, reason: str, loss: float) -> None:
    if step in self.steps:
      return
    self.steps.add(step)
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps({"step": step, "data": position, "reason": reason,
                            "loss": loss if math.isfinite(loss) else str(loss)}) + "\n")


class EventLog:
  """WORKDIR/events.jsonl: rollbacks, divergence, preemption (what happened, when)."""

  def __init__(self, path: str, enabled: bool = True):
    self.path, self.enabled = path, enabled

  def write(self, event: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps(dict(event, time=time.time())) + "\n")


def _eval_record(eval_loss: float, eval_local) -> dict:
  rec = {"eval_loss": eval_loss, "eval_bits_per_token": eval_loss / math.log(2)}
  bytes_per_token = getattr(eval_local, "bytes_per_token", None)  # exact for the eval set
  if bytes_per_token:
    rec["eval_bits_per_byte"] = eval_loss / math.log(2) / bytes_per_token
  return rec


def _peak_flops(device_kind: str, dtype: str) -> float:
  try:
    return flops_lib.peak_flops(device_kind, dtype)
  except ConfigError:
    return float("nan")  # MFU unknown for this device; training goes on


# ------------------------------------------------------------------------------ command line

def main(argv):
  from absl import flags
  require(len(argv) == 1, f"unexpected arguments {argv[1:]}; use --flag=value.", ConfigError)
  flags_ = flags.FLAGS
  require(flags_.workdir, "--workdir is required: the directory for checkpoints and metrics.",
          ConfigError)
  cfg = config_lib.from_dict(Config, flags_.config)
  with handle_signals(StopFlag()) as stop:
    try:
      summary = train(cfg, flags_.workdir, stop=stop)
    except Preempted as e:
      print(f"lmjax: {e}", file=sys.stderr)
      sys.exit(EXIT_REQUEUE)
    except Diverged as e:
      print(f"lmjax: run diverged: {e}; see {flags_.workdir}/events.jsonl, lower the "
            "learning rate or change the guard settings.", file=sys.stderr)
      sys.exit(EXIT_DIVERGED)
  print(json.dumps(summary))


def cli():
  from lmjax.cli import run_main
  run_main(main, config_required=True, workdir=True)


if __name__ == "__main__":
  cli()
