"""Run a scaling sweep end to end: plan -> train (resumably) -> fit -> plot.

  python -m lmjax.sweep --config=experiments/configs/sweeps/cpu_default.py --workdir=DIR

DIR/manifest.sqlite records every run; DIR/runs/<id>/ holds each run's checkpoints and
metrics; DIR/fit/ gets report.json, report.md and the plots. Running the same command again
skips finished runs, resumes interrupted ones from their checkpoints and retries failed ones
up to sweep.max_attempts. SIGTERM / SIGINT checkpoint the runs in flight and exit with
status 75 (requeue). `--worker` processes (sweep.workers > 0) drain the same manifest.
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before jax loads: maybe re-execute on mimalloc
  from lmjax.allocator import maybe_reexec
  maybe_reexec()

import collections
import functools
import json
import math
import os
import subprocess
import sys
import time
import traceback

from absl import flags, logging

from lmjax import config as config_lib
from lmjax.config import Config
from lmjax.errors import ConfigError, DataError, require
from lmjax.metrics import read_metrics
from lmjax.preemption import EXIT_REQUEUE, Preempted, StopFlag, handle_signals
from lmjax.scaling import manifest as manifest_lib
from lmjax.scaling.plan import SweepConfig, plan

SWEEP_JSON = "sweep.json"


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA cache: runs of the same shape (and re-runs of a sweep) skip compiling.
  CPU programs compile fast, so the default time threshold would ignore them all."""
  if not path:
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


HEARTBEAT_S = 30.0  # how often a training run tells the manifest it is alive


def _results(summary: dict, run_dir: str) -> dict:
  """The manifest's result columns for one finished training run."""
  evals = [r["eval_loss"] for r in read_metrics(run_dir) if r.get("eval_loss") is not None]
  # A group member that diverged while resuming alone has no totals: those stay NULL.
  return {"achieved_flops": summary.get("flops"), "tokens": summary.get("tokens"),
          "final_eval_loss": summary["final_eval_loss"],
          "best_eval_loss": min(evals) if evals else None, "wall_s": summary.get("wall_s"),
          "compile_s": summary.get("compile_s"), "malloc": summary.get("malloc"),
          "software": summary.get("software"),
          "metrics_path": os.path.join(run_dir, "metrics.jsonl")}


def run_one(row: dict, workdir: str, stop: StopFlag | None, on_step=None) -> dict:
  """Trains one planned run (resuming if it has a checkpoint); returns manifest results."""
  from lmjax.train import train  # jax is imported only by processes that train
  cfg = config_lib.from_dict(Config, json.loads(row["config"]))
  run_dir = os.path.join(workdir, "runs", row["id"])
  return _results(train(cfg, run_dir, stop=stop, on_step=on_step), run_dir)


def run_group(rows: list[dict], workdir: str, stop: StopFlag | None, on_step=None) -> list[dict]:
  """Trains same-group-key runs as one lmjax.multirun group; one summary per row, with
  "status" (done | diverged) and "reason" besides the manifest results."""
  from lmjax.multirun import train_group
  cfgs = [config_lib.from_dict(Config, json.loads(r["config"])) for r in rows]
  run_dirs = [os.path.join(workdir, "runs", r["id"]) for r in rows]
  summaries = train_group(cfgs, run_dirs, stop=stop, on_step=on_step)
  return [dict(_results(s, d), status=s.get("status", "done"), reason=s.get("reason"))
          for s, d in zip(summaries, run_dirs)]


def _row_keys(manifest: manifest_lib.Manifest, ids: list[str], sweep: SweepConfig
              ) -> tuple[dict[str, str] | None, dict[str, str] | None]:
  """Each run's lmjax.multirun.group_key (where runs may group) and lmjax.train.program_key
  (where sweep workers share out model sizes), from one parse of the configs."""
  if sweep.group_size <= 1 and not sweep.workers:
    return None, None
  from lmjax.multirun import group_key
  from lmjax.train import program_key
  cfgs = {r["id"]: config_lib.from_dict(Config, json.loads(r["config"]))
          for r in manifest.rows(ids)}
  return ({i: group_key(c) for i, c in cfgs.items()} if sweep.group_size > 1 else None,
          {i: program_key(c) for i, c in cfgs.items()} if sweep.workers else None)


def _compile_key(members: int, program_key: str) -> str:
  """The manifest's `compiles` key of a group of `members` runs (1: a lone run)."""
  return f"{members}|{program_key}"


