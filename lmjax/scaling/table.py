"""The runs table that every scaling fit reads, and its loaders.

One row per finished training run: parameters N, tokens D, training FLOPs C and
the final loss, plus an optional nominal compute budget, run id and learning
curve. Convention: C = 6 N D, so any two of N, D, C determine the third.

When no nominal budget is given, runs are grouped into IsoFLOP budgets by
rounding log10(C) to one decimal place (bins 0.1 dex wide, i.e. C to two
significant digits on a log scale); the budget is 10 ** that rounded value.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lmjax.errors import DataError
from lmjax.scaling import manifest as manifest_lib

FLOPS_PER_PARAM_TOKEN = 6.0  # C = 6 N D: forward + backward FLOPs per parameter per token
BUDGET_LOG10_DECIMALS = 1


@dataclasses.dataclass(frozen=True)
class Curve:
  """A learning curve: cumulative training FLOPs and the loss at each point."""
  flops: np.ndarray
  loss: np.ndarray


def budget_groups(C: np.ndarray) -> np.ndarray:
  """Nominal budgets for runs without one: C rounded to 0.1 dex."""
  return 10.0 ** np.round(np.log10(np.asarray(C, np.float64)), BUDGET_LOG10_DECIMALS)


def _check_values(name: str, values: np.ndarray, run_ids: Sequence[str] | None) -> None:
  bad = ~np.isfinite(values)
  what = "is missing or not finite (NaN/inf)"
  if not bad.any():
    bad = values <= 0
    what = f"is {values[bad][0]:g}" if bad.any() else ""
  if bad.any():
    i = int(np.flatnonzero(bad)[0])
    where = f"run {run_ids[i]!r}" if run_ids is not None else f"run number {i + 1}"
    raise DataError(f"{name} {what} for {where}; every {name} must be a finite number > 0 "
                    "(fix or drop that run).")


@dataclasses.dataclass(frozen=True)
class RunsTable:
  """Finished runs as float64 arrays. Construct via from_csv / from_records."""
  N: np.ndarray
  D: np.ndarray
  C: np.ndarray
  loss: np.ndarray
  budget: np.ndarray | None = None
  run_id: tuple[str, ...] | None = None
  curves: tuple[Curve | None, ...] | None = None

  def __post_init__(self):
    arrays = {}
    for name in ("N", "D", "C", "loss", "budget"):
      value = getattr(self, name)
      if value is None:
        continue
      arrays[name] = np.atleast_1d(np.asarray(value, np.float64))
      object.__setattr__(self, name, arrays[name])
    n = len(self.loss)
    for name, value in arrays.items():
      if value.shape != (n,):
        raise DataError(f"column {name} has {value.size} values but loss has {n}; "
                        "every column needs one value per run.")
    if n == 0:
      raise DataError("the runs table is empty; provide at least one finished run.")
    if self.run_id is not None:
      object.__setattr__(self, "run_id", tuple(str(r) for r in self.run_id))
      if len(self.run_id) != n:
        raise DataError(f"{len(self.run_id)} run ids for {n} runs; give one id per run.")
    for name, value in arrays.items():
      _check_values(name, value, self.run_id)
    if self.curves is not None:
      object.__setattr__(self, "curves", tuple(self.curves))
      if len(self.curves) != n:
        raise DataError(f"{len(self.curves)} learning curves for {n} runs; give one (or None) "
                        "per run.")
      if all(c is None for c in self.curves):
        object.__setattr__(self, "curves", None)

  def __len__(self) -> int:
    return len(self.loss)

  @property
  def has_curves(self) -> bool:
    return self.curves is not None

  @property
  def budgets(self) -> np.ndarray:
    """Nominal compute budget per run (given, else C rounded to 0.1 dex)."""
    return self.budget if self.budget is not None else budget_groups(self.C)

  def ids(self) -> tuple[str, ...]:
    return self.run_id if self.run_id is not None else tuple(str(i) for i in range(len(self)))

  def subset(self, index: np.ndarray | Sequence[int]) -> "RunsTable":
    """Rows selected by an integer index or boolean mask, order kept."""
    index = np.asarray(index)
    if index.dtype == bool:
      index = np.flatnonzero(index)
    take = lambda v: None if v is None else v[index]
    return RunsTable(
        N=self.N[index], D=self.D[index], C=self.C[index], loss=self.loss[index],
        budget=take(self.budget),
        run_id=None if self.run_id is None else tuple(self.run_id[i] for i in index),
        curves=None if self.curves is None else tuple(self.curves[i] for i in index))

  def mean_over_replicas(self) -> tuple["RunsTable", dict | None]:
    """Replicas averaged into one run each, and their spread (None if there are none).

    Runs with equal N, D (and budget) are replicas of one point, e.g. the seeds of
    sweep.seeds. Fits must see their mean once: as separate rows the IsoFLOP frontier
    would take the luckiest seed (biased low) and the bootstrap would treat seed noise as
    independent evidence. Each point's loss and C are the replica means, its id joins the
    replica ids with '+', and its curve averages the replicas' curves where they were
    evaluated at the same FLOPs (else it is the first replica's).
    """
    budgets = self.budget if self.budget is not None else np.full(len(self), np.nan)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(self.N, self.D, budgets)):
      groups.setdefault(tuple(float(v) for v in key), []).append(i)
    if all(len(g) == 1 for g in groups.values()):
      return self, None
    order = sorted(groups.values())
    ids = self.ids()

    def mean_curve(g):
      if self.curves is None or any(self.curves[i] is None for i in g):
        return None if self.curves is None else self.curves[g[0]]
      first = self.curves[g[0]]
      if any(not np.array_equal(self.curves[i].flops, first.flops) for i in g):
        return first
      return Curve(first.flops, np.mean([self.curves[i].loss for i in g], axis=0))

    table = RunsTable(
        N=[self.N[g[0]] for g in order], D=[self.D[g[0]] for g in order],
        C=[self.C[g].mean() for g in order], loss=[self.loss[g].mean() for g in order],
        budget=None if self.budget is None else [self.budget[g[0]] for g in order],
        run_id=["+".join(ids[i] for i in g) for g in order],
        curves=None if self.curves is None else [mean_curve(g) for g in order])
    multi = [g for g in order if len(g) > 1]
    sds = np.array([np.std(self.loss[g], ddof=1) for g in multi])
    rel = np.array([np.std(self.loss[g], ddof=1) / np.mean(self.loss[g]) for g in multi])
    stats = {
        "n_runs": len(self), "n_points": len(table),
        "replicas_per_point": {"min": min(len(g) for g in order),
                               "max": max(len(g) for g in order)},
        # Pooled over points: sqrt of the mean within-point sample variance.
        "loss_sd_pooled": float(np.sqrt(np.mean(sds ** 2))),
        "loss_sd_max": float(sds.max()),
        "loss_rel_sd_median": float(np.median(rel)),
    }
    return table, stats

  def drop_highest(self, k: int) -> "RunsTable":
    """Without the k runs of highest final loss (e.g. diverged or outlier runs)."""
    if k < 0:
      raise DataError(f"drop_highest={k} is negative; pass 0 or more.")
    if k == 0:
      return self
    if k >= len(self):
      raise DataError(f"drop_highest={k} would drop all {len(self)} runs; pass a smaller number.")
    keep = np.sort(np.argsort(self.loss, kind="stable")[:len(self) - k])
    return self.subset(keep)

  @classmethod
  def from_columns(cls, *, N=None, D=None, C=None, loss, budget=None, run_id=None,
                   curves=None) -> "RunsTable":
    """Fills the missing one of N, D, C from C = 6 N D."""
    given = [name for name, v in (("N", N), ("D", D), ("C", C)) if v is not None]
    if len(given) < 2:
      missing = sorted({"N", "D", "C"} - set(given))
      raise DataError(f"columns {' and '.join(missing)} are missing; need at least two of "
                      "N (params), D (tokens), C (FLOPs) (the third follows from C = 6 N D).")
    f = lambda v: None if v is None else np.asarray(v, np.float64)
    N, D, C = f(N), f(D), f(C)
    with np.errstate(all="ignore"):
      if C is None:
        C = FLOPS_PER_PARAM_TOKEN * N * D
      elif D is None:
        D = C / (FLOPS_PER_PARAM_TOKEN * N)
      elif N is None:
        N = C / (FLOPS_PER_PARAM_TOKEN * D)
    return cls(N=N, D=D, C=C, loss=loss, budget=budget, run_id=run_id, curves=curves)

  @classmethod
  def from_records(cls, records: Iterable[Mapping[str, Any]], *,
                   drop_highest: int = 0) -> "RunsTable":
    """From dicts with keys id, N, D, C, budget, loss and optionally curve.

    `curve` is {"flops": [...], "loss": [...]} (cumulative FLOPs along training).
    Any two of N, D, C are enough; budget may be absent or None everywhere.
    """
    records = list(records)
    if not records:
      raise DataError("no runs were given; provide at least one finished run.")
    cols: dict[str, list] = {k: [] for k in ("N", "D", "C", "budget", "loss")}
    ids, curves = [], []
    for i, rec in enumerate(records):
      if not isinstance(rec, Mapping):
        raise DataError(f"run record {i + 1} is a {type(rec).__name__}, not a dict; pass dicts "
                        "with keys id, N, D, C, budget, loss.")
      rid = str(rec.get("id", i))
      ids.append(rid)
      for key in cols:
        cols[key].append(_number(rec.get(key), key, f"run {rid!r}", optional=key != "loss"))
      curves.append(_curve(rec.get("curve"), rid))
    arrays = {}
    for key, values in cols.items():
      present = [v is not None for v in values]
      if all(present):
        arrays[key] = np.array(values, np.float64)
      elif any(present):
        raise DataError(f"run {ids[present.index(False)]!r} has no {key} while other runs do; "
                        f"give {key} for every run or for none.")
    table = cls.from_columns(N=arrays.get("N"), D=arrays.get("D"), C=arrays.get("C"),
                             loss=arrays["loss"], budget=arrays.get("budget"), run_id=ids,
                             curves=curves)
    return table.drop_highest(drop_highest)

  @classmethod
  def from_csv(cls, path: str | Path, *, n_col: str = "N", d_col: str = "D", c_col: str = "C",
               loss_col: str = "loss", budget_col: str = "budget", id_col: str = "id",
               drop_highest: int = 0) -> "RunsTable":
    """From a CSV with a header row. Absent N/D/C columns are derived (C = 6 N D)."""
    path = Path(path)
    if not path.is_file():
      raise DataError(f"runs file {str(path)!r} does not exist; pass the path of a CSV.")
    try:
      with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
      raise DataError(f"{str(path)!r} is not a readable CSV ({e}); save it as UTF-8 CSV.") from e
    if not header:
      raise DataError(f"{str(path)!r} is empty; it needs a header row and one row per run.")
    if loss_col not in header:
      raise DataError(f"{str(path)!r} has no loss column {loss_col!r} (columns: "
                      f"{', '.join(header)}); pass --loss_col=NAME.")
    if not rows:
      raise DataError(f"{str(path)!r} has a header but no runs; add one row per finished run.")
    present = [c for c in (n_col, d_col, c_col) if c in header]
    if len(present) < 2:
      raise DataError(f"{str(path)!r} needs two of the columns {n_col!r} (params), {d_col!r} "
                      f"(tokens), {c_col!r} (FLOPs) but has {', '.join(header)}; name them "
                      "with --n_col, --d_col, --c_col.")

    def column(name: str, optional: bool = False):
      if name not in header:
        return None
      values = [_number(r.get(name), name, f"row {i + 2} of {path.name}", optional=optional)
                for i, r in enumerate(rows)]
      for i, v in enumerate(values):  # name the file row here; the table only knows run order
        if v is not None and not (math.isfinite(v) and v > 0):
          raise DataError(f"{name} is {v:g} in row {i + 2} of {path.name}; every {name} must be "
                          "a finite number > 0 (fix or drop that run).")
      return np.array(values, dtype=object)

    budget = None
    if budget_col in header:
      raw = column(budget_col, optional=True)
      if all(v is None for v in raw):
        budget = None
      elif any(v is None for v in raw):
        i = [v is None for v in raw].index(True)
        raise DataError(f"row {i + 2} of {path.name} has an empty {budget_col!r}; fill every "
                        "budget or drop the column.")
      else:
        budget = raw.astype(np.float64)
    ids = [r.get(id_col) or str(i) for i, r in enumerate(rows)] if id_col in header else None
    cast = lambda v: None if v is None else v.astype(np.float64)
    table = cls.from_columns(N=cast(column(n_col)), D=cast(column(d_col)), C=cast(column(c_col)),
                             loss=cast(column(loss_col)), budget=budget, run_id=ids)
    return table.drop_highest(drop_highest)


def _number(value: Any, name: str, where: str, optional: bool = False) -> float | None:
  if value is None or (isinstance(value, str) and not value.strip()):
    if optional:
      return None
    raise DataError(f"{name} is empty in {where}; every run needs a numeric {name}.")
  if isinstance(value, bool):
    raise DataError(f"{name}={value!r} in {where} is not a number; use a numeric value.")
  try:
    out = float(value)
  except (TypeError, ValueError):
    raise DataError(f"{name}={value!r} in {where} is not a number; use a numeric value.") from None
  if math.isnan(out):
    raise DataError(f"{name} is NaN in {where}; fix or drop that run.")
  return out


def _curve(curve: Any, rid: str) -> Curve | None:
  if curve is None:
    return None
  if not isinstance(curve, Mapping) or "flops" not in curve or "loss" not in curve:
    raise DataError(f"the curve of run {rid!r} must be a dict with lists 'flops' and 'loss'.")
  try:
    flops = np.asarray(curve["flops"], np.float64).ravel()
    loss = np.asarray(curve["loss"], np.float64).ravel()
  except (TypeError, ValueError):
    raise DataError(f"the curve of run {rid!r} has non-numeric values; use numbers.") from None
  if flops.shape != loss.shape:
    raise DataError(f"the curve of run {rid!r} has {flops.size} flops but {loss.size} losses; "
                    "they must pair up.")
  ok = np.isfinite(flops) & np.isfinite(loss) & (flops > 0) & (loss > 0)
  flops, loss = flops[ok], loss[ok]  # early evals at step 0 (flops 0) carry no compute
  if flops.size < 2:
    return None
  order = np.argsort(flops, kind="stable")
  return Curve(flops=flops[order], loss=loss[order])


def load_runs(path: str | Path, *, drop_highest: int = 0, **csv_columns: str) -> RunsTable:
  """Loads runs from a CSV, a JSON list of run records, or a sweep manifest (.sqlite)."""
  path = Path(path)
  suffix = path.suffix.lower()
  if suffix in (".sqlite", ".sqlite3", ".db"):
    # Checked here, not left to the manifest: opening a missing path with sqlite would
    # create an empty manifest file as a side effect.
    if not path.is_file():
      raise DataError(f"sweep manifest {str(path)!r} does not exist; pass the manifest.sqlite "
                      "of a sweep (python -m lmjax.sweep writes it into its workdir).")
    records = manifest_lib.load_records(str(path))
    if not records:
      raise DataError(f"sweep manifest {str(path)!r} has no finished runs (status done with a "
                      "final eval loss) yet; let the sweep finish some runs first.")
    return RunsTable.from_records(records, drop_highest=drop_highest)
  if suffix in (".json", ".jsonl"):
    if not path.is_file():
      raise DataError(f"runs file {str(path)!r} does not exist; pass an existing path.")
    try:
      text = path.read_text()
      records = ([json.loads(line) for line in text.splitlines() if line.strip()]
                 if suffix == ".jsonl" else json.loads(text))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError(f"{str(path)!r} is not valid JSON ({e}); fix the file.") from e
    if isinstance(records, Mapping) and "runs" in records:
      records = records["runs"]
    if not isinstance(records, list):
      raise DataError(f"{str(path)!r} must hold a list of run records (or {{'runs': [...]}}).")
    return RunsTable.from_records(records, drop_highest=drop_highest)
  return RunsTable.from_csv(path, drop_highest=drop_highest, **csv_columns)
