"""Tests for lmjax.scaling: runs table, fits, bootstrap, extrapolation check, plots."""
from __future__ import annotations

import json
import time
import types
from pathlib import Path

import numpy as np
import pytest

from lmjax.errors import DataError
from lmjax.scaling import fit as F
from lmjax.scaling import plot as P
from lmjax.scaling import report as R
from lmjax.scaling.manifest import Manifest
from lmjax.scaling.table import RunsTable, budget_groups, load_runs

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
EPOCH_CSV = REFERENCE / "epoch_chinchilla_svg_extracted_data.csv"

# Epoch AI's Huber-sum fit on the 240 rows (reference README).
EPOCH = {"A": 477.84, "B": 2143.86, "E": 1.81724, "alpha": 0.347313, "beta": 0.367183}
EPOCH_OBJECTIVE_MAX = 1.0184e-3
EPOCH_SE = {"A": 125.0, "B": 1290.0, "E": 0.026, "alpha": 0.015, "beta": 0.021, "a": 0.02}

TRUE = {"E": 1.9, "A": 350.0, "B": 1200.0, "alpha": 0.33, "beta": 0.36}
COARSE_STARTS = F.init_grid()[::15]  # 300 of the 4,500 starts keep synthetic tests fast
TRUE_START = np.array([[np.log(TRUE["A"]), np.log(TRUE["B"]), np.log(TRUE["E"]), TRUE["alpha"],
                        TRUE["beta"]]])  # one start, for tests about what follows the fit


def law(N, D, p=TRUE):
  return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def isoflop_table(seed: int, noise: float = 0.01, budgets=np.geomspace(1e18, 1e21, 7),
                  sizes_per_budget: int = 9, curves: bool = False) -> RunsTable:
  """IsoFLOP design around the true optimum of each budget; log-normal loss noise."""
  rng = np.random.default_rng(seed)
  records = []
  for C in budgets:
    n_opt, _ = F.allocation(C, TRUE["A"], TRUE["B"], TRUE["alpha"], TRUE["beta"])
    for N in n_opt * np.geomspace(1 / 8, 8, sizes_per_budget):
      D = C / (6 * N)
      rec = {"id": f"{C:.2g}-{N:.3g}", "N": N, "D": D, "C": C, "budget": C,
             "loss": law(N, D) * np.exp(noise * rng.standard_normal())}
      if curves:
        d = D * np.geomspace(1e-2, 1, 40)
        rec["curve"] = {"flops": 6 * N * d, "loss": law(N, d)}
      records.append(rec)
  return RunsTable.from_records(records)


# ------------------------------------------------------------------ runs table


def write_csv(path: Path, text: str) -> Path:
  path.write_text(text)
  return path


def test_csv_derives_third_column_and_drops_highest(tmp_path):
  p = write_csv(tmp_path / "r.csv", "N,D,loss\n1e6,2e7,4.0\n2e6,4e7,3.5\n4e6,8e7,3.0\n")
  t = RunsTable.from_csv(p)
  np.testing.assert_allclose(t.C, 6 * t.N * t.D)
  assert t.N.dtype == np.float64 and t.budget is None
  t2 = RunsTable.from_csv(p, drop_highest=1)
  assert len(t2) == 2 and t2.loss.max() == 3.5
  p = write_csv(tmp_path / "c.csv", "params,flops,L\n1e6,1.2e14,4.0\n")
  t = RunsTable.from_csv(p, n_col="params", c_col="flops", loss_col="L")
  np.testing.assert_allclose(t.D, 2e7)