def _program_of(compile_key: str) -> str:
  """The program_key inside a _compile_key (the model size, whatever the group size)."""
  return compile_key.partition("|")[2]


def _claim_group(manifest, ids, sweep: SweepConfig, keys: dict[str, str] | None,
                 program_keys: dict[str, str] | None = None) -> list[dict]:
  """The next runnable run plus up to group_size - 1 more runnable runs of its group key.

  With `program_keys` (sweep workers), the next runnable run whose programs no other live
  worker holds comes first: each worker then trains the sizes it compiled (ahead or for an
  earlier budget) instead of compiling again what the other has (the persistent cache
  shares only finished programs, and none with oneDNN dots)."""
  claim = functools.partial(manifest.claim, max_attempts=sweep.max_attempts,
                            stale_after_s=sweep.stale_after_s)
  row = None
  if program_keys:
    theirs = {_program_of(k) for k in manifest.compiles_elsewhere()}
    row = claim([i for i in ids if program_keys[i] not in theirs])
  row = row or claim(ids)
  if row is None:
    return []
  rows = [row]
  if keys:
    mates = [i for i in ids if i != row["id"] and keys[i] == keys[row["id"]]]
    while len(rows) < sweep.group_size and mates:
      more = claim(mates)
      if more is None:
        break
      rows.append(more)
      mates.remove(more["id"])
  if program_keys:
    manifest.record_compile(_compile_key(len(rows), program_keys[row["id"]]))
  return rows


def drain(manifest: manifest_lib.Manifest, ids: list[str], sweep: SweepConfig, workdir: str,
          stop: StopFlag) -> None:
  """Claims and trains runs (in groups where they share a group key) until none is left
  (or a stop is requested). With sweep.compile_ahead, once a run trains, the next model
  size's (or group's) programs compile in a background thread (lmjax.train.CompileAhead)."""
  from lmjax.train import CompileAhead  # imports jax: only processes that train get here
  with CompileAhead() as ahead:
    _drain(manifest, ids, sweep, workdir, stop, ahead if sweep.compile_ahead else None)
  if ahead.compiled:
    _say(f"compiled {ahead.compiled} model size(s) or group(s) ahead of their runs, "
         f"{ahead.seconds:.1f}s in the background")


def _drain(manifest, ids, sweep, workdir, stop, ahead) -> None:
  from lmjax.train import Diverged
  keys, program_keys = _row_keys(manifest, ids, sweep)
  judged: set[str] = set()  # rows already offered to `ahead`
  while not stop:
    rows = _claim_group(manifest, ids, sweep, keys, program_keys)
    if not rows:
      return
    rids = [r["id"] for r in rows]
    for row in rows:
      logging.info("run %s (budget %.3g, N %d): attempt %d", row["id"], row["budget"],
                   row["n_params"], row["attempts"])
    what = (f"training {rids[0]}" if len(rows) == 1 else
            f"training {len(rows)} runs as one group ({', '.join(rids)})")
    _say(f"[{_progress(manifest, ids)}] {what}: budget {rows[0]['budget']:.3g} FLOPs, "
         f"N={rows[0]['n_params']:,}, D={rows[0]['planned_tokens']:,.0f} tokens")
    last_beat, ahead_due = time.time(), ahead is not None

    def heartbeat(*_):  # live runs must not look abandoned
      nonlocal last_beat, ahead_due
      if ahead_due:  # the first record: this run's programs are compiled and it trains
        ahead_due = False
        _compile_next(ahead, manifest, ids, keys, rids, judged, sweep)
      if time.time() - last_beat > HEARTBEAT_S:
        for rid in rids:
          manifest.heartbeat(rid)
        last_beat = time.time()

    try:
      if len(rows) == 1:
        outcomes = [dict(run_one(rows[0], workdir, stop, on_step=heartbeat), status="done")]
      else:
        outcomes = run_group(rows, workdir, stop, on_step=heartbeat)
    except Preempted:
      for rid in rids:
        manifest.release(rid)
      raise
    except Diverged as e:  # a lone run (a group reports divergence per member); not retried
      _say(f"run {rids[0]} diverged: {e}")
      manifest.finish(rids[0], status="diverged", reason=str(e))
      continue
    except (Exception, MemoryError) as e:  # noqa: BLE001 - one run's crash must not end the sweep
      reason = f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]
      logging.error("run(s) %s failed: %s\n%s", rids, reason, traceback.format_exc())
      for row in rows:
        _say(f"run {row['id']} failed (attempt {row['attempts']}/{sweep.max_attempts}): "
             f"{reason}")
        manifest.finish(row["id"], status="failed", reason=reason)
      continue
    for rid, results in zip(rids, outcomes):
      _finish(manifest, rid, results)


