"""End-to-end tests of `python -m lmjax.fit` (run as a subprocess, as a user would)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_fit import write_manifest

REPO = Path(__file__).resolve().parents[1]


def run_fit(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
  return subprocess.run([sys.executable, "-m", "lmjax.fit", *args], capture_output=True,
                        text=True, env=env, cwd=REPO, timeout=300)


def small_csv(path: Path) -> Path:
  """Five IsoFLOP budgets x 7 model sizes from a Chinchilla-like law with 1% noise."""
  rng = np.random.default_rng(0)
  lines = ["id,N,D,budget,loss"]
  for C in np.geomspace(1e18, 1e20, 5):
    for N in np.sqrt(C / 120) * np.geomspace(1 / 6, 6, 7):
      D = C / (6 * N)
      loss = (1.9 + 350 / N ** 0.33 + 1200 / D ** 0.36) * np.exp(0.01 * rng.standard_normal())
      lines.append(f"r{len(lines)},{N:.6g},{D:.6g},{C:.6g},{loss:.6f}")
  path.write_text("\n".join(lines) + "\n")
  return path


def test_cli_writes_report_and_plots(tmp_path):
  out = tmp_path / "out"
  res = run_fit(f"--runs={small_csv(tmp_path / 'runs.csv')}", f"--out={out}", "--bootstrap=100")
  assert res.returncode == 0, res.stderr
  report = json.loads((out / "report.json").read_text())
  assert report["n_runs"] == 35 and report["n_budgets"] == 5
  a3 = report["approach3"]
  assert a3["status"] == "ok" and a3["n_points"] == 35
  for name in ("E", "A", "B", "alpha", "beta", "a", "b", "G"):
    p = a3["params"][name]
    assert p["ci95"][0] <= p["value"] <= p["ci95"][1] and p["se"] > 0, name
  assert a3["extrapolation"]["status"] == "ok"
  assert report["approach1"]["status"] == "skipped"  # a CSV carries no learning curves
  assert report["approach2"]["status"] == "ok"
  assert "Approach 3" in (out / "report.md").read_text()
  for name in ("loss_vs_compute", "isoflop", "allocation", "residuals_approach3"):
    for ext in ("png", "svg"):
      assert (out / f"{name}.{ext}").stat().st_size > 1000, name


BAD_CSVS = {
    "missing_column": ("N,loss\n1e6,4\n2e6,3.5\n", "needs two of the columns"),
    "non_numeric": ("N,D,loss\n1e6,2e7,4\n2e6,lots,3.5\n", "not a number"),
    "negative": ("N,D,loss\n1e6,2e7,4\n-2e6,4e7,3.5\n", "> 0"),
    "too_few_points": ("N,D,loss\n1e6,2e7,4\n2e6,4e7,3.5\n4e6,8e7,3.1\n", "at least"),
}


@pytest.mark.parametrize("name", sorted(BAD_CSVS))
def test_cli_bad_input_is_one_line_without_traceback(tmp_path, name):
  text, needle = BAD_CSVS[name]
  path = tmp_path / f"{name}.csv"
  path.write_text(text)
  res = run_fit(f"--runs={path}", f"--out={tmp_path / 'out'}", "--bootstrap=10")
  assert res.returncode != 0
  assert "Traceback" not in res.stderr
  lines = [l for l in res.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("lmjax: error:"), res.stderr
  assert needle in lines[0]


def sweep_runs():
  """A sweep's shape (4 budgets x 4 sizes, learning curves) from a Chinchilla-like law.

  Achieved compute misses the nominal budget by up to 1%, as whole training steps do.
  """
  rng = np.random.default_rng(1)
  law = lambda N, D: 1.9 + 350 / N ** 0.33 + 1200 / D ** 0.36
  runs = []
  for C in 1e18 * 2.0 ** np.arange(4):
    for N in np.sqrt(C / 120) * np.geomspace(1 / 4, 4, 4):
      D = C / (6 * N)
      achieved = C * (1 + 0.01 * rng.random())
      frac = np.arange(1, 9) / 8  # 8 evals along training; the last is the final one
      noise = np.exp(0.005 * rng.standard_normal())
      runs.append({"id": f"b{C:.0e}-n{N:.2e}", "budget": C, "N": N, "D": D, "C": achieved,
                   "loss": law(N, D) * noise,
                   "curve": (achieved * frac, law(N, D * frac) * noise)})
  return runs


def test_cli_fits_a_sweep_manifest(tmp_path):
  manifest = write_manifest(tmp_path / "manifest.sqlite", sweep_runs(), metrics_dir=tmp_path)
  out = tmp_path / "out"
  # Approach 3's 4,500-start grid is what costs time; the CSV test above covers it end to end.
  res = run_fit(f"--runs={manifest}", f"--out={out}", "--bootstrap=50", "--noplots",
                "--approaches=1,2")
  assert res.returncode == 0, res.stderr
  report = json.loads((out / "report.json").read_text())
  assert report["n_runs"] == 16 and report["n_budgets"] == 4  # failed/planned runs ignored
  assert report["has_curves"] and report["budgets_from"] == "given"
  assert report["approach1"]["status"] == "ok" and report["approach2"]["status"] == "ok"
  lvc = report["loss_vs_compute"]
  assert lvc["frontier"] == "learning-curve envelope"
  # The largest budget's finished runs end within 1% of each other; they reach the
  # envelope's last point, so the frontier spans the full factor 8 of compute.
  assert lvc["compute_decades"] == pytest.approx(np.log10(8), abs=0.01)
  ex = lvc["extrapolation"]
  assert ex["status"] == "ok" and ex["held_out_budgets"] == [8e18]
  for pt in ex["points"]:
    assert pt["pi95"][0] <= pt["predicted"] <= pt["pi95"][1]
  md = (out / "report.md").read_text()
  assert "95% prediction interval for a new run" in md


def test_cli_missing_manifest_is_one_line(tmp_path):
  res = run_fit(f"--runs={tmp_path / 'sweep.sqlite'}", f"--out={tmp_path / 'out'}")
  assert res.returncode != 0 and "Traceback" not in res.stderr
  assert "does not exist" in res.stderr and len(res.stderr.strip().splitlines()) == 1
