"""Training: a pure, jit-compiled step, and the loop around it.

The step (`make_train_step`) is a pure function (state, batch) -> (state, metrics) with
explicit in/out shardings and the old state's buffers donated. Everything with effects
(data, logging, checkpoints, signals) lives in `train`, which touches the host only at log,
eval and checkpoint steps, so the device never waits on Python between them.

  python -m lmjax.train --config=experiments/configs/smoke.py --workdir=/tmp/smoke \
      --config.model.d_model=64
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lmjax import checkpoint as ckpt_lib
from lmjax import config as config_lib
from lmjax import flops as flops_lib
from lmjax import sharding
from lmjax.config import Config
from lmjax.data import pipeline as data_lib
from lmjax.errors import CheckpointError, ConfigError, require
from lmjax.metrics import MetricsWriter, ProgressLine
from lmjax.model import Transformer
from lmjax.optim import accumulate_gradients, make_optimizer, make_schedule
from lmjax.preemption import EXIT_REQUEUE, Preempted, StopFlag, handle_signals

State = dict  # {"step": int32[], "params": ..., "opt_state": ..., "rng": key data}

# Config keys a resumed run may change: where and how it runs, not what it computes.
RESUMABLE_CHANGES = ("mesh", "checkpoint", "name", "train.eval_every", "train.log_every",
                     "train.progress")


# ------------------------------------------------------------------------------ pure core

def make_loss_fn(cfg: Config) -> Callable:
  """(params, batch) -> (sum of per-token losses, (tokens, {"ce_sum": ...}))."""
  model = Transformer(cfg.model)
  z_weight = cfg.train.z_loss

  def loss_fn(params, batch):
    logits_BTV = model.apply({"params": params}, batch["inputs"],
                             segment_ids_BT=batch.get("segment_ids"))
    log_z = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit = jnp.take_along_axis(logits_BTV, batch["targets"][..., None], -1)[..., 0]
    ce = log_z - target_logit
    mask = batch["mask"].astype(jnp.float32)
    loss = ce + z_weight * jnp.square(log_z) if z_weight else ce
    return jnp.sum(loss * mask), (jnp.sum(mask), {"ce_sum": jnp.sum(ce * mask)})

  return loss_fn


def make_train_step(cfg: Config, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable:
  grad_fn = jax.value_and_grad(make_loss_fn(cfg), has_aux=True)

  def train_step(state: State, batch: dict) -> tuple[State, dict]:
    acc = accumulate_gradients(grad_fn, state["params"], batch, cfg.optim.grad_accum)
    updates, opt_state = tx.update(acc.grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
        "loss": acc.aux["ce_sum"] / jnp.maximum(acc.num_tokens, 1.0),
        "grad_norm": optax.global_norm(acc.grads),
        "param_norm": optax.global_norm(params),
        "lr": schedule(state["step"]),
        "real_tokens": acc.num_tokens,
    }
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(cfg: Config) -> Callable:
  loss_fn = make_loss_fn(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                            z_loss=0.0)))

  def eval_step(params, batch):
    _, (tokens, aux) = loss_fn(params, batch)
    return aux["ce_sum"], tokens

  return eval_step


# ----------------------------------------------------------------------- state and sharding

class Trainer:
  """Compiled, sharded steps for one config on one mesh."""

  def __init__(self, cfg: Config, mesh: jax.sharding.Mesh):
    self.cfg, self.mesh = cfg, mesh
    dp = sharding.data_parallel_size(mesh)
    require(cfg.train.global_batch % (dp * cfg.optim.grad_accum) == 0,
            f"train.global_batch={cfg.train.global_batch} is not divisible by the data-parallel "
            f"size {dp} (mesh data*fsdp) x optim.grad_accum={cfg.optim.grad_accum}; use a "
            f"multiple of {dp * cfg.optim.grad_accum}.", ConfigError)
    self.total_steps = cfg.total_steps()
    self.schedule = make_schedule(cfg.optim, self.total_steps)
    model = Transformer(cfg.model)

    def init_boxed(rng):
      params_rng, rng = jax.random.split(rng)
      params = model.init(params_rng, jnp.zeros((1, cfg.train.seq_len), jnp.int32))["params"]
      return {"step": jnp.zeros((), jnp.int32), "params": params,
              "opt_state": self.tx.init(params), "rng": jax.random.key_data(rng)}

    abstract_params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, cfg.train.seq_len), jnp.int32)))
    self.tx = make_optimizer(cfg.optim, self.total_steps, abstract_params["params"])
    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    self.state_shardings = sharding.tree_shardings(boxed, mesh)
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.meta.unbox(boxed), self.state_shardings)
    self._init = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)),
                         out_shardings=self.state_shardings)
    batch_sh = sharding.batch_sharding(mesh)
    rules = sharding.activation_rules(mesh)

    def with_rules(fn):
      def wrapped(*args):
        with nn.logical_axis_rules(rules):
          return fn(*args)
      return wrapped

    self.train_step = jax.jit(with_rules(make_train_step(cfg, self.tx, self.schedule)),
                              in_shardings=(self.state_shardings, batch_sh),
                              out_shardings=(self.state_shardings, sharding.replicated(mesh)),
                              donate_argnums=0)
    params_sh = self.state_shardings["params"]
    self.eval_step = jax.jit(with_rules(make_eval_step(cfg)), in_shardings=(params_sh, batch_sh),
                             out_shardings=sharding.replicated(mesh))

  def init_state(self, seed: int | None = None) -> State:
    with jax.set_mesh(self.mesh):
      return self._init(jax.random.key(self.cfg.train.seed if seed is None else seed))

  def step(self, state: State, batch: dict) -> tuple[State, dict]:
    with jax.set_mesh(self.mesh):
      return self.train_step(state, batch)

  def evaluate(self, params, batches: list[dict]) -> float:
    with jax.set_mesh(self.mesh):
      sums = [self.eval_step(params, b) for b in batches]
    ce, n = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    return float(ce / max(n, 1.0))


# ------------------------------------------------------------------------------ the loop

def _check_workdir_config(cfg: Config, workdir: str) -> None:
  """A workdir belongs to one run: refuse (and touch nothing) if its config differs."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is unreadable ({e}); restore it or use a new --workdir.")
  ckpt_lib.check_compatible(saved, config_lib.to_dict(cfg), RESUMABLE_CHANGES, workdir=workdir)