@pytest.mark.parametrize("text, needle", [
    ("N,loss\n1e6,4\n", "needs two of the columns"),
    ("N,D,C\n1e6,2e7,1e14\n", "no loss column"),
    ("N,D,loss\n1e6,abc,4\n", "not a number"),
    ("N,D,loss\n1e6,2e7,nan\n", "NaN"),
    ("N,D,loss\n1e6,-2e7,4\n", "> 0"),
    ("N,D,loss\n1e6,0,4\n", "> 0"),
    ("N,D,loss\n", "no runs"),
    ("", "empty"),
])
def test_csv_errors_are_one_line(tmp_path, text, needle):
  with pytest.raises(DataError) as e:
    RunsTable.from_csv(write_csv(tmp_path / "bad.csv", text))
  assert needle in str(e.value) and "\n" not in str(e.value)


def test_records_and_budget_groups():
  recs = [{"id": "a", "N": 1e6, "D": 2e7, "loss": 4.0, "curve": {"flops": [0, 1e13, 1.2e14],
                                                                 "loss": [9, 5, 4]}},
          {"id": "b", "N": 2e6, "C": 2.4e14, "D": 2e7, "loss": 3.5}]
  with pytest.raises(DataError, match="has no C while other runs do"):
    RunsTable.from_records(recs)
  recs[0]["C"] = 1.2e14
  t = RunsTable.from_records(recs)
  assert t.ids() == ("a", "b") and t.has_curves and t.curves[1] is None
  np.testing.assert_allclose(t.curves[0].flops, [1e13, 1.2e14])  # the step-0 point is dropped
  with pytest.raises(DataError, match="run 'b'"):
    RunsTable.from_records([recs[0], dict(recs[1], loss=-1)])
  # C within a budget jitters by a few percent; rounding log10 C to 0.1 dex groups it.
  np.testing.assert_allclose(budget_groups(np.array([0.97e19, 1.04e19, 2.9e19])),
                             [1e19, 1e19, 10 ** 19.5])


def write_manifest(path: Path, runs, *, metrics_dir: Path | None = None,
                   unfinished: bool = True) -> Path:
  """A sweep manifest as lmjax.sweep leaves it, without training anything.

  runs: dicts id, budget, N, D, loss and optionally C (achieved FLOPs; default 6 N D)
  and curve (eval points written as a metrics JSONL under metrics_dir). With
  `unfinished`, a failed and a still planned run are added too: the fit must ignore both.
  """
  m = Manifest(str(path))
  extra = [dict(id="failed-run", budget=runs[0]["budget"], N=runs[0]["N"], D=runs[0]["D"]),
           dict(id="planned-run", budget=runs[0]["budget"], N=runs[0]["N"], D=runs[0]["D"])]
  everything = list(runs) + (extra if unfinished else [])
  m.add(types.SimpleNamespace(id=r["id"], budget=r["budget"], config_dict={"id": r["id"]},
                              n_params=int(r["N"]), tokens=r["D"], flops=6 * r["N"] * r["D"])
        for r in everything)
  for r in runs:
    metrics = None
    if r.get("curve") is not None and metrics_dir is not None:
      metrics = metrics_dir / f"{r['id']}.jsonl"
      lines = [{"step": 0, "flops": 0.0, "loss": 9.0}]  # a train-only line: no eval_loss
      lines += [{"step": k + 1, "flops": f, "eval_loss": l}
                for k, (f, l) in enumerate(zip(*r["curve"]))]
      metrics.write_text("".join(json.dumps(x) + "\n" for x in lines))
    m.finish(r["id"], status="done", achieved_flops=r.get("C", 6 * r["N"] * r["D"]),
             tokens=r["D"], final_eval_loss=r["loss"],
             metrics_path=None if metrics is None else str(metrics))
  if unfinished:
    m.finish("failed-run", status="failed", reason="nan loss")
  m.close()
  return path


