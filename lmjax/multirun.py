"""Several same-shape runs trained at once: one compiled step for a group of K members.

Scaling-law sweeps on a CPU train many tiny models, one small program at a time. Runs that
differ only in their seeds or peak learning rate can instead be stacked along a leading
group axis and trained by one compiled step built from the very step a lone run uses
(`lmjax.train.make_train_step`): either `jax.vmap` over the members (K small matmuls become
one batched matmul), or, with `members_per_vmap=1`, the lone step's computation K times in
a row inside one program (`jax.lax.map`), which keeps each member's working set as small as
a lone run's and saves K-1 dispatches. Chunks of m members vmapped in turn sit between.
On the 2-core CPU of docs/training.md the vmap gained at most ~10% and lost 23-41% for
d_model >= 48 at K >= 4, while the in-program loop ran 1.07-1.37x as many tokens/s as K
lone steps for K >= 2, so "auto" picks it on CPU (and the vmap elsewhere, unmeasured).

  results = train_group([cfg_a, cfg_b, cfg_c], ["runs/a", "runs/b", "runs/c"])

What a member may vary (`MEMBER_FIELDS`): `name`, `train.seed` (parameter init),
`data.seed` (training order) and `optim.lr` (peak learning rate). Everything else, model,
batch, seq_len, steps, schedule, warmup, guard, checkpoint and logging settings, must be
equal; `check_groupable` says which field is not, in one line. `group_key` is equal for
configs that can share a group, so a sweep can bucket its runs by it.

Equivalence. Every member has its own parameters, Adam state, guard state, step, rng,
batch (`batch_KBT`: its own pipeline's batch, stacked) and hparams (peak lr, skip flag),
and its initial state is exactly the one `Trainer.init_state` builds from its
train.seed. Member k therefore follows the lone run of its config up to float rounding of
the batched ops (tests/test_multirun.py checks parameters, to rtol 1e-5 / atol 1e-5, and
loss curves and eval losses, to rtol 1e-5, against `lmjax.train.train`); with
members_per_vmap=1 its parameters and losses came out bitwise equal.

Each workdir gets what `train()` writes: config.json, metrics.jsonl (same records;
`tokens_per_s` and `mfu` are the member's own rate, so the group's is their sum),
TensorBoard events, skip_list.jsonl, events.jsonl and a final checkpoint in the lone
format, which `train()` (and so the sweep) accepts as a finished run.

Checkpoints and resume. Every member saves its own lone-format checkpoint when a lone
run would: every checkpoint.every_steps / every_seconds (healthy members only, as a lone
run saves), on a stop request, and at the end. A later `train_group` over the same
workdirs resumes the members whose newest checkpoints hold the same unfinished step as one
group from that step (their data positions, skip lists and metrics pick up where they
were); it hands `lmjax.train.train` every other member with a checkpoint: a finished run
(re-evaluated), a lone run to resume, one whose newest step is unusable or differs from
its mates', or one that has rolled back. A resumed group equals the uninterrupted one
(tests/test_multirun.py).

Differences from a lone run, all deliberate simplifications for tiny runs:
  * No rollbacks: a member whose bad-step streak reaches guard.max_consecutive_bad is
    stopped (its later steps are skipped, it writes no more metrics and no checkpoint) and
    reported with status "diverged"; the other members go on. With guard.max_rollbacks=0
    this is exactly what a lone run does.
  * A stop request (`stop`) checkpoints every live member after the current step and
    raises Preempted.
  * One process only. On a multi-device mesh the group axis is not sharded: every member
    is laid out as its lone run would be (parameters by the logical rules, batch rows over
    data x fsdp), and the members are stacked on each device.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lmjax import allocator
from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import flops as flops_lib
from lmjax import provenance
from lmjax import sharding
from lmjax.compile_clock import CompileClock
from lmjax.config import Config
from lmjax.data import pipeline as data_lib
from lmjax.errors import CheckpointError, ConfigError, require
from lmjax.metrics import MetricsWriter, ProgressLine
from lmjax.preemption import Preempted, StopFlag
from lmjax.train import (RESUMABLE_CHANGES, Diverged, EventLog, SkipList, State, Trainer,
                         _cache_key, _check_workdir_config, _eval_record, _peak_flops,
                         abstract_batch, cached_programs, checkpoint_extras,
                         cpu_compiler_options, cpu_splits, dot_options, interval_record,
                         make_eval_step, make_train_step, runs_onednn_dots, skip_reason, train,
                         wait_for_ahead)

# Config keys in which the members of one group may differ (dotted, as config_diff names them).
MEMBER_FIELDS = ("name", "train.seed", "data.seed", "optim.lr")


# ------------------------------------------------------------------------------ grouping

def _blanked(cfg: Config) -> dict:
  d = config_lib.to_dict(cfg)
  d["name"] = ""
  d["train"]["seed"] = d["data"]["seed"] = 0
  d["optim"]["lr"] = 0.0
  return d


def group_key(cfg: Config) -> str:
  """A hash of everything but MEMBER_FIELDS: configs with equal keys can share a group."""
  blob = json.dumps(_blanked(cfg), sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def check_groupable(cfgs: Sequence[Config]) -> None:
  """ConfigError (one line, naming the first differing field) unless cfgs can be one group."""
  require(len(cfgs) >= 1, "a group needs at least one config.")
  first = config_lib.to_dict(cfgs[0])
  for k, cfg in enumerate(cfgs[1:], start=1):
    diffs = ckpt_lib.config_diff(first, config_lib.to_dict(cfg), MEMBER_FIELDS)
    if diffs:
      key, a, b = diffs[0]
      raise ConfigError(
          f"config {k}{f' ({cfg.name})' if cfg.name else ''} cannot train in a group with "
          f"config 0: {key} {json.dumps(a)} != {json.dumps(b)}"
          f"{f' (and {len(diffs) - 1} more field(s))' if len(diffs) > 1 else ''}; members of "
          f"a group may differ only in {', '.join(MEMBER_FIELDS)}, so train it in its own "
          "group (bucket configs by lmjax.multirun.group_key).")


# XLA:CPU runs some reductions of the vmapped step as YNNPACK fusions that are several times
# slower than XLA's own loops: the norm-scale gradients, summed over the tokens, which the
# leading group axis turns into a middle axis. Leaving YNNPACK only the dots raised a K=1
# vmapped group from 0.71-0.82x to 0.80-1.02x the lone step's speed (docs/training.md).
# Only the group's own vmapped programs are compiled with it.
CPU_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def default_compiler_options(mesh: jax.sharding.Mesh) -> dict | None:
  """The lone step's CPU options plus CPU_COMPILER_OPTIONS on a CPU mesh whose jaxlib
  accepts them, else None (XLA's own)."""
  return cpu_compiler_options(mesh, CPU_COMPILER_OPTIONS)


def _stacked(s: NamedSharding) -> NamedSharding:
  """The sharding of K stacked copies of an array laid out as `s`: the group axis is whole."""
  return NamedSharding(s.mesh, P(None, *s.spec))


# ----------------------------------------------------------------------- compiled group

def _over_members(fn: Callable, xs_K, members_per_vmap: int | None):
  """fn over the leading (member) axis of xs_K: one vmap (None), or chunks of
  `members_per_vmap` members vmapped and the chunks run one after another (1: no vmap)."""
  if members_per_vmap is None:
    return jax.vmap(fn)(xs_K)
  if members_per_vmap == 1:
    return jax.lax.map(fn, xs_K)
  return jax.lax.map(fn, xs_K, batch_size=members_per_vmap)


def make_group_step(cfg: Config, tx, members_per_vmap: int | None = None,
                    splits: int = 1) -> Callable:
  """(state_K, batch_KBT, hparams_K) -> (state_K, metrics_K): lmjax.train.make_train_step
  for every member, each with its own state, batch and hparams (leading axis K).

  members_per_vmap None vmaps all K members (one batched program); an integer m vmaps m
  members at a time and loops over the chunks inside the compiled step, and m=1 runs the
  lone step's own computation K times in a row (jax.lax.map), without the Python dispatch
  of K separate steps. `splits` is the lone run's `lmjax.train.cpu_splits`.
  """
  step = make_train_step(cfg, tx, splits)

  def group_step(state_K: State, batch_KBT: dict, hparams_K: dict):
    return _over_members(lambda args: step(*args), (state_K, batch_KBT, hparams_K),
                         members_per_vmap)

  return group_step


def resolve_members_per_vmap(members_per_vmap: int | str | None, mesh: jax.sharding.Mesh,
                             size: int) -> int | None:
  """"auto" is 1 on CPU (one vmap over the members measured slower than K lone steps for
  d_model >= 32, docs/training.md) and None (one vmap) elsewhere; 1 < m >= size is None."""
  if members_per_vmap == "auto":
    members_per_vmap = 1 if sharding.is_cpu(mesh) else None
  if members_per_vmap is not None:
    require(isinstance(members_per_vmap, int) and not isinstance(members_per_vmap, bool)
            and members_per_vmap >= 1, f"members_per_vmap={members_per_vmap!r} is invalid; "
            "use an integer >= 1, None (vmap all members) or 'auto'.")
    if members_per_vmap >= size and members_per_vmap > 1:  # one chunk: a plain vmap
      members_per_vmap = None
  return members_per_vmap


class _GroupPrograms(NamedTuple):
  state_shardings: Any
  abstract_state: Any
  batch_sharding: NamedSharding
  train_step: Callable
  eval_step: Callable
  stack: Callable
  take: Callable


def _resolve(cfgs: Sequence[Config], mesh: jax.sharding.Mesh, members_per_vmap: int | str | None,
             compiler_options: dict | str | None) -> tuple[int | None, dict | None, tuple]:
  """(members_per_vmap, compiler options, lmjax.train.cached_programs key) of a group."""
  per_vmap = resolve_members_per_vmap(members_per_vmap, mesh, len(cfgs))
  cfg = cfgs[0]
  if compiler_options == "default":
    # The ynn option fixes vmapped reductions; a member at a time is the lone step's
    # program, compiled as a lone step is.
    compiler_options = (cpu_compiler_options(mesh, dot_options(cfg, mesh)) if per_vmap == 1
                        else default_compiler_options(mesh))
  # The builders' identities too, as in the lone key: a test that swaps one gets new programs.
  key = ("group", _cache_key(cfg, mesh, cpu_splits(cfg, mesh)), len(cfgs), per_vmap,
         repr(compiler_options), make_group_step, _over_members, _build_programs)
  return per_vmap, compiler_options, key


def _build_programs(cfg: Config, mesh: jax.sharding.Mesh, member: Trainer, size: int,
                    members_per_vmap: int | None, compiler_options: dict | None) -> _GroupPrograms:
  state_shardings = jax.tree.map(_stacked, member.state_shardings)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct((size, *x.shape), x.dtype, sharding=s),
      member.abstract_state, state_shardings)
  batch_sharding = NamedSharding(mesh, P(None, ("data", "fsdp")))
  rep = sharding.replicated(mesh)
  rules = sharding.activation_rules(mesh)
  member_step = make_group_step(cfg, member.tx, members_per_vmap, member.splits)
  member_eval = make_eval_step(cfg)

  def group_step(state_K: State, batch_KBT: dict, hparams_K: dict):
    with nn.logical_axis_rules(rules):
      return member_step(state_K, batch_KBT, hparams_K)

  def group_eval(params_K, batch_BT: dict):
    with nn.logical_axis_rules(rules):  # every member sees the same eval batch
      return _over_members(lambda p: member_eval(p, batch_BT), params_K, members_per_vmap)

  return _GroupPrograms(
      state_shardings, abstract_state, batch_sharding,
      jax.jit(group_step, in_shardings=(state_shardings, batch_sharding, rep),
              out_shardings=(state_shardings, rep), donate_argnums=0,
              compiler_options=compiler_options),
      jax.jit(group_eval, in_shardings=(state_shardings["params"], sharding.batch_sharding(mesh)),
              out_shardings=rep, compiler_options=compiler_options),
      jax.jit(lambda *states: jax.tree.map(lambda *xs: jnp.stack(xs), *states),
              out_shardings=state_shardings),
      jax.jit(lambda state_K, k: jax.tree.map(lambda x: x[k], state_K),
              out_shardings=member.state_shardings))


