"""Compile time against step time of one default-sweep model under XLA:CPU option variants.

Each variant adds XLA options to lmjax.train.CPU_STEP_COMPILER_OPTIONS (the train and eval
steps; --target=init adds them to CPU_INIT_COMPILER_OPTIONS instead). Every (round,
variant) runs in a fresh process with no persistent cache, and the variants alternate
within a round, since the machine is shared and noisy. Per process: compile_s is
lmjax.compile_clock.CompileClock over building the Trainer, the init and the first step
(trace, lowering and backend compile of init and train step), then the median of --steps
train steps and of 20 eval steps. Figures are medians over rounds; compile and step ratios
against "default" are medians of per-round ratios. Prints one JSON document.

  PYTHONPATH=. python benchmarks/compile_options.py                     # ~3 min
  PYTHONPATH=. python benchmarks/compile_options.py --width=80 --rounds=3 \
      --variants='{"default": {}, "O1": {"xla_backend_optimization_level": 1}}'
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import bench_common

DEFAULT_SWEEP = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                             "sweeps", "cpu_default.py")
DEFAULT_VARIANTS = {
    "default": {},
    "O1": {"xla_backend_optimization_level": 1},
    "no_loop_unrolling": {"xla_cpu_disable_loop_unrolling": True},
    "codegen_split_1": {"xla_cpu_parallel_codegen_split_count": 1},
    "multi_output_fusion": {"xla_cpu_use_multi_output_fusion": True},
}

CHILD = r"""
import json, sys, time
import jax, numpy as np
sys.path.insert(0, sys.argv[4])
import bench_common
from lmjax import sharding, train as train_lib
from lmjax.data import pipeline as data_lib
from lmjax.compile_clock import CompileClock
cfg = bench_common.sweep_shapes(sys.argv[1], [int(sys.argv[2])])[0]
extra, target, steps = json.loads(sys.argv[3]), sys.argv[5], int(sys.argv[6])
name = "CPU_STEP_COMPILER_OPTIONS" if target == "step" else "CPU_INIT_COMPILER_OPTIONS"
setattr(train_lib, name, dict(getattr(train_lib, name), **extra))
mesh = sharding.make_mesh(cfg.mesh)
pipe = data_lib.make_pipeline(cfg.data, seq_len=cfg.train.seq_len,
                              global_batch=cfg.train.global_batch)
batch = sharding.global_batch_from_local(pipe.next(), mesh)
with CompileClock() as clock:
  trainer = train_lib.Trainer(cfg, mesh)
  state = trainer.init_state()
  state, m = trainer.step(state, batch)
  jax.block_until_ready(m)
def median_ms(fn, n):
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))
holder = [state]
def one_step():
  holder[0], metrics = trainer.step(holder[0], batch)
  return metrics
step_ms = median_ms(one_step, steps)
eval_ms = median_ms(lambda: trainer.eval_step(holder[0]["params"], batch), 20)
print(json.dumps({"compile_s": clock.seconds, "programs": clock.programs,
                  "step_ms": step_ms, "eval_ms": eval_ms}))
"""


def run_child(sweep: str, width: int, extra: dict, target: str, steps: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  out = subprocess.run([sys.executable, "-c", CHILD, sweep, str(width), json.dumps(extra),
                        os.path.dirname(os.path.abspath(__file__)), target, str(steps)],
                       capture_output=True, text=True, env=env, check=False)
  if out.returncode:
    raise SystemExit(f"variant {extra} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sweep", default=DEFAULT_SWEEP)
  parser.add_argument("--width", type=int, default=64, help="d_model of the sweep's model")
  parser.add_argument("--variants", default=json.dumps(DEFAULT_VARIANTS),
                      help='JSON {name: {xla_option: value}}; must include "default"')
  parser.add_argument("--target", choices=("step", "init"), default="step")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  variants = json.loads(args.variants)
  if "default" not in variants:
    raise SystemExit('--variants needs a "default" entry (the reference of the ratios)')
  cfg = bench_common.sweep_shapes(args.sweep, [args.width])[0]
  report = {
      "benchmark": "compile_options", "machine": bench_common.machine_info(),
      "load_average_start": bench_common.load_average(),
      "config": {"sweep": os.path.relpath(args.sweep), "d_model": cfg.model.d_model,
                 "n_layers": cfg.model.n_layers, "global_batch": cfg.train.global_batch,
                 "seq_len": cfg.train.seq_len, "target": args.target,
                 "rounds": args.rounds, "steps": args.steps},
      "rounds": []}
  for r in range(args.rounds):
    names = list(variants)
    names = names[r % len(names):] + names[:r % len(names)]  # who goes first rotates
    report["rounds"].append({n: run_child(args.sweep, args.width, variants[n], args.target,
                                          args.steps) for n in names})
  report["variants"] = {}
  for name, extra in variants.items():
    rows = [rnd[name] for rnd in report["rounds"]]
    report["variants"][name] = {
        "options": extra,
        **{k: statistics.median(x[k] for x in rows)
           for k in ("compile_s", "step_ms", "eval_ms")},
        **{f"{k}_vs_default": statistics.median(x[k] / rnd["default"][k]
                                                for x, rnd in zip(rows, report["rounds"]))
           for k in ("compile_s", "step_ms", "eval_ms")}}
  report["load_average_end"] = bench_common.load_average()
  bench_common.emit(report, args.out)


if __name__ == "__main__":
  main()
