"""Throughput of a group of K runs trained at once (lmjax.multirun) against the same K runs
stepped one after another, for the model shapes of the default CPU sweep.

For each distinct model shape that lmjax.scaling.plan gives for the sweep config (by
default experiments/configs/sweeps/cpu_default.py), and each K in --ks, these runners train
K members (different train seeds, data seeds and peak learning rates) on pre-placed
batches of the sweep's batch and sequence length:

  sequential  Trainer.step (the lone run's compiled step) called K times, once per member;
  group_vmap  GroupTrainer(members_per_vmap=None).step: one vmapped step for all K members;
  group_map   GroupTrainer(members_per_vmap=1).step: one compiled step that runs the K
              members one after another (jax.lax.map), the CPU default;
  group_vmap_xla_defaults (--xla_defaults=1)  group_vmap without multirun's CPU options.

Tokens/s are summed over the members. The machine is shared and noisy, so the runners
alternate within each round (who goes first rotates), figures are medians over rounds,
and each ratio group/sequential is also given as the median of per-round ratios (which
cancels slow drifts), as the ratio of the best rounds, and as a ratio of process CPU time.
Compilation (the first step) is timed separately and kept out of tokens/s. Prints one JSON
document (and writes it to --out if given).

  PYTHONPATH=. python benchmarks/multirun_throughput.py                 # a few minutes
  PYTHONPATH=. python benchmarks/multirun_throughput.py --widths=16,80 --ks=1,8 --rounds=3
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import bench_common
import jax
import numpy as np

from lmjax import flops as flops_lib
from lmjax import sharding
from lmjax.config import Config
from lmjax.data import pipeline as data_lib
from lmjax.multirun import GroupTrainer, default_compiler_options
from lmjax.train import Trainer

DEFAULT_SWEEP = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                             "sweeps", "cpu_default.py")
N_BATCHES = 4   # distinct pre-placed batches per member, cycled


def members(cfg: Config, k: int) -> list[Config]:
  """K configs of one group: their own seeds and a spread of peak learning rates."""
  r = dataclasses.replace
  lrs = cfg.optim.lr * np.geomspace(0.5, 2.0, k) if k > 1 else [cfg.optim.lr]
  return [r(cfg, name=f"m{i}", train=r(cfg.train, seed=i), data=r(cfg.data, seed=i),
            optim=r(cfg.optim, lr=float(lr))) for i, lr in enumerate(lrs)]


def host_batches(cfg: Config) -> list[dict[str, np.ndarray]]:
  pipe = data_lib.make_pipeline(cfg.data, seq_len=cfg.train.seq_len,
                                global_batch=cfg.train.global_batch)
  return [pipe.next() for _ in range(N_BATCHES)]


class Sequential:
  """K lone runs, each stepped in turn by the same compiled Trainer.train_step."""

  def __init__(self, trainer: Trainer, cfgs: list[Config], mesh):
    self.trainer = trainer
    # Each member's own peak lr, through the (traced) scale rollbacks use: same program.
    self.lr_scales = [c.optim.lr / trainer.cfg.optim.lr for c in cfgs]
    self.states = [trainer.init_state(c.train.seed) for c in cfgs]
    self.batches = [[sharding.global_batch_from_local(b, mesh) for b in host_batches(c)]
                    for c in cfgs]
    self.i = 0

  def run(self, steps: int) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    metrics = []
    for _ in range(steps):
      for k in range(len(self.states)):
        self.trainer.lr_scale = self.lr_scales[k]
        self.states[k], m = self.trainer.step(self.states[k],
                                              self.batches[k][self.i % N_BATCHES])
        metrics.append(m["loss"])
      self.i += 1
    jax.block_until_ready((self.states, metrics))
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    self.last_loss = float(np.mean(jax.device_get(metrics[-len(self.states):])))
    return elapsed


class Grouped:
  """The same K runs as one vmapped group."""

  def __init__(self, cfgs: list[Config], mesh, members_per_vmap: int | None,
               compiler_options: dict | str | None = "default"):
    self.group = GroupTrainer(cfgs, mesh, members_per_vmap=members_per_vmap,
                              compiler_options=compiler_options)
    self.state = self.group.init_state()
    per_member = [host_batches(c) for c in cfgs]
    self.batches = [self.group.put_batch([b[i] for b in per_member]) for i in range(N_BATCHES)]
    self.i = 0

  def run(self, steps: int) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.group.step(self.state, self.batches[self.i % N_BATCHES])
      self.i += 1
    jax.block_until_ready((self.state, metrics))
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    self.last_loss = float(np.mean(jax.device_get(metrics["loss"])))
    return elapsed


def first_step(runner) -> float:
  """Seconds of the first step: tracing, compilation and one step."""
  return runner.run(1)[0]


def auto_steps(seq: Sequential, k: int, target_s: float) -> int:
  """Steps per round so that the K sequential members take about target_s."""
  wall, _ = seq.run(2)
  per_member_step = wall / (2 * k)
  return int(min(100, max(2, round(target_s / (k * per_member_step)))))


def bench_shape(cfg: Config, ks: list[int], steps: int, rounds: int, target_s: float,
                xla_defaults: bool, mesh) -> dict[str, Any]:
  tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
  trainer = Trainer(members(cfg, 1)[0], mesh)  # one compiled lone step serves every K
  m = cfg.model
  out: dict[str, Any] = {
      "shape": {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
                "d_ff": m.ff_dim, "vocab_size": m.vocab_size,
                "params": flops_lib.param_counts(m).total},
      "batch": cfg.train.global_batch, "seq_len": cfg.train.seq_len,
      "tokens_per_step_per_member": tokens_per_step, "ks": {},
  }
  lone_compile = None
  for k in ks:
    cfgs = members(cfg, k)
    runners: dict[str, Any] = {"sequential": Sequential(trainer, cfgs, mesh),
                               "group_vmap": Grouped(cfgs, mesh, None),
                               "group_map": Grouped(cfgs, mesh, 1)}
    if xla_defaults:  # the vmapped group without lmjax.multirun.CPU_COMPILER_OPTIONS
      runners["group_vmap_xla_defaults"] = Grouped(cfgs, mesh, None, compiler_options=None)
    compile_s = {name: first_step(r) for name, r in runners.items()}
    lone_compile = compile_s["sequential"] if lone_compile is None else lone_compile
    n = steps or auto_steps(runners["sequential"], k, target_s)
    for r in runners.values():  # untimed warm-up (allocator, threads, caches)
      r.run(max(1, n // 2))
    names = list(runners)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(rounds):
      shift = r % len(names)  # rotate who goes first
      for name in names[shift:] + names[:shift]:
        times[name].append(runners[name].run(n))
    tokens = k * n * tokens_per_step
    wall = {name: [w for w, _ in ts] for name, ts in times.items()}
    cpu = {name: [c for _, c in ts] for name, ts in times.items()}
    res: dict[str, Any] = {"steps_per_round": n}
    for name in names:
      tps = [tokens / w for w in wall[name]]
      res[name] = {
          "tokens_per_s": statistics.median(tps),
          "tokens_per_s_best": max(tps),
          "ms_per_member_step": 1000 * statistics.median(wall[name]) / (n * k),
          "tokens_per_s_rounds": [round(x) for x in tps],
          "final_loss": runners[name].last_loss,
      }
      if name != "sequential":
        res[name]["compile_s"] = compile_s[name]
        # Each round ran the runners back to back: the per-round ratio cancels slow drifts
        # of the machine's load, and best-of-rounds is the least disturbed figure.
        res[name]["ratio_per_round_median"] = statistics.median(
            s_ / g for g, s_ in zip(wall[name], wall["sequential"]))
        res[name]["ratio_best"] = max(tps) / max(tokens / w for w in wall["sequential"])
        # Process CPU seconds (all threads) are less sensitive to other users of the cores.
        res[name]["ratio_cpu_time"] = (statistics.median(cpu["sequential"])
                                       / statistics.median(cpu[name]))
      if not math.isfinite(res[name]["final_loss"]):
        raise RuntimeError(f"{name} loss is {res[name]['final_loss']} for d_model="
                           f"{m.d_model}, K={k}")
    out["ks"][str(k)] = res
    print(f"# d_model={m.d_model} K={k}: sequential {res['sequential']['tokens_per_s']:.0f} "
          "tok/s; " + "; ".join(
              f"{name} {res[name]['tokens_per_s']:.0f} tok/s, ratio "
              f"{res[name]['ratio_per_round_median']:.2f} (best {res[name]['ratio_best']:.2f}, "
              f"cpu {res[name]['ratio_cpu_time']:.2f}, compile {res[name]['compile_s']:.1f}s)"
              for name in names[1:]), file=sys.stderr, flush=True)
    del runners
  out["lone_compile_s"] = lone_compile
  return out


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--ks", default="1,2,4,8", help="comma list of group sizes K")
  p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
  p.add_argument("--steps", type=int, default=0,
                 help="train steps per timing round per runner (each of K members steps); "
                      "0: enough for about --round_s seconds of the sequential runner")
  p.add_argument("--round_s", type=float, default=0.5,
                 help="target seconds per sequential round when --steps=0")
  p.add_argument("--sweep", default=DEFAULT_SWEEP, help="sweep config file whose shapes to use")
  p.add_argument("--widths", default="",
                 help="comma list of d_model values to keep (default: every shape)")
  p.add_argument("--xla_defaults", type=int, default=0,
                 help="1: also time the vmapped group compiled with XLA's default options "
                      "(without lmjax.multirun.CPU_COMPILER_OPTIONS)")
  p.add_argument("--out", default="", help="also write the JSON here")
  args = p.parse_args(argv)
  ks = [int(k) for k in args.ks.split(",") if k]
  if not ks or min(ks) < 1 or args.rounds < 1 or args.steps < 0:
    raise SystemExit("--ks and --rounds must be positive, --steps >= 0")
  widths = [int(w) for w in args.widths.split(",") if w]

  t0 = time.time()
  # A fresh persistent cache: each group program is compiled for real once (the compile
  # times are first compiles), while the programs every K shares (the init) compile once.
  cache_dir = tempfile.mkdtemp(prefix="lmjax-bench-cache-")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])
  report: dict[str, Any] = {
      "machine": dict(bench_common.machine_info(), devices_used=1), "load_average_start": bench_common.load_average(),
      "command": " ".join(sys.argv), "args": vars(args),
      "note": "shared machine: other users' jobs share the cores (see load_average_*); "
              "runners alternate within each round; ratio = group / sequential tokens/s "
              "(summed over the K members); summary lists [per-round median, best of "
              "rounds, CPU time] ratios; compile times are first steps with a fresh cache",
      "runners": {
          "sequential": "K lone runs, one Trainer.step each in turn (the lone program)",
          "group_vmap": "GroupTrainer(members_per_vmap=None): one vmap over the K members, "
                        f"compiler options {default_compiler_options(mesh)}",
          "group_map": "GroupTrainer(members_per_vmap=1, the CPU default): the members one "
                       "after another (jax.lax.map) inside one compiled step",
          "group_vmap_xla_defaults": "group_vmap compiled with XLA's default options"},
  }
  report["shapes"] = [bench_shape(cfg, ks, args.steps, args.rounds, args.round_s,
                                  bool(args.xla_defaults), mesh)
                      for cfg in bench_common.sweep_shapes(args.sweep, widths)]
  # group / sequential tokens/s per shape and K: per-round median, best of rounds, CPU time.
  report["summary"] = {
      name: {f"d{s['shape']['d_model']}": {
          k: [round(v[name][r], 2) for r in ("ratio_per_round_median", "ratio_best",
                                             "ratio_cpu_time")]
          for k, v in s["ks"].items() if name in v} for s in report["shapes"]}
      for name in ("group_vmap", "group_map", "group_vmap_xla_defaults")
      if args.xla_defaults or name != "group_vmap_xla_defaults"}
  report["load_average_end"] = bench_common.load_average()
  report["wall_s"] = time.time() - t0
  bench_common.emit(report, args.out)
  return report


if __name__ == "__main__":
  main()