def test_load_runs_reads_sweep_manifest(tmp_path):
  runs = [dict(id=f"r{i}", budget=1e15, N=N, D=1e15 / (6 * N), loss=4.0 - 0.1 * i)
          for i, N in enumerate([1e5, 2e5, 4e5])]
  runs[1]["curve"] = ([1e14, 5e14, 1e15], [5.0, 4.2, 3.9])
  path = write_manifest(tmp_path / "manifest.sqlite", runs, metrics_dir=tmp_path)
  t = load_runs(path)
  assert t.ids() == ("r0", "r1", "r2")  # done runs only
  np.testing.assert_allclose(t.budget, 1e15)
  np.testing.assert_allclose(t.C, 6 * t.N * t.D)
  assert t.curves[0] is None and t.curves[2] is None
  np.testing.assert_allclose(t.curves[1].loss, [5.0, 4.2, 3.9])
  # A missing manifest is an error, and is not created as a side effect.
  with pytest.raises(DataError, match="does not exist"):
    load_runs(tmp_path / "missing.sqlite")
  assert not (tmp_path / "missing.sqlite").exists()
  empty = Manifest(str(tmp_path / "empty.sqlite"))
  empty.close()
  with pytest.raises(DataError, match="no finished runs"):
    load_runs(tmp_path / "empty.sqlite")


# ------------------------------------------------------------------ approach 3 on real data


@pytest.fixture(scope="module")
def epoch_table():
  if not EPOCH_CSV.is_file():
    pytest.skip(f"reference data absent: {EPOCH_CSV} (needs ../shared/reference)")
  t = RunsTable.from_csv(EPOCH_CSV, n_col="Model Size", c_col="Training FLOP", loss_col="loss",
                         drop_highest=5)
  assert len(t) == 240
  return t


@pytest.fixture(scope="module")
def epoch_fit(epoch_table):
  t0 = time.perf_counter()
  fit = F.fit_parametric(epoch_table.N, epoch_table.D, epoch_table.loss)
  return fit, time.perf_counter() - t0


def test_reference_fit_matches_epoch(epoch_table, epoch_fit):
  fit, seconds = epoch_fit
  print(f"\nfull 4,500-start grid fit: {seconds:.1f} s; {fit}")
  assert fit.status == F.OK
  assert fit.objective <= EPOCH_OBJECTIVE_MAX
  # The reported objective is the plain Huber sum of the reported parameters.
  assert F.parametric_objective(fit.theta, epoch_table.N, epoch_table.D,
                                epoch_table.loss) == pytest.approx(fit.objective, rel=1e-9)
  assert abs(fit.alpha - EPOCH["alpha"]) <= 0.001
  assert abs(fit.beta - EPOCH["beta"]) <= 0.002
  assert abs(fit.E - EPOCH["E"]) <= 0.002
  assert fit.A == pytest.approx(EPOCH["A"], rel=0.02)
  assert fit.B == pytest.approx(EPOCH["B"], rel=0.05)
  assert fit.a == pytest.approx(0.513, abs=0.002)


def test_reference_bootstrap_matches_epoch_and_is_fast(epoch_table, epoch_fit):
  fit, fit_seconds = epoch_fit
  counts = F.bootstrap_counts(len(epoch_table), 1000, seed=0)
  t0 = time.perf_counter()
  boot = F.bootstrap_parametric(epoch_table.N, epoch_table.D, epoch_table.loss, fit, counts)
  seconds = time.perf_counter() - t0
  E, A, B, alpha, beta = boot.T
  a, _, _ = F.allocation_constants(A, B, alpha, beta)
  se = {k: np.nanstd(v, ddof=1) for k, v in
        dict(E=E, A=A, B=B, alpha=alpha, beta=beta, a=a).items()}
  print(f"\ngrid fit {fit_seconds:.1f} s + 1,000 bootstrap refits {seconds:.1f} s; SE {se}")
  assert np.isnan(E).sum() <= 10  # nearly every resample converges
  for k, ref in EPOCH_SE.items():
    assert se[k] == pytest.approx(ref, rel=0.2), k
  assert fit_seconds + seconds < 120

  # Reduced starts (optimum + runner-up optima) reach the full grid's optimum on resamples:
  # a resample is the data with each run repeated by its count, refitted from all 4,500 starts.
  for r in range(2):
    rep = lambda v: np.repeat(v, counts[r])
    full = F.fit_parametric(rep(epoch_table.N), rep(epoch_table.D), rep(epoch_table.loss))
    reduced = F.parametric_objective(
        [np.log(A[r]), np.log(B[r]), np.log(E[r]), alpha[r], beta[r]],
        rep(epoch_table.N), rep(epoch_table.D), rep(epoch_table.loss))
    assert reduced <= full.objective * (1 + 1e-7)
    assert alpha[r] == pytest.approx(full.alpha, abs=1e-4)