class GroupTrainer:
  """Compiled steps for a group of same-shape configs on one mesh.

  State arrays carry a leading group axis of size K (`state_K`); batches are
  `{"inputs": int32[K, B, T], ...}` (`batch_KBT`), B the per-member global batch.
  """

  def __init__(self, cfgs: Sequence[Config], mesh: jax.sharding.Mesh, *,
               members_per_vmap: int | str | None = "auto",
               compiler_options: dict | str | None = "default"):
    """Builds the group's programs, or takes those of an earlier group of the same
    programs and size (lmjax.train.cached_programs); compiles nothing yet.

    Args:
      cfgs: configs that differ at most in MEMBER_FIELDS (else ConfigError).
      mesh: the mesh every member is laid out on, as its lone run would be.
      members_per_vmap: see make_group_step; "auto" (resolve_members_per_vmap) is 1 on CPU.
      compiler_options: XLA options for the group's vmapped programs; "default" picks
        default_compiler_options(mesh), None compiles with XLA's defaults.
    """
    check_groupable(cfgs)
    self.cfgs, self.mesh = list(cfgs), mesh
    self.size = len(self.cfgs)
    # The programs are shared with earlier groups of the same programs and size: a sweep's
    # groups of one model size at several budgets (lr, warmup and length reach the step as
    # hparams).
    self.members_per_vmap, compiler_options, key = _resolve(cfgs, mesh, members_per_vmap,
                                                            compiler_options)
    self.compiler_options = compiler_options
    cfg = self.cfgs[0]
    wait_for_ahead(key)   # its thread builds the member's programs below too
    # The lone trainer of member 0 supplies what members share: the optimizer (it leaves
    # out the lr, which comes in hparams), shardings, the init and the eval step. Its own
    # jitted train step is never called, so never compiled.
    self.member = Trainer(cfg, mesh)
    self.total_steps = self.member.total_steps
    self.tx = self.member.tx
    self._hparams = {
        "total_steps": np.full(self.size, self.total_steps, np.int32),
        "warmup_steps": np.full(self.size, cfg.optim.warmup_steps, np.int32),
        "peak_lr": np.array([c.optim.lr for c in self.cfgs], np.float32),
    }
    (self.state_shardings, self.abstract_state, self.batch_sharding, self.train_step,
     self.eval_step, self._stack, self._take) = cached_programs(
         key, lambda: _build_programs(cfg, mesh, self.member, self.size,
                                      self.members_per_vmap, compiler_options))

  def init_state(self) -> State:
    """K stacked states; member k's is exactly Trainer.init_state(cfgs[k].train.seed)."""
    return self.stack([self.member.init_state(c.train.seed) for c in self.cfgs])

  def stack(self, states: Sequence[State]) -> State:
    """K lone states (member k's at k) -> one group state."""
    with jax.set_mesh(self.mesh):
      return self._stack(*states)

  def member_state(self, state_K: State, k: int) -> State:
    """Member k's state, laid out as its lone run's (what its checkpoint holds)."""
    with jax.set_mesh(self.mesh):
      return self._take(state_K, np.int32(k))

  def put_batch(self, local_batches: Sequence[dict]) -> dict:
    """K host batches (one per member, each B x T) -> one device batch of (K, B, T) arrays."""
    return {key: jax.device_put(np.stack([b[key] for b in local_batches]),
                                self.batch_sharding) for key in local_batches[0]}

  def step(self, state_K: State, batch_KBT: dict,
           skip: Sequence[bool] | None = None) -> tuple[State, dict]:
    """One step of every member; metrics are arrays of shape (K,)."""
    skip_K = np.zeros(self.size, bool) if skip is None else np.asarray(skip, bool)
    require(skip_K.shape == (self.size,),
            f"skip has shape {skip_K.shape}; give one flag per member ({self.size}).")
    with jax.set_mesh(self.mesh):
      return self.train_step(state_K, batch_KBT, dict(self._hparams, skip=skip_K))

  def evaluate(self, params_K, batches: list[dict]) -> np.ndarray:
    """Mean eval loss per member, float64[K], over the same (global) eval batches."""
    with jax.set_mesh(self.mesh):
      sums = [self.eval_step(params_K, b) for b in batches]
    ce_K, n_K = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    return ce_K / np.maximum(n_K, 1.0)