def _compile_next(ahead, manifest: manifest_lib.Manifest, ids: list[str],
                  keys: dict[str, str] | None, training: list[str], judged: set[str],
                  sweep: SweepConfig) -> None:
  """Queues the programs of the next run, or group of runs, that this process would claim
  (a failed run due a retry included) and whose programs are not built yet. A speed-up
  only: it never fails the run.

  Each row is offered once per sweep process (`judged`): a row is parsed and keyed in
  ~4 ms, and this runs on the training thread at every run's first record, so rescanning
  rows whose programs were built would cost a long sweep O(runs^2) of that. (A row whose
  programs have since left lmjax.train's 16-entry cache then compiles in its own run.)
  """
  from lmjax.multirun import compile_group_ahead
  from lmjax.train import program_key
  try:
    nexts = [r for r in manifest.runnable(ids, max_attempts=sweep.max_attempts,
                                          stale_after_s=sweep.stale_after_s)
             if r["id"] not in training]
    for row in nexts:
      if row["id"] in judged:
        continue
      # _claim_group's pick: this row and its first runnable mates, in sweep order.
      rows = ([r for r in nexts if keys[r["id"]] == keys[row["id"]]][:sweep.group_size]
              if keys else [row])
      cfgs = [config_lib.from_dict(Config, json.loads(r["config"])) for r in rows]
      # Workers look ahead at the same rows: the first takes these programs, and the
      # others try the next size (and claim these runs last: _claim_group).
      if not manifest.claim_compile(_compile_key(len(cfgs), program_key(cfgs[0]))):
        continue
      judged.update(r["id"] for r in rows)
      queued = ahead.submit(cfgs[0]) if len(cfgs) == 1 else compile_group_ahead(ahead, cfgs)
      if queued:
        return
  except Exception as e:  # noqa: BLE001 - e.g. a busy manifest: the runs compile as usual
    logging.warning("not compiling ahead: %s", e)


def _finish(manifest: manifest_lib.Manifest, rid: str, outcome: dict) -> None:
  status, reason = outcome.pop("status"), outcome.pop("reason", None)
  loss = outcome["final_eval_loss"]
  if status == "diverged":
    _say(f"run {rid} diverged: {reason}")
    manifest.finish(rid, status="diverged", reason=reason, **outcome)
  elif loss is None or not math.isfinite(loss):
    manifest.finish(rid, status="diverged", reason=f"final eval loss {loss}", **outcome)
  else:
    manifest.finish(rid, status="done", **outcome)
    _say(f"run {rid} done: eval loss {loss:.4f} in {outcome['wall_s']:.1f}s "
         f"(compile {outcome['compile_s'] or 0:.1f}s)")


def _progress(manifest, ids) -> str:
  c = manifest.counts(ids)
  return f"{c['done']}/{len(ids)} done"


def _say(message: str) -> None:
  print(f"lmjax.sweep: {message}", file=sys.stderr, flush=True)


def core_shares(cores: list[int], k: int) -> list[list[int]]:
  """k disjoint, contiguous shares of `cores`, all of one size, so that every worker's
  XLA:CPU pools have as many threads and its runs round alike (lmjax.provenance): with 3
  cores and 2 workers the third core stays idle. With fewer cores than workers, worker i
  gets core i mod len(cores)."""
  cores = sorted(cores)
  if len(cores) < k:
    return [[cores[i % len(cores)]] for i in range(k)]
  size = len(cores) // k
  return [cores[i * size:(i + 1) * size] for i in range(k)]


def _worker_cores(sweep: SweepConfig) -> list[str | None]:
  """Each worker's --worker_cores value (None: not pinned)."""
  if not (sweep.pin_workers and hasattr(os, "sched_getaffinity")):
    return [None] * sweep.workers
  return [",".join(map(str, share))
          for share in core_shares(list(os.sched_getaffinity(0)), sweep.workers)]


