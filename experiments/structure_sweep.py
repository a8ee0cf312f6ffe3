"""Final loss against model size at several structure settings of the synthetic language.

The synthetic language knows its own exact entropy floor (docs/data.md), so a size sweep
can be checked against the truth: at every structure setting, loss should fall with model
size and approach that setting's floor from above, never cross it.

For each setting this trains a width ladder of the planner's model family
(lmjax.scaling.plan.family_member: heads = d/16, layers = max(1, round(d/32)),
d_ff = 4d) for one fixed token budget, with the planner's per-size hyperparameter rules,
and draws final eval loss against N (6N convention) with each floor as a dashed line.

  python -m experiments.structure_sweep --workdir=/tmp/structure_sweep

The default (hard, default, easy x widths 16, 32, 48, 64, 7.5e5 tokens each) took 4m43s
on 2 CPU cores shared with other jobs (load average ~7) and writes
experiments/results/structure_sweep.{png,svg,json}. Width 128 is left out on purpose: at
a CPU-sized token budget it is data-limited and, at the hard setting, not reliably better
than width 64 across seeds (docs/data.md). Runs live in --workdir; rerunning with the same
flags reuses finished runs.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: maybe re-execute on mimalloc
  from lmjax.allocator import maybe_reexec
  maybe_reexec()

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Sequence

from absl import app, flags

from lmjax import flops as flops_lib
from lmjax.checkpoint import CheckpointConfig
from lmjax.config import Config
from lmjax.data import pipeline as data_lib
from lmjax.data.synthetic import PRESETS
from lmjax.errors import ConfigError, require
from lmjax.metrics import read_metrics
from lmjax.scaling import plan as plan_lib

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_STRUCTURES = ("hard", "default", "easy")
DEFAULT_WIDTHS = (16, 32, 48, 64)
DEFAULT_TOKENS = 750_000


def base_sweep(*, seq_len: int = 64, global_batch: int = 16, eval_batches: int = 8,
               evals_per_run: int = 4) -> plan_lib.SweepConfig:
  """The planner's CPU template (as experiments/configs/sweeps/cpu_default.py).

  Written out here rather than loaded from that file, so that edits to the main
  sweep's config do not silently change this experiment's published numbers.
  """
  base = Config()
  base = dataclasses.replace(
      base,
      model=dataclasses.replace(base.model, vocab_size=256, position="rope", norm="rmsnorm",
                                mlp="gelu", max_len=seq_len),
      train=dataclasses.replace(base.train, global_batch=global_batch, seq_len=seq_len,
                                log_every=25, steps=1, progress=False),
      data=dataclasses.replace(base.data, eval_batches=eval_batches),
      # Only the final save: these runs are short, and periodic saves cost CPU time.
      checkpoint=CheckpointConfig(every_steps=None, keep=1))
  return plan_lib.SweepConfig(design="ladder", evals_per_run=evals_per_run, base=base)


def parse_structure(spec: str) -> tuple[str, dict]:
  """'easy' or '0.9' -> (label, DataConfig overrides)."""
  spec = spec.strip()
  if spec in PRESETS:
    return spec, {"synthetic_preset": spec, "synthetic_structure": None}
  try:
    value = float(spec)
  except ValueError:
    raise ConfigError(f"structure {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                      "number in [0, 1].") from None
  require(0.0 <= value <= 1.0, f"structure {spec!r} must lie in [0, 1].", ConfigError)
  return f"s={value:g}", {"synthetic_structure": value}


def run_config(sweep: plan_lib.SweepConfig, width: int, tokens: float) -> plan_lib.PlannedRun:
  """The planned run of family member `width` trained for `tokens` tokens (whole steps), with
  the learning rate, warmup, beta2 and schedule of the sweep's rules."""
  tokens_per_step = sweep.base.train.global_batch * sweep.base.train.seq_len
  steps = max(1, round(tokens / tokens_per_step))
  model = plan_lib.family_member(sweep, width)
  tokens = steps * tokens_per_step
  budget = flops_lib.run_flops(model, sweep.base.train.seq_len, tokens,
                               sweep.base.train.flops_convention)
  return plan_lib.planned_run(sweep, model, budget, tokens)