# ------------------------------------------------------------------ synthetic recovery


def test_approach3_recovers_parameters_inside_intervals():
  covered, total = 0, 0
  for seed in range(5):
    t = isoflop_table(seed)
    fit = F.fit_parametric(t.N, t.D, t.loss, starts=COARSE_STARTS)
    assert fit.status == F.OK
    boot = F.bootstrap_parametric(t.N, t.D, t.loss, fit, F.bootstrap_counts(len(t), 300, seed))
    for k, samples in zip(F.PARAM_NAMES, boot.T):
      lo, hi = F.summarise(getattr(fit, k), samples)["ci95"]
      covered += lo <= TRUE[k] <= hi
      total += 1
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=0.1)
  assert covered / total >= 0.8, f"{covered}/{total} intervals cover the truth"


def test_not_converged_reports_no_numbers():
  t = isoflop_table(0)
  fit = F.fit_parametric(t.N, t.D, t.loss, starts=COARSE_STARTS, max_iter=2)
  assert fit.status == F.NOT_CONVERGED and np.isnan(fit.E)
  # Loss that grows with compute has no decaying saturating law: alpha runs to its bound.
  C = np.geomspace(1e18, 1e21, 8)
  out = F.fit_loss_vs_compute_batched(C[None], (1 + 1e-3 * np.log(C))[None], np.ones((1, 8)))
  assert not out["ok"][0]
  with pytest.raises(DataError, match="at least 8 runs"):
    F.fit_parametric(t.N[:5], t.D[:5], t.loss[:5])


def test_loss_vs_compute_recovers_known_law():
  C = np.geomspace(1e17, 1e22, 30)
  E, A, alpha = 1.7, 2.0e3, 0.16
  covered = 0
  for seed in range(5):
    rng = np.random.default_rng(seed)
    L = (E + A * C ** -alpha) * np.exp(0.002 * rng.standard_normal(C.size))
    out = F.fit_loss_vs_compute_batched(C[None], L[None], np.ones((1, C.size)))
    assert out["ok"][0]
    assert out["E"][0] == pytest.approx(E, rel=0.02)
    assert out["alpha"][0] == pytest.approx(alpha, rel=0.05)
    assert out["A"][0] == pytest.approx(A, rel=0.3)
    # Through fit_all: one run per budget, so the frontier is exactly these points.
    t = RunsTable.from_columns(N=np.sqrt(C / 120), C=C, loss=L)
    rep = F.fit_all(t, approaches=[], n_boot=200, holdout_budgets=0)["loss_vs_compute"]
    assert rep["n_points"] == C.size
    p = rep["saturating"]["params"]
    covered += sum(p[k]["ci95"][0] <= v <= p[k]["ci95"][1] for k, v in (("E", E), ("alpha", alpha)))
  assert covered >= 8, f"{covered}/10 intervals cover the truth"


def test_approach2_recovers_allocation_exponent():
  t = isoflop_table(1, noise=0.003)
  rep = F.fit_all(t, approaches=[2], n_boot=200, holdout_budgets=0)["approach2"]
  a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
  p = rep["params"]
  assert rep["status"] == F.OK and rep["n_points"] == 7
  assert p["a"]["value"] == pytest.approx(a_true, abs=0.02)
  assert p["a"]["value"] + p["b"]["value"] == pytest.approx(1.0, abs=1e-6)  # C = 6 N D exactly
  assert p["a"]["ci95"][0] <= a_true <= p["a"]["ci95"][1]