def compile_group_ahead(ahead, cfgs: Sequence[Config],
                        members_per_vmap: int | str | None = "auto") -> bool:
  """Queues on `ahead` (a lmjax.train.CompileAhead) every program that train_group(cfgs)
  will run from step 0: the group's train, eval, stack and take steps and the members'
  init. False, and nothing queued, if they are built or queued already or cfgs cannot be a
  group (their run will say why)."""
  try:
    check_groupable(cfgs)
    mesh = sharding.make_mesh(cfgs[0].mesh)
    key = _resolve(cfgs, mesh, members_per_vmap, "default")[2]
  except Exception:  # pylint: disable=broad-except - the run reports its own bad config
    return False
  return ahead.submit_programs(key, lambda: _compile_group(cfgs, mesh, members_per_vmap))


def _compile_group(cfgs: Sequence[Config], mesh: jax.sharding.Mesh, members_per_vmap) -> None:
  group = GroupTrainer(cfgs, mesh, members_per_vmap=members_per_vmap)
  K = group.size
  batch_BT = abstract_batch(cfgs[0], mesh)   # the eval batch; each member's train batch
  batch_KBT = {k: jax.ShapeDtypeStruct((K, *v.shape), v.dtype, sharding=group.batch_sharding)
               for k, v in batch_BT.items()}
  with jax.set_mesh(mesh):
    group.member._init.lower(jax.random.key(0)).compile()  # pylint: disable=protected-access
    group._stack.lower(*[group.member.abstract_state] * K).compile()
    group.train_step.lower(group.abstract_state, batch_KBT,
                           dict(group._hparams, skip=np.zeros(K, bool))).compile()
    group.eval_step.lower(group.abstract_state["params"], batch_BT).compile()
    group._take.lower(group.abstract_state, np.int32(0)).compile()