def _pin(cores: str) -> None:
  """Restricts this worker to `cores`, before jax starts a thread: threads inherit the
  mask, and XLA:CPU sizes its pools to it."""
  try:
    wanted = {int(c) for c in cores.split(",")}
    os.sched_setaffinity(0, wanted)
  except (ValueError, OSError) as e:
    raise ConfigError(f"--worker_cores={cores!r} cannot be used here ({e}); give CPU core "
                      "numbers this process may run on, comma-separated, or leave it out.") from e
  _say(f"worker {os.getpid()} on CPU core(s) "
       f"{','.join(map(str, sorted(os.sched_getaffinity(0))))}")


def _spawn_workers(sweep: SweepConfig, workdir: str, stop: StopFlag) -> None:
  cmd = [sys.executable, "-m", "lmjax.sweep", "--worker", f"--workdir={workdir}"]
  procs = [subprocess.Popen(cmd + ([f"--worker_cores={cores}"] if cores else []))
           for cores in _worker_cores(sweep)]
  forwarded = False
  while any(p.poll() is None for p in procs):
    if stop and not forwarded:
      for p in procs:
        if p.poll() is None:
          p.send_signal(stop.signum or 15)
      forwarded = True
    time.sleep(0.2)
  if stop:
    raise Preempted(-1, stop.signum)


def fit_sweep(manifest: manifest_lib.Manifest, ids: list[str], sweep: SweepConfig,
              out_dir: str) -> dict:
  from lmjax.scaling import fit as fit_lib
  from lmjax.scaling import plot as plot_lib
  from lmjax.scaling.table import RunsTable
  rows = manifest.rows(ids)
  records = [r for r in map(manifest_lib.run_record, rows) if r is not None]
  require(records, "no run of the sweep finished, so there is nothing to fit; see the "
          "manifest's reasons (status failed/diverged) and fix the sweep config.", DataError)
  table = RunsTable.from_records(records)
  report = fit_lib.fit_all(table, n_boot=sweep.bootstrap, seed=sweep.fit_seed,
                           holdout_budgets=sweep.holdout_budgets)
  report["sweep"] = {
      "runs": {s: n for s, n in manifest.counts(ids).items() if n},
      "failed": [{"id": r["id"], "status": r["status"], "reason": r["reason"]} for r in rows
                 if r["status"] in ("failed", "diverged")],
      "train_wall_s": sum(r["wall_s"] or 0 for r in rows),
      "compile_s": sum(r["compile_s"] or 0 for r in rows),
      "malloc": sorted({r["malloc"] for r in rows if r.get("malloc")}),
      "software": sorted({r["software"] for r in rows if r.get("software")}),
  }
  _add_known_floor(report, sweep)
  fit_lib.write_report(report, out_dir)
  plot_lib.plot_all(table, report, out_dir)
  return report


def _add_known_floor(report: dict, sweep: SweepConfig) -> None:
  """For synthetic data the irreducible loss is known exactly: put it beside the fitted E."""
  from lmjax.data.pipeline import entropy_floor
  floor = entropy_floor(sweep.base.data, sweep.base.train.seq_len)
  if floor is not None:
    report["true_entropy_floor"] = floor


