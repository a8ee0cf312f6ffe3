"""Planning, the manifest, and a real sweep that is killed and resumed."""
import dataclasses
import functools
import importlib.util
import json
import multiprocessing
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmjax import config as config_lib
from lmjax import flops as flops_lib
from lmjax import provenance
from lmjax import sweep as sweep_lib
from lmjax.errors import ConfigError
from lmjax.preemption import EXIT_REQUEUE
from lmjax.scaling import manifest as manifest_lib
from lmjax.scaling.plan import SweepConfig, flops_n, plan

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "experiments" / "configs" / "sweeps"


def _sweep(name: str) -> SweepConfig:
  spec = importlib.util.spec_from_file_location(name, SWEEPS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_lib.from_dict(SweepConfig, module.get_config())


@pytest.mark.parametrize("name", ["cpu_default", "tiny"])
def test_isoflop_plan_spends_each_budget(name):
  sweep = _sweep(name)
  runs = plan(sweep)
  assert [r.id for r in plan(sweep)] == [r.id for r in runs]  # stable ids
  assert len({r.id for r in runs}) == len(runs) == len(sweep.budgets) * sweep.sizes_per_budget
  T, tokens_per_step = sweep.base.train.seq_len, sweep.base.train.global_batch * sweep.base.train.seq_len
  for r in runs:
    cfg = r.config
    one_step = flops_lib.flops_per_token(cfg.model, T, "6N") * tokens_per_step
    assert r.budget <= r.flops < r.budget + one_step  # spends the budget, within one step
    assert r.flops == pytest.approx(6 * r.n_params * r.tokens)  # C = 6 N D exactly
    assert r.n_params == flops_n(cfg.model)
    assert cfg.train.steps * tokens_per_step == r.tokens
    assert cfg.model.d_model == cfg.model.n_heads * sweep.head_dim
    assert 0 <= cfg.optim.warmup_steps <= cfg.train.steps // 4
    assert cfg.name == r.id
  for budget in sweep.budgets:  # sizes spread around the expected optimum
    ns = sorted(r.n_params for r in runs if r.budget == budget)
    assert ns[-1] / ns[0] >= 3


def test_ladder_plan_and_hyperparameter_rules():
  sweep = dataclasses.replace(_sweep("tiny"), design="ladder", ladder_widths=(16, 32, 64),
                              token_multiples=(10.0, 20.0))
  runs = plan(sweep)
  assert len(runs) == 6
  by_width = {}
  for r in runs:
    by_width.setdefault(r.config.model.d_model, []).append(r)
    assert r.tokens >= 10 * r.n_params
  lrs = [by_width[w][0].config.optim.lr for w in (16, 32, 64)]
  assert lrs[0] > lrs[1] > lrs[2]  # learning rate falls with width
  assert lrs[1] / lrs[2] == pytest.approx(2 ** sweep.lr_width_exponent)


def test_bad_sweep_configs_are_one_line():
  for kwargs, fragment in [(dict(budgets=(1e9, -1.0)), "sweep.budgets"),
                           (dict(design="grid"), "sweep.design"),
                           (dict(widths=(16, 40)), "multiple of sweep.head_dim")]:
    with pytest.raises(ConfigError, match=fragment) as e:
      SweepConfig(**kwargs)
    assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="unknown config key 'budgetz'"):
    config_lib.from_dict(SweepConfig, {"budgetz": [1.0]})


def _claimer(path, ids, out_path, delay):
  m = manifest_lib.Manifest(path)
  got = []
  while True:
    row = m.claim(ids, max_attempts=1, stale_after_s=60)
    if row is None:
      break
    time.sleep(delay)  # "train"
    m.finish(row["id"], status="done", final_eval_loss=1.0)
    got.append(row["id"])
  Path(out_path).write_text(json.dumps(got))


@dataclasses.dataclass
class _FakeRun:
  id: str
  budget: float = 1.0
  n_params: int = 1
  tokens: int = 1
  flops: float = 6.0
  config_dict: dict = dataclasses.field(default_factory=dict)