def run_sweep(structures: Sequence[str], widths: Sequence[int], tokens: float, workdir: str,
              *, sweep: plan_lib.SweepConfig | None = None, mesh=None,
              compilation_cache: str | None = None, log=print) -> dict:
  """Trains every (structure, width) pair; returns the numbers the figure and JSON need.

  Args:
    structures: preset names or numbers in [0, 1] (see parse_structure).
    widths: d_model of each family member, smallest first.
    tokens: training tokens of every run (rounded to whole steps).
    workdir: runs go to <workdir>/<label>/w<width>_<run id>; finished runs are reused.
    sweep: the template (base_sweep() by default).
    mesh: passed to lmjax.train.train (default: all devices).
    compilation_cache: persistent XLA cache directory; None means <workdir>/xla_cache,
      "" leaves JAX's (process-wide) cache settings alone.
    log: called with one line per finished run.
  """
  from lmjax.sweep import enable_compilation_cache
  from lmjax.train import train  # imports jax: keep --help fast

  # Runs of one width compile identical programs at every structure setting (the data is
  # not part of the program), so a cache shared by this sweep compiles each width once.
  # Kept inside workdir, so a fresh workdir is a cold start and timings stay honest.
  if compilation_cache is None:
    compilation_cache = os.path.join(workdir, "xla_cache")
  enable_compilation_cache(compilation_cache)
  sweep = sweep or base_sweep()
  seq_len = sweep.base.train.seq_len
  started = time.time()
  settings = []
  for spec in structures:
    label, overrides = parse_structure(spec)
    data = dataclasses.replace(sweep.base.data, **overrides)
    setting_sweep = dataclasses.replace(sweep, base=dataclasses.replace(sweep.base, data=data))
    lang = data.language()
    floor = data_lib.entropy_floor(data, seq_len)
    runs = []
    for width in widths:
      planned = run_config(setting_sweep, int(width), tokens)
      cfg = planned.config
      # The config hash in the name: another --tokens or template never meets a stale run.
      run_dir = os.path.join(workdir, label, f"w{width}_{planned.id}")
      summary = train(cfg, run_dir, mesh=mesh)
      loss = float(summary["final_eval_loss"])
      curve = [(r["tokens"], r["eval_loss"]) for r in read_metrics(run_dir) if "eval_loss" in r]
      runs.append({
          "width": int(width), "n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads,
          "n_params": planned.n_params, "tokens": planned.tokens, "lr": cfg.optim.lr,
          "final_eval_loss": loss, "gap_to_floor": loss - floor,
          "eval_curve": [{"tokens": t, "eval_loss": l} for t, l in curve],
          "wall_s": round(summary["wall_s"], 2),
      })
      log(f"{label:>8} d={width:<4} N={planned.n_params:>8,}  loss {loss:.4f}  "
          f"floor {floor:.4f}  gap {loss - floor:+.4f}  ({summary['wall_s']:.1f}s)")
    losses = [r["final_eval_loss"] for r in runs]
    settings.append({
        "label": label, "structure": lang.structure, "floor": floor,
        "stationary_entropy_rate": lang.entropy_rate(),
        "unigram_loss": lang.unigram_entropy(seq_len),
        "runs": runs,
        "decreasing_with_size": all(b < a for a, b in zip(losses, losses[1:])),
        "above_floor": all(l > floor for l in losses),
    })
  return {
      "description": "final eval loss (nats/token) vs model size at fixed tokens, per "
                     "structure setting of the synthetic language; floor = exact best loss "
                     f"on length-{seq_len} inputs (lmjax.data.pipeline.entropy_floor)",
      "tokens_per_run": tokens, "seq_len": seq_len,
      "global_batch": sweep.base.train.global_batch,
      "eval_tokens": sweep.base.data.eval_batches * sweep.base.train.global_batch * seq_len,
      "family": {"head_dim": sweep.head_dim, "aspect_ratio": sweep.aspect_ratio,
                 "mlp_ratio": sweep.mlp_ratio},
      "lr_rule": {"lr_base": sweep.lr_base, "lr_base_width": sweep.lr_base_width,
                  "lr_width_exponent": sweep.lr_width_exponent},
      "settings": settings,
      "wall_s": round(time.time() - started, 1),
  }


