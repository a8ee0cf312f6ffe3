"""A vmapped group of runs equals the same runs trained alone, member by member."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import sharding
from lmjax.config import Config
from lmjax.data import pipeline as data_lib
from lmjax.errors import ConfigError
from lmjax.metrics import read_metrics
from lmjax.multirun import GroupTrainer, check_groupable, group_key, train_group
from lmjax.preemption import Preempted, StopFlag
from lmjax.train import Trainer, train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "smoke.py"
STEPS = 24
# (train.seed, data.seed, peak lr) of the three members.
MEMBERS = ((0, 0, 1e-2), (1, 5, 3e-3), (2, 7, 2e-2))
# Logged fields that are measurements of the machine, not of the run.
TIMING = ("tokens_per_s", "mfu")


def _base() -> Config:
  spec = importlib.util.spec_from_file_location("smoke_cfg", SMOKE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.from_dict(Config, module.get_config())
  r = dataclasses.replace
  return r(cfg,
           model=r(cfg.model, d_model=32, n_layers=2, n_heads=2, max_len=32),
           optim=r(cfg.optim, warmup_steps=2),
           train=r(cfg.train, steps=STEPS, seq_len=32, global_batch=8, eval_every=8,
                   log_every=4, progress=False),
           data=r(cfg.data, eval_batches=2),
           # A group never rolls back; without rollbacks a lone run stops where it would.
           guard=r(cfg.guard, max_consecutive_bad=3, max_rollbacks=0),
           checkpoint=r(cfg.checkpoint, every_steps=None))  # only the final save


def _member(seed: int, data_seed: int, lr: float) -> Config:
  cfg = _base()
  r = dataclasses.replace
  return r(cfg, name=f"s{seed}-lr{lr:g}", train=r(cfg.train, seed=seed),
           data=r(cfg.data, seed=data_seed), optim=r(cfg.optim, lr=lr))


def _mesh():
  return sharding.make_mesh(sharding.MeshConfig(data=1), jax.devices()[:1])


def _final_params(cfg: Config, workdir: Path):
  trainer = Trainer(cfg, _mesh())
  state, _ = ckpt_lib.Checkpointer(workdir).restore(abstract_state=trainer.abstract_state)
  return jax.device_get(state["params"])


def _assert_same_run(group_dir: Path, lone_dir: Path, cfg: Config) -> None:
  a, b = read_metrics(str(group_dir)), read_metrics(str(lone_dir))
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    assert set(ra) == set(rb), (ra, rb)
    for key in set(ra) - set(TIMING):
      np.testing.assert_allclose(ra[key], rb[key], rtol=1e-5, err_msg=f"{key} at {ra['step']}")
  # atol 1e-5: Adam turns the vmapped program's rounding in near-zero gradients (rare
  # tokens' embedding rows) into ~2e-6 after 24 steps; another member's lr or data order
  # moves them by orders of magnitude more.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
               _final_params(cfg, group_dir), _final_params(cfg, lone_dir))


@pytest.fixture(scope="module")
def lone(tmp_path_factory):
  """Each member trained alone by lmjax.train.train: (config, workdir, summary)."""
  root = tmp_path_factory.mktemp("lone")
  out = []
  for i, (seed, data_seed, lr) in enumerate(MEMBERS):
    cfg = _member(seed, data_seed, lr)
    out.append((cfg, root / str(i), train(cfg, str(root / str(i)), mesh=_mesh())))
  return out


def test_group_members_equal_lone_runs(lone, tmp_path):
  cfgs = [cfg for cfg, _, _ in lone]
  assert len({group_key(c) for c in cfgs}) == 1
  dirs = [tmp_path / str(i) for i in range(len(cfgs))]
  # One vmap over all three members (on CPU, "auto" would run them one after another).
  results = train_group(cfgs, [str(d) for d in dirs], mesh=_mesh(), members_per_vmap=None)
  for (cfg, lone_dir, summary), res, group_dir in zip(lone, results, dirs):
    assert res["status"] == "done" and res["group_size"] == 3
    assert res["members_per_vmap"] is None
    for key in ("steps", "tokens", "flops", "skipped_steps", "rollbacks"):
      assert res[key] == summary[key], key
    assert res["final_eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    _assert_same_run(group_dir, lone_dir, cfg)
    assert config_lib.load(str(group_dir / "config.json")) == cfg
  # The members really differ (seeds, data order, lr): equal curves would prove nothing.
  assert len({round(r["final_eval_loss"], 6) for r in results}) == 3
  # A finished member's workdir is a finished run to lmjax.train (and so to the sweep).
  again = train(cfgs[1], str(dirs[1]), mesh=_mesh())
  assert again["final_eval_loss"] == pytest.approx(results[1]["final_eval_loss"], rel=1e-6)


def test_diverging_member_does_not_stop_the_others(lone, tmp_path):
  cfgs = [_member(*MEMBERS[0]), _member(3, 3, 1e3), _member(*MEMBERS[2])]  # lr 1e3 blows up
  dirs = [tmp_path / str(i) for i in range(3)]
  # The CPU default: members one after another inside one compiled step.
  results = train_group(cfgs, [str(d) for d in dirs], mesh=_mesh(), members_per_vmap="auto")
  assert results[0]["members_per_vmap"] == 1
  assert results[1]["status"] == "diverged" and results[1]["final_eval_loss"] is None
  assert "consecutive bad steps" in results[1]["reason"]
  assert not (dirs[1] / "checkpoints").exists() or not any(
      p.name.isdigit() for p in (dirs[1] / "checkpoints").iterdir())
  events = (dirs[1] / "events.jsonl").read_text()
  assert '"diverged"' in events
  for k in (0, 2):
    assert results[k]["status"] == "done"
    lone_cfg, lone_dir, summary = lone[k]
    assert lone_cfg == cfgs[k]
    assert results[k]["final_eval_loss"] == pytest.approx(summary["final_eval_loss"], rel=1e-5)
    a, b = read_metrics(str(dirs[k])), read_metrics(str(lone_dir))
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 _final_params(cfgs[k], dirs[k]), _final_params(lone_cfg, lone_dir))


def _saving(cfg: Config, every_steps: int) -> Config:
  return dataclasses.replace(cfg, checkpoint=dataclasses.replace(
      cfg.checkpoint, every_steps=every_steps, keep=3))


def _events(workdir: Path) -> list[dict]:
  return [json.loads(l) for l in (workdir / "events.jsonl").read_text().splitlines()]


def _stop_group(cfgs, dirs, after_steps: int, monkeypatch) -> None:
  """Trains the group until a stop request arrives after `after_steps` steps (between two
  log records, as a signal would), and checks it raised Preempted there."""
  flag, calls, step = StopFlag(), [0], GroupTrainer.step

  def counting(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == after_steps:
      flag.request()
    return step(self, *args, **kwargs)
  with monkeypatch.context() as m:
    m.setattr(GroupTrainer, "step", counting)
    with pytest.raises(Preempted, match=f"step {after_steps}"):
      train_group(cfgs, [str(d) for d in dirs], mesh=_mesh(), members_per_vmap=1, stop=flag)


def _group_steps(cfgs, dirs, monkeypatch) -> tuple[list[dict], int]:
  """train_group's summaries and how many group steps it ran."""
  calls, step = [0], GroupTrainer.step

  def counting(self, *args, **kwargs):
    calls[0] += 1
    return step(self, *args, **kwargs)
  with monkeypatch.context() as m:
    m.setattr(GroupTrainer, "step", counting)
    results = train_group(cfgs, [str(d) for d in dirs], mesh=_mesh(), members_per_vmap=1)
  return results, calls[0]