def test_approach1_envelope_and_plots_with_curves(tmp_path):
  t = isoflop_table(2, noise=0.0, sizes_per_budget=13, curves=True)
  rep = F.fit_all(t, n_boot=100, holdout_budgets=1, target_flops=1e22,
                  parametric_starts=COARSE_STARTS)
  a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
  assert rep["approach1"]["status"] == F.OK
  assert rep["approach1"]["params"]["a"]["value"] == pytest.approx(a_true, abs=0.05)
  assert rep["loss_vs_compute"]["frontier"] == "learning-curve envelope"
  assert F.write_report is R.write_report  # lmjax/sweep.py calls fit.write_report
  R.write_report(rep, tmp_path)
  json.loads((tmp_path / "report.json").read_text())  # strict JSON: no NaN
  paths = P.plot_all(t, rep, tmp_path)
  names = {p.name for p in paths}
  assert {"loss_vs_compute.png", "isoflop.svg", "allocation.png",
          "residuals_approach3.png"} <= names
  assert all(p.stat().st_size > 1000 for p in paths)


def test_extrapolation_check_uses_only_training_budgets():
  t = isoflop_table(3, noise=0.005)
  rep = F.fit_all(t, approaches=[3], n_boot=200, holdout_budgets=1,
                  parametric_starts=COARSE_STARTS)["approach3"]["extrapolation"]
  assert rep["status"] == F.OK and rep["n_held_out_runs"] == 9
  assert rep["held_out_budgets"] == [pytest.approx(1e21)]
  assert rep["mean_abs_rel_error"] < 0.02
  assert rep["coverage"] >= 0.3
  for pt in rep["points"]:  # a new run is less certain than the curve through it
    assert pt["pi95"][1] - pt["pi95"][0] >= pt["ci95"][1] - pt["ci95"][0]
  # Inflate the held-out losses by 10%: the training fit must not move, and the check must see it.
  held = t.budgets == t.budgets.max()
  bad = RunsTable(N=t.N, D=t.D, C=t.C, loss=np.where(held, 1.1 * t.loss, t.loss),
                  budget=t.budget, run_id=t.run_id)
  rep2 = F.fit_all(bad, approaches=[3], n_boot=200, holdout_budgets=1,
                   parametric_starts=COARSE_STARTS)["approach3"]["extrapolation"]
  assert rep2["fit_without_held_out"] == pytest.approx(rep["fit_without_held_out"], rel=1e-9)
  for before, after in zip(rep["points"], rep2["points"]):
    assert after["rel_error"] == pytest.approx((before["predicted"] - 1.1 * before["observed"])
                                               / (1.1 * before["observed"]), rel=1e-9)
  assert rep2["mean_abs_rel_error"] > 0.07 and rep2["coverage"] == 0.0


def test_residual_scatter():
  rng = np.random.default_rng(0)
  r = 0.02 * rng.standard_normal(400)
  s = F.residual_scatter(r, 5)
  assert s["sigma_log"] == pytest.approx(0.02, rel=0.1) and s["dof"] == 395
  r[:4] = 5.0  # a few diverged runs must not widen every interval
  assert F.residual_scatter(r, 5)["sigma_log"] == pytest.approx(0.02, rel=0.15)
  # 3 residuals of a line through 3 evenly spaced points: their MAD is exactly 0.
  s = F.residual_scatter(0.01 * np.array([1.0, -2.0, 1.0]), 2)
  assert s["estimator"] == "root mean square" and s["sigma_log"] > 0.01
  assert F.residual_scatter([0.1, -0.1], 2) is None