def test_concurrent_claimers_run_each_run_exactly_once(tmp_path):
  path = str(tmp_path / "manifest.sqlite")
  ids = [f"run{i:02d}" for i in range(24)]
  manifest_lib.Manifest(path).add([_FakeRun(i) for i in ids])
  ctx = multiprocessing.get_context("spawn")
  procs = [ctx.Process(target=_claimer, args=(path, ids, str(tmp_path / f"w{k}.json"), 0.01))
           for k in range(3)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(60)
  claimed = sum((json.loads((tmp_path / f"w{k}.json").read_text()) for k in range(3)), [])
  assert sorted(claimed) == ids  # every run once, none twice
  rows = manifest_lib.Manifest(path).rows()
  assert all(r["status"] == "done" and r["attempts"] == 1 for r in rows)


def test_manifest_from_older_code_gains_new_columns(tmp_path):
  # A manifest written before the malloc and software columns existed: opening it adds them
  # (NULL for its runs), twice is harmless, and its runs finish with the new fields.
  path = str(tmp_path / "manifest.sqlite")
  old_schema = manifest_lib._SCHEMA   # the first schema; later columns are _ADDED_COLUMNS
  assert "malloc" not in old_schema and "software" not in old_schema
  db = sqlite3.connect(path)
  db.executescript(old_schema)
  db.execute("INSERT INTO runs (id, budget, config, n_params, planned_tokens, planned_flops) "
             "VALUES ('r1', 1e9, '{}', 10, 100.0, 6000.0)")
  db.commit()
  db.close()
  for _ in range(2):
    m = manifest_lib.Manifest(path)
    row = m.rows()[0]
    assert row["malloc"] is None and row["software"] is None and row["id"] == "r1"
    m.close()
  m = manifest_lib.Manifest(path)
  m.finish("r1", status="done", final_eval_loss=2.5, malloc="system", software="python 3.11")
  row = m.rows()[0]
  assert (row["status"], row["malloc"], row["software"]) == ("done", "system", "python 3.11")


def test_sweep_says_when_its_runs_trained_on_different_software():
  old, new = "python 3.11.7, jax 0.10.2", "python 3.12.1, jax 0.12.0.1"
  rows = [{"software": old}, {"software": new}, {"software": new}, {"software": None}]
  note = sweep_lib.mixed_software_note(rows)
  assert note.startswith("note: this sweep's runs trained on 2 software versions "
                         f"(2 on {new}; 1 on {old})"), note
  assert sweep_lib.mixed_software_note(rows[1:]) is None   # one version (and an unknown)
  assert sweep_lib.mixed_software_note([]) is None
  # Runs whose dots ran on oneDNN (a sweep resumed on another CPU or jaxlib) count apart.
  here = provenance.software(on_cpu=True)
  onednn = provenance.software(on_cpu=True, onednn_dots=True)
  assert onednn == here + ", onednn dots"
  note = sweep_lib.mixed_software_note([{"software": here}, {"software": onednn}])
  assert note and "2 software versions" in note and "onednn dots" in note, note
  # So do runs that trained on CPUs with other thread counts (XLA:CPU splits sums over them).
  n = provenance.cpu_threads()
  assert here == provenance.software(on_cpu=False) + f", {n} cpu thread{'s' * (n != 1)}"
  note = sweep_lib.mixed_software_note([{"software": here.replace(f", {n} cpu", ", 64 cpu")},
                                        {"software": here}])
  assert note and "2 software versions" in note and "64 cpu threads" in note, note


def test_dead_owner_is_reclaimed(tmp_path):
  m = manifest_lib.Manifest(str(tmp_path / "m.sqlite"))
  m.add([_FakeRun("a")])
  dead = f"{socket.gethostname()}:999999999"  # this host, a pid that does not exist
  assert m.claim(["a"], max_attempts=3, stale_after_s=1e9, owner=dead)["id"] == "a"
  # Its owner process is gone: the next claimer takes the run over.
  row = m.claim(["a"], max_attempts=3, stale_after_s=1e9)
  assert row["id"] == "a" and row["attempts"] == 2
  assert m.claim(["a"], max_attempts=3, stale_after_s=1e9) is None  # we are alive


def _sweep_cmd(workdir, cache):
  return [sys.executable, "-m", "lmjax.sweep", f"--config={SWEEPS / 'tiny.py'}",
          f"--workdir={workdir}", f"--config.compilation_cache={cache}"]


def _statuses(workdir):
  db = sqlite3.connect(str(Path(workdir) / "manifest.sqlite"))
  return {r[0]: (r[1], r[2], r[3]) for r in
          db.execute("SELECT id, status, attempts, wall_s FROM runs")}


def test_sweep_killed_midway_resumes_without_redoing_finished_runs(tmp_path):
  workdir, cache = tmp_path / "sweep", tmp_path / "cache"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  for sig in (signal.SIGTERM, signal.SIGINT):
    proc = subprocess.Popen(_sweep_cmd(workdir, cache), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until one more run has finished
      time.sleep(0.5)
      if (workdir / "manifest.sqlite").exists():
        done = {k for k, v in _statuses(workdir).items() if v[0] == "done"}
        if len(done) >= (2 if sig == signal.SIGTERM else 4):
          break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err[-3000:]
    assert "interrupted" in err
    after = _statuses(workdir)
    assert all(s != "running" for s, _, _ in after.values())  # nothing left claimed
  finished_before_resume = {k: v for k, v in after.items() if v[0] == "done"}
  assert len(finished_before_resume) >= 4  # so 'not trained again' below is not vacuous
  proc = subprocess.run(_sweep_cmd(workdir, cache), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = _statuses(workdir)
  assert all(s == "done" for s, _, _ in final.values()), final
  for rid, row in finished_before_resume.items():
    assert final[rid] == row  # same attempts and wall time: not trained again
  report = json.loads((workdir / "fit" / "report.json").read_text())
  assert report["n_runs"] == 9
  assert (workdir / "fit" / "loss_vs_compute.png").exists()


def test_parallel_worker_processes_run_every_run_exactly_once(tmp_path):
  # sweep.workers=2: two sweep processes drain one manifest; each run is trained once.
  workdir = tmp_path / "sweep"
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  cmd = _sweep_cmd(workdir, tmp_path / "cache") + [
      "--config.workers=2", "--config.pin_workers=true", "--config.budgets=(2e9,4e9)",
      "--config.sizes_per_budget=2", "--skip_fit"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # sweep.pin_workers: each worker runs on its own share of this process's cores, as
  # read back from the worker's own affinity mask.
  pinned = sorted(re.findall(r"worker \d+ on CPU core\(s\) ([\d,]+)", proc.stderr))
  threads = provenance.cpu_threads()
  if hasattr(os, "sched_getaffinity"):
    shares = sweep_lib.core_shares(list(os.sched_getaffinity(0)), 2)
    assert pinned == sorted(",".join(map(str, c)) for c in shares), proc.stderr[-2000:]
    threads = len(shares[0])
  else:
    assert not pinned, pinned
  assert re.search(r"training finished in \d+s by 2 workers, \d+ runs per hour: 4 done",
                   proc.stderr), proc.stderr[-1000:]
  rows = _statuses(workdir)
  assert len(rows) == 4
  assert all(status == "done" and attempts == 1 for status, attempts, _ in rows.values()), rows
  db = sqlite3.connect(str(workdir / "manifest.sqlite"))
  assert len({r[0] for r in db.execute("SELECT owner FROM runs")}) == 1  # owners cleared
  # Each run records the thread count its worker's XLA:CPU pools had: its share's size.
  suffix = f", {threads} cpu thread{'s' * (threads != 1)}"
  assert all(r[0].endswith(suffix) or r[0].endswith(suffix + ", onednn dots")
             for r in db.execute("SELECT software FROM runs")), suffix
  for rid in rows:  # each run trained in exactly one place, start to finish
    metrics = (workdir / "runs" / rid / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(l)["step"] for l in metrics]
    assert steps == sorted(set(steps))


def test_unpinned_workers_train_what_one_process_trains(tmp_path):
  # The default (pin_workers=false): each worker's XLA:CPU has every core, as a lone sweep
  # process has, so its runs end at the same losses, to the bit, with the same software.
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  results = {}
  for workers in (2, 0):
    workdir = tmp_path / f"w{workers}"
    cmd = _sweep_cmd(workdir, tmp_path / "cache") + [   # the second loads the programs
        f"--config.workers={workers}", "--config.budgets=(2e9,)",
        "--config.sizes_per_budget=2", "--skip_fit"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("by 2 workers" in proc.stderr) == (workers == 2), proc.stderr[-1000:]
    assert "on CPU core(s)" not in proc.stderr   # not pinned
    db = sqlite3.connect(str(workdir / "manifest.sqlite"))
    results[workers] = {r[0]: (r[1], r[2], r[3]) for r in db.execute(
        "SELECT id, status, final_eval_loss, software FROM runs")}
  assert len(results[0]) == 2 and all(r[0] == "done" for r in results[0].values())
  assert results[2] == results[0]
  n = provenance.cpu_threads()
  assert all(f", {n} cpu thread" in r[2] for r in results[0].values()), results[0]


def test_core_shares_split_the_cores_among_workers():
  # Equal shares, so every worker's runs round alike; a remainder stays idle.
  assert sweep_lib.core_shares([1, 0], 2) == [[0], [1]]
  assert sweep_lib.core_shares([0, 1, 2], 2) == [[0], [1]]
  assert sweep_lib.core_shares([2, 5, 7, 9, 11], 1) == [[2, 5, 7, 9, 11]]
  assert sweep_lib.core_shares([2, 5, 7, 9, 11], 2) == [[2, 5], [7, 9]]
  sixteen = sweep_lib.core_shares(list(range(16)), 3)
  assert sixteen == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
  assert sweep_lib.core_shares(list(range(16)), 4)[3] == [12, 13, 14, 15]
  assert sweep_lib.core_shares([3], 2) == [[3], [3]]  # more workers than cores: they share
  assert sweep_lib.core_shares([0, 1], 3) == [[0], [1], [0]]


class _Ahead:  # records what _compile_next queues
  def __init__(self):
    self.submitted = []

  def submit(self, cfg):
    self.submitted.append(cfg)
    return True


def test_workers_share_out_model_sizes(tmp_path):
  # Another live worker that holds a size's programs (it compiled them ahead, or claimed a
  # run of them) keeps this one off them: this one compiles the size after ahead, and
  # claims the runs of sizes nobody else holds first; the other's size it takes last.
  from lmjax.train import program_key
  sweep = dataclasses.replace(_sweep("tiny"), budgets=(2e9, 4e9), sizes_per_budget=2,
                              group_size=1, workers=2)
  runs = plan(sweep)
  ids = [r.id for r in runs]
  pkeys = {r.id: program_key(r.config) for r in runs}
  sizes = sorted(set(pkeys.values()), key=list(pkeys.values()).index)
  assert len(sizes) >= 2 and pkeys[ids[0]] == sizes[0]
  m = manifest_lib.Manifest(str(tmp_path / "manifest.sqlite"))
  m.add(runs)
  first = sweep_lib._compile_key(1, sizes[0])
  dead = f"{socket.gethostname()}:999999999"
  other = f"{socket.gethostname()}:{os.getppid()}"   # a live process
  assert m.claim_compile(first, owner=dead)
  assert m.claim_compile(first, owner=other)   # the dead owner holds nothing
  assert not m.claim_compile(first)            # the live one does
  assert m.compiles_elsewhere() == {first}
  judged = set()
  ahead = _Ahead()
  sweep_lib._compile_next(ahead, m, ids, None, [], judged, sweep)
  assert program_key(ahead.submitted[0]) == sizes[1]   # the size after, now ours
  assert m.compiles_elsewhere() == {first}
  _, program_keys = sweep_lib._row_keys(m, ids, sweep)
  assert program_keys == pkeys
  claimed = []
  while rows := sweep_lib._claim_group(m, ids, sweep, None, program_keys):
    claimed.append(rows[0]["id"])
  # Every run claimed once; the other worker's size last, each part in sweep order.
  theirs = [i for i in ids if pkeys[i] == sizes[0]]
  assert claimed == [i for i in ids if i not in theirs] + theirs, (claimed, ids)
  assert m.compiles_elsewhere() == set()   # this process holds what it claimed last, theirs too
  # Without workers, claims keep the sweep's order whoever holds what.
  m2 = manifest_lib.Manifest(str(tmp_path / "one.sqlite"))
  m2.add(runs)
  assert m2.claim_compile(first, owner=other)
  lone = dataclasses.replace(sweep, workers=0)
  assert sweep_lib._row_keys(m2, ids, lone) == (None, None)
  assert [sweep_lib._claim_group(m2, ids, lone, None)[0]["id"] for _ in ids] == ids


def test_replica_seeds_plan_adjacent_groupable_runs():
  from lmjax import checkpoint as ckpt_lib
  from lmjax.multirun import MEMBER_FIELDS, group_key
  one = plan(_sweep("tiny"))
  three = plan(dataclasses.replace(_sweep("tiny"), seeds=3))
  assert len(three) == 3 * len(one)
  assert [r.id for r in three[::3]] == [r.id for r in one]  # replica 0 keeps its id
  for k in range(len(one)):
    reps = three[3 * k:3 * k + 3]
    assert len({r.id for r in reps}) == 3 and len({group_key(r.config) for r in reps}) == 1
    assert [r.config.train.seed for r in reps] == [0, 1, 2]
    assert [r.config.data.seed for r in reps] == [0, 1, 2]
    diff = ckpt_lib.config_diff(reps[0].config_dict, reps[2].config_dict, MEMBER_FIELDS)
    assert diff == []  # nothing but member fields differs
    assert {(r.budget, r.n_params, r.tokens) for r in reps} == {(reps[0].budget,
                                                                 reps[0].n_params,
                                                                 reps[0].tokens)}


def test_grouped_replicas_equal_lone_runs(tmp_path):
  # seeds=2: each point's two replicas train as one lmjax.multirun group; the same sweep
  # with group_size=1 trains all four runs alone. Same ids, same losses.
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  losses = {}
  import jax
  from lmjax import sharding
  from lmjax.train import uses_onednn
  base = _sweep("tiny").base
  onednn_here = uses_onednn(base, sharding.make_mesh(sharding.MeshConfig(data=1),
                                                     jax.devices()[:1]))
  for group_size in (8, 1):
    workdir = tmp_path / f"g{group_size}"
    cmd = _sweep_cmd(workdir, tmp_path / "cache") + [
        "--config.budgets=(2e9,)", "--config.sizes_per_budget=2", "--config.seeds=2",
        f"--config.group_size={group_size}", "--skip_fit"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("as one group") == (2 if group_size > 1 else 0), proc.stderr[-2000:]
    # The second model size (alone) or the second group compiles in the background while
    # the first trains.
    assert "compiled 1 model size(s) or group(s) ahead of their runs" in proc.stderr, \
        proc.stderr[-2000:]
    db = sqlite3.connect(str(workdir / "manifest.sqlite"))
    rows = list(db.execute(
        "SELECT id, status, final_eval_loss, wall_s, malloc, software FROM runs"))
    assert len(rows) == 4 and all(r[1] == "done" and r[3] > 0 for r in rows), rows
    # Runs per hour of the runs' own time (a group member's wall_s is its share).
    per_hour = re.search(r", (\d+) runs per hour of their time", proc.stderr)
    assert per_hour and int(per_hour[1]) == round(3600 * 4 / sum(r[3] for r in rows)), \
        proc.stderr[-1000:]
    # The allocator the run trained on (its step times depend on it), lone or grouped.
    assert all(r[4] in ("mimalloc", "system") for r in rows), rows
    # And the software it trained on: this interpreter's, this process's CPU thread count,
    # and ", onednn dots" where this jaxlib and CPU run the f32 runs' dots on oneDNN; so no
    # mixed-versions note.
    assert {r[5] for r in rows} == {provenance.software(on_cpu=True,
                                                        onednn_dots=onednn_here)}, rows
    assert "software versions" not in proc.stderr
    losses[group_size] = {r[0]: r[2] for r in rows}
    for rid in losses[group_size]:
      events = workdir / "runs" / rid / "events.jsonl"  # lone runs write it only on events
      events = events.read_text() if events.exists() else ""
      assert ('"event": "group"' in events) == (group_size > 1)
  assert losses[8].keys() == losses[1].keys()
  for rid, loss in losses[1].items():
    assert losses[8][rid] == pytest.approx(loss, rel=1e-5)
  assert len(set(losses[1].values())) == 4  # the replicas really differ


def test_drain_books_each_group_member_by_its_own_outcome(tmp_path, monkeypatch):
  # Bookkeeping only (run_group is replaced): a claim takes a run plus its replicas (same
  # group key, up to group_size), and each member's row gets its own status and results.
  from lmjax.preemption import StopFlag
  sweep = dataclasses.replace(_sweep("tiny"), budgets=(2e9,), sizes_per_budget=2, seeds=3,
                              group_size=2)
  runs = plan(sweep)
  m = manifest_lib.Manifest(str(tmp_path / "manifest.sqlite"))
  m.add(runs)
  point = {r.id: k // 3 for k, r in enumerate(runs)}
  calls = []

  def fake_group(rows, workdir, stop, on_step=None):
    calls.append([r["id"] for r in rows])
    out = []
    for i, r in enumerate(rows):
      res = {"achieved_flops": 1.0, "tokens": 2.0, "final_eval_loss": 3.0 + i,
             "best_eval_loss": 3.0, "wall_s": 0.5, "compile_s": 0.1, "metrics_path": None}
      out.append(dict(res, status="diverged" if i else "done",
                      reason="bad streak" if i else None))
    return out

  def fake_one(row, workdir, stop, on_step=None):
    calls.append([row["id"]])
    return {"achieved_flops": 1.0, "tokens": 2.0, "final_eval_loss": 5.0,
            "best_eval_loss": 5.0, "wall_s": 0.5, "compile_s": 0.1, "metrics_path": None}

  monkeypatch.setattr(sweep_lib, "run_group", fake_group)
  monkeypatch.setattr(sweep_lib, "run_one", fake_one)
  sweep_lib.drain(m, [r.id for r in runs], sweep, str(tmp_path), StopFlag())
  # 2 points x 3 seeds, groups of at most 2: [2, 1] per point, never mixing points.
  assert [len(c) for c in calls] == [2, 1, 2, 1]
  assert all(len({point[i] for i in c}) == 1 for c in calls)
  rows = {r["id"]: r for r in m.rows()}
  for c in calls:
    if len(c) == 2:
      assert rows[c[0]]["status"] == "done" and rows[c[0]]["final_eval_loss"] == 3.0
      assert rows[c[1]]["status"] == "diverged" and rows[c[1]]["reason"] == "bad streak"
    else:
      assert rows[c[0]]["status"] == "done" and rows[c[0]]["final_eval_loss"] == 5.0
  assert all(r["owner"] is None for r in rows.values())  # nothing left claimed


def test_compile_ahead_forecasts_the_run_claim_takes_next(tmp_path):
  # A failed run with attempts left is claimed before later planned runs, so it is the one
  # whose programs compile ahead; once out of attempts, the next planned run is.
  sweep = dataclasses.replace(_sweep("tiny"), budgets=(2e9,), sizes_per_budget=3, seeds=1,
                              group_size=1, max_attempts=2)
  runs = plan(sweep)
  ids = [r.id for r in runs]
  m = manifest_lib.Manifest(str(tmp_path / "manifest.sqlite"))
  m.add(runs)
  claim = functools.partial(m.claim, max_attempts=2, stale_after_s=sweep.stale_after_s)
  first = claim(ids)   # ids[0]: fails once, due a retry
  m.finish(first["id"], status="failed", reason="boom")
  second = claim(ids)  # the retry: ids[0] again, for its second and last attempt
  assert second["id"] == ids[0]
  training = claim(ids)  # ids[1]: the run this process trains while the next compiles
  assert training["id"] == ids[1]
  m.finish(second["id"], status="failed", reason="boom")   # out of attempts now

  want = {r.id: r.config for r in runs}
  for failed_attempts, expected in ((1, ids[0]), (2, ids[2])):
    with m._transaction() as db:
      db.execute("UPDATE runs SET attempts=? WHERE id=?", (failed_attempts, ids[0]))
    assert [r["id"] for r in m.runnable(ids, max_attempts=2,
                                        stale_after_s=sweep.stale_after_s)] == (
        [ids[0], ids[2]] if failed_attempts == 1 else [ids[2]])
    ahead = _Ahead()
    sweep_lib._compile_next(ahead, m, ids, None, [training["id"]], set(), sweep)
    assert ahead.submitted == [want[expected]], failed_attempts
  assert m.rows([ids[0]])[0]["status"] == "failed"   # forecasting claimed nothing


def test_stopped_group_resumes_as_a_group_in_the_next_sweep(tmp_path, monkeypatch):
  # A stop in the middle of a group (3 replicas of one point): the runs checkpoint and are
  # released; the next drain claims the same three together and they go on from the stop,
  # ending where an uninterrupted sweep ends.
  from lmjax import sweep as sweep_lib
  from lmjax.multirun import GroupTrainer
  from lmjax.preemption import Preempted, StopFlag
  sweep = dataclasses.replace(_sweep("tiny"), budgets=(2e9,), sizes_per_budget=1, seeds=3,
                              group_size=3)
  runs = plan(sweep)
  ids = [r.id for r in runs]
  total = runs[0].config.total_steps()
  stop_at = total // 2 + 1
  assert total > stop_at and stop_at % runs[0].config.checkpoint.every_steps
  real_step, calls = GroupTrainer.step, []

  def counting(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == stop_at and stop_flag is not None:
      stop_flag.request()
    return real_step(self, *args, **kwargs)
  monkeypatch.setattr(GroupTrainer, "step", counting)

  def drain(workdir, flag):
    workdir.mkdir(exist_ok=True)
    m = manifest_lib.Manifest(str(workdir / "manifest.sqlite"))
    m.add(runs)
    calls.clear()
    sweep_lib.drain(m, ids, sweep, str(workdir), flag)
    return {r["id"]: r for r in m.rows()}, len(calls)

  stop_flag = None
  straight, steps = drain(tmp_path / "straight", StopFlag())
  assert steps == total
  stop_flag = StopFlag()
  with pytest.raises(Preempted):
    drain(tmp_path / "stopped", stop_flag)
  stop_flag = None
  resumed, steps = drain(tmp_path / "stopped", StopFlag())
  assert steps == total - stop_at   # one group, from the stop
  for rid in ids:
    assert resumed[rid]["status"] == straight[rid]["status"] == "done"
    assert resumed[rid]["final_eval_loss"] == straight[rid]["final_eval_loss"]
    events = [json.loads(l) for l in
              (tmp_path / "stopped" / "runs" / rid / "events.jsonl").read_text().splitlines()]
    assert [(e["size"], e.get("resumed_at")) for e in events if e["event"] == "group"] == [
        (3, None), (3, stop_at)]
  assert len({r["final_eval_loss"] for r in straight.values()}) == 3   # replicas differ
