"""Train-step throughput of lmjax against a PyTorch reference of the same model, on CPU.

Prints one JSON document: the machine, and for each (config, dtype) the tokens/s of lmjax's
real jit-compiled train step (lmjax.train.Trainer) and of an eager PyTorch model with the
same architecture, initialisation scale and AdamW settings, their ratio, achieved FLOP/s
(lmjax.flops "6N" and "matmul" conventions), MFU against matmul peaks measured in the same
process, and compile (first-step) times.

The machine is shared and noisy, so the two frameworks are timed in the same invocation in
alternating rounds (the order flips every round) and the figures are medians over rounds;
the ratio is also given as the median of per-round ratios, which cancels slow drifts, and
as the ratio of each side's fastest round, which neighbours cannot inflate.

  PYTHONPATH=. python benchmarks/train_throughput.py                       # ~5 minutes
  PYTHONPATH=. python benchmarks/train_throughput.py --configs=small --dtypes=float32 \
      --variants='default;attention=dot_product_attention' --out=/tmp/bench.json
  # lmjax on other jax versions (each venv with lmjax's dependencies), in the same rounds:
  PYTHONPATH=. python benchmarks/train_throughput.py \
      --lmjax_python=.venv/bin/python,/path/to/py312-venv/bin/python

torch is the optional `bench` extra (pip install -e .[bench]); without it only lmjax runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
from typing import Any

import bench_common
import jax

from lmjax import allocator
from lmjax import flops as flops_lib
from lmjax import provenance
from lmjax import sharding
from lmjax.config import Config, TrainConfig
from lmjax.model import ModelConfig
from lmjax.optim import OptimConfig
from lmjax import train as train_lib
from lmjax.train import Trainer

# libgomp's default active wait makes torch's 2-thread step ~15x slower when other processes
# share the cores (measured: 400 vs 6000 tokens/s on 'baby'); passive waiting keeps the
# reference honest on a shared machine. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # the bench extra is optional; lmjax still gets measured
  torch = None

# nanoGPT's CPU configurations (its README's "baby GPT" for a MacBook, and a small GPT of
# the shakespeare_char family), dropout off. Default steps per timing round keep one round
# of one framework at roughly 1-3 s on a 2-core machine.
CONFIGS = {
    "baby": dict(n_layers=4, n_heads=4, d_model=128, seq_len=64, batch=12, vocab=65, steps=20),
    "small": dict(n_layers=6, n_heads=6, d_model=384, seq_len=256, batch=16, vocab=65, steps=1),
}
DTYPES = ("float32", "bfloat16")

# Optimizer settings shared by both sides (lmjax's defaults, written out so the torch side
# copies them explicitly): AdamW, decoupled decay on weight matrices only, clipping at 1.0,
# cosine schedule over a long run so the lr never reaches its floor during the benchmark.
OPTIM = OptimConfig(lr=1e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, schedule="cosine",
                    warmup_steps=0, final_lr_frac=0.1, clip_norm=1.0)
TOTAL_STEPS = 100_000


# --------------------------------------------------------------------------------- machine

def machine_info() -> dict[str, Any]:
  info = bench_common.machine_info()
  info.update(torch=torch.__version__ if torch else None,
              torch_threads=torch.get_num_threads() if torch else None,
              omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
  return info


# ----------------------------------------------------------------------------- matmul peaks

def jax_matmul_peak(dtype: str) -> float:
  # lru_cache'd in lmjax; __wrapped__ re-measures, so peaks taken at the start and the end
  # of a run both count (the best of them is the machine's practical peak).
  return flops_lib.measure_matmul_peak.__wrapped__(dtype)


def torch_matmul_peak(dtype: str, n: int = 1024, repeats: int = 10) -> float:
  """The same measurement as lmjax.flops.measure_matmul_peak, with torch's kernels."""
  dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  g = torch.Generator().manual_seed(0)
  a = torch.randn(n, n, generator=g).to(dt)
  b = torch.randn(n, n, generator=g).to(dt)
  torch.mm(a, b)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


# ------------------------------------------------------------------------------ lmjax side

def model_config(shape: dict, dtype: str, overrides: dict[str, Any]) -> ModelConfig:
  cfg = ModelConfig(vocab_size=shape["vocab"], d_model=shape["d_model"],
                    n_layers=shape["n_layers"], n_heads=shape["n_heads"],
                    max_len=shape["seq_len"], position="learned", mlp="gelu",
                    norm="layernorm", norm_position="pre", tie_embeddings=True, dtype=dtype)
  return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if "." not in k})