def test_prediction_interval_covers_new_runs_at_nominal_rate():
  # Known 1% log-normal noise; the largest budget is held out. The curve's CI is
  # parameter uncertainty only and misses about half of the held-out runs; the PI
  # adds the runs' own scatter and should cover about 95%.
  pi, ci, total = 0, 0, 0
  for seed in range(4):
    t = isoflop_table(seed, noise=0.01, sizes_per_budget=21)
    ex = F.fit_all(t, approaches=[3], n_boot=200, holdout_budgets=1,
                   parametric_starts=TRUE_START)["approach3"]["extrapolation"]
    assert ex["scatter"]["sigma_log"] == pytest.approx(0.01, rel=0.25)
    pi += sum(p["covered"] for p in ex["points"])
    ci += sum(p["covered_ci"] for p in ex["points"])
    total += len(ex["points"])
  print(f"\nheld-out coverage over {total} runs: PI {pi / total:.0%}, CI {ci / total:.0%}")
  assert pi / total >= 0.85
  assert ci / total <= 0.65


def test_saturating_frontier_at_bound_is_reported_not_presented(tmp_path):
  # A frontier that steepens with compute (log-log curvature < 0): no E >= 0 fits it.
  C = np.geomspace(1e18, 1e21, 8)
  u = np.log(C / 1e19)
  loss = np.exp(1.0 - 0.03 * u - 0.004 * u * u)
  t = RunsTable.from_columns(N=np.sqrt(C / 120), C=C, loss=loss, budget=C)
  rep = F.fit_all(t, approaches=[], n_boot=50, holdout_budgets=1)
  sec = rep["loss_vs_compute"]
  sat = sec["saturating"]
  assert sec["status"] == F.OK and sat["status"] == F.AT_BOUND
  assert sat["params"] is None and sat["boundary_fit"]["E"] == 0.0
  assert sec["loglog_curvature"] < 0 and sec["compute_decades"] == pytest.approx(3.0)
  ex = sec["extrapolation"]
  assert ex["status"] == F.OK and ex["law"].startswith("L(C) = A * C^-alpha")
  md = R.render_markdown(rep)
  assert "At a bound, not an estimate" in md and "bends down" in md
  assert "| E |" not in md  # the boundary values are not presented as a result
  paths = P.plot_loss_vs_compute(t, rep, tmp_path)  # draws the power-law band instead
  assert all(p.stat().st_size > 1000 for p in paths)


def test_plots_without_curves_or_optional_sections(tmp_path):
  t = isoflop_table(4)
  rep = F.fit_all(t, approaches=[2], n_boot=50, holdout_budgets=0)
  assert rep["approach2"]["status"] == F.OK and "approach3" not in rep
  names = {p.name for p in P.plot_all(t, rep, tmp_path)}
  assert names == {"loss_vs_compute.png", "loss_vs_compute.svg", "isoflop.png", "isoflop.svg",
                   "allocation.png", "allocation.svg"}
  with pytest.raises(DataError, match="approach 1 needs learning curves"):
    F.fit_all(t, approaches=[1], n_boot=50)


def _with_replicas(t: RunsTable, k: int, sd: float, seed: int) -> RunsTable:
  """k copies of every run, each with its own additive loss noise (and curve noise)."""
  rng = np.random.default_rng(seed)
  records = []
  for i in range(len(t)):
    for r in range(k):
      rec = {"id": f"{t.ids()[i]}/s{r}", "N": t.N[i], "D": t.D[i], "C": t.C[i],
             "budget": t.budget[i], "loss": t.loss[i] + sd * rng.standard_normal()}
      if t.curves is not None:
        rec["curve"] = {"flops": t.curves[i].flops,
                        "loss": t.curves[i].loss + sd * rng.standard_normal(len(t.curves[i].loss))}
      records.append(rec)
  return RunsTable.from_records(records)