# ------------------------------------------------------------------------------ the loop

class _Member:
  """One member's effects: its pipeline, its files, and how it is doing."""

  def __init__(self, cfg: Config, workdir: str, pipeline, start_step: int):
    self.cfg, self.workdir, self.pipeline = cfg, workdir, pipeline
    os.makedirs(workdir, exist_ok=True)
    config_lib.save(cfg, os.path.join(workdir, "config.json"))
    self.skips = SkipList(os.path.join(workdir, "skip_list.jsonl"))
    self.events = EventLog(os.path.join(workdir, "events.jsonl"))
    # Records after the start step are from steps that will run again.
    self.writer = MetricsWriter(workdir, truncate_after_step=start_step)
    self.checkpointer = ckpt_lib.Checkpointer(workdir, cfg.checkpoint,
                                              keys_that_may_change=RESUMABLE_CHANGES)
    self.diverged: str | None = None   # the reason, once it has
    self.last_eval: float | None = None


def _latest_checkpoint(workdir: str) -> int | None:
  """The newest committed step under workdir (None: none), read from the directory names
  alone: a workdir without checkpoints is left untouched."""
  ckpt_dir = os.path.join(workdir, ckpt_lib.CHECKPOINT_SUBDIR)
  if not os.path.isdir(ckpt_dir):
    return None
  return max((int(n) for n in os.listdir(ckpt_dir) if n.isdigit()), default=None)