def _xla_value(value: str) -> Any:
  """An XLA option's value as text -> bool, int or str (XLA checks the type). '+' stands
  for the ',' of a list-valued option, since ',' separates a variant's overrides."""
  value = value.replace("+", ",")
  if value.lower() in ("true", "false"):
    return value.lower() == "true"
  try:
    return int(value)
  except ValueError:
    return value


def parse_overrides(text: str) -> dict[str, Any]:
  """'attention=dot_product_attention,train.cpu_splits=1' -> ModelConfig field values,
  TrainConfig ones under 'train.', and XLA:CPU options for the train step under 'xla.'
  ('xla.xla_cpu_experimental_ynn_fusion_type=': added to train.CPU_STEP_COMPILER_OPTIONS
  while this variant's programs are built)."""
  out: dict[str, Any] = {}
  if text in ("", "default"):
    return out
  types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
  types.update({f"train.{f.name}": f.type for f in dataclasses.fields(TrainConfig)})
  for item in text.split(","):
    key, _, value = item.partition("=")
    key = key.strip()
    if key.startswith("xla.") and len(key) > 4:
      out[key] = _xla_value(value.strip())
      continue
    if key not in types:
      raise SystemExit(f"unknown ModelConfig (or train./xla.) field {key!r} in variant "
                       f"{text!r}")
    kind = {"int": int, "float": float, "str": str, "bool": bool}.get(str(types[key]), str)
    out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out


class LmjaxRunner:
  """lmjax's real Trainer on a one-device mesh, fed pre-placed random batches."""

  def __init__(self, shape: dict, dtype: str, overrides: dict[str, Any], batches: list):
    self.cfg = Config(model=model_config(shape, dtype, overrides), optim=OPTIM,
                      mesh=sharding.MeshConfig(data=1),
                      train=TrainConfig(global_batch=shape["batch"], seq_len=shape["seq_len"],
                                        steps=TOTAL_STEPS, progress=False,
                                        **{k[len("train."):]: v for k, v in overrides.items()
                                           if k.startswith("train.")}))
    mesh = sharding.make_mesh(self.cfg.mesh, jax.devices()[:1])
    xla = {k[len("xla."):]: v for k, v in overrides.items() if k.startswith("xla.")}
    saved = dict(train_lib.CPU_STEP_COMPILER_OPTIONS)
    train_lib.CPU_STEP_COMPILER_OPTIONS.update(xla)   # read when the programs are built
    try:
      self.trainer = Trainer(self.cfg, mesh)
    finally:
      train_lib.CPU_STEP_COMPILER_OPTIONS.clear()
      train_lib.CPU_STEP_COMPILER_OPTIONS.update(saved)
    self.state = self.trainer.init_state()
    self.batches = [sharding.global_batch_from_local(b, mesh) for b in batches]
    self.i = 0

  def cpu_dots(self) -> str:
    """What ran the step's dots (lmjax.train.uses_onednn): "onednn" or "xla"."""
    return "onednn" if self.trainer.onednn_dots else "xla"

  def first_step(self) -> float:
    """Seconds for the first step: tracing + XLA compilation + one step."""
    start = time.perf_counter()
    self.run(1)
    return time.perf_counter() - start

  def run(self, steps: int) -> float:
    start = time.perf_counter()
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.trainer.step(self.state, self.batches[self.i % len(self.batches)])
      self.i += 1
    jax.block_until_ready((self.state, metrics))
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
      raise RuntimeError(f"lmjax loss is {loss}")
    self.last_loss = loss
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ torch side

