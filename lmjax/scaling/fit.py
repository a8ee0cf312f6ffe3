"""Scaling-law fits: loss vs compute, Chinchilla Approaches 1-3, bootstrap, hold-out checks.

Pure float64 numpy/scipy functions (no jax: its x64 switch is process-global).
Every approach accepts a bootstrap "counts" matrix (resamples x runs, how often
each run is drawn) so that one batched computation fits the full data (a single
row of ones) and all resamples at once; resampling runs by counts is exactly
the usual bootstrap over runs.

Conventions (see docs/scaling.md): C = 6 N D; logs are natural; Approach 3 is
L(N, D) = E + A / N^alpha + B / D^beta fitted as Hoffmann et al. / Epoch AI do
(Huber(1e-3) sum on log-loss residuals, L-BFGS from a 4,500-point grid), with
N_opt = G (C/6)^a, D_opt = (C/6)^b / G. Approaches 1 and 2 report
N_opt = G C^a and D_opt = H C^b (no factor 6, as those approaches fit C directly).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from lmjax.errors import ConfigError, DataError
# Rendering lives in report.py; write_report is re-exported for existing callers (sweep.py).
from lmjax.scaling.report import AT_BOUND, NOT_CONVERGED, OK, SKIPPED, write_report  # noqa: F401
from lmjax.scaling.table import RunsTable

HUBER_DELTA = 1e-3
MIN_RUNS_APPROACH3 = 8
MIN_BUDGETS_APPROACH2 = 3
MIN_FRONTIER_POINTS = 4
MIN_ENVELOPE_POINTS = 3
ENVELOPE_GRID_POINTS = 64
# A run's achieved compute misses its nominal budget by up to ~1-2% (whole steps), so the
# runs of one budget end at slightly different C. A curve counts as reaching a grid point up
# to this fraction past its end (at its final loss): otherwise the largest budget's finished,
# fully annealed runs (the most informative frontier points) drop out of the envelope.
CURVE_END_TOLERANCE = 0.02
PARAM_NAMES = ("E", "A", "B", "alpha", "beta")


# ----------------------------------------------------------------------------
# Batched L-BFGS: many independent small problems advanced in lock step.


def lbfgs_batched(fg: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
                  x0: np.ndarray, *, max_iter: int = 2000, memory: int = 10,
                  ftol: float = 1e-13, gtol: float = 1e-14, first_step: float = 0.1
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Minimises B independent problems, one per row of x0 (B, P).

  fg(x, rows) returns (f (k,), grad (k, P)) for parameter rows x (k, P) that
  belong to problems `rows`. Armijo backtracking line search; memory pairs with
  non-positive curvature are skipped. Returns (x, f, status) with status 0 =
  converged (relative decrease below ftol twice in a row, gradient below gtol,
  or no decrease possible even along the steepest-descent direction),
  1 = iteration limit, 2 = non-finite objective.
  """
  x = np.array(x0, np.float64, copy=True)
  B, P = x.shape
  f, g = fg(x, np.arange(B))
  status = np.full(B, -1, np.int64)
  status[~(np.isfinite(f) & np.isfinite(g).all(1))] = 2
  S = np.zeros((B, memory, P))
  Y = np.zeros((B, memory, P))
  rho = np.zeros((B, memory))
  small = np.zeros(B, np.int64)
  for _ in range(max_iter):
    act = np.flatnonzero(status < 0)
    if act.size == 0:
      break
    ga = g[act]
    gmax = np.maximum(np.abs(ga).max(1), 1e-300)
    sa, ya, ra = S[act], Y[act], rho[act]
    sy_last = np.einsum("bp,bp->b", sa[:, -1], ya[:, -1])
    yy_last = np.einsum("bp,bp->b", ya[:, -1], ya[:, -1])
    gamma = np.where(ra[:, -1] > 0, sy_last / np.maximum(yy_last, 1e-300), first_step / gmax)
    d = -_two_loop(ga, sa, ya, ra, gamma)
    gd = np.einsum("bp,bp->b", ga, d)
    bad = ~(gd < 0) | ~np.isfinite(gd)
    if bad.any():  # memory lost positive definiteness numerically: restart from steepest descent
      rho[act[bad]] = 0.0
      d[bad] = -ga[bad] * (first_step / gmax[bad])[:, None]
      gd[bad] = np.einsum("bp,bp->b", ga[bad], d[bad])
    t = np.ones(act.size)
    x_new = np.empty((act.size, P))
    f_new = np.empty(act.size)
    g_new = np.empty((act.size, P))
    pending = np.arange(act.size)
    for _ in range(60):
      rows = act[pending]
      xt = x[rows] + t[pending, None] * d[pending]
      ft, gt = fg(xt, rows)
      finite = np.isfinite(ft) & np.isfinite(gt).all(1)
      ok = finite & (ft <= f[rows] + 1e-4 * t[pending] * gd[pending])
      done = pending[ok]
      x_new[done], f_new[done], g_new[done] = xt[ok], ft[ok], gt[ok]
      pending = pending[~ok]
      t[pending] *= np.where(finite[~ok], 0.5, 0.1)
      if pending.size == 0:
        break
    failed = np.zeros(act.size, bool)
    failed[pending] = True
    if failed.any():
      rows = act[failed]
      had_memory = (rho[rows] > 0).any(1)
      rho[rows[had_memory]] = 0.0  # retry once along steepest descent
      status[rows[~had_memory]] = 0  # no descent even along -grad: a numerical minimum
    okr = ~failed
    rows = act[okr]
    s = x_new[okr] - x[rows]
    yv = g_new[okr] - g[rows]
    sy = np.einsum("bp,bp->b", s, yv)
    keep = sy > 1e-12 * np.linalg.norm(s, axis=1) * np.linalg.norm(yv, axis=1)
    upd = rows[keep]
    if upd.size:
      S[upd] = np.roll(S[upd], -1, axis=1)
      Y[upd] = np.roll(Y[upd], -1, axis=1)
      rho[upd] = np.roll(rho[upd], -1, axis=1)
      S[upd, -1], Y[upd, -1], rho[upd, -1] = s[keep], yv[keep], 1.0 / sy[keep]
    decrease = f[rows] - f_new[okr]
    scale = np.maximum(np.maximum(np.abs(f[rows]), np.abs(f_new[okr])), 1e-300)
    small[rows] = np.where(decrease <= ftol * scale, small[rows] + 1, 0)
    x[rows], f[rows], g[rows] = x_new[okr], f_new[okr], g_new[okr]
    conv = (small[rows] >= 2) | (np.abs(g_new[okr]).max(1) <= gtol)
    status[rows[conv]] = 0
  status[status < 0] = 1
  return x, f, status


def _two_loop(g, S, Y, rho, gamma):
  m = S.shape[1]
  q = g.copy()
  alpha = np.empty((g.shape[0], m))
  for i in range(m - 1, -1, -1):
    alpha[:, i] = rho[:, i] * np.einsum("bp,bp->b", S[:, i], q)
    q -= alpha[:, i, None] * Y[:, i]
  r = gamma[:, None] * q
  for i in range(m):
    beta = rho[:, i] * np.einsum("bp,bp->b", Y[:, i], r)
    r += S[:, i] * (alpha[:, i] - beta)[:, None]
  return r


# ----------------------------------------------------------------------------
# Approach 3: parametric L(N, D) = E + A / N^alpha + B / D^beta.


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
  """Huber loss, as scipy.special.huber(delta, r)."""
  ar = np.abs(r)
  return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def init_grid() -> np.ndarray:
  """Hoffmann/Epoch start grid as rows (a, b, e, alpha, beta): 4,500 points."""
  a = b = np.arange(0.0, 30.0, 5.0)
  e = np.arange(-1.0, 1.5, 0.5)
  alpha = beta = np.arange(0.0, 2.5, 0.5)
  return np.array(list(itertools.product(a, b, e, alpha, beta)), np.float64)