def _restore(cfg: Config, workdir: str, trainer: Trainer, step: int) -> tuple | None:
  """(state, data position) of the run in workdir if its newest usable checkpoint is `step`
  and it has never rolled back (its lr is then the config's); else None (train it alone)."""
  try:
    with ckpt_lib.Checkpointer(workdir, cfg.checkpoint,
                               keys_that_may_change=RESUMABLE_CHANGES) as checkpointer:
      state, extras = checkpointer.restore(abstract_state=trainer.abstract_state,
                                           current_config=config_lib.to_dict(cfg))
  except CheckpointError:  # train() says what is wrong, in one line
    return None
  if int(jax.device_get(state["step"])) != step or extras.get("rollbacks", 0):
    return None
  return state, extras["data"]


def _train_alone(cfg: Config, workdir: str, mesh, stop) -> dict:
  try:
    return dict(train(cfg, workdir, mesh=mesh, stop=stop), status="done", reason=None,
                group_size=1)
  except Diverged as e:
    return {"steps": cfg.total_steps(), "final_eval_loss": None, "status": "diverged",
            "reason": str(e), "group_size": 1}


def train_group(cfgs: Sequence[Config], workdirs: Sequence[str], *,
                mesh: jax.sharding.Mesh | None = None,
                members_per_vmap: int | str | None = "auto",
                on_step: Callable[[int, int, dict], None] | None = None,
                stop: StopFlag | None = None) -> list[dict]:
  """Trains cfgs[k] in workdirs[k] for every k, as one group; returns their summaries.

  Each summary has the keys of `lmjax.train.train`'s (steps, tokens, flops,
  final_eval_loss, wall_s, compile_s, first_step_s, skipped_steps, rollbacks) plus status
  ("done" or "diverged"), reason, group_size, members_per_vmap, group_wall_s and
  group_compile_s.
  wall_s and compile_s are the member's share (the group's divided by K), so summing over
  runs, as the sweep does, counts the time once. A diverged member has final_eval_loss
  None.

  Args:
    cfgs: configs that differ at most in MEMBER_FIELDS (else ConfigError).
    workdirs: one distinct directory per config.
    mesh: default sharding.make_mesh(cfgs[0].mesh).
    members_per_vmap: how the members are batched (see make_group_step and
      resolve_members_per_vmap): None vmaps all, 1 runs them one after another inside one
      compiled step, "auto" picks 1 on CPU and None elsewhere.
    on_step: called with (member index, step, record) after each record is written.
    stop: when set, the group checkpoints every live member after the current step and
      raises Preempted; the next call resumes them as a group from that step.
  """
  require(len(cfgs) == len(workdirs),
          f"train_group got {len(cfgs)} configs but {len(workdirs)} workdirs; give one each.")
  check_groupable(cfgs)
  paths = [os.path.abspath(w) for w in workdirs]
  require(len(set(paths)) == len(paths),
          "train_group got the same workdir twice; give every member its own.")
  require(jax.process_count() == 1, "train_group runs in one process only; train "
          "multi-process runs one at a time with lmjax.train.", ConfigError)
  cfg = cfgs[0]
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  for c, w in zip(cfgs, workdirs):
    _check_workdir_config(c, w)
  data_lib.check_vocab(cfg.data, cfg.model.vocab_size)

  # Members whose newest checkpoints hold the same unfinished step (0: none) train on as
  # a group; train() resumes or re-evaluates the rest alone.
  total = cfg.total_steps()
  by_step: dict[int, list[int]] = {}
  for k, w in enumerate(workdirs):
    by_step.setdefault(_latest_checkpoint(w) or 0, []).append(k)
  groups = {s: ks for s, ks in by_step.items() if s < total and (s == 0 or len(ks) > 1)}
  alone = [k for s, ks in by_step.items() if s not in groups for k in ks]
  results: list[dict | None] = [None] * len(cfgs)
  for start, ks in sorted(groups.items()):
    with CompileClock() as clock:  # restoring compiles the checkpoint fingerprints
      restored = None
      if start:
        trainer = Trainer(cfgs[ks[0]], mesh)   # the abstract state every member shares
        tried = {k: _restore(cfgs[k], workdirs[k], trainer, start) for k in ks}
        alone += [k for k in ks if tried[k] is None]
        ks = [k for k in ks if tried[k] is not None]
        if len(ks) < 2:
          alone += ks
          continue
        restored = [tried.pop(k) for k in ks]
      member_on_step = (lambda i, s, r, ks=ks: on_step(ks[i], s, r)) if on_step else None
      group = _run_group([cfgs[k] for k in ks], [workdirs[k] for k in ks], mesh, start,
                         restored, members_per_vmap=members_per_vmap,
                         on_step=member_on_step, stop=stop, clock=clock)
    for k, res in zip(ks, group):
      results[k] = res
  for k in sorted(alone):
    results[k] = _train_alone(cfgs[k], workdirs[k], mesh, stop)
  return results