@pytest.fixture(scope="module")
def straight_group(tmp_path_factory):
  """The three members as one uninterrupted group, saving every 3 steps."""
  cfgs = [_saving(_member(*m), 3) for m in MEMBERS]
  dirs = [tmp_path_factory.mktemp("straight") / str(i) for i in range(len(cfgs))]
  results = train_group(cfgs, [str(d) for d in dirs], mesh=_mesh(), members_per_vmap=1)
  return cfgs, dirs, results


def _assert_resumed_equals_straight(workdir: Path, straight_dir: Path, cfg: Config,
                                    stopped_at: int) -> None:
  """Bitwise final parameters; the same log records, where the stop cut no interval."""
  a = {r["step"]: r for r in read_metrics(str(workdir))}
  b = {r["step"]: r for r in read_metrics(str(straight_dir))}
  assert sorted(a) == sorted(set(b) | {stopped_at})   # the stop flushed its partial interval
  cut = min(s for s in b if s > stopped_at)           # its interval began before the stop
  for s, rb in b.items():
    same = set(rb) - set(TIMING) - ({"loss", "bits_per_token", "skipped"} if s == cut else set())
    assert {k: a[s][k] for k in same} == {k: rb[k] for k in same}, s
  jax.tree.map(np.testing.assert_array_equal, _final_params(cfg, workdir),
               _final_params(cfg, straight_dir))


