"""Plots of a scaling-law report: loss vs compute, IsoFLOPs, allocation, residuals.

Each figure is written as PNG and SVG. Figures are built on matplotlib's Figure
directly (Agg canvas), never pyplot, so importing this module changes no global
backend state. A figure whose inputs are absent is skipped, and a layer whose
inputs are absent (e.g. learning curves) is left out of an otherwise drawn figure.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmjax.scaling.table import RunsTable

# Chinchilla reference: a = b = 0.5 through the Chinchilla model itself (70e9 params on
# 1.4e12 tokens, C = 6 N D), i.e. D = 20 N and N_opt = sqrt(C / 120).
CHINCHILLA_N, CHINCHILLA_D = 70e9, 1.4e12
# Kaplan et al. 2020: N_opt ~ C^0.73 (and D_opt ~ C^0.27); drawn as a slope reference.
KAPLAN_A = 0.73


def _ok(section) -> bool:
  return bool(section) and section.get("status") == "ok"


def _save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
  FigureCanvasAgg(fig)
  paths = []
  for ext in ("png", "svg"):
    p = out_dir / f"{name}.{ext}"
    fig.savefig(p, dpi=130, bbox_inches="tight")
    paths.append(p)
  return paths


def _held_out_mask(table: RunsTable, report: dict) -> np.ndarray:
  budgets = set()
  for key in ("loss_vs_compute", "approach3", "approach2"):
    ex = (report.get(key) or {}).get("extrapolation") or {}
    budgets.update(ex.get("held_out_budgets") or [])
  if not budgets:
    return np.zeros(len(table), bool)
  return np.isin(table.budgets, np.array(sorted(budgets)))


def plot_loss_vs_compute(table: RunsTable, report: dict, out_dir: Path) -> list[Path]:
  fig = Figure(figsize=(7, 5), layout="constrained")
  ax = fig.add_subplot()
  if table.curves is not None:
    for cv in table.curves:
      if cv is not None:
        ax.plot(cv.flops, cv.loss, color="0.6", alpha=0.25, lw=0.7)
  held = _held_out_mask(table, report)
  ax.scatter(table.C[~held], table.loss[~held], s=10, color="C0", alpha=0.6, label="runs (final)")
  if held.any():
    ax.scatter(table.C[held], table.loss[held], s=40, marker="x", color="C3",
               label="held out (extrapolation check)")
  sec = report.get("loss_vs_compute") or {}
  plot = sec.get("plot") or {}
  if plot.get("frontier_C"):
    ax.plot(plot["frontier_C"], plot["frontier_loss"], "o", ms=4, color="k", mfc="none",
            label=f"frontier ({sec.get('frontier')})")
  if plot.get("fit"):
    p = sec["saturating"]["params"]
    ax.plot(plot["C"], plot["fit"], color="C1", lw=2,
            label=f"L = E + A C^-alpha (E={p['E']['value']:.3g}, alpha={p['alpha']['value']:.3g})")
    lo, hi = np.array(plot["lo"], float), np.array(plot["hi"], float)
    ax.fill_between(plot["C"], lo, hi, color="C1", alpha=0.25, lw=0, label="95% bootstrap band")
  if plot.get("power_law_fit"):
    ax.plot(plot["C"], plot["power_law_fit"], color="C2", lw=1, ls="--", label="A C^-alpha")
    if not plot.get("fit") and plot.get("power_law_lo"):
      # The saturating law is not presented (E at its bound or not converged): band the
      # power law instead, as it is then the section's result.
      ax.fill_between(plot["C"], np.array(plot["power_law_lo"], float),
                      np.array(plot["power_law_hi"], float), color="C2", alpha=0.2, lw=0,
                      label="95% bootstrap band (A C^-alpha)")
  ex = sec.get("extrapolation") or {}
  labelled = False
  for pt in ex.get("points") or []:
    # Thin wide bar: prediction interval for a new run; thick bar: the curve's CI.
    for key, lw, cap, name in (("pi95", 1, 4, "95% PI (new run)"),
                               ("ci95", 3, 0, "95% CI (curve)")):
      iv = pt.get(key)
      if iv and None not in iv:  # an unbounded side (see fit.summarise) gets no bar
        ax.errorbar([pt["C"]], [pt["predicted"]], fmt="s", color="C3", ms=4, capsize=cap,
                    elinewidth=lw, yerr=[[pt["predicted"] - iv[0]], [iv[1] - pt["predicted"]]],
                    label=None if labelled else f"held-out prediction, {name}")
    labelled = True
  ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs)", ylabel="loss",
         title="Loss vs compute")
  ax.legend(fontsize=7)
  return _save(fig, out_dir, "loss_vs_compute")


def plot_isoflop(table: RunsTable, report: dict, out_dir: Path) -> list[Path]:
  sec = report.get("approach2")
  if not _ok(sec):
    return []
  fig = Figure(figsize=(7, 5), layout="constrained")
  ax = fig.add_subplot()
  budgets = table.budgets
  rows = sec["budgets"]
  colours = [f"C{i % 10}" for i in range(len(rows))]
  for row, colour in zip(rows, colours):
    g = np.flatnonzero(np.isclose(budgets, row["budget"], rtol=1e-9))
    if g.size == 0:
      continue
    ax.scatter(table.N[g], table.loss[g], s=10, color=colour, alpha=0.7)
    coef = row["parabola_log_N"]["coef"]
    if row["valid"] and None not in coef:
      x = np.log(table.N[g])
      u = np.linspace(x.min(), x.max(), 50) - row["parabola_log_N"]["centre"]
      ax.plot(np.exp(u + row["parabola_log_N"]["centre"]),
              np.exp(coef[0] + coef[1] * u + coef[2] * u * u), color=colour, lw=1,
              label=f"C={row['budget']:.2g}")
      ax.plot([row["N_opt"]], [row["loss_opt"]], "*", ms=10, color=colour, mec="k", mew=0.5)
  ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="final loss",
         title="IsoFLOP profiles (robust parabolas in log N, * = optimum)")
  if len(rows) <= 20:
    ax.legend(fontsize=6, ncol=2)
  return _save(fig, out_dir, "isoflop")


def _reference_lines(C: np.ndarray):
  n_chin = np.sqrt(C / (6 * CHINCHILLA_D / CHINCHILLA_N))
  d_chin = C / (6 * n_chin)
  centre = math.exp(np.log(C).mean())
  n0 = math.sqrt(centre / (6 * CHINCHILLA_D / CHINCHILLA_N))
  n_kap = n0 * (C / centre) ** KAPLAN_A
  d_kap = C / (6 * n_kap)
  return n_chin, d_chin, n_kap, d_kap


def plot_allocation(report: dict, out_dir: Path) -> list[Path]:
  sections = [(k, report.get(k)) for k in ("approach1", "approach2", "approach3")]
  sections = [(k, s) for k, s in sections if _ok(s) and s.get("plot")]
  if not sections:
    return []
  fig = Figure(figsize=(11, 4.5), layout="constrained")
  axes = fig.subplots(1, 2)
  labels = {"approach1": "Approach 1", "approach2": "Approach 2", "approach3": "Approach 3"}
  all_c = []
  for i, (key, sec) in enumerate(sections):
    plot, p = sec["plot"], sec["params"]
    C = np.array(plot["C"], float)
    all_c.append(C)
    colour = f"C{i}"
    for ax, q, exp_name in ((axes[0], "N", "a"), (axes[1], "D", "b")):
      ax.plot(C, plot[f"{q}_opt"], color=colour, lw=2,
              label=f"{labels[key]}: {exp_name} = {p[exp_name]['value']:.3f}")
      ax.fill_between(C, np.array(plot[f"{q}_lo"], float), np.array(plot[f"{q}_hi"], float),
                      color=colour, alpha=0.2, lw=0)
      if plot.get("points_C"):
        ax.plot(plot["points_C"], plot[f"points_{q}"], "o", ms=3, color=colour, alpha=0.7)
  C = np.geomspace(min(c.min() for c in all_c), max(c.max() for c in all_c), 50)
  n_chin, d_chin, n_kap, d_kap = _reference_lines(C)
  for ax, chin, kap, q in ((axes[0], n_chin, n_kap, "N"), (axes[1], d_chin, d_kap, "D")):
    ax.plot(C, chin, "k--", lw=1, label="Chinchilla (a = b = 0.5, D = 20 N)")
    ax.plot(C, kap, "k:", lw=1,
            label=f"Kaplan slope ({q} ~ C^{KAPLAN_A if q == 'N' else round(1 - KAPLAN_A, 2)})")
    ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)",
           ylabel=f"{q}_opt ({'parameters' if q == 'N' else 'tokens'})")
    ax.legend(fontsize=7)
  axes[0].set_title("Compute-optimal model size")
  axes[1].set_title("Compute-optimal training tokens")
  return _save(fig, out_dir, "allocation")


def plot_residuals(table: RunsTable, report: dict, out_dir: Path) -> list[Path]:
  sec = report.get("approach3")
  if not _ok(sec) or "residuals" not in (sec.get("plot") or {}):
    return []
  r = np.array(sec["plot"]["residuals"], float)
  fig = Figure(figsize=(10, 4), layout="constrained")
  ax1, ax2 = fig.subplots(1, 2)
  sc = ax1.scatter(table.C, r, c=np.log10(table.N), s=10, cmap="viridis")
  fig.colorbar(sc, ax=ax1, label="log10 N")
  ax1.axhline(0, color="k", lw=0.8)
  ax1.set(xscale="log", xlabel="compute C (FLOPs)", ylabel="log L - log L_hat",
          title="Approach 3 residuals")
  ax2.hist(r, bins=min(40, max(5, len(r) // 5)), color="C0")
  ax2.set(xlabel="log L - log L_hat", ylabel="runs", title="Residual distribution")
  return _save(fig, out_dir, "residuals_approach3")


def plot_all(table: RunsTable, report: dict, out_dir: str | Path) -> list[Path]:
  """Every figure the report supports; returns the written paths."""
  table, _ = table.mean_over_replicas()  # the points fit_all fitted (residuals align)
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = plot_loss_vs_compute(table, report, out)
  paths += plot_isoflop(table, report, out)
  paths += plot_allocation(report, out)
  paths += plot_residuals(table, report, out)
  return paths