if torch is not None:

  class TorchBlock(torch.nn.Module):
    """Pre-norm block of lmjax/model.py: no biases in linears, LayerNorm with bias."""

    def __init__(self, d: int, h: int, f: int, eps: float):
      super().__init__()
      self.h = h
      self.ln1 = torch.nn.LayerNorm(d, eps=eps)
      self.qkv = torch.nn.Linear(d, 3 * d, bias=False)  # nanoGPT's fused c_attn
      self.proj = torch.nn.Linear(d, d, bias=False)
      self.ln2 = torch.nn.LayerNorm(d, eps=eps)
      self.up = torch.nn.Linear(d, f, bias=False)
      self.down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
      b, t, d = x.shape
      q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
      q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
      o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      x = x + self.proj(o.transpose(1, 2).reshape(b, t, d))
      return x + self.down(F.gelu(self.up(self.ln2(x)), approximate="tanh"))

  class TorchGPT(torch.nn.Module):
    """lmjax's Transformer (learned positions, gelu, layernorm, pre-norm, tied head)."""

    def __init__(self, mc: ModelConfig):
      super().__init__()
      d, L = mc.d_model, mc.n_layers
      self.embedding = torch.nn.Parameter(torch.empty(mc.vocab_size, d))
      self.pos_embedding = torch.nn.Parameter(torch.empty(mc.max_len, d))
      self.blocks = torch.nn.ModuleList(
          TorchBlock(d, mc.n_heads, mc.ff_dim, mc.norm_eps) for _ in range(L))
      self.final_norm = torch.nn.LayerNorm(d, eps=mc.norm_eps)
      # lmjax's init: N(0, 1/fan_in) everywhere, output projections further scaled by
      # 1/sqrt(2L); LayerNorm scale 1, bias 0.
      out_scale = 1.0 / math.sqrt(2 * L)
      with torch.no_grad():
        self.embedding.normal_(0.0, 1.0 / math.sqrt(d))
        self.pos_embedding.normal_(0.0, 1.0 / math.sqrt(d))
        for blk in self.blocks:
          blk.qkv.weight.normal_(0.0, 1.0 / math.sqrt(d))
          blk.up.weight.normal_(0.0, 1.0 / math.sqrt(d))
          blk.proj.weight.normal_(0.0, out_scale / math.sqrt(d))
          blk.down.weight.normal_(0.0, out_scale / math.sqrt(mc.ff_dim))

    def forward(self, tokens):
      t = tokens.shape[1]
      x = self.embedding[tokens] + self.pos_embedding[:t]
      for blk in self.blocks:
        x = blk(x)
      return self.final_norm(x) @ self.embedding.t()   # tied logits

  class TorchRunner:
    """Eager PyTorch train step: forward, mean CE, backward, clip, AdamW, schedule."""

    def __init__(self, mc: ModelConfig, dtype: str, batches: list, adamw_impl: str,
                 threads: int):
      self.threads = threads
      torch.manual_seed(0)
      self.model = TorchGPT(mc)
      self.autocast = dtype == "bfloat16"
      decay = [p for n, p in self.model.named_parameters() if p.ndim == 2 and "embedding" not in n]
      no_decay = [p for n, p in self.model.named_parameters()
                  if not (p.ndim == 2 and "embedding" not in n)]
      kwargs = {"fused": True} if adamw_impl == "fused" else {"foreach": adamw_impl == "foreach"}
      # lr is schedule(step) * OPTIM.lr; decay is lr * wd * param, as optax.add_decayed_weights
      # followed by scale_by_learning_rate (and torch's AdamW) both do.
      self.opt = torch.optim.AdamW(
          [{"params": decay, "weight_decay": OPTIM.weight_decay},
           {"params": no_decay, "weight_decay": 0.0}],
          lr=OPTIM.lr, betas=(OPTIM.b1, OPTIM.b2), eps=OPTIM.eps, **kwargs)
      f = OPTIM.final_lr_frac
      self.sched = torch.optim.lr_scheduler.LambdaLR(
          self.opt, lambda s: f + (1 - f) * 0.5 * (1 + math.cos(math.pi * min(s / TOTAL_STEPS, 1))))
      self.batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]
      for b in self.batches:
        b["inputs"], b["targets"] = b["inputs"].long(), b["targets"].long()
      self.i = 0

    def step(self, batch):
      with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
        logits = self.model(batch["inputs"])
      loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIM.clip_norm)
      self.opt.step()
      self.sched.step()
      return loss.detach()

    def first_step(self) -> float:
      start = time.perf_counter()
      self.run(1)
      return time.perf_counter() - start

    def run(self, steps: int) -> float:
      torch.set_num_threads(self.threads)
      start = time.perf_counter()
      for _ in range(steps):
        loss = self.step(self.batches[self.i % len(self.batches)])
        self.i += 1
      loss = loss.item()
      if not math.isfinite(loss):
        raise RuntimeError(f"torch loss is {loss}")
      self.last_loss = loss
      return time.perf_counter() - start


# ------------------------------------------------------------------------ process isolation