def test_stopped_group_resumes_as_a_group_and_equals_the_uninterrupted(straight_group,
                                                                      tmp_path, monkeypatch):
  cfgs, straight_dirs, straight = straight_group
  dirs = [tmp_path / str(i) for i in range(len(cfgs))]
  _stop_group(cfgs, dirs, 10, monkeypatch)
  for d in dirs:   # every 3 steps (keep 3), then the stop's own save
    assert sorted(int(p.name) for p in (d / "checkpoints").iterdir()) == [6, 9, 10]
    last = _events(d)[-1]
    assert (last["event"], last["step"]) == ("preempted", 10)
  results, steps = _group_steps(cfgs, dirs, monkeypatch)
  assert steps == STEPS - 10   # resumed at step 10, not from scratch
  for k, (cfg, d, res) in enumerate(zip(cfgs, dirs, results)):
    assert res["status"] == "done" and res["group_size"] == 3
    assert res["final_eval_loss"] == straight[k]["final_eval_loss"]
    assert [e.get("resumed_at") for e in _events(d) if e["event"] == "group"] == [None, 10]
    _assert_resumed_equals_straight(d, straight_dirs[k], cfg, stopped_at=10)


def test_member_whose_checkpoint_differs_resumes_alone(straight_group, tmp_path, monkeypatch):
  cfgs, straight_dirs, straight = straight_group
  dirs = [tmp_path / str(i) for i in range(len(cfgs))]
  _stop_group(cfgs, dirs, 10, monkeypatch)
  # Member 2's newest step is unusable: it restores step 9, which its mates are past.
  (dirs[2] / "checkpoints" / "10" / "state" / "_METADATA").write_text("{not json")
  results, steps = _group_steps(cfgs, dirs, monkeypatch)
  assert steps == STEPS - 10   # members 0 and 1; member 2 trained alone
  assert [r["group_size"] for r in results] == [2, 2, 1]
  assert (dirs[2] / "checkpoints" / "10.corrupt").is_dir()   # set aside, not deleted
  for k, (cfg, d, res) in enumerate(zip(cfgs, dirs, results)):
    assert res["final_eval_loss"] == pytest.approx(straight[k]["final_eval_loss"], rel=1e-6)
    if k < 2:
      _assert_resumed_equals_straight(d, straight_dirs[k], cfg, stopped_at=10)
    else:   # alone it replays steps 10-24 from step 9: the lone step, bitwise the group's
      jax.tree.map(np.testing.assert_array_equal, _final_params(cfg, d),
                   _final_params(cfg, straight_dirs[k]))


def _fresh_group(cfgs, root: Path, mesh=None) -> tuple[list[dict], list[Path]]:
  """train_group(cfgs) with no programs built before it (on _mesh() unless given)."""
  from lmjax import train as train_lib
  with train_lib._PROGRAMS_LOCK:
    train_lib._PROGRAMS.clear()
  dirs = [root / str(i) for i in range(len(cfgs))]
  return train_group(cfgs, [str(d) for d in dirs], mesh=mesh or _mesh()), dirs


def _assert_bitwise_same_runs(cfgs, dirs, other_dirs) -> None:
  for cfg, d, o in zip(cfgs, dirs, other_dirs):
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(str(d))] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(str(o))]
    jax.tree.map(np.testing.assert_array_equal, _final_params(cfg, d), _final_params(cfg, o))


def test_groups_of_one_shape_share_programs_and_train_as_if_fresh(tmp_path):
  # A sweep's groups of one model size at other budgets differ in lr, warmup, length and
  # seeds, which reach the step as inputs: the second group reuses the first's programs
  # and trains bit for bit as it would with its own.
  from lmjax.compile_clock import CompileClock
  r = dataclasses.replace
  a = [_member(*m) for m in MEMBERS]
  b = [r(c, name=c.name + "-b", optim=r(c.optim, lr=c.optim.lr / 2, warmup_steps=3),
         train=r(c.train, steps=16, seed=c.train.seed + 10), data=r(c.data, seed=c.data.seed + 1))
       for c in a]
  fresh, fresh_dirs = _fresh_group(b, tmp_path / "fresh")
  _fresh_group(a, tmp_path / "a")
  mesh = _mesh()
  with CompileClock() as clock:
    assert GroupTrainer(b, mesh).train_step is GroupTrainer(a, mesh).train_step
    dirs = [tmp_path / "b" / str(i) for i in range(3)]
    reused = train_group(b, [str(d) for d in dirs], mesh=mesh)
  assert clock.programs == 0   # nothing traced, lowered or compiled again
  assert [x["final_eval_loss"] for x in reused] == [x["final_eval_loss"] for x in fresh]
  _assert_bitwise_same_runs(b, dirs, fresh_dirs)
  # Another group size, or another way of batching the members, is another program.
  assert GroupTrainer(a[:2], mesh).train_step is not GroupTrainer(a, mesh).train_step
  assert (GroupTrainer(a, mesh, members_per_vmap=None).train_step
          is not GroupTrainer(a, mesh).train_step)