def plot(results: dict, out_prefix: str | Path) -> list[Path]:
  """Final loss vs N (log x), one colour per setting, its exact floor dashed."""
  # Figure + Agg canvas, never pyplot: no global backend state (as lmjax/scaling/plot.py).
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(8.5, 5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for i, s in enumerate(results["settings"]):
    color = f"C{i}"
    ns = [r["n_params"] for r in s["runs"]]
    losses = [r["final_eval_loss"] for r in s["runs"]]
    ax.plot(ns, losses, "o-", color=color,
            label=f"{s['label']} (structure {s['structure']:g})")
    ax.axhline(s["floor"], color=color, ls="--", lw=1.2,
               label=f"{s['label']} floor {s['floor']:.3f}")
  ax.set_xscale("log")
  ax.set_xlabel("N (non-embedding + head parameters, 6N convention)")
  ax.set_ylabel("final eval loss (nats/token)")
  ax.set_title(f"Synthetic language: loss vs size at {results['tokens_per_run']:.3g} tokens "
               f"per run (dashed: exact floor, T={results['seq_len']})", fontsize=10)
  ax.set_ylim(bottom=0.0)  # floors near 0 (easy, determined) stay in view
  ax.grid(True, which="both", alpha=0.3)
  # Outside the axes: inside, it hides the low floors.
  fig.legend(loc="outside right upper", fontsize=8)
  out_prefix = Path(out_prefix)
  out_prefix.parent.mkdir(parents=True, exist_ok=True)
  paths = []
  for ext in ("png", "svg"):
    path = out_prefix.with_name(out_prefix.name + f".{ext}")
    # metadata Date=None keeps the SVG byte-stable across reruns (clean diffs).
    fig.savefig(path, dpi=110, bbox_inches="tight",
                metadata={"Date": None} if ext == "svg" else None)
    paths.append(path)
  return paths


def write_json(results: dict, out_prefix: str | Path) -> Path:
  path = Path(out_prefix).with_name(Path(out_prefix).name + ".json")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1) + "\n")
  return path


def main(argv):
  require(len(argv) == 1, f"unexpected arguments {argv[1:]}; use --flag=value.", ConfigError)
  f = flags.FLAGS
  require(f.workdir, "--workdir is required: the directory for the runs.", ConfigError)
  try:
    widths = [int(w) for w in f.widths]
  except ValueError:
    raise ConfigError(f"--widths={','.join(f.widths)} must be integers, e.g. 16,32,64.") from None
  require(widths and f.structures, "--widths and --structures must be non-empty.", ConfigError)
  require(all(w > 0 and w % 16 == 0 for w in widths),
          f"--widths={','.join(f.widths)} must be positive multiples of 16 (the head size).",
          ConfigError)
  require(f.tokens > 0, f"--tokens={f.tokens} must be positive.", ConfigError)
  results = run_sweep(f.structures, widths, f.tokens, f.workdir)
  paths = plot(results, f.out) + [write_json(results, f.out)]
  for s in results["settings"]:
    print(f"{s['label']}: floor {s['floor']:.4f}; decreasing with size: "
          f"{s['decreasing_with_size']}; above floor: {s['above_floor']}")
  print(f"{results['wall_s']:.0f}s; wrote " + ", ".join(map(str, paths)))


def _define_flags() -> None:
  # Defined only when run as a program: lmjax.fit defines --out at import, and tests import
  # this module beside it in one process.
  flags.DEFINE_string("workdir", None, "Directory for the runs (one subdirectory per run).")
  flags.DEFINE_list("structures", list(DEFAULT_STRUCTURES),
                    f"Structure settings: preset names ({', '.join(PRESETS)}) or numbers in "
                    "[0, 1].")
  flags.DEFINE_list("widths", [str(w) for w in DEFAULT_WIDTHS],
                    "Model widths d_model (multiples of 16); the rest of the shape follows the "
                    "planner's family rule.")
  flags.DEFINE_float("tokens", DEFAULT_TOKENS, "Training tokens per run (the same for every "
                     "run).")
  flags.DEFINE_string("out", str(RESULTS_DIR / "structure_sweep"),
                      "Output prefix: writes <out>.png, <out>.svg and <out>.json.")


def cli():
  from absl import logging
  from lmjax.errors import run_cli

  def quiet_main(argv):
    if not flags.FLAGS["verbosity"].present:  # orbax logs every save at INFO
      logging.set_verbosity(logging.WARNING)
    return run_cli(main, argv)

  _define_flags()
  app.run(quiet_main)


if __name__ == "__main__":
  cli()