def train(cfg: Config, workdir: str, *, mesh: jax.sharding.Mesh | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          stop: StopFlag | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns its summary. Effects live here.

  If `stop` becomes true (a signal handler sets it), the loop checkpoints after the
  current step and raises Preempted; running again resumes from that step.
  """
  t_start = time.time()
  mesh = mesh or sharding.make_mesh(cfg.mesh)
  is_main = jax.process_index() == 0
  _check_workdir_config(cfg, workdir)
  data_lib.check_vocab(cfg.data, cfg.model.vocab_size)
  trainer = Trainer(cfg, mesh)
  total = trainer.total_steps
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    config_lib.save(cfg, os.path.join(workdir, "config.json"))

  pipeline = data_lib.make_pipeline(cfg.data, seq_len=cfg.train.seq_len,
                                    global_batch=cfg.train.global_batch, split="train",
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
  eval_local = data_lib.eval_batches(cfg.data, seq_len=cfg.train.seq_len,
                                     global_batch=cfg.train.global_batch,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count())
  eval_set = [sharding.global_batch_from_local(b, mesh) for b in eval_local]

  checkpointer = ckpt_lib.Checkpointer(workdir, cfg.checkpoint,
                                       keys_that_may_change=RESUMABLE_CHANGES)
  cfg_dict = config_lib.to_dict(cfg)
  start_step = 0
  if checkpointer.latest_step() is not None:
    state, extras = checkpointer.restore(abstract_state=trainer.abstract_state,
                                         current_config=cfg_dict)
    pipeline.set_state(extras["data"])
    start_step = int(jax.device_get(state["step"]))
    logging.info("resumed %s at step %d", workdir, start_step)
  else:
    state = trainer.init_state()

  tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
  flops_per_token = flops_lib.flops_per_token(cfg.model, cfg.train.seq_len,
                                              cfg.train.flops_convention)
  hw_flops_per_token = flops_lib.flops_per_token(cfg.model, cfg.train.seq_len, "matmul")
  device = jax.devices()[0]
  peak = _peak_flops(device.device_kind, cfg.model.dtype) * jax.device_count()
  writer = MetricsWriter(workdir, enabled=is_main, truncate_after_step=start_step)
  progress = ProgressLine(total, enabled=is_main and cfg.train.progress)

  try:
    pending: list[dict] = []
    interval_start, interval_steps = time.time(), 0
    last = {"eval_loss": None}
    compile_s = None
    for step in range(start_step, total):
      t0 = time.time()
      batch = sharding.global_batch_from_local(pipeline.next(), mesh)
      state, metrics = trainer.step(state, batch)
      if compile_s is None:
        jax.block_until_ready(metrics)
        compile_s = time.time() - t0
        interval_start = time.time()  # keep compilation out of tokens/s
      else:
        interval_steps += 1
      pending.append(metrics)
      done = step + 1
      is_eval = done == total or (cfg.train.eval_every and done % cfg.train.eval_every == 0)
      if done % cfg.train.log_every == 0 or is_eval:
        host = jax.device_get(pending)
        pending = []
        elapsed = max(time.time() - interval_start, 1e-9)
        record = {
            "step": done,
            "loss": float(np.mean([m["loss"] for m in host])),
            "grad_norm": float(host[-1]["grad_norm"]),
            "param_norm": float(host[-1]["param_norm"]),
            "lr": float(host[-1]["lr"]),
            "tokens": done * tokens_per_step,
            "flops": done * tokens_per_step * flops_per_token,
        }
        record["bits_per_token"] = record["loss"] / math.log(2)
        if interval_steps:
          tps = interval_steps * tokens_per_step / elapsed
          record["tokens_per_s"] = tps
          record["mfu"] = tps * hw_flops_per_token / peak
        if is_eval:
          record.update(_eval_record(trainer.evaluate(state["params"], eval_set), eval_local))
          last["eval_loss"] = record["eval_loss"]
        writer.write(record)
        progress.update(record)
        interval_start, interval_steps = time.time(), 0
        if on_step:
          on_step(done, record)
      if done == total or stop or checkpointer.due(done):  # save() itself costs ms: ask first
        extras = {"data": pipeline.get_state(), "config": cfg_dict}
        checkpointer.save(done, state, extras, force=bool(stop), final=done == total)
        if stop and done < total:
          raise Preempted(done, stop.signum)
  finally:  # an interrupted run still finishes its async save and closes its files
    checkpointer.wait()
    checkpointer.close()
    writer.close()
    progress.close()

  summary = {
      "steps": total, "tokens": total * tokens_per_step,
      "flops": total * tokens_per_step * flops_per_token,
      "final_eval_loss": last["eval_loss"], "wall_s": time.time() - t_start,
      "compile_s": compile_s,
  }
  if last["eval_loss"] is None and start_step >= total:  # already finished earlier
    summary["final_eval_loss"] = trainer.evaluate(state["params"], eval_set)
  return summary


def _eval_record(eval_loss: float, eval_local) -> dict:
  rec = {"eval_loss": eval_loss, "eval_bits_per_token": eval_loss / math.log(2)}
  bytes_per_token = getattr(eval_local, "bytes_per_token", None)  # exact for the eval set
  if bytes_per_token:
    rec["eval_bits_per_byte"] = eval_loss / math.log(2) / bytes_per_token
  return rec


def _peak_flops(device_kind: str, dtype: str) -> float:
  try:
    return flops_lib.peak_flops(device_kind, dtype)
  except ConfigError:
    return float("nan")  # MFU unknown for this device; training goes on


# ------------------------------------------------------------------------------ command line

def main(argv):
  from absl import flags
  require(len(argv) == 1, f"unexpected arguments {argv[1:]}; use --flag=value.", ConfigError)
  flags_ = flags.FLAGS
  require(flags_.workdir, "--workdir is required: the directory for checkpoints and metrics.",
          ConfigError)
  cfg = config_lib.from_dict(Config, flags_.config)
  with handle_signals(StopFlag()) as stop:
    try:
      summary = train(cfg, flags_.workdir, stop=stop)
    except Preempted as e:
      print(f"lmjax: {e}", file=sys.stderr)
      sys.exit(EXIT_REQUEUE)
  print(json.dumps(summary))


def cli():
  from lmjax.cli import run_main
  run_main(main, config_required=True, workdir=True)


if __name__ == "__main__":
  cli()
