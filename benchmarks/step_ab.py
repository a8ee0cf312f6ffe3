"""A/B of lmjax train-step variants in one process, steps interleaved: small differences.

train_throughput.py answers "lmjax against torch"; each framework runs in its own worker
process and a round is one step, so on a shared 2-core VM its per-round figures swing by
+-15% and a 5-10% change of lmjax's own step does not show there. This script answers
"variant B against variant A": every variant's Trainer lives in this one process, and the
rounds interleave them (A B C, then C B A, ...), so drift and neighbours' bursts hit all
of them alike. For each variant it reports medians of wall time, CPU time (user + system),
minor page faults and system time per step, the median over rounds of the per-round
wall ratio against the first variant (the figure to read), and the temporaries XLA
assigns the compiled step (`temp_mib`, from `memory_analysis()`; on XLA:CPU each step
takes them as one fresh block, so they set the page faults).

  PYTHONPATH=. python benchmarks/step_ab.py --variants='default;attention_chunks=2'
  PYTHONPATH=. python benchmarks/step_ab.py --config=baby --steps=20 \
      --variants='default;train.cpu_splits=2'

Variants use train_throughput.py's syntax: ','-separated ModelConfig fields, TrainConfig
ones under 'train.'; 'default' is the benchmark's model as it stands. Variants that only
reorder the arithmetic may round differently; each variant's last loss is reported so a
variant that changes the math is visible.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import bench_common
import train_throughput as tt


def _usage() -> tuple[float, float, int]:
  u = resource.getrusage(resource.RUSAGE_SELF)
  return u.ru_utime + u.ru_stime, u.ru_stime, u.ru_minflt


def _temp_mib(runner: tt.LmjaxRunner) -> float | None:
  """MiB of temporaries in the runner's compiled train step (None if XLA does not say)."""
  temp = runner.trainer.compiled_temp_bytes(runner.state, runner.batches[0])
  return None if temp is None else round(temp / 2**20, 1)


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="small", help=f"one of {sorted(tt.CONFIGS)}")
  p.add_argument("--dtype", default="float32", choices=tt.DTYPES)
  p.add_argument("--variants", default="default;attention_chunks=2",
                 help="';'-separated variants; the first is the reference of the ratios")
  p.add_argument("--steps", type=int, default=0,
                 help="steps per variant per round (0: 2 for small, 20 for baby)")
  p.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
  p.add_argument("--out", default="", help="also write the JSON here")
  args = p.parse_args(argv)
  if args.config not in tt.CONFIGS:
    raise SystemExit(f"unknown --config {args.config!r}; choose from {sorted(tt.CONFIGS)}")
  variants = [v.strip() for v in args.variants.split(";")]
  if len(variants) < 2 or args.rounds < 1 or args.steps < 0:
    raise SystemExit("give at least two --variants, --rounds >= 1 and --steps >= 0")
  shape = tt.CONFIGS[args.config]
  steps = args.steps or max(2, shape["steps"])

  t0 = time.time()
  batches = tt.make_batches(shape)
  runners = []
  for v in variants:
    runner = tt.LmjaxRunner(shape, args.dtype, tt.parse_overrides(v), batches)
    compile_s = runner.first_step()
    runner.run(steps)   # untimed: the first steps after compiling touch fresh memory
    runners.append((runner, compile_s))
  load_start = bench_common.load_average()

  samples = [[] for _ in variants]   # per round: (wall, cpu, sys, faults) per step
  for r in range(args.rounds):
    order = range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))
    for i in order:
      cpu0, sys0, flt0 = _usage()
      wall = runners[i][0].run(steps)
      cpu1, sys1, flt1 = _usage()
      samples[i].append(((wall / steps), (cpu1 - cpu0) / steps, (sys1 - sys0) / steps,
                         (flt1 - flt0) / steps))

  results = {}
  for i, v in enumerate(variants):
    col = list(zip(*samples[i]))
    ratios = [a[0] / b[0] for a, b in zip(samples[i], samples[0])]
    results[v] = {
        "step_ms": round(1e3 * statistics.median(col[0]), 1),
        "step_ms_rounds": [round(1e3 * w, 1) for w in col[0]],
        "cpu_ms": round(1e3 * statistics.median(col[1]), 1),
        "system_ms": round(1e3 * statistics.median(col[2]), 1),
        "minor_faults": int(statistics.median(col[3])),
        "wall_ratio_vs_first_per_round_median": round(statistics.median(ratios), 4),
        "wall_ratio_vs_first_rounds_slower": sum(x > 1 for x in ratios),
        "compile_s": round(runners[i][1], 2),
        "temp_mib": _temp_mib(runners[i][0]),
        "tokens_per_s": round(shape["batch"] * shape["seq_len"] / statistics.median(col[0]), 1),
        "final_loss": runners[i][0].last_loss,
        "cpu_dots": runners[i][0].cpu_dots(),
    }
  report = {"machine": bench_common.machine_info(), "command": " ".join(sys.argv),
            "args": vars(args), "shape": shape, "steps_per_round": steps,
            "load_average": {"start": load_start, "end": bench_common.load_average()},
            "results": results, "wall_s": round(time.time() - t0, 1)}
  bench_common.emit(report, args.out)
  return report


if __name__ == "__main__":
  main()