def main(argv) -> None:
  require(len(argv) == 1, f"unexpected arguments {argv[1:]}; use --flag=value.", ConfigError)
  if flags.FLAGS.worker_cores:
    _pin(flags.FLAGS.worker_cores)   # first: nothing may have started a thread pool yet
  workdir = flags.FLAGS.workdir
  require(workdir, "--workdir is required: the sweep's directory (manifest, runs, fit).",
          ConfigError)
  workdir = os.path.abspath(workdir)  # the manifest stores paths: keep them valid from anywhere
  saved_path = os.path.join(workdir, SWEEP_JSON)
  if flags.FLAGS.worker:
    require(os.path.exists(saved_path), f"--worker needs {saved_path}; start the sweep "
            "without --worker first.", ConfigError)
    with open(saved_path) as f:
      sweep = config_lib.from_dict(SweepConfig, json.load(f))
  else:
    require(flags.FLAGS.config is not None, "--config is required, e.g. "
            "--config=experiments/configs/sweeps/cpu_default.py", ConfigError)
    sweep = config_lib.from_dict(SweepConfig, flags.FLAGS.config)
  runs = plan(sweep)
  if sweep.base.train.cpu_dots == "onednn":  # else every run would fail alike, one by one
    from lmjax.train import check_cpu_dots  # pylint: disable=import-outside-toplevel
    check_cpu_dots(sweep.base)
  ids = [r.id for r in runs]
  os.makedirs(workdir, exist_ok=True)
  manifest = manifest_lib.Manifest(os.path.join(workdir, "manifest.sqlite"))
  if not flags.FLAGS.worker:
    config_lib.save(sweep, saved_path)
    new = manifest.add(runs)
    counts = manifest.counts(ids)
    _say(f"{len(runs)} runs planned ({new} new; {counts['done']} already done) in {workdir}")
    done_before = counts["done"]
  enable_compilation_cache(sweep.compilation_cache)
  started = time.time()
  with handle_signals(StopFlag()) as stop:
    try:
      if sweep.workers and not flags.FLAGS.worker:
        _spawn_workers(sweep, workdir, stop)
      else:
        drain(manifest, ids, sweep, workdir, stop)
      if stop:
        raise Preempted(-1, stop.signum)
    except Preempted as e:
      _say(f"interrupted ({e}); rerun the same command to continue.")
      sys.exit(EXIT_REQUEUE)
  if flags.FLAGS.worker:
    return
  counts = manifest.counts(ids)
  rows = manifest.rows(ids)
  trained = [r for r in rows if r["wall_s"]]
  compile_s, wall_s = (sum(r[k] or 0.0 for r in trained) for k in ("compile_s", "wall_s"))
  elapsed = time.time() - started
  finished = counts["done"] - done_before
  # Runs per hour of the clock: what workers raise (each run's own time grows meanwhile).
  _say(f"training finished in {elapsed:.0f}s"
       + (f" by {sweep.workers} workers" if sweep.workers else "")
       + (f", {3600 * finished / elapsed:.0f} runs per hour" if finished and elapsed else "")
       + ": " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
       + (f"; the runs spent {compile_s:.1f}s of their {wall_s:.0f}s compiling "
          f"({100 * compile_s / wall_s:.1f}%), {3600 * len(trained) / wall_s:.0f} runs per "
          "hour of their time" if wall_s else ""))
  note = mixed_software_note(rows)
  if note:
    _say(note)
  if flags.FLAGS.skip_fit:
    return
  out_dir = os.path.join(workdir, "fit")
  report = fit_sweep(manifest, ids, sweep, out_dir)
  _say(f"fit written to {out_dir}/report.md")
  print(_headline(report))


def mixed_software_note(rows: list[dict]) -> str | None:
  """A warning when the sweep's finished runs trained on different software versions
  (lmjax/provenance.py), say after an upgrade between a sweep's first and later runs."""
  seen = collections.Counter(r["software"] for r in rows if r.get("software"))
  if len(seen) < 2:
    return None
  listed = "; ".join(f"{n} on {s}" for s, n in seen.most_common())
  return (f"note: this sweep's runs trained on {len(seen)} software versions ({listed}); "
          "another XLA rounds differently, so compare losses within one (the manifest's "
          "software column) or rerun the rest in a new --workdir")


def _headline(report: dict) -> str:
  lines = []
  lvc = report.get("loss_vs_compute", {})
  ex = (lvc.get("extrapolation") or {}) if isinstance(lvc, dict) else {}
  if ex.get("status") == "ok" or "max_abs_rel_error" in ex:
    lines.append(f"extrapolation to held-out budget(s): {json.dumps(ex, default=str)[:400]}")
  a3 = report.get("approach3", {})
  if isinstance(a3, dict) and "params" in a3:
    p = a3["params"]
    lines.append("approach 3: " + ", ".join(
        f"{k}={p[k]['value']:.4g}" for k in ("E", "A", "B", "alpha", "beta", "a") if k in p))
  if "true_entropy_floor" in report:
    lines.append(f"true entropy floor of the data: {report['true_entropy_floor']:.4f} nats/token")
  return "\n".join(lines)


def cli():
  flags.DEFINE_bool("worker", False, "Drain the manifest of an already started sweep.")
  flags.DEFINE_bool("skip_fit", False, "Train only; fit later with python -m lmjax.fit.")
  flags.DEFINE_string("worker_cores", None, "With --worker: the CPU cores this worker runs "
                      "on, comma-separated (the sweep sets it; sweep.pin_workers).")
  from lmjax.cli import run_main
  run_main(main, workdir=True)


if __name__ == "__main__":
  cli()
