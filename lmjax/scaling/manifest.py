"""The sweep manifest: one SQLite file recording every run's config, status and results.

SQLite gives atomic claims across processes on one machine (or a shared POSIX filesystem),
so any number of sweep processes can drain one manifest without running a run twice.
Statuses: planned -> running -> done | failed (retried while attempts < max) | diverged.
A 'running' run whose owner died (same host: its pid is gone; elsewhere: no heartbeat for
`stale_after_s`) is reclaimed and resumes from its checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from typing import Any, Iterable

from lmjax.errors import DataError

STATUSES = ("planned", "running", "done", "failed", "diverged")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  id TEXT PRIMARY KEY,
  budget REAL NOT NULL,
  config TEXT NOT NULL,
  n_params INTEGER NOT NULL,
  planned_tokens REAL NOT NULL,
  planned_flops REAL NOT NULL,
  status TEXT NOT NULL DEFAULT 'planned',
  reason TEXT,
  attempts INTEGER NOT NULL DEFAULT 0,
  owner TEXT,
  heartbeat REAL,
  achieved_flops REAL,
  tokens REAL,
  final_eval_loss REAL,
  best_eval_loss REAL,
  wall_s REAL,
  compile_s REAL,
  metrics_path TEXT,
  updated REAL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS compiles (key TEXT PRIMARY KEY, owner TEXT NOT NULL, started REAL);
"""


# (name, type) of the runs columns added after the first schema, to new and old manifests
# alike when they are opened: the allocator a run trained on, which moves CPU step times
# ~10% (lmjax/allocator.py), and the software versions (lmjax/provenance.py).
_ADDED_COLUMNS = (("malloc", "TEXT"), ("software", "TEXT"))


def owner_id() -> str:
  return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str | None) -> bool:
  if not owner:
    return False
  host, _, pid = owner.rpartition(":")
  if host != socket.gethostname():
    return True  # cannot see other hosts' processes: rely on the heartbeat
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, ValueError):
    return False
  except PermissionError:
    return True
  return True