def _run_group(cfgs, workdirs, mesh, start: int, restored: list | None, *, members_per_vmap,
               on_step, stop, clock: CompileClock) -> list[dict]:
  """Trains the group from step `start`: from scratch (start 0) or from `restored`, each
  member's (state, data position) at that step."""
  t_start = time.time()
  cfg, K = cfgs[0], len(cfgs)
  group = GroupTrainer(cfgs, mesh, members_per_vmap=members_per_vmap)
  total = group.total_steps
  layout = dict(seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch)
  pipelines = [data_lib.make_pipeline(c.data, split="train", **layout) for c in cfgs]
  # The eval set never depends on data.seed: one copy serves every member.
  eval_local = data_lib.eval_batches(cfg.data, **layout)
  eval_set = [sharding.global_batch_from_local(b, mesh) for b in eval_local]
  members = [_Member(c, w, p, start) for c, w, p in zip(cfgs, workdirs, pipelines)]
  event = {"event": "group", "size": K, "members": [c.name for c in cfgs],
           "workdirs": [os.path.abspath(w) for w in workdirs]}
  for m in members:
    m.events.write(dict(event, resumed_at=start) if start else event)

  if restored:
    for m, (_, position) in zip(members, restored):
      m.pipeline.set_state(position)
    state_K = group.stack([state for state, _ in restored])
    restored.clear()   # the lone copies: the caller's list too, so they can be freed
  else:
    state_K = group.init_state()
  tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
  flops_per_token = flops_lib.flops_per_token(cfg.model, cfg.train.seq_len,
                                              cfg.train.flops_convention)
  hw_flops_per_token = flops_lib.flops_per_token(cfg.model, cfg.train.seq_len, "matmul")
  peak = _peak_flops(jax.devices()[0].device_kind, cfg.model.dtype) * jax.device_count()
  progress = ProgressLine(total, enabled=cfg.train.progress)
  g = cfg.guard

  pending: list[tuple[int, list[dict], dict]] = []  # (step, data positions, metrics_K)
  interval_start, interval_steps = time.time(), 0
  first_step_s = None
  step = start

  def flush() -> list[tuple[dict, int] | None]:
    """Fetches the pending metrics (the host sync) and returns each live member's record
    and bad-step streak, as train()'s flush does for a lone run."""
    nonlocal pending
    host_K = jax.device_get([m for _, _, m in pending])
    elapsed = max(time.time() - interval_start, 1e-9)
    out: list[tuple[dict, int] | None] = []
    for k, member in enumerate(members):
      if member.diverged:
        out.append(None)
        continue
      host = [{name: v[k] for name, v in metrics.items()} for metrics in host_K]
      for (s, positions, _), m in zip(pending, host):
        if m["skipped"]:
          member.skips.add(s, positions[k], skip_reason(m), float(m["loss"]))
      # tokens_per_s and mfu are this member's own rate: the group's is their sum.
      record = interval_record(host, step, tokens_per_step=tokens_per_step,
                               flops_per_token=flops_per_token,
                               hw_flops_per_token=hw_flops_per_token, peak=peak,
                               interval_steps=interval_steps, elapsed=elapsed)
      out.append((record, int(host[-1]["bad_streak"])))
    pending = []
    return out

  try:
    while step < total:
      t0 = time.time()
      positions = [m.pipeline.get_state() for m in members]
      batch_KBT = group.put_batch([m.pipeline.next() for m in members])
      # A stopped member keeps its slot (the shapes are fixed) but every step is skipped.
      skip_K = [bool(m.diverged) or step + 1 in m.skips for m in members]
      state_K, metrics_K = group.step(state_K, batch_KBT, skip=skip_K)
      if first_step_s is None:
        jax.block_until_ready(metrics_K)
        first_step_s = time.time() - t0
        interval_start = time.time()  # keep compilation out of tokens/s
      else:
        interval_steps += 1
      step += 1
      pending.append((step, positions, metrics_K))
      is_eval = step == total or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
      if step % cfg.train.log_every == 0 or is_eval:
        flushed = flush()
        evals_K = group.evaluate(state_K["params"], eval_set) if is_eval else None
        shown = []
        for k, (member, item) in enumerate(zip(members, flushed)):
          if item is None:
            continue
          record, streak = item
          if g.max_consecutive_bad and streak >= g.max_consecutive_bad:
            # A lone run would roll back here; a group cannot (its members share steps).
            member.diverged = (f"{streak} consecutive bad steps (non-finite, spiking or "
                               f"exploded loss) at step {step} in a group of {K}, which "
                               "does not roll back; train it alone with lmjax.train to use "
                               "guard.max_rollbacks")
            member.events.write({"event": "diverged", "step": step,
                                 "reason": member.diverged})
            continue
          if is_eval:
            member.last_eval = float(evals_K[k])
            record.update(_eval_record(member.last_eval, eval_local))
          member.writer.write(record)
          shown.append(record)
          if on_step:
            on_step(k, step, record)
        if shown:  # one line for the group: mean over the live members, summed tokens/s
          progress.update(_group_record(shown, step))
        interval_start, interval_steps = time.time(), 0
        if all(m.diverged for m in members):
          break  # nothing left to train
      # One decision for all (any live member's clock), so all save the same steps: a
      # group resumes only members whose newest steps are equal.
      if step == total or stop or any(m.checkpointer.due(step) for m in members
                                      if not m.diverged):
        _save(group, state_K, members, step, final=step == total, stop=bool(stop))
      if stop and step < total:
        if pending:  # steps since the last log are not recomputed after resume: keep them
          for member, item in zip(members, flush()):
            if item is not None:
              member.writer.write(item[0])
        for m in members:
          m.events.write({"event": "preempted", "step": step, "signal": stop.signum})
        raise Preempted(step, stop.signum)
  finally:  # an interrupted group still finishes its async saves and closes its files
    for m in members:
      m.checkpointer.wait()
      m.checkpointer.close()
      m.writer.close()
    progress.close()

  group_wall, compile_s = time.time() - t_start, clock.seconds
  results = []
  for m in members:
    results.append({
        "steps": total, "tokens": total * tokens_per_step,
        "flops": total * tokens_per_step * flops_per_token,
        "final_eval_loss": None if m.diverged else m.last_eval,
        "wall_s": group_wall / K, "compile_s": compile_s / K,
        "first_step_s": first_step_s,
        "skipped_steps": len(m.skips), "rollbacks": 0,
        "status": "diverged" if m.diverged else "done", "reason": m.diverged,
        "group_size": K, "group_wall_s": group_wall, "group_compile_s": compile_s,
        "members_per_vmap": group.members_per_vmap, "malloc": allocator.current(),
        "software": provenance.software(
            on_cpu=sharding.is_cpu(group.mesh),
            onednn_dots=runs_onednn_dots(group.compiler_options)),
    })
  return results


