"""Tests for lmjax.scaling: runs table, fits, bootstrap, extrapolation check, plots."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from lmjax.errors import DataError
from lmjax.scaling import fit as F
from lmjax.scaling import plot as P
from lmjax.scaling.table import RunsTable, budget_groups, load_runs

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
EPOCH_CSV = REFERENCE / "epoch_chinchilla_svg_extracted_data.csv"

# Epoch AI's Huber-sum fit on the 240 rows (reference README).
EPOCH = {"A": 477.84, "B": 2143.86, "E": 1.81724, "alpha": 0.347313, "beta": 0.367183}
EPOCH_OBJECTIVE_MAX = 1.0184e-3
EPOCH_SE = {"A": 125.0, "B": 1290.0, "E": 0.026, "alpha": 0.015, "beta": 0.021, "a": 0.02}

TRUE = {"E": 1.9, "A": 350.0, "B": 1200.0, "alpha": 0.33, "beta": 0.36}
COARSE_STARTS = F.init_grid()[::15]  # 300 of the 4,500 starts keep synthetic tests fast


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


def test_sqlite_without_manifest_module_is_a_clear_error(tmp_path):
  import importlib.util
  if importlib.util.find_spec("lmjax.sweep_manifest") is not None:
    pytest.skip("lmjax.sweep_manifest exists in this checkout")
  with pytest.raises(DataError, match="sweep_manifest"):
    load_runs(tmp_path / "sweep.sqlite")


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
  F.write_report(rep, tmp_path)
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


def test_plots_without_curves_or_optional_sections(tmp_path):
  t = isoflop_table(4)
  rep = F.fit_all(t, approaches=[2], n_boot=50, holdout_budgets=0)
  assert rep["approach2"]["status"] == F.OK and "approach3" not in rep
  names = {p.name for p in P.plot_all(t, rep, tmp_path)}
  assert names == {"loss_vs_compute.png", "loss_vs_compute.svg", "isoflop.png", "isoflop.svg",
                   "allocation.png", "allocation.svg"}
  with pytest.raises(DataError, match="approach 1 needs learning curves"):
    F.fit_all(t, approaches=[1], n_boot=50)