def test_group_compiled_ahead_leaves_the_group_nothing_to_compile(tmp_path):
  # The sweep compiles the next group's programs in the background while a run trains
  # (lmjax.sweep._compile_next). The group that follows makes no program itself, waiting
  # if they are still compiling, and trains bit for bit as with its own.
  from lmjax import train as train_lib
  from lmjax.compile_clock import CompileClock
  from lmjax.multirun import compile_group_ahead
  cfgs = [_member(*m) for m in MEMBERS[:2]]
  mesh = sharding.make_mesh(cfgs[0].mesh)   # what the sweep's groups and their ahead use
  fresh, fresh_dirs = _fresh_group(cfgs, tmp_path / "fresh", mesh)
  with train_lib._PROGRAMS_LOCK:
    train_lib._PROGRAMS.clear()
  dirs = [tmp_path / "ahead" / str(i) for i in range(2)]
  with train_lib.CompileAhead() as ahead:
    assert compile_group_ahead(ahead, cfgs)
    assert not compile_group_ahead(ahead, cfgs)   # queued already
    with CompileClock() as clock:
      results = train_group(cfgs, [str(d) for d in dirs])
  assert clock.programs == 0
  assert ahead.compiled == 1 and ahead.seconds > 0
  assert [x["final_eval_loss"] for x in results] == [x["final_eval_loss"] for x in fresh]
  _assert_bitwise_same_runs(cfgs, dirs, fresh_dirs)
  with train_lib.CompileAhead() as ahead:
    assert not compile_group_ahead(ahead, cfgs)   # built already
    # Configs that cannot be one group queue nothing; their run reports the problem.
    other = dataclasses.replace(cfgs[1], model=dataclasses.replace(cfgs[1].model, d_model=64))
    assert not compile_group_ahead(ahead, [cfgs[0], other])
  assert ahead.compiled == 0 and not train_lib._AHEAD


def test_nan_batch_or_skip_flag_skips_only_that_member():
  cfgs = [_member(*m) for m in MEMBERS]
  mesh = _mesh()
  # One vmap over the members: a NaN in member 1 must not leak into the others, which share
  # its batched ops. (The program is the first test's: the compilation cache serves it.)
  group = GroupTrainer(cfgs, mesh, members_per_vmap=None)
  steps, K = 8, len(cfgs)
  pipes = [data_lib.make_pipeline(c.data, seq_len=c.train.seq_len,
                                  global_batch=c.train.global_batch) for c in cfgs]
  batches = [[p.next() for p in pipes] for _ in range(steps)]  # [step][member]
  nan_at, flag_at = 3, 5  # member 1 gets a NaN mask at step 3; member 2 a skip flag at step 5
  state_K = group.init_state()
  for s in range(steps):
    local = [dict(b) for b in batches[s]]
    if s == nan_at:
      local[1]["mask"] = np.full_like(local[1]["mask"], np.nan)
    skip = [k == 2 and s == flag_at for k in range(K)]
    before = jax.device_get(state_K["params"])
    state_K, metrics = group.step(state_K, group.put_batch(local), skip=skip)
    m = jax.device_get(metrics)
    expected = [(k == 1 and s == nan_at) or (k == 2 and s == flag_at) for k in range(K)]
    assert list(m["skipped"]) == expected, (s, m["skipped"])
    assert list(m["nonfinite"]) == [k == 1 and s == nan_at for k in range(K)]
    assert np.all(np.isfinite(m["loss"][[0, 2]]))
    after = jax.device_get(state_K["params"])
    for k in range(K):  # a skipped member keeps its exact parameters
      if expected[k]:
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(x[k], y[k]), before, after)
  # The lone reference: the clean batches, with that member's step skipped by the flag.
  for k, cfg in enumerate(cfgs):
    trainer = Trainer(cfg, mesh)
    state = trainer.init_state()
    for s in range(steps):
      state, _ = trainer.step(state, sharding.global_batch_from_local(batches[s][k], mesh),
                              skip=(k == 1 and s == nan_at) or (k == 2 and s == flag_at))
    got = jax.device_get(group.member_state(state_K, k))
    want = jax.device_get(state)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5),
                 got["params"], want["params"])  # atol: see _assert_same_run
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                 got["opt_state"], want["opt_state"])
    assert int(got["step"]) == steps


