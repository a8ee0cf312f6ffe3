"""MFU of lmjax's real train step on the devices at hand: a ~125M and a ~1B GPT, bf16.

Issue 7 asks for MFU on an H100 for a ~125M and a ~1B model (target: >= 45% for ~1B in
bf16). This is the one command for it, so that a session that is lent a GPU spends its
minutes measuring, not writing a harness:

  PYTHONPATH=. python benchmarks/accelerator_mfu.py --configs=125m,1b --out=/tmp/mfu.json
  PYTHONPATH=. python benchmarks/accelerator_mfu.py --configs=1b --remat=dots --batch=8
  PYTHONPATH=. python benchmarks/accelerator_mfu.py --configs=tiny      # a CPU smoke run

Each config trains lmjax's own Trainer (the jitted, donated, sharded step of
lmjax.train, AdamW, f32 master weights, bf16 compute) on random tokens placed on the
devices beforehand, over every local device on the `data` axis. The figures: compile
time (the first step), steady tokens/s (median of --rounds rounds of --steps steps, each
round ended by one host sync), model FLOPs per token under lmjax.flops' "matmul" count
(what train.py's `mfu` metric uses; it counts the attention blocks actually computed) and
under 6N, and MFU against two peaks: the device's spec sheet (lmjax.flops.PEAK_FLOPS;
dense bf16, 989 TFLOP/s for an H100 SXM) and, the in-run reference, a large bf16 matmul
measured in the same process (`matmul_peak_flops`). Peak device memory where the backend
reports it.

Defaults per backend: attention "cudnn" on GPU (cuDNN flash attention; bf16 only),
"splash" on TPU (Pallas), "causal_blocks" on CPU; layers scanned (one compiled block).
Everything is overridable; the report records the config that ran.

A GPU is lent rarely, so one failure must not cost the session its figures. With
--fallback=1 (the default) a config that fails is tried again, changed one step at a time:
out of device memory, with more remat ("none" -> "dots" -> "full"); any other error (a
fused-attention kernel that does not build or runs out of its on-chip memory, a NaN loss),
or out of memory at "full", with jax.nn's XLA attention. Each row
lists its failed attempts and their errors; a config that fails every way gets a row with
its error, and the other configs still run. With --out the JSON is rewritten after every
config, so a command cut off by its time limit still leaves the configs it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

import bench_common
from lmjax import flops as flops_lib
from lmjax import sharding
from lmjax.config import Config, OptimConfig, TrainConfig
from lmjax.model import ModelConfig
from lmjax.train import Trainer

# GPT-2 small (124M with tied embeddings, vocab padded to a multiple of 128) and a 1.3B
# model of the same family (lmjax.flops.TABLE_MODELS' "1B" shape). 32k and 16k tokens a
# step: the 1B's f32 weights and Adam moments take ~21 GB and its activations without remat
# ~2.3 GB a layer at 32k tokens, too much for an 80 GB H100 (try --batch=16 --remat=dots).
CONFIGS = {
    "tiny": dict(n_layers=2, d_model=64, n_heads=2, seq_len=64, batch=8, vocab=256),
    "125m": dict(n_layers=12, d_model=768, n_heads=12, seq_len=1024, batch=32, vocab=50304),
    "1b": dict(n_layers=24, d_model=2048, n_heads=16, seq_len=2048, batch=8, vocab=50304),
}
DEFAULT_ATTENTION = {"gpu": "cudnn", "tpu": "splash"}   # anything else: the model's default

OPTIM = OptimConfig(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, schedule="cosine",
                    warmup_steps=0, final_lr_frac=0.1, clip_norm=1.0)


def build_config(name: str, args: argparse.Namespace) -> Config:
  shape = CONFIGS[name]
  backend = jax.default_backend()
  model = ModelConfig(vocab_size=shape["vocab"], d_model=shape["d_model"],
                      n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                      max_len=shape["seq_len"], position="learned", mlp="gelu",
                      norm="layernorm", tie_embeddings=True, dtype=args.dtype,
                      scan_layers=bool(args.scan_layers), remat=args.remat)
  attention = args.attention or DEFAULT_ATTENTION.get(backend)
  if attention == "cudnn" and args.dtype != "bfloat16" and not args.attention:
    attention = None   # cuDNN's flash attention takes bf16/fp16 only
  if attention:
    model = dataclasses.replace(model, attention=attention)
  n = jax.device_count()
  batch = (args.batch or shape["batch"]) * (n if args.batch_per_device else 1)
  return Config(model=model, optim=OPTIM, mesh=sharding.MeshConfig(data=n),
                train=TrainConfig(global_batch=batch, seq_len=shape["seq_len"],
                                  steps=100_000, progress=False))


def _batches(cfg: Config, mesh, n: int = 4) -> list[dict]:
  shape = dict(batch=cfg.train.global_batch, seq_len=cfg.train.seq_len,
               vocab=cfg.model.vocab_size)
  return [sharding.global_batch_from_local(b, mesh)
          for b in bench_common.make_batches(shape, n=n)]


def _peak_memory() -> int | None:
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s.get("peak_bytes_in_use") for s in stats if s]
  return max(peaks) if peaks and all(p is not None for p in peaks) else None


_attempts = [0]   # bench() calls in this process so far


def bench(name: str, args: argparse.Namespace, matmul_peak: float,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  _attempts[0] += 1
  first = _attempts[0] == 1
  cfg = build_config(name, args)
  if overrides:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **overrides))
  mesh = sharding.make_mesh(cfg.mesh)
  trainer = Trainer(cfg, mesh)
  state = trainer.init_state()
  batches = _batches(cfg, mesh)
  t0 = time.perf_counter()
  state, metrics = trainer.step(state, batches[0])
  jax.block_until_ready(metrics)
  first_step_s = time.perf_counter() - t0
  i = 1
  for _ in range(args.warmup):
    state, metrics = trainer.step(state, batches[i % len(batches)])
    i += 1
  jax.block_until_ready(metrics)
  rounds = []
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, metrics = trainer.step(state, batches[i % len(batches)])
      i += 1
    jax.block_until_ready((state, metrics))
    rounds.append((time.perf_counter() - t0) / args.steps)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):   # e.g. a broken fused kernel: the ladder tries XLA attention
    raise FloatingPointError(f"{name}: the loss is {loss}; the figures would be meaningless")
  step_s = statistics.median(rounds)
  tokens = cfg.train.global_batch * cfg.train.seq_len
  tokens_per_s = tokens / step_s
  kind = jax.devices()[0].device_kind
  n_dev = jax.device_count()
  spec_peak = flops_lib.peak_flops(kind, cfg.model.dtype) * n_dev
  per_token = {c: flops_lib.flops_per_token(cfg.model, cfg.train.seq_len, c)
               for c in ("matmul", "6N")}
  achieved = {c: tokens_per_s * f for c, f in per_token.items()}
  counts = flops_lib.param_counts(cfg.model)
  return {
      "config": name, "model": dataclasses.asdict(cfg.model),
      "global_batch": cfg.train.global_batch, "seq_len": cfg.train.seq_len,
      "params": counts.total, "params_non_embedding": counts.non_embedding,
      "devices": n_dev, "device_kind": kind,
      "compile_and_first_step_s": round(first_step_s, 2),
      "step_ms": round(1e3 * step_s, 2), "step_ms_rounds": [round(1e3 * r, 2) for r in rounds],
      "tokens_per_s": round(tokens_per_s, 1),
      "flops_per_token": {c: float(f) for c, f in per_token.items()},
      "achieved_flops_per_s": {c: float(f) for c, f in achieved.items()},
      "spec_peak_flops": spec_peak,
      "mfu": round(achieved["matmul"] / spec_peak, 4),
      "mfu_6n": round(achieved["6N"] / spec_peak, 4),
      "mfu_vs_matmul_peak": round(achieved["matmul"] / (matmul_peak * n_dev), 4),
      "peak_memory_bytes": _peak_memory(),
      # The device's peak is this process's high-water mark: after an earlier config or a
      # failed attempt it may be theirs.
      "peak_memory_is_this_runs_alone": first,
      "final_loss": loss,
  }


REMAT_LADDER = ("none", "dots", "full")
XLA_ATTENTION = "dot_product_attention"   # jax.nn's reference attention, plain XLA


def _out_of_device_memory(e: BaseException) -> bool:
  """True for the device's memory; a kernel's own on-chip memory (a TPU kernel's VMEM or
  SMEM, a GPU kernel's shared memory) running out is the kernel's failure instead."""
  text = str(e).lower()
  on_chip = any(m in text for m in ("vmem", "smem", "shared memory"))
  return not on_chip and ("resource_exhausted" in text or "out of memory" in text)


def next_variant(model: dict[str, Any], e: BaseException) -> dict[str, Any] | None:
  """The model overrides to try after `model` (the failed attempt's ModelConfig fields)
  failed with `e`: more remat if the device ran out of memory, else (or once remat is
  "full") jax.nn's XLA attention; None when nothing is left to try."""
  if _out_of_device_memory(e) and model["remat"] in REMAT_LADDER[:-1]:
    return {"remat": REMAT_LADDER[REMAT_LADDER.index(model["remat"]) + 1]}
  if model["attention"] != XLA_ATTENTION:
    return {"attention": XLA_ATTENTION}
  return None


def run_config(name: str, args: argparse.Namespace, matmul_peak: float) -> dict[str, Any]:
  """bench(name), falling back as the module doc says when --fallback is on."""
  overrides: dict[str, Any] = {}
  failed = []
  while True:
    try:
      return dict(bench(name, args, matmul_peak, overrides), failed_attempts=failed)
    except Exception as e:  # pylint: disable=broad-except - reported in the row, not lost
      if not args.fallback:
        raise
      model = dataclasses.asdict(build_config(name, args).model) | overrides
      error = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
      failed.append({"overrides": dict(overrides), "error": error})
      print(f"{name} with {overrides or 'the defaults'} failed: {error}", file=sys.stderr)
      step = next_variant(model, e)
    if step is None:
      return {"config": name, "error": error, "failed_attempts": failed}
    overrides = overrides | step
    # Out of the except block, the traceback no longer holds the failed attempt's frames:
    # free its arrays before the next attempt allocates its own.
    gc.collect()


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="125m,1b", help=f"','-separated, of {sorted(CONFIGS)}")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--attention", default="",
                 help="model.attention (default: cudnn on GPU, splash on TPU, else the model's)")
  p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  p.add_argument("--scan_layers", type=int, default=1, choices=(0, 1))
  p.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
  p.add_argument("--batch_per_device", type=int, default=0, choices=(0, 1),
                 help="1: --batch (or the config's) is per device, times the device count")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
  p.add_argument("--steps", type=int, default=10, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--matmul_n", type=int, default=0,
                 help="size of the reference matmul (0: 8192 on accelerators, 1024 on CPU)")
  p.add_argument("--fallback", type=int, default=1, choices=(0, 1),
                 help="1: retry a failing config with more remat (out of memory) or XLA "
                      "attention (other errors); 0: let the error end the command")
  p.add_argument("--out", default="", help="also write the JSON here (after every config)")
  args = p.parse_args(argv)
  names = [n.strip() for n in args.configs.split(",") if n.strip()]
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown or not names:
    raise SystemExit(f"unknown --configs {unknown}; choose from {sorted(CONFIGS)}")
  if min(args.steps, args.rounds) < 1 or args.warmup < 0:
    raise SystemExit("--steps and --rounds must be >= 1 and --warmup >= 0")
  on_cpu = jax.default_backend() == "cpu"
  n = args.matmul_n or (1024 if on_cpu else 8192)
  t0 = time.time()
  matmul_peak = flops_lib.measure_matmul_peak(args.dtype, n=n)
  report = {"machine": bench_common.machine_info(),
            "devices": [str(d) for d in jax.devices()], "command": " ".join(sys.argv),
            "args": vars(args), "matmul_peak_flops": {"n": n, "per_device": matmul_peak},
            "results": []}
  for name in names:
    report["results"].append(run_config(name, args, matmul_peak))
    report["wall_s"] = round(time.time() - t0, 1)
    if args.out:   # what is finished survives a cut-off command
      with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
  bench_common.emit(report, args.out)
  return report


if __name__ == "__main__":
  main()