def log_loss_hat(theta: np.ndarray, N: np.ndarray, D: np.ndarray) -> np.ndarray:
  """log L_hat = logsumexp(a - alpha log N, b - beta log D, e); theta = (a, b, e, alpha, beta)."""
  a, b, e, alpha, beta = np.asarray(theta, np.float64)
  u = np.stack(np.broadcast_arrays(a - alpha * np.log(N), b - beta * np.log(D), e + 0 * np.log(N)))
  m = u.max(0)
  return m + np.log(np.exp(u - m).sum(0))


def parametric_objective(theta: np.ndarray, N, D, loss, delta: float = HUBER_DELTA) -> float:
  """Sum over runs of Huber(delta) of log L - log L_hat."""
  r = np.log(np.asarray(loss, np.float64)) - log_loss_hat(theta, N, D)
  return float(huber(r, delta).sum())


def _parametric_fg(x, y, logL, W, delta):
  """Objective/gradient in centred coordinates (a', b', e, alpha, beta), x, y centred logs.

  Written with in-place operations and BLAS reductions: this is the inner loop of the
  4,500-start grid and of every bootstrap refit.
  """
  unweighted = W.shape[0] == 1 and bool(np.all(W == 1))
  X1 = np.stack([np.ones_like(x), x], 1)
  Y1 = np.stack([np.ones_like(y), y], 1)

  def fg(theta, rows):
    a, b, e, al, be = (theta[:, i, None] for i in range(5))
    u1 = al * x
    np.subtract(a, u1, out=u1)
    u2 = be * y
    np.subtract(b, u2, out=u2)
    m = np.maximum(u1, u2)
    np.maximum(m, e, out=m)
    u1 -= m
    np.exp(u1, out=u1)
    u2 -= m
    np.exp(u2, out=u2)
    u3 = e - m
    np.exp(u3, out=u3)
    s = u1 + u2
    s += u3
    r = np.log(s)
    r += m
    np.subtract(logL, r, out=r)
    psi = np.clip(r, -delta, delta)
    r -= 0.5 * psi
    r *= psi  # Huber: psi * (r - psi / 2) is r^2/2 inside [-delta, delta], linear outside
    if not unweighted:
      w = W if W.shape[0] == 1 else W[rows]
      r *= w
      psi *= w
    f = r.sum(1)
    psi /= s  # dF/d(term k) = -psi * exp(u_k) / s
    u1 *= psi
    u2 *= psi
    u3 *= psi
    g1 = u1 @ X1
    g2 = u2 @ Y1
    grad = np.stack([-g1[:, 0], -g2[:, 0], -u3.sum(1), g1[:, 1], g2[:, 1]], axis=1)
    return f, grad

  return fg