def _serve(conn, kind: str, args: tuple) -> None:
  """Worker process: builds one runner and answers (method, args) requests until 'stop'."""
  try:
    runner = LmjaxRunner(*args) if kind == "lmjax" else TorchRunner(*args)
  except Exception as e:  # report, don't hang the parent
    conn.send((False, f"{type(e).__name__}: {e}"))
    return
  conn.send((True, None))
  while True:
    try:
      method, call_args = conn.recv()
    except EOFError:  # the parent is gone
      return
    if method == "stop":
      return
    try:
      if method == "last_loss":
        value = runner.last_loss
      elif method == "malloc":  # this worker's, which --malloc chose when it started
        value = allocator.current()
      elif method == "versions":
        value = versions()
      else:
        value = getattr(runner, method)(*call_args)
      conn.send((True, value))
    except Exception as e:
      conn.send((False, f"{type(e).__name__}: {e}"))


def versions() -> dict[str, str | None]:
  """The interpreter's and frameworks' versions of this process (its worker's, if isolated)."""
  return dict(provenance.versions(), torch=torch.__version__ if torch is not None else None)


def _worker_main(fd: int) -> None:
  """A worker's entry (IsolatedRunner starts this script with --_worker_fd)."""
  from multiprocessing.connection import Connection
  conn = Connection(fd)
  kind, args = conn.recv()
  _serve(conn, kind, args)


def worker_env(kind: str, malloc: str) -> dict[str, str | None]:
  """Environment changes for a worker: which malloc it runs on (see --malloc)."""
  lib = allocator.mimalloc_library()
  pick = lambda env: {k: v for k, v in env.items() if k == "LD_PRELOAD" or k.startswith("MIMALLOC")}
  if malloc == "system":
    return {"LD_PRELOAD": None}
  if malloc == "lmjax":  # as each ships: lmjax as its CLIs would run, torch untouched
    env = (allocator.reexec_env(os.environ, lib, accelerator=allocator.accelerator_present())
           if kind == "lmjax" else None)
    return {} if env is None else pick(env)
  env = allocator.reexec_env({**os.environ, "LD_PRELOAD": "", allocator.ENV: "mimalloc"}, lib)
  if env is None:
    raise SystemExit("--malloc=mimalloc needs the mimalloc library (cmeel-mimalloc, a "
                     "dependency on Linux x86_64); or pass --malloc=lmjax or system")
  return pick(env)


