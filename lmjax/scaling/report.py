"""The scaling-law report: its status vocabulary, report.json and report.md.

lmjax.scaling.fit computes the report dict; this module only renders it. The status
strings live here because they are part of the report's format, and this module must
not import fit (fit re-exports write_report from here).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# Status strings used throughout the report.
OK = "ok"
NOT_CONVERGED = "not_converged"
SKIPPED = "skipped"
# A fit whose optimum sits on a constraint (E = 0 in L(C) = E + A C^-alpha): the numbers
# are a boundary artefact rather than an estimate, so they are not presented as a result.
AT_BOUND = "at_bound"

_SECTIONS = (("loss_vs_compute", "Loss vs compute (frontier)"),
             ("approach1", "Approach 1: learning-curve envelope"),
             ("approach2", "Approach 2: IsoFLOP profiles"),
             ("approach3", "Approach 3: parametric L(N, D)"))
_MAX_POINT_ROWS = 20  # longer per-point tables would drown the summary


def jsonable(obj):
  """obj with numpy types as Python ones and non-finite floats as None (strict JSON)."""
  if isinstance(obj, dict):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return jsonable(obj.tolist())
  if isinstance(obj, (np.bool_, bool)):
    return bool(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.4e}"
  return str(v)


def _interval(ci) -> str:
  if not ci or (ci[0] is None and ci[1] is None):
    return "-"
  lo = "(-inf" if ci[0] is None else f"[{_fmt(ci[0])}"  # None: unbounded (see summarise)
  hi = "inf)" if ci[1] is None else f"{_fmt(ci[1])}]"
  return f"{lo}, {hi}"


def _pct(v) -> str:
  return "-" if v is None else f"{v:.0%}"


def _param_table(params: dict) -> list[str]:
  lines = ["| parameter | value | 95% CI | SE |", "|---|---|---|---|"]
  for name, p in params.items():
    lines.append(f"| {name} | {_fmt(p['value'])} | {_interval(p['ci95'])} | {_fmt(p['se'])} |")
  return lines


def _extrapolation_lines(ex: dict | None) -> list[str]:
  if not ex:
    return []
  if ex.get("status") != OK:
    return [f"Extrapolation check: {ex.get('status')} ({ex.get('reason', '')})", ""]
  held = ", ".join(_fmt(b) for b in ex["held_out_budgets"])
  law = f" with {ex['law']}" if ex.get("law") else ""
  lines = [f"Extrapolation check (refit without budgets {held}; predicts {ex['predicts']}{law}): "
           f"mean |rel. error| {ex['mean_abs_rel_error']:.3%}, "
           f"max {ex['max_abs_rel_error']:.3%}."]
  sc = ex.get("scatter")
  if sc:
    lines.append(f"The 95% prediction interval for a new run (fit uncertainty plus run-to-run "
                 f"scatter sigma = {sc['sigma_log']:.3g} in log, {sc['estimator']} of {sc['n']} "
                 f"residuals) "
                 f"covers {_pct(ex['coverage'])} of held-out values; the 95% CI of the fitted "
                 f"curve alone covers {_pct(ex.get('coverage_ci'))}.")
  else:
    lines.append(f"No prediction interval: {ex.get('scatter_reason', 'no scatter estimate')}. "
                 f"The 95% CI of the fitted curve covers {_pct(ex.get('coverage_ci'))} of "
                 "held-out values (parameter uncertainty only).")
  lines.append("")
  points = [p for p in ex.get("points", []) if "observed" in p]
  if points and len(points) <= _MAX_POINT_ROWS:
    label = "run" if "run_id" in points[0] else "budget"
    lines += [f"| {label} | observed | predicted | rel. error | 95% CI (curve) | "
              "95% PI (new run) | in PI |", "|---|---|---|---|---|---|---|"]
    for p in points:
      key = p["run_id"] if label == "run" else _fmt(p["budget"])
      inside = {True: "yes", False: "no", None: "-"}[p.get("covered")]
      lines.append(f"| {key} | {_fmt(p['observed'])} | {_fmt(p['predicted'])} | "
                   f"{p['rel_error']:+.2%} | {_interval(p.get('ci95'))} | "
                   f"{_interval(p.get('pi95'))} | {inside} |")
    lines.append("")
  return lines


def _loss_vs_compute_lines(sec: dict) -> list[str]:
  decades = sec.get("compute_decades")
  span = f", spanning {decades:.2g} decades of compute" if decades is not None else ""
  lines = [f"Frontier: {sec['frontier']} ({sec['n_points']} points{span}).", ""]
  for sub in ("saturating", "power_law"):
    s = sec[sub]
    lines += [f"### {s['law']}", ""]
    if s["status"] == AT_BOUND:
      lines += [f"At a bound, not an estimate: {s.get('message', '')}", ""]
      continue
    if s["status"] != OK:
      lines += [f"Not converged: {s.get('message') or sec.get('message', '')}", ""]
      continue
    lines += _param_table(s["params"]) + [""]
    if s.get("prediction"):
      p = s["prediction"]["loss"]
      lines += [f"Predicted frontier loss at target: {_fmt(p['value'])} {_interval(p['ci95'])}",
                ""]
  return lines


def render_markdown(report: dict) -> str:
  lines = ["# Scaling-law fit report", "",
           f"{report['n_runs']} runs, {report['n_budgets']} budgets ({report['budgets_from']}), "
           f"learning curves: {'yes' if report['has_curves'] else 'no'}. Convention C = 6 N D. "
           f"Predictions at C = {report['target_flops']:.4g} FLOPs.", ""]
  rep = report.get("replicas")
  if rep:  # fit_all averaged replicas (same N and D, other seeds) into single points
    lines += [f"Replicas: the {rep['n_runs']} runs are {rep['n_points']} points of "
              f"{rep['replicas_per_point']['min']}-{rep['replicas_per_point']['max']} "
              "replicas each (other seeds), averaged before fitting. Seed-to-seed spread of "
              f"the final loss: pooled sd {_fmt(rep['loss_sd_pooled'])} (max "
              f"{_fmt(rep['loss_sd_max'])}; median {rep['loss_rel_sd_median']:.2%} of the "
              "loss).", ""]
  floor = report.get("true_entropy_floor")
  if floor is not None:  # sweep.py adds it for synthetic data, where it is known exactly
    lines += [f"Known irreducible loss of the data (entropy floor): {_fmt(float(floor))}; "
              "compare it with the fitted E.", ""]
  lines += ["Extrapolation checks refit without the largest budget(s) and predict them. "
            "`ci95` is the bootstrap interval of the fitted curve (parameter uncertainty "
            "only); `pi95` is the 95% prediction interval for a new run (the same bootstrap "
            "plus the run-to-run scatter of runs around the law), and coverage counts the "
            "held-out values inside `pi95`.", ""]
  for key, title in _SECTIONS:
    sec = report.get(key)
    if sec is None:
      continue
    lines += [f"## {title}", ""]
    if sec.get("status") == SKIPPED:
      lines += [f"Skipped: {sec.get('reason')}", ""]
      continue
    if key == "loss_vs_compute":
      lines += _loss_vs_compute_lines(sec)
    else:
      if sec.get("status") != OK:
        lines += [f"Not converged: {sec.get('message', '')}", ""]
        continue
      lines += [f"{sec.get('law', '')}; {sec['n_points']} points; objective "
                + ", ".join(f"{k} = {_fmt(v)}" for k, v in sec["objective"].items()), ""]
      lines += _param_table(sec["params"]) + [""]
      pred = sec.get("prediction", {})
      if pred:
        lines += ["| at target compute | value | 95% CI | SE |", "|---|---|---|---|"]
        for name in ("loss", "N_opt", "D_opt"):
          if name in pred:
            p = pred[name]
            lines.append(f"| {name} | {_fmt(p['value'])} | {_interval(p['ci95'])} | "
                         f"{_fmt(p['se'])} |")
        lines.append("")
    b = sec.get("bootstrap")
    if b:
      extra = (f", {b['n_at_bound']} with E at its bound 0" if b.get("n_at_bound") else "")
      lines += [f"Bootstrap: {b['n_resamples']} resamples (seed {b['seed']}), "
                f"{b['n_failed']} failed{extra}.", ""]
    lines += _extrapolation_lines(sec.get("extrapolation"))
  return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
  """Writes report.json and report.md into out_dir; returns their paths."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  js = out / "report.json"
  md = out / "report.md"
  js.write_text(json.dumps(jsonable(report), indent=1, allow_nan=False) + "\n")
  md.write_text(render_markdown(report))
  return js, md