def _group_record(records: list[dict], step: int) -> dict:
  losses = [r["loss"] for r in records if r.get("loss") is not None]
  rec = {"step": step, "loss": float(np.mean(losses)) if losses else None}
  evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
  if evals:
    rec["eval_loss"] = float(np.mean(evals))
  if all(r.get("tokens_per_s") for r in records):
    rec["tokens_per_s"] = sum(r["tokens_per_s"] for r in records)
  return rec


def _save(group: GroupTrainer, state_K: State, members: list[_Member], step: int, *,
          final: bool, stop: bool) -> None:
  """Each live member's state at `step`, in its workdir, as lmjax.train saves a lone run:
  interval saves only of healthy members (a rollback must land on a healthy state). The
  loop decided that all save now, so each save is forced past its own clock."""
  bad_streak_K = np.asarray(jax.device_get(state_K["guard"]["bad_streak"]))
  for k, m in enumerate(members):
    healthy = bool(bad_streak_K[k] == 0)
    if m.diverged or not (healthy or final or stop):
      continue
    extras = checkpoint_extras([m.pipeline.get_state()], config_lib.to_dict(m.cfg),
                               rollbacks=0, healthy=healthy)
    m.checkpointer.save(step, group.member_state(state_K, k), extras, force=True,
                        final=final)