class IsolatedRunner:
  """A runner in its own process, so the frameworks' thread pools never share one.

  In one process, lmjax's XLA thread pool and torch's OpenMP threads disturbed each other:
  on 'small' f32, lmjax's rounds alternated with torch's took 1125-1793 tokens/s, against
  1632-1939 alone, while torch ran 1300-1702 alone. Nobody trains with both frameworks in
  one process, so each gets its own; the rounds still alternate, and a worker waiting for
  its turn sleeps in a socket read.

  The worker is this script run by `python` (default: this interpreter), another venv's
  interpreter included (--lmjax_python: lmjax on another jax, timed in the same rounds).
  That is why it is a plain subprocess talking over a socketpair and not a multiprocessing
  spawn, which would hand the child this interpreter's sys.path. `env` holds the changes
  to this process's environment that the worker starts with (None removes a variable).
  """

  def __init__(self, kind: str, *args, env: dict[str, str | None] | None = None,
               python: str | None = None):
    import socket
    import subprocess
    from multiprocessing.connection import Connection
    self.python = python or sys.executable
    child_env = dict(os.environ)
    for k, v in (env or {}).items():
      if v is None:
        child_env.pop(k, None)
      else:
        child_env[k] = v
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child_env["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    ours, theirs = socket.socketpair()
    try:
      self.proc = subprocess.Popen(
          [self.python, os.path.abspath(__file__), f"--_worker_fd={theirs.fileno()}"],
          env=child_env, pass_fds=(theirs.fileno(),))
    finally:
      theirs.close()
    self.conn = Connection(ours.detach())
    self._exchange((kind, args))

  def _exchange(self, request):
    try:
      self.conn.send(request)
      ok, value = self.conn.recv()
    except (EOFError, OSError):  # it died: its own traceback is on stderr above
      raise RuntimeError(f"the worker ({self.python}) exited with code {self.proc.wait()} "
                         "before answering; its stderr above says why") from None
    if not ok:
      raise RuntimeError(value)
    return value

  def _call(self, method: str, *args):
    return self._exchange((method, args))

  def first_step(self) -> float:
    return self._call("first_step")

  def run(self, steps: int) -> float:
    return self._call("run", steps)

  @property
  def last_loss(self) -> float:
    return self._call("last_loss")

  @property
  def malloc(self) -> str:
    return self._call("malloc")

  def versions(self) -> dict[str, str | None]:
    return self._call("versions")

  def cpu_dots(self) -> str:
    return self._call("cpu_dots")

  def close(self) -> None:
    try:
      self.conn.send(("stop", ()))
    except OSError:  # already gone
      pass
    self.proc.wait(timeout=30)


# ------------------------------------------------------------------------------ benchmark

make_batches = bench_common.make_batches   # step_ab.py and the tests call it here


def bench_one(name: str, dtype: str, variants: list[str], steps: int, rounds: int,
              adamw_impl: str, torch_threads: list[int], peaks: dict,
              isolate: bool = True, warm_steps: int = 1,
              malloc: str = "lmjax", lmjax_pythons: tuple[str, ...] = ()) -> dict[str, Any]:
  shape = CONFIGS[name]
  tokens_per_step = shape["batch"] * shape["seq_len"]
  batches = make_batches(shape)
  runners: dict[str, Any] = {}
  compile_s: dict[str, float] = {}
  model_cfgs: dict[str, ModelConfig] = {}

  def make(kind, *args, python=None):
    if isolate:
      return IsolatedRunner(kind, *args, env=worker_env(kind, malloc), python=python)
    return LmjaxRunner(*args) if kind == "lmjax" else TorchRunner(*args)

  for v in variants:
    for py in lmjax_pythons or (None,):
      tags = ([v] if len(variants) > 1 else []) + ([f"python={py}"] if py else [])
      label = f"lmjax[{', '.join(tags)}]" if tags else "lmjax"
      model_cfgs[label] = model_config(shape, dtype, parse_overrides(v))
      runners[label] = make("lmjax", shape, dtype, parse_overrides(v), batches, python=py)
      compile_s[label] = runners[label].first_step()
  base_mc = model_config(shape, dtype, {})
  torch_labels = []
  if torch is not None:
    for n in torch_threads:
      label = f"torch[threads={n}]" if len(torch_threads) > 1 else "torch"
      torch_labels.append(label)
      runners[label] = make("torch", base_mc, dtype, batches, adamw_impl, n)
      compile_s[label] = runners[label].first_step()  # eager: no compile, warm-up only
  for r in runners.values():  # one untimed warm-up round each (caches, allocator, threads)
    r.run(max(1, steps // 2))

  times: dict[str, list[float]] = {k: [] for k in runners}
  warm_times: dict[str, list[float]] = {k: [] for k in runners}
  labels = list(runners)
  for i in range(rounds):
    order = labels if i % 2 == 0 else labels[::-1]   # alternate who goes first
    for label in order:
      # A worker that sat idle while the other framework ran starts its turn slowly (on
      # 'small', lmjax's first step after a torch round took 5.6 s against 3.8 s back to
      # back; torch's 3.3-3.6 s against 3.1-3.4 s). Training runs steps back to back, so
      # each turn begins with untimed steps; their times are reported, not hidden.
      if warm_steps:
        warm_times[label].append(runners[label].run(warm_steps) / warm_steps)
      times[label].append(runners[label].run(steps))

  # "matmul" here is the full T x T square (attention="xla"), the same for every runner.
  full_mc = dataclasses.replace(base_mc, attention="xla")
  fpt = {conv: flops_lib.flops_per_token(full_mc, shape["seq_len"], conv)
         for conv in ("6N", "matmul")}
  results: dict[str, Any] = {}
  for label, ts in times.items():
    tps = [steps * tokens_per_step / t for t in ts]
    med = statistics.median(tps)
    fw = "torch" if label in torch_labels else "jax"
    # "matmul" counts what this lmjax variant executes (causal_blocks skips score blocks);
    # the full-square count is the same for every variant and for torch, whose fused CPU
    # attention kernel's own skipping is not counted.
    fpt_exec = (fpt["matmul"] if fw == "torch" else
                flops_lib.flops_per_token(model_cfgs[label], shape["seq_len"], "matmul"))
    res = {
        "tokens_per_s": med,
        "tokens_per_s_rounds": [round(x, 1) for x in tps],
        "step_ms": 1000 * statistics.median(ts) / steps,
        "warm_step_ms": (1000 * statistics.median(warm_times[label]) if warm_times[label]
                         else None),
        "compile_s" if fw == "jax" else "first_step_s": compile_s[label],
        "flops_per_s_6N": med * fpt["6N"],
        "flops_per_token_matmul": fpt_exec,
        "flops_per_s_matmul": med * fpt_exec,
        # MFU of the executed matmul FLOPs, against the same dtype's measured matmul peak:
        # that framework's own peak, and the best of both frameworks.
        "mfu_matmul": med * fpt_exec / peaks[fw][dtype],
        "mfu_matmul_vs_best_peak": med * fpt_exec / max(p[dtype] for p in peaks.values()),
        "flops_per_s_matmul_full_attention": med * fpt["matmul"],
        "mfu_6N": med * fpt["6N"] / peaks[fw][dtype],
        "final_loss": runners[label].last_loss,
        "malloc": (runners[label].malloc if isinstance(runners[label], IsolatedRunner)
                   else allocator.current()),
        "versions": (runners[label].versions() if isinstance(runners[label], IsolatedRunner)
                     else versions()),
    }
    if fw == "jax":
      res["cpu_dots"] = runners[label].cpu_dots()
    results[label] = res
  best_torch = None
  if torch_labels:  # the reference is torch's best thread setting
    best_torch = max(torch_labels, key=lambda k: results[k]["tokens_per_s"])
    for label in times:
      if label in torch_labels:
        continue
      results[label]["ratio_vs_torch"] = (results[label]["tokens_per_s"]
                                          / results[best_torch]["tokens_per_s"])
      results[label]["ratio_vs_torch_per_round_median"] = statistics.median(
          t_torch / t_jax for t_jax, t_torch in zip(times[label], times[best_torch]))
      # Neighbours on a shared machine only ever slow a round down, so each side's fastest
      # round is the closest to what it can do; this ratio is the one noise cannot inflate.
      results[label]["ratio_vs_torch_best_round"] = min(times[best_torch]) / min(times[label])
  for r in runners.values():
    if isinstance(r, IsolatedRunner):
      r.close()
  return {"config": name, "dtype": dtype, "shape": shape, "steps_per_round": steps,
          "warm_steps_per_round": warm_steps,
          "torch_reference": best_torch,
          "rounds": rounds, "tokens_per_step": tokens_per_step,
          "params": dataclasses.asdict(flops_lib.param_counts(base_mc)),
          "flops_per_token": fpt, "results": results}


def measure_peaks(dtypes: list[str]) -> dict[str, dict[str, float]]:
  peaks = {"jax": {d: jax_matmul_peak(d) for d in dtypes}}
  if torch is not None:
    peaks["torch"] = {d: torch_matmul_peak(d) for d in dtypes}
  return peaks


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--configs", default="baby,small", help=f"comma list of {sorted(CONFIGS)}")
  p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32,bfloat16")
  p.add_argument("--steps", type=int, default=0,
                 help="train steps per timing round per framework (0: per-config default)")
  p.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
  p.add_argument("--warm_steps", type=int, default=1,
                 help="untimed steps at the start of each framework's turn in a round, so "
                      "the timed steps run back to back as in training (0: time the turn's "
                      "first step too; the idle-then-step penalty then enters the figures)")
  p.add_argument("--variants", default="default",
                 help="';'-separated lmjax ModelConfig overrides timed side by side, e.g. "
                      "'default;attention=dot_product_attention;scan_layers=true'")
  p.add_argument("--torch_adamw", default="fused", choices=("fused", "foreach", "forloop"),
                 help="torch AdamW implementation (fused is its fastest on CPU)")
  p.add_argument("--torch_threads", default="",
                 help="comma list of torch thread counts, each timed; the fastest is the "
                      "reference (default: torch's own default, one per core)")
  p.add_argument("--isolation", default="process", choices=("process", "none"),
                 help="process: each runner in its own worker process (default; the "
                      "frameworks' thread pools disturb each other in one process); "
                      "none: all in this process")
  p.add_argument("--malloc", default="lmjax", choices=("lmjax", "system", "mimalloc"),
                 help="workers' allocators. lmjax (default): each as it ships: the lmjax "
                      "worker on mimalloc, as lmjax's command lines (lmjax/allocator.py; "
                      "LMJAX_MALLOC=system keeps glibc's), torch on glibc's malloc; system: "
                      "both on glibc's; mimalloc: both on mimalloc. Needs process isolation.")
  p.add_argument("--lmjax_python", default="",
                 help="comma list of Python interpreters (another venv's bin/python, with "
                      "lmjax's dependencies on another jax, say), each running its own "
                      "lmjax worker in the same alternated rounds as torch; default: this "
                      "interpreter only. MFU uses the peaks this interpreter's jax measures. "
                      "Needs process isolation.")
  p.add_argument("--out", default="", help="also write the JSON here")
  args = p.parse_args(argv)

  configs = [c for c in args.configs.split(",") if c]
  dtypes = [d for d in args.dtypes.split(",") if d]
  for c in configs:
    if c not in CONFIGS:
      raise SystemExit(f"unknown config {c!r}; choose from {sorted(CONFIGS)}")
  for d in dtypes:
    if d not in DTYPES:
      raise SystemExit(f"unknown dtype {d!r}; choose from {DTYPES}")
  if args.isolation == "none" and args.malloc != "lmjax":
    raise SystemExit("--malloc needs --isolation=process: a process's allocator is fixed "
                     "when it starts")
  lmjax_pythons = tuple(x for x in args.lmjax_python.split(",") if x)
  if lmjax_pythons and args.isolation == "none":
    raise SystemExit("--lmjax_python needs --isolation=process: a worker process runs each "
                     "interpreter")
  if len(set(lmjax_pythons)) < len(lmjax_pythons):
    raise SystemExit(f"--lmjax_python names an interpreter twice: {args.lmjax_python!r}")
  for py in lmjax_pythons:
    if not (os.path.isfile(py) and os.access(py, os.X_OK)):
      raise SystemExit(f"--lmjax_python: {py!r} is not an executable file; give a Python "
                       "interpreter whose environment has lmjax's dependencies, e.g. "
                       "/path/to/venv/bin/python")
  if args.warm_steps < 0 or args.steps < 0 or args.rounds < 1:
    raise SystemExit("--warm_steps and --steps must be >= 0 and --rounds >= 1")
  variants = args.variants.split(";")
  torch_threads = ([int(n) for n in args.torch_threads.split(",") if n] if args.torch_threads
                   else [torch.get_num_threads() if torch else 1])

  t0 = time.time()
  report: dict[str, Any] = {"machine": machine_info(), "command": " ".join(sys.argv),
                            "args": vars(args), "optim": dataclasses.asdict(OPTIM)}
  peaks_start = measure_peaks(dtypes)
  runs = []
  for name in configs:
    for dtype in dtypes:
      steps = args.steps or CONFIGS[name]["steps"]
      runs.append(bench_one(name, dtype, variants, steps, args.rounds, args.torch_adamw,
                            torch_threads, peaks_start, args.isolation == "process",
                            args.warm_steps, args.malloc, lmjax_pythons))
      print(f"# {name} {dtype}: " + ", ".join(
          f"{k} {v['tokens_per_s']:.0f} tok/s" for k, v in runs[-1]["results"].items()),
            file=sys.stderr, flush=True)
  peaks_end = measure_peaks(dtypes)
  # The machine's practical peak is the best of the two measurements; MFU above used the
  # start-of-run figure, so recompute it against the best one.
  peaks = {fw: {d: max(peaks_start[fw][d], peaks_end[fw][d]) for d in dtypes}
           for fw in peaks_start}
  for run in runs:
    for label, res in run["results"].items():
      fw = "torch" if label.startswith("torch") else "jax"
      peak = peaks[fw][run["dtype"]]
      res["mfu_matmul"] = res["flops_per_s_matmul"] / peak
      res["mfu_6N"] = res["flops_per_s_6N"] / peak
      best = max(p[run["dtype"]] for p in peaks.values())
      res["mfu_matmul_vs_best_peak"] = res["flops_per_s_matmul"] / best
      res["mfu_full_attention_vs_best_peak"] = res["flops_per_s_matmul_full_attention"] / best
  report["matmul_peak_flops"] = {"start": peaks_start, "end": peaks_end, "used": peaks}
  report["runs"] = runs
  report["wall_s"] = time.time() - t0
  bench_common.emit(report, args.out)
  return report


if __name__ == "__main__":
  if len(sys.argv) == 2 and sys.argv[1].startswith("--_worker_fd="):
    _worker_main(int(sys.argv[1].split("=", 1)[1]))
  else:
    main()