@dataclasses.dataclass(frozen=True)
class ParametricFit:
  """Approach 3 result. Parameters are None-free only when status == "ok"."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  objective: float
  n_points: int
  status: str
  message: str = ""
  # Distinct other local optima from the start grid (rows a, b, e, alpha, beta), best first:
  # extra starts for the bootstrap.
  other_optima: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 5)),
                                               repr=False)

  @property
  def theta(self) -> np.ndarray:
    return np.array([math.log(self.A), math.log(self.B), math.log(self.E), self.alpha, self.beta])

  @property
  def a(self) -> float:
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    return self.alpha / (self.alpha + self.beta)

  @property
  def G(self) -> float:
    return allocation_constants(self.A, self.B, self.alpha, self.beta)[2]

  def predict(self, N, D) -> np.ndarray:
    return self.E + self.A / np.asarray(N, np.float64) ** self.alpha + \
        self.B / np.asarray(D, np.float64) ** self.beta

  def allocation(self, C) -> tuple[np.ndarray, np.ndarray]:
    return allocation(C, self.A, self.B, self.alpha, self.beta)


def allocation_constants(A, B, alpha, beta):
  """(a, b, G) of N_opt = G (C/6)^a, D_opt = (C/6)^b / G; works elementwise."""
  A, B, alpha, beta = (np.asarray(v, np.float64) for v in (A, B, alpha, beta))
  with np.errstate(all="ignore"):
    a = beta / (alpha + beta)
    b = alpha / (alpha + beta)
    G = np.exp((np.log(alpha * A) - np.log(beta * B)) / (alpha + beta))
  return a, b, G


def allocation(C, A, B, alpha, beta):
  """Compute-optimal (N_opt, D_opt) for L = E + A/N^alpha + B/D^beta under C = 6 N D."""
  a, b, G = allocation_constants(A, B, alpha, beta)
  c6 = np.asarray(C, np.float64) / 6.0
  with np.errstate(all="ignore"):
    return G * c6 ** a, c6 ** b / G


def _theta_to_params(theta: np.ndarray) -> np.ndarray:
  """Rows (a, b, e, alpha, beta) -> rows (E, A, B, alpha, beta)."""
  with np.errstate(over="ignore"):
    return np.stack([np.exp(theta[:, 2]), np.exp(theta[:, 0]), np.exp(theta[:, 1]),
                     theta[:, 3], theta[:, 4]], axis=1)


class _Centred:
  """Centring log N, log D decouples a from alpha (and b from beta): better conditioning.

  The objective is the same function; only the coordinates the optimiser walks in differ.
  """

  def __init__(self, N, D):
    self.x = np.log(N)
    self.y = np.log(D)
    self.xm = float(self.x.mean())
    self.ym = float(self.y.mean())

  def to(self, theta):
    t = np.array(theta, np.float64, copy=True)
    t[:, 0] -= t[:, 3] * self.xm
    t[:, 1] -= t[:, 4] * self.ym
    return t

  def back(self, t):
    theta = np.array(t, np.float64, copy=True)
    theta[:, 0] += theta[:, 3] * self.xm
    theta[:, 1] += theta[:, 4] * self.ym
    return theta


def _minimise_parametric(N, D, loss, starts: np.ndarray, counts: np.ndarray | None,
                         delta: float, max_iter: int):
  """Runs every start (rows a, b, e, alpha, beta) for every resample row of counts.

  With counts (R, n) the batch is R * len(starts); returns theta (R, K, 5), f, status.
  """
  cen = _Centred(N, D)
  logL = np.log(loss)
  W = np.ones((1, len(loss))) if counts is None else np.repeat(counts, len(starts), axis=0)
  R = 1 if counts is None else counts.shape[0]
  x0 = np.tile(cen.to(starts), (R, 1))
  fg = _parametric_fg(cen.x - cen.xm, cen.y - cen.ym, logL, W.astype(np.float64), delta)
  with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
    t, f, status = lbfgs_batched(fg, x0, max_iter=max_iter)
  theta = cen.back(t)
  K = len(starts)
  return theta.reshape(R, K, 5), f.reshape(R, K), status.reshape(R, K)


def _distinct_optima(theta, f, status, limit):
  """Best-first distinct converged endpoints (a duplicate lies within 1e-3 in every coordinate)."""
  order = [i for i in np.argsort(f) if status[i] == 0 and np.isfinite(f[i])]
  # Compare E rather than e = log E: endpoints drifting towards E -> 0 are one optimum.
  key = np.array(theta, np.float64, copy=True)
  with np.errstate(over="ignore"):
    key[:, 2] = np.exp(key[:, 2])
  kept: list[int] = []
  finite = np.isfinite(_theta_to_params(theta)).all(1)
  for i in order:
    if finite[i] and all(np.abs(key[i] - key[j]).max() > 1e-3 for j in kept):
      kept.append(i)
    if len(kept) >= limit:
      break
  return kept


def fit_parametric(N, D, loss, *, delta: float = HUBER_DELTA, starts: np.ndarray | None = None,
                   max_iter: int = 1000, n_other_optima: int = 3) -> ParametricFit:
  """Approach 3: Huber-sum fit of log L from every start; the best converged one wins."""
  N, D, loss = (np.asarray(v, np.float64) for v in (N, D, loss))
  n = len(loss)
  if n < MIN_RUNS_APPROACH3:
    raise DataError(f"approach 3 needs at least {MIN_RUNS_APPROACH3} runs but got {n}; add "
                    "runs or choose other approaches with --approaches.")
  starts = init_grid() if starts is None else np.atleast_2d(np.asarray(starts, np.float64))
  theta, f, status = _minimise_parametric(N, D, loss, starts, None, delta, max_iter)
  theta, f, status = theta[0], f[0], status[0]
  kept = _distinct_optima(theta, f, status, 1 + n_other_optima)
  finite = np.isfinite(f)
  if not kept:
    return ParametricFit(*([math.nan] * 5), objective=math.nan, n_points=n,
                         status=NOT_CONVERGED,
                         message=f"none of {len(starts)} starts converged in {max_iter} "
                                 "iterations")
  best = kept[0]
  message = ""
  state = OK
  # A start still descending below the best converged objective means the optimum is not settled.
  unsettled = finite & (status == 1) & (f < f[best] * (1 - 1e-6))
  if unsettled.any():
    state = NOT_CONVERGED
    message = (f"{int(unsettled.sum())} start(s) hit the {max_iter}-iteration limit below the best "
               "converged objective")
  params = _theta_to_params(theta[best:best + 1])[0]
  if not (np.isfinite(params).all() and params[3] > 0 and params[4] > 0):
    state = NOT_CONVERGED
    message = "the optimum is degenerate (non-positive exponent or infinite coefficient)"
  return ParametricFit(*map(float, params), objective=float(f[best]), n_points=n, status=state,
                       message=message, other_optima=theta[kept[1:]])


def bootstrap_parametric(N, D, loss, fit: ParametricFit, counts: np.ndarray, *,
                         delta: float = HUBER_DELTA, max_iter: int = 1000) -> np.ndarray:
  """Refits every resample (rows of counts) from the full-data optimum and its runner-up optima.

  Returns (R, 5) rows (E, A, B, alpha, beta); NaN rows where no start converged.
  """
  N, D, loss = (np.asarray(v, np.float64) for v in (N, D, loss))
  starts = np.vstack([fit.theta[None], fit.other_optima])
  theta, f, status = _minimise_parametric(N, D, loss, starts, counts, delta, max_iter)
  f = np.where((status == 0) & np.isfinite(f), f, np.inf)
  best = f.argmin(1)
  rows = np.arange(len(best))
  out = _theta_to_params(theta[rows, best])
  out[~np.isfinite(f[rows, best])] = np.nan
  return out


# ----------------------------------------------------------------------------
# Loss-vs-compute frontier and L(C) = E + A C^-alpha.


def _curve_grid(table: RunsTable, n_grid: int = ENVELOPE_GRID_POINTS):
  """Every learning curve's loss on one log-spaced compute grid (+inf outside its range).

  The grid spans the smallest to the largest final compute: below the smallest run's
  end only partially trained (warm-up dominated) points would form the envelope. The
  grid is uniform in log C, so every stretch of log compute weighs the same in the
  frontier fit however densely the curves were evaluated there.
  """
  have = [i for i, c in enumerate(table.curves or ()) if c is not None]
  lo, hi = np.log(table.C[have].min()), np.log(table.C[have].max())
  logc = np.linspace(lo, hi, n_grid)
  grid = np.full((len(table), n_grid), np.inf)
  for i in have:
    cv = table.curves[i]
    lf = np.log(cv.flops)
    inside = (logc >= lf[0] - 1e-9) & (logc <= lf[-1] + math.log1p(CURVE_END_TOLERANCE))
    # np.interp holds the final loss beyond the last point: the run's loss at its end.
    grid[i, inside] = np.exp(np.interp(logc[inside], lf, np.log(cv.loss)))
  return np.exp(logc), grid


def _envelope(Cg, grid, table: RunsTable, counts: np.ndarray, chunk: int = 64):
  """Lower envelope per resample: loss (R, G), argmin run (R, G), valid (R, G).

  A grid point is valid when at least two distinct model sizes reach it, so that the
  envelope there is a choice between models rather than the only run available.
  """
  R, G = counts.shape[0], len(Cg)
  loss = np.empty((R, G))
  arg = np.empty((R, G), np.int64)
  valid = np.empty((R, G), bool)
  sizes, size_id = np.unique(table.N, return_inverse=True)
  covered = np.isfinite(grid)
  for s in range(0, R, chunk):
    present = counts[s:s + chunk] > 0
    masked = np.where(present[:, :, None], grid[None], np.inf)
    arg[s:s + chunk] = masked.argmin(1)
    loss[s:s + chunk] = np.take_along_axis(masked, arg[s:s + chunk, None], 1)[:, 0]
    cov = present[:, :, None] & covered[None]
    per_size = np.zeros((cov.shape[0], len(sizes), G), bool)
    for k in range(len(sizes)):
      per_size[:, k] = cov[:, size_id == k].any(1)
    valid[s:s + chunk] = per_size.sum(1) >= 2
  valid &= np.isfinite(loss)
  return loss, arg, valid


def _budget_groups(table: RunsTable):
  budgets = table.budgets
  values = np.unique(budgets)
  groups = [np.flatnonzero(budgets == v) for v in values]
  # The compute a budget stands for: the nominal value if given, else its runs' geometric mean.
  centre = values if table.budget is not None else np.array(
      [np.exp(np.log(table.C[g]).mean()) for g in groups])
  return values, groups, centre


def frontier_points(table: RunsTable, counts: np.ndarray):
  """Compute-efficient frontier per resample: (C (R, n), loss (R, n), weight (R, n)).

  With learning curves: their lower envelope on a compute grid. Otherwise: the best
  final loss of each budget (at that run's compute).
  """
  if table.has_curves:
    Cg, grid = _curve_grid(table)
    loss, _, valid = _envelope(Cg, grid, table, counts)
    C = np.broadcast_to(Cg, loss.shape)
    return C, np.where(valid, loss, 1.0), valid.astype(np.float64)
  _, groups, _ = _budget_groups(table)
  R = counts.shape[0]
  C = np.ones((R, len(groups)))
  L = np.ones((R, len(groups)))
  w = np.zeros((R, len(groups)))
  for k, g in enumerate(groups):
    masked = np.where(counts[:, g] > 0, table.loss[g][None], np.inf)
    j = masked.argmin(1)
    ok = np.isfinite(masked[np.arange(R), j])
    C[:, k] = np.where(ok, table.C[g][j], 1.0)
    L[:, k] = np.where(ok, table.loss[g][j], 1.0)
    w[:, k] = ok
  return C, L, w


def _saturating_profile(logc, L, w, alpha):
  """Least-squares (E >= 0, A) at fixed alpha for L = E + A (C/Cref)^-alpha; returns E, A, sse."""
  z = np.exp(-alpha[:, None] * logc)
  Sw, Sz, Szz = w.sum(1), (w * z).sum(1), (w * z * z).sum(1)
  SL, SzL = (w * L).sum(1), (w * z * L).sum(1)
  with np.errstate(all="ignore"):
    det = Sw * Szz - Sz * Sz
    E = (Szz * SL - Sz * SzL) / det
    A = (Sw * SzL - Sz * SL) / det
    neg = ~(E >= 0)
    E = np.where(neg, 0.0, E)
    A = np.where(neg, SzL / Szz, A)
    flat = ~(A > 0)  # no decay at this alpha: the best feasible curve is a constant
    E = np.where(flat, SL / Sw, E)
    A = np.where(flat, 0.0, A)
  sse = (w * (L - E[:, None] - A[:, None] * z) ** 2).sum(1)
  return E, A, sse


def fit_loss_vs_compute_batched(C, L, w, *, alpha_max: float = 3.0, n_grid: int = 300):
  """L(C) = E + A C^-alpha and A C^-alpha on frontier rows (R, n) with weights w.

  The saturating law is linear in (E, A) at fixed alpha, so alpha is profiled on a
  log grid and refined by golden-section search. alpha at the grid edge = not converged.
  at_bound marks E clipped to 0: the frontier does not flatten (in log-log it bends
  down), so the best saturating law degenerates into a pure power law and E is not
  estimated. curvature is the quadratic coefficient of log L in log C (> 0: flattening).
  """
  C, L, w = (np.asarray(v, np.float64) for v in (C, L, w))
  logC = np.log(C)
  with np.errstate(all="ignore"):
    cref = (w * logC).sum(1) / w.sum(1)
  logc = logC - cref[:, None]
  R = C.shape[0]
  alphas = np.geomspace(1e-3, alpha_max, n_grid)
  sse = np.stack([_saturating_profile(logc, L, w, np.full(R, al))[2] for al in alphas], 1)
  k = np.nanargmin(np.where(np.isfinite(sse), sse, np.inf), 1)
  interior = (k > 0) & (k < n_grid - 1)
  lo = alphas[np.clip(k - 1, 0, n_grid - 1)]
  hi = alphas[np.clip(k + 1, 0, n_grid - 1)]
  ratio = (math.sqrt(5) - 1) / 2
  for _ in range(60):
    m1 = hi - ratio * (hi - lo)
    m2 = lo + ratio * (hi - lo)
    f1 = _saturating_profile(logc, L, w, m1)[2]
    f2 = _saturating_profile(logc, L, w, m2)[2]
    left = f1 <= f2
    hi = np.where(left, m2, hi)
    lo = np.where(left, lo, m1)
  alpha = 0.5 * (lo + hi)
  E, A, sse_best = _saturating_profile(logc, L, w, alpha)
  with np.errstate(all="ignore"):
    A_abs = A * np.exp(alpha * cref)  # undo the reference compute: A (C/Cref)^-a = A Cref^a C^-a
    # Pure power law: ordinary least squares of log L on log C.
    lL = np.log(L)
    sw = w.sum(1)
    mx = (w * logC).sum(1) / sw
    my = (w * lL).sum(1) / sw
    slope = (w * (logC - mx[:, None]) * (lL - my[:, None])).sum(1) / \
        (w * (logC - mx[:, None]) ** 2).sum(1)
    pl_alpha = -slope
    pl_A = np.exp(my + pl_alpha * mx)
    pl_sse = (w * (lL - (my[:, None] + slope[:, None] * (logC - mx[:, None]))) ** 2).sum(1)
    curvature = _loglog_curvature(logC - mx[:, None], lL, w)
  n_eff = (w > 0).sum(1)
  ok = interior & (n_eff >= 3) & (A > 0) & np.isfinite(A_abs)
  return {"E": E, "A": A_abs, "alpha": alpha, "sse": sse_best, "ok": ok, "at_bound": ok & (E <= 0),
          "curvature": curvature,
          "pl_A": pl_A, "pl_alpha": pl_alpha, "pl_sse": pl_sse, "pl_ok": n_eff >= 2}


def _loglog_curvature(x, y, w):
  """c2 of the weighted least-squares y = c0 + c1 x + c2 x^2 per row (NaN if < 3 points)."""
  X = np.stack([np.ones_like(x), x, x * x], -1)
  M = np.einsum("rn,rni,rnj->rij", w, X, X)
  v = np.einsum("rn,rni,rn->ri", w, X, y)
  singular = ~(np.abs(np.linalg.det(M)) > 0)
  M[singular] = np.eye(3)
  c2 = np.linalg.solve(M, v[..., None])[:, 2, 0]
  return np.where(singular, np.nan, c2)


# ----------------------------------------------------------------------------
# Approaches 1 and 2: N_opt(C), D_opt(C) power laws.


def _power_law_batched(logC, logY, w):
  """Weighted OLS log Y = log G + a log C per row; returns (G, a, sse)."""
  with np.errstate(all="ignore"):
    sw = w.sum(1)
    mx = (w * logC).sum(1) / sw
    my = (w * logY).sum(1) / sw
    dx = logC - mx[:, None]
    slope = (w * dx * (logY - my[:, None])).sum(1) / (w * dx * dx).sum(1)
    inter = my - slope * mx
    sse = (w * (logY - inter[:, None] - slope[:, None] * logC) ** 2).sum(1)
  return np.exp(inter), slope, sse


def envelope_optima(table: RunsTable, counts: np.ndarray):
  """Approach 1 per resample: grid C, N_opt, D_opt (R, G) and validity along the envelope."""
  Cg, grid = _curve_grid(table)
  _, arg, valid = _envelope(Cg, grid, table, counts)
  N_opt = table.N[arg]
  D_opt = table.D[arg] * Cg[None] / table.C[arg]  # tokens seen when the run had spent Cg
  return Cg, N_opt, D_opt, valid


def isoflop_parabolas(x: np.ndarray, logL: np.ndarray, groups: Sequence[np.ndarray],
                      counts: np.ndarray, *, delta: float = HUBER_DELTA, n_iter: int = 50):
  """Robust quadratic log L = c0 + c1 u + c2 u^2 per budget (u = x - budget centre).

  Huber(delta) fitted by iteratively reweighted least squares, batched over resamples.
  Returns (coef (R, nb, 3), centre (nb,), x_opt (R, nb), logL_opt (R, nb), valid (R, nb));
  a budget is valid when it has >= 3 distinct x, opens upwards and its minimum lies
  inside the sampled x range.
  """
  R, nb = counts.shape[0], len(groups)
  coef = np.full((R, nb, 3), np.nan)
  centre = np.zeros(nb)
  x_opt = np.full((R, nb), np.nan)
  l_opt = np.full((R, nb), np.nan)
  valid = np.zeros((R, nb), bool)
  for k, g in enumerate(groups):
    xg, yg = x[g], logL[g]
    centre[k] = xg.mean()
    u = xg - centre[k]
    X = np.stack([np.ones_like(u), u, u * u], 1)
    w = counts[:, g].astype(np.float64)
    labels = np.unique(u, return_inverse=True)[1]
    distinct = np.stack([(w[:, labels == j] > 0).any(1) for j in range(labels.max() + 1)],
                        1).sum(1)
    usable = distinct >= 3
    if not usable.any():
      continue
    omega = w.copy()
    c = np.zeros((R, 3))
    for _ in range(n_iter):
      M = np.einsum("rn,ni,nj->rij", omega, X, X)
      v = np.einsum("rn,ni,n->ri", omega, X, yg)
      M[~usable] = np.eye(3)
      v[~usable] = 0.0
      c = np.linalg.solve(M, v[..., None])[..., 0]
      r = yg[None] - c @ X.T
      omega = w * np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-300))
    with np.errstate(all="ignore"):
      uo = -c[:, 1] / (2 * c[:, 2])
      lo = np.where(w > 0, u[None], np.inf).min(1)
      hi = np.where(w > 0, u[None], -np.inf).max(1)
      ok = usable & (c[:, 2] > 0) & (uo >= lo) & (uo <= hi)
    coef[:, k] = c
    x_opt[:, k] = np.where(ok, uo + centre[k], np.nan)
    with np.errstate(all="ignore"):
      l_opt[:, k] = np.where(ok, c[:, 0] - c[:, 1] ** 2 / (4 * c[:, 2]), np.nan)
    valid[:, k] = ok
  return coef, centre, x_opt, l_opt, valid


def isoflop_optima(table: RunsTable, counts: np.ndarray, *, delta: float = HUBER_DELTA):
  """Approach 2 per resample: per-budget C, N_opt, D_opt (R, nb), validity, and parabolas."""
  values, groups, Cb = _budget_groups(table)
  logL = np.log(table.loss)
  coef_n, centre_n, xn, lopt, valid_n = isoflop_parabolas(np.log(table.N), logL, groups, counts,
                                                          delta=delta)
  coef_d, centre_d, xd, _, valid_d = isoflop_parabolas(np.log(table.D), logL, groups, counts,
                                                       delta=delta)
  return {"budgets": values, "C": Cb, "N_opt": np.exp(xn), "D_opt": np.exp(xd),
          "loss_opt": np.exp(lopt), "valid": valid_n & valid_d, "coef_n": coef_n,
          "centre_n": centre_n, "coef_d": coef_d, "centre_d": centre_d, "groups": groups}


# ----------------------------------------------------------------------------
# Bootstrap summaries.


def bootstrap_counts(n: int, n_boot: int, seed: int | Sequence[int]) -> np.ndarray:
  """(n_boot, n) counts: how often each run is drawn in each resample (with replacement)."""
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(n_boot, n))
  counts = np.zeros((n_boot, n), np.int64)
  np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1)
  return counts


def summarise(value: float, samples: np.ndarray) -> dict:
  """{"value", "ci95": [lo, hi] (percentile), "se"} over the bootstrap samples.

  NaN marks a failed resample and is left out. +-inf is a resample whose prediction
  overflowed (G * C^a with a wild exponent): a real outcome beyond every finite one, so it
  stays in the percentiles, and a bound that lands on it is None (unbounded on that side).
  Dropping it would pull the bound in. se is over the finite samples.
  """
  s = np.asarray(samples, np.float64)
  s = s[~np.isnan(s)]
  finite = s[np.isfinite(s)]
  if finite.size < 2:
    return {"value": _num(value), "ci95": [None, None], "se": None}
  if finite.size == s.size:
    lo, hi = (float(v) for v in np.percentile(s, [2.5, 97.5]))
  else:
    lo, hi = (_percentile_or_none(np.sort(s), q) for q in (2.5, 97.5))
  return {"value": _num(value), "ci95": [lo, hi], "se": float(finite.std(ddof=1))}


def _percentile_or_none(sorted_s: np.ndarray, q: float) -> float | None:
  """np.percentile (linear) of sorted samples with +-inf in them: None if it touches one."""
  pos = (sorted_s.size - 1) * q / 100.0
  i, j = int(np.floor(pos)), int(np.ceil(pos))
  if not (np.isfinite(sorted_s[i]) and np.isfinite(sorted_s[j])):
    return None
  return float(np.percentile(sorted_s[i:j + 1], 100.0 * (pos - i)))


def _num(v) -> float | None:
  v = float(v)
  return v if math.isfinite(v) else None


def _covers(ci, observed) -> bool | None:
  """Whether the interval holds `observed`; a None bound is open, [None, None] unknown."""
  if ci[0] is None and ci[1] is None:
    return None
  return bool((ci[0] is None or ci[0] <= observed) and (ci[1] is None or observed <= ci[1]))


def _bootstrap_info(n_boot: int, n_failed: int, seed: int) -> dict:
  return {"n_resamples": n_boot, "n_failed": int(n_failed), "seed": seed,
          "interval": "percentile 2.5-97.5 over resamples of runs"}


# ----------------------------------------------------------------------------
# Prediction intervals for held-out runs.

MAD_TO_SD = 1.4826  # sd of a normal distribution = 1.4826 * its median absolute deviation
# Below this many residuals the MAD is degenerate rather than robust: the 3 residuals of a
# line through 3 evenly spaced budgets are proportional to (1, -2, 1), whose MAD is 0.
MIN_RESIDUALS_FOR_MAD = 10
SCATTER_METHOD = ("sigma = 1.4826 * MAD of the training fit's log residuals (root mean square "
                  "below 10 residuals), times sqrt(n / (n - p)); Student-t(n - p) noise times "
                  "sigma multiplied onto every bootstrap prediction, percentiles 2.5-97.5")


def residual_scatter(resid, n_params: int) -> dict | None:
  """Run-to-run scatter of observations around a fitted law, in log space.

  A robust scale (1.4826 * MAD about the median) so that one diverged or mis-logged run
  does not widen every interval; with fewer than MIN_RESIDUALS_FOR_MAD residuals the
  root mean square instead, as a median of so few is degenerate. Either is multiplied
  by sqrt(n / (n - p)) because residuals of a fit with p parameters understate the
  errors (the fit absorbed p degrees of freedom). Returns {"sigma_log", "n", "dof",
  "estimator"}, or None when n <= p leaves nothing to estimate from.
  """
  r = np.asarray(resid, np.float64)
  r = r[np.isfinite(r)]
  n = r.size
  dof = n - n_params
  if dof < 1:
    return None
  if n >= MIN_RESIDUALS_FOR_MAD:
    scale, estimator = MAD_TO_SD * float(np.median(np.abs(r - np.median(r)))), "1.4826 MAD"
  else:
    scale, estimator = float(np.sqrt(np.mean(r * r))), "root mean square"
  return {"sigma_log": scale * math.sqrt(n / dof), "n": int(n), "dof": int(dof),
          "estimator": estimator}


def predictive_samples(curve_samples: np.ndarray, scatter: dict | None,
                       rng: np.random.Generator) -> np.ndarray | None:
  """Bootstrap predictions of the law (R, m) -> draws of a new observation (R, m).

  Each draw is one resample's curve times exp(noise): parameter uncertainty plus the
  scatter of a single run around the law. Student-t(n - p) noise rather than normal
  because sigma itself is estimated from few residuals (the classical t interval).
  """
  if scatter is None:
    return None
  noise = scatter["sigma_log"] * rng.standard_t(scatter["dof"], size=curve_samples.shape)
  with np.errstate(all="ignore"):
    return curve_samples * np.exp(noise)


def _held_out_row(predicted: float, observed: float, curve: np.ndarray,
                  new_run: np.ndarray | None, **keys) -> dict:
  """One held-out prediction: curve CI, new-run PI, and coverage judged by the PI."""
  ci = summarise(predicted, curve)["ci95"]
  pi = summarise(predicted, new_run)["ci95"] if new_run is not None else [None, None]
  return {**keys, "observed": float(observed), "predicted": _num(predicted), "ci95": ci,
          "pi95": pi, "rel_error": (predicted - observed) / observed,
          "covered": _covers(pi, observed), "covered_ci": _covers(ci, observed)}


def _noise_rng(seed: int, stream: int) -> np.random.Generator:
  """Noise for prediction intervals: separate from the run resamples, one stream per section."""
  return np.random.default_rng([seed, 2, stream])


# ----------------------------------------------------------------------------
# Per-approach drivers that produce report sections.


def _plot_grid(C_data: np.ndarray, target: float, n: int = 48) -> np.ndarray:
  return np.geomspace(C_data.min(), max(C_data.max(), target), n)


def _saturating_state(out: dict, r: int = 0) -> str:
  if not out["ok"][r]:
    return NOT_CONVERGED
  return AT_BOUND if out["at_bound"][r] else OK


def _at_bound_message(main: dict, decades: float) -> str:
  c2 = float(main["curvature"][0])
  bend = (f"log L against log C bends down (quadratic coefficient {c2:.3g} < 0), i.e. the "
          "frontier steepens instead of flattening" if c2 < 0 else
          "the frontier shows no flattening")
  return (f"E hit its lower bound 0 over {decades:.2g} decades of compute: {bend}, so the "
          "saturating law degenerates into the pure power law and E (with A, alpha of this "
          "law) is not identified by these runs. Use the power law below, or add budgets "
          "that reach where the loss flattens.")


def _section_loss_vs_compute(table: RunsTable, counts: np.ndarray, target: float, seed: int,
                             holdout: np.ndarray | None) -> dict:
  ones = np.ones((1, len(table)), np.int64)
  Cf, Lf, wf = frontier_points(table, ones)
  n_pts = int((wf[0] > 0).sum())
  source = "learning-curve envelope" if table.has_curves else "best final loss per budget"
  if n_pts < MIN_FRONTIER_POINTS:
    raise DataError(f"the loss-vs-compute fit needs at least {MIN_FRONTIER_POINTS} frontier points "
                    f"({source}) but has {n_pts}; add runs at more compute budgets.")
  used = wf[0] > 0
  decades = float(np.log10(Cf[0][used].max() / Cf[0][used].min()))
  main = fit_loss_vs_compute_batched(Cf, Lf, wf)
  Cb, Lb, wb = frontier_points(table, counts)
  boot = fit_loss_vs_compute_batched(Cb, Lb, wb)
  bad = ~boot["ok"]
  for key in ("E", "A", "alpha"):
    boot[key] = np.where(bad, np.nan, boot[key])
  grid = _plot_grid(table.C, target)
  pred = lambda E, A, al, C: E[:, None] + A[:, None] * C[None] ** -al[:, None]
  with np.errstate(all="ignore"):
    band = pred(boot["E"], boot["A"], boot["alpha"], grid)
    at_target = pred(boot["E"], boot["A"], boot["alpha"], np.array([target]))[:, 0]
    pl_band = boot["pl_A"][:, None] * grid[None] ** -boot["pl_alpha"][:, None]
  state = _saturating_state(main)
  sat_ok = state == OK
  E, A, alpha = (float(main[k][0]) for k in ("E", "A", "alpha"))
  saturating = {
      "law": "L(C) = E + A * C^-alpha",
      "status": state,
      "objective": {"sse": _num(main["sse"][0]) if sat_ok else None},
      "params": ({"E": summarise(E, boot["E"]), "A": summarise(A, boot["A"]),
                  "alpha": summarise(alpha, boot["alpha"])} if sat_ok else None),
      "prediction": ({"target_flops": target,
                      "loss": summarise(E + A * target ** -alpha, at_target)}
                     if sat_ok else None),
  }
  if state == AT_BOUND:
    saturating["message"] = _at_bound_message(main, decades)
    # Kept for diagnosis only; render_markdown and the plots do not present them.
    saturating["boundary_fit"] = {"E": E, "A": A, "alpha": alpha}
  elif state == NOT_CONVERGED:
    saturating["message"] = ("the saturating fit did not converge (alpha ran to the edge of "
                             "[0.001, 3] or the fit has no decay); no parameters reported")
  info = _bootstrap_info(counts.shape[0], int(bad.sum()), seed)
  info["n_at_bound"] = int(boot["at_bound"].sum())
  section = {
      # The pure power law always fits, so the section has a usable result; the saturating
      # law's own status says whether E is estimated.
      "status": OK,
      "frontier": source,
      "n_points": n_pts,
      "compute_decades": decades,
      "loglog_curvature": _num(main["curvature"][0]),
      "saturating": saturating,
      "power_law": {
          "law": "L(C) = A * C^-alpha",
          "status": OK,
          "objective": {"sse_log": _num(main["pl_sse"][0])},
          "params": {"A": summarise(main["pl_A"][0], boot["pl_A"]),
                     "alpha": summarise(main["pl_alpha"][0], boot["pl_alpha"])},
      },
      "bootstrap": info,
      "plot": {"frontier_C": Cf[0][used].tolist(), "frontier_loss": Lf[0][used].tolist(),
               "C": grid.tolist(),
               "fit": (E + A * grid ** -alpha).tolist() if sat_ok else None,
               "lo": np.nanpercentile(band, 2.5, 0).tolist() if sat_ok else None,
               "hi": np.nanpercentile(band, 97.5, 0).tolist() if sat_ok else None,
               "power_law_fit": (main["pl_A"][0] * grid ** -main["pl_alpha"][0]).tolist(),
               "power_law_lo": np.nanpercentile(pl_band, 2.5, 0).tolist(),
               "power_law_hi": np.nanpercentile(pl_band, 97.5, 0).tolist()},
  }
  if state != OK:
    section["message"] = saturating["message"]
  section["extrapolation"] = _extrapolate_loss_vs_compute(table, holdout, counts, seed)
  return section


def _holdout_mask(table: RunsTable, holdout_budgets: int) -> np.ndarray | None:
  if holdout_budgets <= 0:
    return None
  values = np.unique(table.budgets)
  if len(values) <= holdout_budgets:
    return None
  return np.isin(table.budgets, values[-holdout_budgets:])


def _skip(reason: str) -> dict:
  return {"status": SKIPPED, "reason": reason}


def _train_counts(n_boot: int, train: np.ndarray, seed: int) -> np.ndarray:
  """Resamples of the training runs only, from a stream separate from the main resamples."""
  return bootstrap_counts(int(train.sum()), n_boot, [seed, 1])


def _extrapolate_loss_vs_compute(table, holdout, counts, seed) -> dict:
  """Predicts each held-out budget's best final loss from the frontier without it.

  Uses the saturating law when its training fit is interior, else the pure power law
  (the saturating law's E = 0 limit, fitted in log space), and says which.
  """
  if holdout is None:
    return _skip("needs --holdout_budgets >= 1 and more budgets than that")
  train = table.subset(~holdout)
  test = table.subset(holdout)
  ones = np.ones((1, len(train)), np.int64)
  Cf, Lf, wf = frontier_points(train, ones)
  if (wf[0] > 0).sum() < MIN_FRONTIER_POINTS:
    return _skip(f"fewer than {MIN_FRONTIER_POINTS} frontier points remain without the held-out "
                 "budgets")
  main = fit_loss_vs_compute_batched(Cf, Lf, wf)
  train_counts = _train_counts(counts.shape[0], ~holdout, seed)
  boot = fit_loss_vs_compute_batched(*frontier_points(train, train_counts))
  state = _saturating_state(main)
  used = wf[0] > 0
  if state == OK:
    law = "L(C) = E + A * C^-alpha"
    E, A, al = (float(main[k][0]) for k in ("E", "A", "alpha"))
    curve = lambda C: E + A * C ** -al
    ok = boot["ok"]
    boot_curve = lambda C: np.where(ok, boot["E"] + boot["A"] * C ** -boot["alpha"], np.nan)
    n_params = 3
  else:
    law = "L(C) = A * C^-alpha (the saturating fit " + (
        "has E at its bound 0)" if state == AT_BOUND else "did not converge)")
    A, al = float(main["pl_A"][0]), float(main["pl_alpha"][0])
    curve = lambda C: A * C ** -al
    boot_curve = lambda C: np.where(boot["pl_ok"], boot["pl_A"] * C ** -boot["pl_alpha"], np.nan)
    n_params = 2
  with np.errstate(all="ignore"):
    scatter = residual_scatter(np.log(Lf[0][used]) - np.log(curve(Cf[0][used])), n_params)
  rng = _noise_rng(seed, 0)
  rows = []
  _, groups, _ = _budget_groups(test)
  for g in groups:
    j = g[np.argmin(test.loss[g])]
    C, obs = float(test.C[j]), float(test.loss[j])
    with np.errstate(all="ignore"):
      samples = boot_curve(C)
    rows.append(_held_out_row(curve(C), obs, samples, predictive_samples(samples, scatter, rng),
                              budget=float(test.budgets[j]), C=C))
  out = _extrapolation_summary(rows, "best final loss of each held-out budget", test, scatter)
  out["law"] = law
  return out


def _extrapolation_summary(rows, what, test, scatter) -> dict:
  errs = np.array([abs(r["rel_error"]) for r in rows])

  def rate(key):
    judged = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(judged)) if judged else None

  out = {"status": OK, "held_out_budgets": sorted({float(b) for b in np.unique(test.budgets)}),
         "n_held_out_runs": len(test), "predicts": what,
         "mean_abs_rel_error": float(errs.mean()), "max_abs_rel_error": float(errs.max()),
         "coverage": rate("covered"), "coverage_ci": rate("covered_ci"),
         "interval": "coverage counts held-out values inside pi95, the 95% prediction "
                     "interval for a new run; ci95 is the fitted curve's interval only",
         "pi_method": SCATTER_METHOD,
         "scatter": scatter, "points": rows}
  if scatter is None:
    out["scatter_reason"] = ("too few training points to estimate the run-to-run scatter "
                             "(need more points than the law has parameters)")
  return out


def _section_approach3(table, counts, target, seed, holdout, delta, starts) -> dict:
  fit = fit_parametric(table.N, table.D, table.loss, delta=delta, starts=starts)
  base = {"law": "L(N, D) = E + A / N^alpha + B / D^beta",
          "fit": "sum of Huber(delta=%g) of log L - log L_hat; L-BFGS from 4,500 starts" % delta,
          "status": fit.status, "n_points": fit.n_points}
  if fit.status != OK:
    base["message"] = f"approach 3 did not converge: {fit.message}; no parameters reported"
    return base
  boot = bootstrap_parametric(table.N, table.D, table.loss, fit, counts, delta=delta)
  E, A, B, al, be = boot.T
  a, b, G = allocation_constants(A, B, al, be)
  n_t, d_t = allocation(target, A, B, al, be)
  with np.errstate(all="ignore"):
    l_t = E + A / n_t ** al + B / d_t ** be
  N_t, D_t = fit.allocation(target)
  params = {"E": summarise(fit.E, E), "A": summarise(fit.A, A), "B": summarise(fit.B, B),
            "alpha": summarise(fit.alpha, al), "beta": summarise(fit.beta, be),
            "a": summarise(fit.a, a), "b": summarise(fit.b, b), "G": summarise(fit.G, G)}
  grid = _plot_grid(table.C, target)
  ng, dg = allocation(grid[None], A[:, None], B[:, None], al[:, None], be[:, None])
  nf, df = fit.allocation(grid)
  resid = np.log(table.loss) - np.log(fit.predict(table.N, table.D))
  base.update({
      "objective": {"huber_sum": fit.objective},
      "params": params,
      "allocation": "N_opt = G (C/6)^a, D_opt = (C/6)^b / G",
      "prediction": {"target_flops": target,
                     "loss": summarise(fit.predict(N_t, D_t), l_t),
                     "N_opt": summarise(N_t, n_t), "D_opt": summarise(D_t, d_t)},
      "bootstrap": _bootstrap_info(counts.shape[0], int(np.isnan(E).sum()), seed),
      "plot": {"C": grid.tolist(), "N_opt": nf.tolist(), "D_opt": df.tolist(),
               "N_lo": np.nanpercentile(ng, 2.5, 0).tolist(),
               "N_hi": np.nanpercentile(ng, 97.5, 0).tolist(),
               "D_lo": np.nanpercentile(dg, 2.5, 0).tolist(),
               "D_hi": np.nanpercentile(dg, 97.5, 0).tolist(),
               "residuals": resid.tolist()},
  })
  base["extrapolation"] = _extrapolate_approach3(table, holdout, counts, seed, delta, starts)
  return base


def _extrapolate_approach3(table, holdout, counts, seed, delta, starts) -> dict:
  if holdout is None:
    return _skip("needs --holdout_budgets >= 1 and more budgets than that")
  train, test = table.subset(~holdout), table.subset(holdout)
  if len(train) < MIN_RUNS_APPROACH3:
    return _skip(f"fewer than {MIN_RUNS_APPROACH3} runs remain without the held-out budgets")
  fit = fit_parametric(train.N, train.D, train.loss, delta=delta, starts=starts)
  if fit.status != OK:
    return {"status": NOT_CONVERGED, "reason": f"the fit without the held-out budgets did not "
            f"converge: {fit.message}"}
  train_counts = _train_counts(counts.shape[0], ~holdout, seed)
  boot = bootstrap_parametric(train.N, train.D, train.loss, fit, train_counts, delta=delta)
  E, A, B, al, be = (c[:, None] for c in boot.T)
  with np.errstate(all="ignore"):
    samples = E + A / test.N[None] ** al + B / test.D[None] ** be
  pred = fit.predict(test.N, test.D)
  # Scatter from the same Huber fit's log residuals on the training runs (p = 5).
  scatter = residual_scatter(np.log(train.loss) - np.log(fit.predict(train.N, train.D)),
                             len(PARAM_NAMES))
  new_run = predictive_samples(samples, scatter, _noise_rng(seed, 3))
  rows = []
  for j, rid in enumerate(test.ids()):
    rows.append(_held_out_row(pred[j], test.loss[j], samples[:, j],
                              None if new_run is None else new_run[:, j], run_id=rid,
                              budget=float(test.budgets[j]), N=float(test.N[j]),
                              D=float(test.D[j])))
  out = _extrapolation_summary(rows, "final loss of every held-out run", test, scatter)
  out["fit_without_held_out"] = {k: getattr(fit, k) for k in PARAM_NAMES}
  return out


def _optima_section(name, C, N_opt, D_opt, valid, counts_rows, target, seed, min_points,
                    what) -> tuple[dict, dict]:
  """Power laws N_opt = G C^a, D_opt = H C^b from per-resample optima (row 0 = full data)."""
  logC = np.log(np.broadcast_to(C, N_opt.shape))
  w = valid.astype(np.float64)
  with np.errstate(all="ignore"):
    G, a, sse_n = _power_law_batched(logC, np.log(np.where(valid, N_opt, 1.0)), w)
    H, b, sse_d = _power_law_batched(logC, np.log(np.where(valid, D_opt, 1.0)), w)
  n_valid = valid.sum(1)
  ok = (n_valid >= 2) & np.isfinite(a) & np.isfinite(b)
  n_main = int(n_valid[0])
  if n_main < min_points:
    raise DataError(f"{name} needs at least {min_points} {what} but has {n_main}; add runs "
                    "or choose other approaches with --approaches.")
  bs = slice(1, None)
  Gb, ab, Hb, bb = (np.where(ok[bs], v[bs], np.nan) for v in (G, a, H, b))
  # A wild resample's exponent overflows to inf (kept, see summarise); times G = 0 it is
  # NaN, a failed resample.
  with np.errstate(over="ignore", invalid="ignore"):
    N_at, D_at = G[0] * target ** a[0], H[0] * target ** b[0]
    N_at_b, D_at_b = Gb * target ** ab, Hb * target ** bb
  section = {
      "status": OK, "n_points": n_main,
      "law": "N_opt = G * C^a, D_opt = H * C^b",
      "objective": {"sse_log_N": float(sse_n[0]), "sse_log_D": float(sse_d[0])},
      "params": {"G": summarise(G[0], Gb), "a": summarise(a[0], ab),
                 "H": summarise(H[0], Hb), "b": summarise(b[0], bb)},
      "prediction": {"target_flops": target,
                     "N_opt": summarise(N_at, N_at_b), "D_opt": summarise(D_at, D_at_b)},
      "bootstrap": _bootstrap_info(counts_rows, int((~ok[bs]).sum()), seed),
  }
  return section, {"G": Gb, "a": ab, "H": Hb, "b": bb}


def _section_approach1(table, counts, target, seed) -> dict:
  allc = np.vstack([np.ones((1, len(table)), np.int64), counts])
  Cg, N_opt, D_opt, valid = envelope_optima(table, allc)
  section, boot = _optima_section("approach 1", Cg, N_opt, D_opt, valid, counts.shape[0], target,
                                  seed, MIN_ENVELOPE_POINTS, "envelope points (compute values "
                                  "reached by >= 2 model sizes)")
  section["source"] = "lower envelope of all learning curves"
  section["plot"] = _allocation_band(section, boot, table, target)
  v = valid[0]
  section["plot"].update({"points_C": Cg[v].tolist(), "points_N": N_opt[0][v].tolist(),
                          "points_D": D_opt[0][v].tolist()})
  section["extrapolation"] = _skip("not applicable: the envelope is not grouped by budget")
  return section


def _allocation_band(section, boot, table, target) -> dict:
  grid = _plot_grid(table.C, target)
  p = section["params"]
  with np.errstate(all="ignore"):
    ng = boot["G"][:, None] * grid[None] ** boot["a"][:, None]
    dg = boot["H"][:, None] * grid[None] ** boot["b"][:, None]
  return {"C": grid.tolist(),
          "N_opt": (p["G"]["value"] * grid ** p["a"]["value"]).tolist(),
          "D_opt": (p["H"]["value"] * grid ** p["b"]["value"]).tolist(),
          "N_lo": np.nanpercentile(ng, 2.5, 0).tolist(),
          "N_hi": np.nanpercentile(ng, 97.5, 0).tolist(),
          "D_lo": np.nanpercentile(dg, 2.5, 0).tolist(),
          "D_hi": np.nanpercentile(dg, 97.5, 0).tolist()}


def _section_approach2(table, counts, target, seed, holdout, delta) -> dict:
  allc = np.vstack([np.ones((1, len(table)), np.int64), counts])
  iso = isoflop_optima(table, allc, delta=delta)
  section, boot = _optima_section("approach 2", iso["C"], iso["N_opt"], iso["D_opt"],
                                  iso["valid"], counts.shape[0], target, seed,
                                  MIN_BUDGETS_APPROACH2, "IsoFLOP budgets with a valid parabola "
                                  "(>= 3 model sizes, minimum inside the sampled range)")
  section["source"] = ("IsoFLOP profiles: robust (Huber delta=%g) quadratic of log L in log N "
                       "(and in log D) per budget" % delta)
  section["plot"] = _allocation_band(section, boot, table, target)
  v = iso["valid"][0]
  section["plot"].update({"points_C": iso["C"][v].tolist(), "points_N": iso["N_opt"][0][v].tolist(),
                          "points_D": iso["D_opt"][0][v].tolist()})
  section["budgets"] = [
      {"budget": float(iso["budgets"][k]), "C": float(iso["C"][k]),
       "n_runs": int(len(iso["groups"][k])), "valid": bool(v[k]),
       "N_opt": _num(iso["N_opt"][0, k]), "D_opt": _num(iso["D_opt"][0, k]),
       "loss_opt": _num(iso["loss_opt"][0, k]),
       "parabola_log_N": {"centre": float(iso["centre_n"][k]),
                          "coef": [_num(c) for c in iso["coef_n"][0, k]]}}
      for k in range(len(iso["budgets"]))]
  section["extrapolation"] = _extrapolate_approach2(table, holdout, counts, iso, seed, delta)
  return section


def _extrapolate_approach2(table, holdout, counts, iso_full, seed, delta) -> dict:
  if holdout is None:
    return _skip("needs --holdout_budgets >= 1 and more budgets than that")
  train = table.subset(~holdout)
  tc = _train_counts(counts.shape[0], ~holdout, seed)
  allc = np.vstack([np.ones((1, len(train)), np.int64), tc])
  iso = isoflop_optima(train, allc, delta=delta)
  v = iso["valid"]
  if v[0].sum() < MIN_BUDGETS_APPROACH2:
    return _skip(f"fewer than {MIN_BUDGETS_APPROACH2} valid budgets remain without the held-out "
                 "ones")
  logC = np.log(np.broadcast_to(iso["C"], v.shape))
  logN = np.log(np.where(v, iso["N_opt"], 1.0))
  G, a, _ = _power_law_batched(logC, logN, v.astype(float))
  # Scatter of the training budgets' N_opt around N_opt = G C^a (p = 2).
  scatter = residual_scatter((logN[0] - np.log(G[0]) - a[0] * logC[0])[v[0]], 2)
  rng = _noise_rng(seed, 2)
  rows = []
  held = np.unique(table.budgets[holdout])
  for k, bval in enumerate(iso_full["budgets"]):
    if bval not in held:
      continue
    if not iso_full["valid"][0, k]:
      rows.append({"budget": float(bval), "status": "no valid parabola for this budget"})
      continue
    C, obs = float(iso_full["C"][k]), float(iso_full["N_opt"][0, k])
    with np.errstate(all="ignore"):
      samples = np.where(v[1:].sum(1) >= 2, G[1:] * C ** a[1:], np.nan)
    new_run = predictive_samples(samples[:, None], scatter, rng)
    rows.append(_held_out_row(G[0] * C ** a[0], obs, samples,
                              None if new_run is None else new_run[:, 0], budget=float(bval),
                              C=C))
  scored = [r for r in rows if "observed" in r]
  if not scored:
    return _skip("no held-out budget has a valid IsoFLOP parabola to compare with")
  out = _extrapolation_summary(scored, "N_opt from each held-out budget's own parabola",
                               table.subset(holdout), scatter)
  out["points"] = rows
  return out


# ----------------------------------------------------------------------------
# Everything at once.


def fit_all(table: RunsTable, *, approaches: Iterable[int] | None = None, n_boot: int = 1000,
            seed: int = 0, holdout_budgets: int = 1, target_flops: float | None = None,
            delta: float = HUBER_DELTA, parametric_starts: np.ndarray | None = None) -> dict:
  """Fits L(C) and Approaches 1-3 with bootstrap intervals; returns the JSON-able report.

  approaches=None runs every approach the data allow (Approach 1 needs learning curves)
  and records why others were skipped; an explicit list makes each one required, so
  missing inputs raise DataError. target_flops defaults to the largest run's compute.
  parametric_starts overrides Approach 3's 4,500-point start grid (rows a, b, e, alpha, beta).
  """
  explicit = approaches is not None
  wanted = sorted(set(approaches)) if explicit else [1, 2, 3]
  for k in wanted:
    if k not in (1, 2, 3):
      raise ConfigError(f"approach {k!r} does not exist; choose from 1, 2, 3.")
  if n_boot < 2:
    raise ConfigError(f"bootstrap={n_boot} is too small for intervals; use 1000 or more.")
  if holdout_budgets < 0:
    raise ConfigError(f"holdout_budgets={holdout_budgets} is negative; use 0 (off) or more.")
  n_runs = len(table)
  table, replicas = table.mean_over_replicas()
  target = float(target_flops) if target_flops is not None else float(table.C.max())
  if not (target > 0 and math.isfinite(target)):
    raise ConfigError(f"target_flops={target_flops!r} must be a positive number.")
  counts = bootstrap_counts(len(table), n_boot, seed)
  holdout = _holdout_mask(table, holdout_budgets)
  report: dict[str, Any] = {
      "n_runs": n_runs, "n_points": len(table), "has_curves": table.has_curves,
      "budgets_from": "given" if table.budget is not None else "C rounded to 0.1 dex",
      "n_budgets": int(len(np.unique(table.budgets))),
      "target_flops": target,
      "conventions": {"compute": "C = 6 N D", "log": "natural",
                      "approach3_allocation": "N_opt = G (C/6)^a, D_opt = (C/6)^b / G",
                      "approach1_2_allocation": "N_opt = G C^a, D_opt = H C^b"},
      "holdout_budgets": holdout_budgets,
  }
  if replicas:
    report["replicas"] = replicas
  errors: list[str] = []

  def attempt(key, required, fn):
    try:
      report[key] = fn()
    except DataError as e:
      if required:
        raise
      errors.append(str(e))
      report[key] = _skip(str(e))

  attempt("loss_vs_compute", False,
          lambda: _section_loss_vs_compute(table, counts, target, seed, holdout))
  if 1 in wanted:
    if not table.has_curves:
      if explicit:
        raise DataError("approach 1 needs learning curves but the runs have none; drop 1 from "
                        "--approaches or give runs with curves.")
      report["approach1"] = _skip("no learning curves in the runs")
    else:
      attempt("approach1", explicit, lambda: _section_approach1(table, counts, target, seed))
  if 2 in wanted:
    attempt("approach2", explicit,
            lambda: _section_approach2(table, counts, target, seed, holdout, delta))
  if 3 in wanted:
    attempt("approach3", explicit,
            lambda: _section_approach3(table, counts, target, seed, holdout, delta,
                                       parametric_starts))
  ran = [k for k in ("loss_vs_compute", "approach1", "approach2", "approach3")
         if k in report and report[k].get("status") != SKIPPED]
  if not ran:
    raise DataError(f"no fit can run on these {len(table)} runs: {errors[0] if errors else ''}")
  return report