class Manifest:
  def __init__(self, path: str):
    self.path = path
    try:
      self._db = sqlite3.connect(path, timeout=60.0, isolation_level=None)
      self._db.row_factory = sqlite3.Row
      self._db.executescript(_SCHEMA)
      self._add_missing_columns()
    except sqlite3.DatabaseError as e:
      raise DataError(f"{path} is not a usable sweep manifest ({e}); move it away or point "
                      "--workdir at a new directory.") from None

  def _add_missing_columns(self) -> None:
    """Columns added since a manifest was created (NULL for its earlier runs), so a sweep
    started by older code resumes under newer code."""
    have = {r["name"] for r in self._db.execute("PRAGMA table_info(runs)")}
    for name, kind in _ADDED_COLUMNS:
      if name not in have:
        try:
          self._db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
        except sqlite3.OperationalError as e:
          if "duplicate column" not in str(e):   # another process added it first
            raise

  @contextlib.contextmanager
  def _transaction(self):
    # IMMEDIATE takes the write lock up front: two claimers serialise here.
    self._db.execute("BEGIN IMMEDIATE")
    try:
      yield self._db
      self._db.execute("COMMIT")
    except BaseException:
      self._db.execute("ROLLBACK")
      raise

  def close(self) -> None:
    self._db.close()

  # -- plan -----------------------------------------------------------------------------

  def add(self, runs: Iterable[Any]) -> int:
    """Records planned runs not yet in the manifest; returns how many were new."""
    now, added = time.time(), 0
    with self._transaction() as db:
      for r in runs:
        cur = db.execute(
            "INSERT OR IGNORE INTO runs (id, budget, config, n_params, planned_tokens, "
            "planned_flops, updated) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (r.id, r.budget, json.dumps(r.config_dict, sort_keys=True), r.n_params, r.tokens,
             r.flops, now))
        added += cur.rowcount
    return added

  def set_meta(self, key: str, value: Any) -> None:
    with self._transaction() as db:
      db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

  def get_meta(self, key: str) -> Any:
    row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else json.loads(row["value"])

  # -- claiming and reporting -----------------------------------------------------------

  def claim(self, ids: Iterable[str], *, max_attempts: int, stale_after_s: float,
            owner: str | None = None) -> dict | None:
    """Atomically takes the next runnable run among `ids` (in that order), or None."""
    owner = owner or owner_id()
    now = time.time()
    with self._transaction() as db:
      candidates = self._runnable(db, ids, now, max_attempts, stale_after_s)
      if not candidates:
        return None
      row = candidates[0]
      db.execute("UPDATE runs SET status='running', owner=?, heartbeat=?, updated=?, "
                 "attempts=attempts+1 WHERE id=?", (owner, now, now, row["id"]))
      return dict(row) | {"attempts": row["attempts"] + 1}

  def runnable(self, ids: Iterable[str], *, max_attempts: int,
               stale_after_s: float) -> list[dict]:
    """The runs that claim() would take, in its order, taking none (a forecast: another
    process may claim them first)."""
    return [dict(r) for r in self._runnable(self._db, ids, time.time(), max_attempts,
                                            stale_after_s)]

  @staticmethod
  def _runnable(db, ids, now: float, max_attempts: int, stale_after_s: float) -> list:
    """Rows among `ids`, in that order, that are planned, failed with attempts left, or
    running under an owner that is gone or silent."""
    order = {rid: i for i, rid in enumerate(ids)}
    rows = db.execute("SELECT * FROM runs WHERE status IN ('planned', 'failed', 'running')"
                      ).fetchall()
    candidates = []
    for row in rows:
      if row["id"] not in order:
        continue
      if row["status"] == "failed" and row["attempts"] >= max_attempts:
        continue
      if row["status"] == "running":
        stale = row["heartbeat"] is None or now - row["heartbeat"] > stale_after_s
        if _owner_alive(row["owner"]) and not stale:
          continue
      candidates.append(row)
    return sorted(candidates, key=lambda r: order[r["id"]])

  def heartbeat(self, rid: str) -> None:
    with self._transaction() as db:
      db.execute("UPDATE runs SET heartbeat=? WHERE id=?", (time.time(), rid))

  def finish(self, rid: str, *, status: str, reason: str | None = None, **results: Any) -> None:
    assert status in STATUSES, status
    cols = ", ".join(f"{k}=?" for k in results)
    sets = "status=?, reason=?, owner=NULL, updated=?" + (", " + cols if cols else "")
    with self._transaction() as db:
      db.execute(f"UPDATE runs SET {sets} WHERE id=?",
                 (status, reason, time.time(), *results.values(), rid))

  def release(self, rid: str) -> None:
    """An interrupted run goes back to 'planned' and does not use up an attempt."""
    with self._transaction() as db:
      db.execute("UPDATE runs SET status='planned', owner=NULL, attempts=MAX(attempts-1, 0), "
                 "updated=? WHERE id=?", (time.time(), rid))

  def claim_compile(self, key: str, *, owner: str | None = None) -> bool:
    """Takes `key`'s programs for this process to compile ahead, unless another live
    process built or took them last (it holds them: its runs of them need no compile)."""
    owner = owner or owner_id()
    with self._transaction() as db:
      row = db.execute("SELECT owner FROM compiles WHERE key=?", (key,)).fetchone()
      if row and row["owner"] != owner and _owner_alive(row["owner"]):
        return False
      self._hold(db, key, owner)
    return True

  def record_compile(self, key: str, *, owner: str | None = None) -> None:
    """Notes that this process holds `key`'s programs from now (it claimed a run of them)."""
    with self._transaction() as db:
      self._hold(db, key, owner or owner_id())

  @staticmethod
  def _hold(db, key: str, owner: str) -> None:
    db.execute("INSERT OR REPLACE INTO compiles VALUES (?, ?, ?)", (key, owner, time.time()))

  def compiles_elsewhere(self, *, owner: str | None = None) -> set[str]:
    """The compile keys whose programs another live process built or took last."""
    owner = owner or owner_id()
    return {r["key"] for r in self._db.execute("SELECT key, owner FROM compiles")
            if r["owner"] != owner and _owner_alive(r["owner"])}

  # -- reading --------------------------------------------------------------------------

  def rows(self, ids: Iterable[str] | None = None) -> list[dict]:
    rows = [dict(r) for r in self._db.execute("SELECT * FROM runs ORDER BY budget, n_params")]
    if ids is not None:
      keep = set(ids)
      rows = [r for r in rows if r["id"] in keep]
    return rows

  def counts(self, ids: Iterable[str] | None = None) -> dict[str, int]:
    out = {s: 0 for s in STATUSES}
    for r in self.rows(ids):
      out[r["status"]] += 1
    return out


def run_record(row: dict) -> dict | None:
  """A finished run as the fit wants it (RunsTable.from_records), with its eval curve."""
  if row["status"] != "done" or row["final_eval_loss"] is None:
    return None
  record = {"id": row["id"], "N": row["n_params"], "D": row["tokens"],
            "C": row["achieved_flops"], "budget": row["budget"], "loss": row["final_eval_loss"]}
  path = row.get("metrics_path")
  if path and os.path.exists(path):
    with open(path) as f:
      points = [json.loads(l) for l in f if l.strip()]
    points = [p for p in points if p.get("eval_loss") is not None]
    if len(points) >= 2:
      record["curve"] = {"flops": [p["flops"] for p in points],
                         "loss": [p["eval_loss"] for p in points]}
  return record


def load_records(path: str, ids: Iterable[str] | None = None) -> list[dict]:
  """Finished runs of the manifest at `path`, for `python -m lmjax.fit --runs=manifest.sqlite`."""
  if not os.path.exists(path):
    raise DataError(f"no sweep manifest at {path}; run `python -m lmjax.sweep` first or "
                    "check the path.")
  manifest = Manifest(path)
  try:
    return [r for r in map(run_record, manifest.rows(ids)) if r is not None]
  finally:
    manifest.close()