def test_replicas_are_averaged_into_one_point_each():
  base = isoflop_table(4, noise=0.0, budgets=np.geomspace(1e18, 1e19, 2), sizes_per_budget=3,
                       curves=True)
  reps = _with_replicas(base, 3, 0.01, seed=0)
  mean, stats = reps.mean_over_replicas()
  assert len(mean) == len(base) == len(reps) // 3
  for i in range(len(base)):
    rows = slice(3 * i, 3 * i + 3)
    assert (mean.N[i], mean.D[i], mean.budget[i]) == (base.N[i], base.D[i], base.budget[i])
    assert mean.loss[i] == pytest.approx(np.mean(reps.loss[rows]))
    np.testing.assert_allclose(mean.curves[i].loss,
                               np.mean([c.loss for c in reps.curves[rows]], axis=0))
    assert mean.run_id[i] == "+".join(reps.run_id[rows])
  sds = [np.std(reps.loss[3 * i:3 * i + 3], ddof=1) for i in range(len(base))]
  assert stats["loss_sd_pooled"] == pytest.approx(np.sqrt(np.mean(np.square(sds))))
  assert stats["loss_sd_max"] == pytest.approx(max(sds))
  assert stats["replicas_per_point"] == {"min": 3, "max": 3}
  assert 0.003 < stats["loss_sd_pooled"] < 0.03  # near the injected sd of 0.01
  assert base.mean_over_replicas() == (base, None)  # no replicas: untouched


def test_fit_all_fits_replica_means_not_the_luckiest_seed(tmp_path):
  # The frontier of raw replicas would take each budget's luckiest seed; fit_all must give
  # exactly the report of the averaged table, plus the replica spread.
  reps = _with_replicas(isoflop_table(5, noise=0.005), 2, 0.02, seed=1)
  kw = dict(n_boot=50, holdout_budgets=1, approaches=[2, 3], parametric_starts=COARSE_STARTS)
  got = F.fit_all(reps, **kw)
  mean, stats = reps.mean_over_replicas()
  want = F.fit_all(mean, **kw)
  assert got["replicas"] == stats and got["n_runs"] == len(reps) and got["n_points"] == len(mean)
  for key in ("loss_vs_compute", "approach2", "approach3"):
    assert json.dumps(got[key], default=str) == json.dumps(want[key], default=str)
  R.write_report(got, tmp_path)
  assert "Replicas: the 126 runs are 63 points" in (tmp_path / "report.md").read_text()
  assert P.plot_all(reps, got, tmp_path)  # residuals line up with the averaged points


def test_overflowing_bootstrap_samples_widen_the_interval_instead_of_vanishing():
  # A resample whose G * C^a overflows is an outcome beyond every finite one: dropping it
  # (as summarise once did) pulls the upper bound in. NaN (a failed fit) is still dropped.
  from lmjax.scaling.report import _interval
  rng = np.random.default_rng(0)
  finite = rng.lognormal(size=198)
  plain = F.summarise(1.0, finite)
  assert plain["ci95"] == [float(v) for v in np.percentile(finite, [2.5, 97.5])]
  two_inf = F.summarise(1.0, np.concatenate([finite, [np.inf, np.inf], [np.nan] * 5]))
  # Ranks with the two infinities on top: the same percentile as of a huge stand-in value.
  stand_in = np.percentile(np.concatenate([finite, [1e300, 1e300]]), [2.5, 97.5])
  assert two_inf["ci95"] == pytest.approx(list(stand_in), rel=1e-12)
  assert two_inf["ci95"][1] > np.percentile(finite, 97.5)  # wider than dropping them
  assert two_inf["se"] == pytest.approx(np.std(finite, ddof=1))
  many_inf = F.summarise(1.0, np.concatenate([finite[:90], [np.inf] * 10]))
  lo, hi = many_inf["ci95"]
  assert hi is None and lo == pytest.approx(np.percentile(
      np.concatenate([finite[:90], [1e300] * 10]), 2.5), rel=1e-12)
  assert F._covers([lo, None], 1e200) and not F._covers([lo, None], lo / 2)
  assert F._covers([None, None], 1.0) is None
  assert _interval([lo, None]).endswith(", inf)") and _interval([None, None]) == "-"
  assert F.summarise(1.0, [np.inf, np.inf, 2.0])["ci95"] == [None, None]  # < 2 finite