@pytest.mark.parametrize("members_per_vmap", [None, 1])
def test_sharded_group_equals_the_single_device_group(members_per_vmap):
  # Job 1 on a pod: the group's members laid out over a (data, fsdp, tensor) = (2, 2, 2)
  # mesh as their lone runs would be, the group axis unsharded. Same members, same batches,
  # the same 3 steps as on one device.
  cfgs = [_member(*m) for m in MEMBERS]
  pipes = [data_lib.make_pipeline(c.data, seq_len=c.train.seq_len,
                                  global_batch=c.train.global_batch) for c in cfgs]
  batches = [[p.next() for p in pipes] for _ in range(3)]
  params = []
  for mesh in (_mesh(), sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2),
                                           jax.devices()[:8])):
    group = GroupTrainer(cfgs, mesh, members_per_vmap=members_per_vmap)
    state_K = group.init_state()
    for local in batches:
      state_K, metrics = group.step(state_K, group.put_batch(local))
    assert not np.any(jax.device_get(metrics["skipped"]))
    leaves = jax.tree.leaves(state_K["params"])
    # Really laid out over the 8 devices: some weights are split, not just replicated.
    assert any(not x.sharding.is_fully_replicated for x in leaves) == (mesh.size == 8)
    params.append(jax.device_get(state_K["params"]))
  # Sharded matmuls reduce in another order: float rounding only, which Adam can blow up to
  # ~2e-6 in a rare token's near-zero embedding gradient (jax 0.11.2 did, at [2, 150, 30]):
  # hence atol 1e-5, as in _assert_same_run. Another member's parameters differ from these
  # by orders of magnitude more.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), *params)
  first = jax.tree.leaves(params[0])[0]
  assert not np.allclose(first[0], first[1], rtol=1e-3)


def test_configs_that_cannot_share_a_group_are_one_line_errors():
  a = _member(0, 0, 1e-2)
  ok = _member(4, 9, 5e-3)
  check_groupable([a, ok])
  assert group_key(a) == group_key(ok)
  r = dataclasses.replace
  cases = [
      (r(a, model=r(a.model, d_model=64)), "model.d_model"),
      (r(a, train=r(a.train, steps=STEPS + 1)), "train.steps"),
      (r(a, optim=r(a.optim, warmup_steps=3)), "optim.warmup_steps"),
  ]
  for other, field in cases:
    assert group_key(other) != group_key(a)
    with pytest.raises(ConfigError) as e:
      check_groupable([a, other])
    msg = str(e.value)
    assert field in msg and "\n" not in msg, msg
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
      GroupTrainer([a, other], _mesh())


def test_group_step_cuts_batches_like_the_lone_step():
  """A group runs each member with its lone run's cpu_splits: bitwise the lone step."""
  from lmjax.multirun import make_group_step
  from lmjax.train import make_train_step
  cfg = _member(*MEMBERS[0])
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cpu_splits=2))
  group = GroupTrainer([cfg], _mesh())
  assert group.member.splits == 2
  tx = group.member.tx
  state = group.member.init_state()
  tok = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (8, 33), np.int32)
  mask = np.ones((8, 32), np.float32)
  mask[1, 9:] = 0
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "mask": mask}
  hparams = {"total_steps": np.int32(STEPS), "warmup_steps": np.int32(2),
             "peak_lr": np.float32(cfg.optim.lr), "skip": np.bool_(False)}
  stack = lambda tree: jax.tree.map(lambda x: np.asarray(x)[None], tree)
  lone_s, lone_m = jax.jit(make_train_step(cfg, tx, 2))(state, batch, hparams)
  group_s, group_m = jax.jit(make_group_step(cfg, tx, 1, 2))(
      stack(jax.device_get(state)), stack(batch), stack(hparams))
  # The new state is bitwise the lone one. The metrics' norms are reductions, which the
  # vmapped program may sum in another order (param_norm was 1 ulp apart with equal params).
  jax.tree.map(lambda g, l: np.testing.assert_array_equal(np.asarray(g)[0], l),
               jax.device_get(group_s), jax.device_get(lone_s))
  for key in ("loss", "grad_norm", "param_norm"):
    assert float(group_m[key][0]) == pytest.approx(float(lone_m[key]), rel=1e-6), key
