"""Fits scaling laws to finished runs and writes report.json, report.md and plots.

  python -m lmjax.fit --runs=runs.csv --out=fit_out [--n_col=N --d_col=D --c_col=C
      --loss_col=loss --drop_highest=K --approaches=1,2,3 --bootstrap=1000 --seed=0
      --holdout_budgets=1 --target_flops=1e23]

--runs takes a CSV (two of N, D, C plus loss; optional budget and id columns), a JSON
list of run records (keys id, N, D, C, budget, loss, optional curve), or the
manifest.sqlite of a sweep (python -m lmjax.sweep): its finished runs, with their eval
curves where the metrics files are still there.
"""
from __future__ import annotations

from absl import app
from absl import flags

from lmjax.errors import ConfigError, UserError, run_cli

_RUNS = flags.DEFINE_string("runs", None, "CSV, JSON or .sqlite sweep manifest of finished runs.")
_OUT = flags.DEFINE_string("out", None, "Directory for report.json, report.md and plots.")
_N_COL = flags.DEFINE_string("n_col", "N", "CSV column with parameter counts.")
_D_COL = flags.DEFINE_string("d_col", "D", "CSV column with training tokens.")
_C_COL = flags.DEFINE_string("c_col", "C", "CSV column with training FLOPs.")
_LOSS_COL = flags.DEFINE_string("loss_col", "loss", "CSV column with final losses.")
_BUDGET_COL = flags.DEFINE_string("budget_col", "budget", "CSV column with nominal budgets.")
_ID_COL = flags.DEFINE_string("id_col", "id", "CSV column with run ids.")
_DROP_HIGHEST = flags.DEFINE_integer("drop_highest", 0, "Drop the K runs of highest final loss.")
_APPROACHES = flags.DEFINE_string(
    "approaches", None, "Comma-separated subset of 1,2,3 that must run; default: all the data "
    "allow (1 needs learning curves).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples of runs.")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_HOLDOUT = flags.DEFINE_integer("holdout_budgets", 1,
                                "Largest budgets held out for the extrapolation check (0: off).")
_TARGET = flags.DEFINE_float("target_flops", None,
                             "Compute for the predictions; default: the largest run's compute.")
_PLOTS = flags.DEFINE_bool("plots", True, "Write PNG and SVG plots.")


def _parse_approaches(text: str | None) -> list[int] | None:
  if text is None or not text.strip():
    return None
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ConfigError(f"--approaches={text!r} is not a list of integers; use e.g. "
                      "--approaches=2,3.") from None
  bad = [v for v in values if v not in (1, 2, 3)]
  if bad or not values:
    raise ConfigError(f"--approaches={text!r} names unknown approaches; choose from 1, 2, 3.")
  return values


def main(argv) -> None:
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {' '.join(argv[1:])!r}; pass everything as --flags.")
  if not _RUNS.value or not _OUT.value:
    raise ConfigError("--runs and --out are required; e.g. python -m lmjax.fit --runs=runs.csv "
                      "--out=fit_out.")
  # Imported here so that --help and flag errors stay fast.
  from lmjax.scaling import fit as fit_lib
  from lmjax.scaling import plot as plot_lib
  from lmjax.scaling import report as report_lib
  from lmjax.scaling import table as table_lib

  approaches = _parse_approaches(_APPROACHES.value)
  table = table_lib.load_runs(
      _RUNS.value, drop_highest=_DROP_HIGHEST.value, n_col=_N_COL.value, d_col=_D_COL.value,
      c_col=_C_COL.value, loss_col=_LOSS_COL.value, budget_col=_BUDGET_COL.value,
      id_col=_ID_COL.value)
  report = fit_lib.fit_all(table, approaches=approaches, n_boot=_BOOTSTRAP.value,
                           seed=_SEED.value, holdout_budgets=_HOLDOUT.value,
                           target_flops=_TARGET.value)
  paths = list(report_lib.write_report(report, _OUT.value))
  if _PLOTS.value:
    paths += plot_lib.plot_all(table, report, _OUT.value)
  print(f"wrote {len(paths)} files to {_OUT.value}")


if __name__ == "__main__":
  app.run(lambda argv: run_cli(main, argv))
