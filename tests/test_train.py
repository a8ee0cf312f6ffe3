"""The training loop end to end: the smoke config learns, resume is exact, bad input is one line."""
import dataclasses
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmjax import config as config_lib
from lmjax.config import Config
from lmjax.errors import ConfigError
from lmjax.metrics import read_metrics
from lmjax.train import onednn_dots_supported, train
from tests.util import tree_hash

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "configs" / "smoke.py"


def _load_config(path: Path, **train_overrides) -> Config:
  spec = importlib.util.spec_from_file_location("cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = config_lib.from_dict(Config, module.get_config())
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **train_overrides))


def _tiny(**train_overrides) -> Config:
  cfg = _load_config(SMOKE, **{"progress": False, **train_overrides})
  model = dataclasses.replace(cfg.model, d_model=32, n_layers=1, n_heads=2, max_len=32)
  return dataclasses.replace(cfg, model=model, optim=dataclasses.replace(cfg.optim, warmup_steps=2),
                             train=dataclasses.replace(cfg.train, seq_len=32, global_batch=8))


def test_smoke_config_learns(tmp_path):
  cfg = _load_config(SMOKE, progress=False)
  summary = train(cfg, str(tmp_path))
  records = read_metrics(str(tmp_path))
  first, last = records[0]["loss"], records[-1]["loss"]
  # The synthetic language has 256 tokens: log(256) = 5.55 nats is "knows nothing".
  assert first > 4.5 and last < first - 1.5, (first, last)
  assert summary["final_eval_loss"] < first - 1.5
  # Every program of the run (init, train, eval, fingerprints) counts, each once.
  assert 0 < summary["compile_s"] < summary["wall_s"]
  for key in ("step", "loss", "tokens", "flops", "grad_norm", "param_norm", "lr",
              "bits_per_token"):
    assert key in records[-1]
  assert "eval_loss" in records[-1] and records[-1]["step"] == cfg.total_steps()
  saved = config_lib.load(str(tmp_path / "config.json"))
  assert saved == cfg  # the resolved config is saved with the run
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


class _Interrupt(Exception):
  pass


def test_resume_equals_uninterrupted(tmp_path):
  cfg = _tiny(steps=12, log_every=1, eval_every=6)
  cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=6))
  straight = train(cfg, str(tmp_path / "straight"))

  def stop_after_checkpoint(step, record):
    if step == 7:  # step 6 was checkpointed; steps 7+ are lost and recomputed
      raise _Interrupt()

  with pytest.raises(_Interrupt):
    train(cfg, str(tmp_path / "resumed"), on_step=stop_after_checkpoint)
  resumed = train(cfg, str(tmp_path / "resumed"))
  a = read_metrics(str(tmp_path / "straight"))
  b = read_metrics(str(tmp_path / "resumed"))
  assert [r["step"] for r in b] == list(range(1, 13))  # each step logged once
  np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
  np.testing.assert_allclose([r["grad_norm"] for r in b], [r["grad_norm"] for r in a],
                             rtol=1e-6)
  assert resumed["final_eval_loss"] == pytest.approx(straight["final_eval_loss"], rel=1e-6)


def _cli(*args, env_extra=None):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "lmjax.train", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc, fragment):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert fragment in lines[0], lines[0]


def test_cli_unknown_config_key_is_one_line(tmp_path):
  proc = _cli(f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.model.d_modle=32")
  _assert_one_line_error(proc, "d_modle")
  bad = tmp_path / "bad.py"
  bad.write_text(SMOKE.read_text().replace("return c", "c.train.stepz = 3\n  return c"))
  proc = _cli(f"--config={bad}", f"--workdir={tmp_path / 'w'}")
  _assert_one_line_error(proc, "unknown config key 'train.stepz'")


def test_cli_bad_values_are_one_line(tmp_path):
  cases = [
      (["--config.model.n_heads=3"], "not divisible by model.n_heads"),
      (["--config.mesh.data=3"], "devices"),
      (["--config.train.global_batch=12", "--config.mesh.data=8"],
       "not divisible by the data-parallel size 8"),
      (["--config.data.synthetic_vocab_size=512"], "smaller than the data's vocabulary"),
  ]
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  for extra, fragment in cases:
    proc = _cli(f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}", *extra, env_extra=env)
    _assert_one_line_error(proc, fragment)
  proc = _cli(f"--workdir={tmp_path}", f"--config={tmp_path / 'missing.py'}")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_incompatible_workdir_is_refused_and_untouched(tmp_path):
  cfg = _tiny(steps=4, log_every=2)
  train(cfg, str(tmp_path))
  before = tree_hash(tmp_path)
  proc = _cli(f"--config={SMOKE}", f"--workdir={tmp_path}", "--config.model.d_model=48",
              "--config.train.progress=false")
  _assert_one_line_error(proc, "model.d_model")
  assert tree_hash(tmp_path) == before


def test_cli_trains_in_a_relative_workdir(tmp_path):
  # The README's commands use relative workdirs; orbax needs absolute checkpoint paths.
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  args = [sys.executable, "-m", "lmjax.train", f"--config={SMOKE}", "--workdir=runs/rel",
          "--config.train.steps=6", "--config.train.log_every=2", "--config.train.eval_every=6",
          "--config.checkpoint.every_steps=2", "--config.optim.warmup_steps=1",
          "--config.model.d_model=32", "--config.model.n_layers=1",
          "--config.train.progress=false"]
  proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = sorted(p.name for p in (tmp_path / "runs" / "rel" / "checkpoints").iterdir())
  assert "6" in saved and "4" in saved
  again = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # resumes (finished): same final eval loss
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads(again.stdout)["final_eval_loss"] == pytest.approx(
      json.loads(proc.stdout)["final_eval_loss"], rel=1e-6)


def test_cli_sets_a_field_to_none(tmp_path):
  # ml_collections parses an override by the field's type (int for every_steps), so
  # "--config.checkpoint.every_steps=None" needs lmjax.cli's own handling.
  work = tmp_path / "w"
  proc = _cli(f"--config={SMOKE}", f"--workdir={work}", "--config.train.steps=4",
              "--config.train.log_every=2", "--config.train.eval_every=4",
              "--config.checkpoint.every_steps=None", "--config.checkpoint.every_seconds=null",
              "--config.optim.warmup_steps=1", "--config.train.progress=false")
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads((work / "config.json").read_text())["checkpoint"]
  assert saved["every_steps"] is None and saved["every_seconds"] is None
  assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["4"]   # the final only


def _mesh(data: int = 1):
  import jax
  from lmjax import sharding
  return sharding.make_mesh(sharding.MeshConfig(data=data), jax.devices()[:data])


def _nanogpt(small, layers, heads, d, seq, batch):
  return dataclasses.replace(
      small, model=dataclasses.replace(small.model, n_layers=layers, n_heads=heads, d_model=d,
                                       max_len=seq, vocab_size=65),
      train=dataclasses.replace(small.train, global_batch=batch, seq_len=seq))


def test_cpu_splits_rule_keeps_small_models_whole_and_cuts_big_batches():
  from lmjax import flops as flops_lib
  from lmjax.train import (CPU_FAULT_BUDGET, CPU_FAULT_SECONDS_PER_BYTE,
                           CPU_MATMUL_FLOPS_PER_S, CPU_REUSED_BLOCK_BYTES, step_temp_bytes)
  from lmjax.train import cpu_splits as cpu_splits_of
  cpu_splits = functools.partial(cpu_splits_of, malloc="system")  # glibc's malloc
  CPU_FRESH_BLOCK_BYTES = CPU_REUSED_BLOCK_BYTES["system"]
  small = _tiny()                                     # 8 x 32 tokens x d_model 32
  assert cpu_splits(small, _mesh()) == 1
  # nanoGPT 'baby': 12 x 64 tokens, ~50 MiB of temporaries -> 2 pieces of ~25 MiB, under
  # glibc's mmap threshold (no fresh pages per step).
  baby = _nanogpt(small, 4, 4, 128, 64, 12)
  assert step_temp_bytes(baby, 768) > CPU_FRESH_BLOCK_BYTES >= step_temp_bytes(baby, 384, 2)
  assert cpu_splits(baby, _mesh()) == 2
  # At 8 layers 3 pieces of 256 tokens would hold ~36 MiB once the gradient accumulator
  # (one float per parameter) is counted, so 4 pieces of 192 tokens (~29 MiB) it is.
  deep = _nanogpt(small, 8, 4, 128, 64, 12)
  assert step_temp_bytes(deep, 256, 3) > CPU_FRESH_BLOCK_BYTES >= step_temp_bytes(deep, 192, 4)
  assert cpu_splits(deep, _mesh()) == 4
  # At 16 layers no piece of >= 192 tokens fits, and no split brings the page faults
  # within budget (this model's matmuls are few for its activations): the most pieces.
  assert cpu_splits(_nanogpt(small, 16, 4, 128, 64, 12), _mesh()) == 4
  # nanoGPT 'small': no piece fits; the fewest pieces whose faults (~0.9 ms per MiB) stay
  # within 15% of the step's matmuls (~2.9 s at 100 GFLOP/s) are 4 (~330 MiB), not 2.
  cfg = _nanogpt(small, 6, 6, 384, 256, 16)
  matmul_s = flops_lib.flops_per_token(cfg.model, 256, "matmul") * 16 * 256 / CPU_MATMUL_FLOPS_PER_S

  def fault_share(tokens, pieces):
    return step_temp_bytes(cfg, tokens, pieces) * CPU_FAULT_SECONDS_PER_BYTE / matmul_s
  assert step_temp_bytes(cfg, 256, 16) > CPU_FRESH_BLOCK_BYTES
  assert fault_share(2048, 2) > CPU_FAULT_BUDGET >= fault_share(1024, 4)
  assert cpu_splits(cfg, _mesh()) == 4
  # Two data-parallel devices hold 8 rows each: half the matmuls against the same pieces'
  # faults, so 4 pieces of 2 rows. Two accumulation microbatches of 8 rows: the step's
  # matmuls are unchanged, so 2 pieces of 4 rows.
  assert cpu_splits(cfg, _mesh(2)) == 4
  accum = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum=2))
  assert cpu_splits(accum, _mesh()) == 2
  fixed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cpu_splits=8))
  assert cpu_splits(fixed, _mesh()) == 8
  # Scanned layers take pieces of at least 1,024 tokens: 'baby' (768 tokens) stays whole at
  # 4 and at 24 layers, 'small' keeps its 4 pieces of 1,024, and on 2 devices (2,048 tokens
  # each) it gets 2.
  scan = lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, scan_layers=True))
  assert cpu_splits(scan(baby), _mesh()) == cpu_splits(scan(_nanogpt(small, 24, 4, 128, 64, 12)),
                                                       _mesh()) == 1
  assert cpu_splits(scan(cfg), _mesh()) == 4 and cpu_splits(scan(cfg), _mesh(2)) == 2
  # Under mimalloc (lmjax's CLIs) blocks up to 384 MiB come back without fresh pages: 'baby'
  # stays whole at 4, 8 and 16 layers, 'small' still gets 4 pieces (~330 MiB; 2 would hold
  # ~620), at d_model 256 4 too (~210 MiB; 2 would hold ~400), and a manual setting wins.
  mi = functools.partial(cpu_splits_of, malloc="mimalloc")
  assert mi(baby, _mesh()) == mi(deep, _mesh()) == mi(small, _mesh()) == 1
  assert mi(_nanogpt(small, 16, 4, 128, 64, 12), _mesh()) == 1
  assert mi(_nanogpt(small, 6, 4, 256, 256, 16), _mesh()) == 4
  assert (step_temp_bytes(cfg, 2048, 2) > CPU_REUSED_BLOCK_BYTES["mimalloc"]
          >= step_temp_bytes(cfg, 1024, 4))
  assert mi(cfg, _mesh()) == 4 and mi(fixed, _mesh()) == 8


def test_step_temp_estimate_tracks_xla_memory_analysis():
  # The splits rule reasons about XLA:CPU's per-step temporaries without compiling; its
  # estimate must stay near what XLA itself reports, or the rule picks blind.
  from lmjax import sharding
  from lmjax.train import Trainer, step_temp_bytes
  # The split case has 3.2M parameters against ~29 MiB of activations per piece: leaving
  # out the gradient accumulator would put the estimate at ~0.7x.
  base = _tiny()
  for cfg, pieces in ((_nanogpt(base, 4, 4, 128, 64, 12), 1), (_nanogpt(base, 2, 4, 64, 64, 16), 1),
                      (_nanogpt(base, 4, 4, 256, 64, 12), 3)):
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cpu_splits=pieces))
    mesh = _mesh()
    trainer = Trainer(cfg, mesh)
    B, T = cfg.train.global_batch, cfg.train.seq_len
    zeros = np.zeros((B, T), np.int32)
    batch = sharding.global_batch_from_local(
        {"inputs": zeros, "targets": zeros, "mask": np.ones((B, T), np.float32)}, mesh)
    temp = trainer.compiled_temp_bytes(trainer.init_state(), batch)
    ratio = step_temp_bytes(cfg, B * T // pieces, pieces) / temp
    assert 0.85 < ratio < 1.18, (cfg.model, pieces, temp, ratio)


def test_cpu_splits_leave_the_training_trajectory_unchanged():
  """Sequential pieces are gradient accumulation: same losses and parameters as one piece."""
  import jax
  from lmjax.train import Trainer
  results = {}
  for splits in (1, 4):
    cfg = _tiny(cpu_splits=splits, steps=3)
    trainer = Trainer(cfg, _mesh())
    assert trainer.splits == splits
    state = trainer.init_state()
    losses = []
    for i in range(3):
      tok = np.random.default_rng(i).integers(0, cfg.model.vocab_size, (8, 33), np.int32)
      mask = np.ones((8, 32), np.float32)
      mask[i, 20:] = 0  # unequal token counts per piece: pieces must weight by tokens
      batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "mask": mask}
      state, metrics = trainer.step(state, batch)
      losses.append(float(metrics["loss"]))
    results[splits] = (losses, jax.device_get(state["params"]))
  np.testing.assert_allclose(results[4][0], results[1][0], rtol=2e-6)
  for a, b in zip(jax.tree.leaves(results[4][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_dots_rule_gives_onednn_to_f32_models_on_a_jaxlib_that_compiles_them(monkeypatch):
  """train.cpu_dots: "auto" hands f32 models' dots to oneDNN only on jaxlib >= 0.11 (0.10.2
  dies of SIGILL compiling them), on x86-64 with AVX-512 (the CPUs measured); bf16 models
  keep YNNPACK's AMX kernels; "onednn" where it cannot run is one ConfigError."""
  from lmjax import train as train_lib
  f32 = _tiny()
  bf16 = dataclasses.replace(f32, model=dataclasses.replace(f32.model, dtype="bfloat16"))
  forced = dataclasses.replace(f32, train=dataclasses.replace(f32.train, cpu_dots="onednn"))
  off = dataclasses.replace(f32, train=dataclasses.replace(f32.train, cpu_dots="xla"))
  mesh = _mesh()
  monkeypatch.setattr(train_lib.platform, "machine", lambda: "x86_64")
  monkeypatch.setattr(train_lib, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
  monkeypatch.setattr(train_lib, "_jaxlib_version", lambda: (0, 12, 0))
  assert train_lib.uses_onednn(f32, mesh) and train_lib.uses_onednn(forced, mesh)
  assert not train_lib.uses_onednn(bf16, mesh) and not train_lib.uses_onednn(off, mesh)
  options = train_lib._compiler_options(f32, mesh)[0]
  assert options["xla_cpu_use_onednn"] is True, options
  assert "xla_cpu_use_onednn" not in (train_lib._compiler_options(bf16, mesh)[0] or {})
  # The options are part of the programs' key: switching cpu_dots never reuses programs.
  assert train_lib._cache_key(f32, mesh, 1) != train_lib._cache_key(off, mesh, 1)
  monkeypatch.setattr(train_lib, "cpu_flags", lambda: frozenset({"avx2"}))
  assert not train_lib.uses_onednn(f32, mesh) and train_lib.uses_onednn(forced, mesh)
  monkeypatch.setattr(train_lib, "_jaxlib_version", lambda: (0, 10, 2))
  assert not train_lib.uses_onednn(f32, mesh)
  with pytest.raises(ConfigError, match=r"^train.cpu_dots='onednn' cannot run here: jaxlib "
                     r"0\.10\.2 crashes .*use train.cpu_dots='auto' or 'xla'\.$"):
    train_lib.uses_onednn(forced, mesh)
  monkeypatch.setattr(train_lib, "_jaxlib_version", lambda: (0, 12, 0))
  monkeypatch.setattr(train_lib.platform, "machine", lambda: "aarch64")
  assert not train_lib.uses_onednn(f32, mesh)
  with pytest.raises(ConfigError, match="only for x86-64, not aarch64"):
    train_lib.uses_onednn(forced, mesh)
  with pytest.raises(ConfigError, match=r"train.cpu_dots='mkl' is not a known option"):
    dataclasses.replace(f32.train, cpu_dots="mkl")
  # A machine setting: a run resumes under another choice, and from a config saved before
  # the key existed.
  from lmjax.checkpoint import config_diff
  saved = config_lib.to_dict(off)
  assert config_diff(saved, config_lib.to_dict(f32), train_lib.RESUMABLE_CHANGES) == []
  del saved["train"]["cpu_dots"]
  assert config_diff(saved, config_lib.to_dict(f32), train_lib.RESUMABLE_CHANGES) == []


@pytest.mark.skipif(bool(onednn_dots_supported()),
                    reason=f"no oneDNN dots here: {onednn_dots_supported()}")
def test_onednn_dots_train_the_same_model_as_xla_dots():
  """oneDNN's matmuls are a kernel choice: the same gradients to f32 rounding, and the same
  losses over steps. (Parameters are not compared: Adam turns the rounding of a rare
  token's near-zero gradient into visible differences, as any kernel change would.)"""
  import jax
  from lmjax.train import Trainer, cpu_compiler_options, dot_options, make_loss_fn
  tok = np.random.default_rng(0).integers(0, 256, (8, 33), np.int32)
  batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "mask": np.ones((8, 32), np.float32)}
  results = {}
  for dots in ("xla", "onednn"):
    cfg = _tiny(cpu_dots=dots, cpu_splits=2, steps=3)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=2))
    trainer = Trainer(cfg, _mesh())
    assert trainer.onednn_dots == (dots == "onednn")
    state = trainer.init_state()
    with jax.set_mesh(trainer.mesh):
      text = trainer.train_step.lower(state, batch, trainer.hparams()).compile().as_text()
      grad = jax.jit(jax.grad(lambda p, c=cfg: make_loss_fn(c)(p, batch)[0]),
                     compiler_options=cpu_compiler_options(trainer.mesh, dot_options(
                         cfg, trainer.mesh)))(state["params"])
    losses = []
    for _ in range(3):
      state, metrics = trainer.step(state, batch)
      losses.append(float(metrics["loss"]))
    results[dots] = (losses, jax.device_get(grad), text)
  # The options took: oneDNN runs the dots, and nothing does without them.
  assert results["onednn"][2].count('"__onednn_fusion"') >= 10, results["onednn"][2][:2000]
  assert "__onednn_fusion" not in results["xla"][2]
  assert results["onednn"][0][-1] < results["onednn"][0][0]
  np.testing.assert_allclose(results["onednn"][0], results["xla"][0], rtol=1e-5)
  leaves = jax.tree.leaves(results["xla"][1])
  scale = max(float(np.abs(g).max()) for g in leaves)
  for a, b in zip(jax.tree.leaves(results["onednn"][1]), leaves):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale)


def test_scan_layers_trains_the_same_model_as_unrolled_layers():
  """scan_layers is a layout: the same seed gives the same losses and parameters."""
  import jax
  from lmjax.train import Trainer
  results = {}
  for scan in (False, True):
    cfg = _tiny(steps=3)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=3,
                                                             scan_layers=scan))
    trainer = Trainer(cfg, _mesh())
    state = trainer.init_state()
    losses = []
    tok = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (8, 33), np.int32)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "mask": np.ones((8, 32), np.float32)}
    for _ in range(3):  # one batch again and again, so the loss must fall
      state, metrics = trainer.step(state, batch)
      losses.append(float(metrics["loss"]))
    params = jax.device_get(state["params"])
    if scan:
      params = dict(params)
      stacked = params.pop("layers")["block"]
      params.update({f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(3)})
    results[scan] = (losses, params)
  assert results[False][0][-1] < results[False][0][0]  # it trained
  np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(results[True][1]), jax.tree.leaves(results[False][1]),
                  strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_cpu_splits_that_do_not_divide_the_batch_are_one_line():
  from lmjax.errors import ConfigError
  from lmjax.train import Trainer
  with pytest.raises(ConfigError, match=r"train.cpu_splits=3 does not divide the 8 rows.*divisor"):
    Trainer(_tiny(cpu_splits=3), _mesh())
  with pytest.raises(ConfigError, match=r"train.cpu_splits=-1 is invalid"):
    _tiny(cpu_splits=-1)


def test_unrolled_remat_on_cpu_warns_that_it_saves_no_memory(caplog):
  # XLA:CPU schedules an unrolled block's recomputation early (docs/performance.md), so
  # remat there only costs time; the run says so and names the setting that works.
  import logging
  from lmjax import train as train_lib
  caplog.set_level(logging.WARNING)
  for remat, scan, warned in (("full", False, True), ("dots", False, True),
                              ("full", True, False), ("none", False, False)):
    cfg = _tiny()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, remat=remat,
                                                             scan_layers=scan))
    with train_lib._PROGRAMS_LOCK:
      train_lib._PROGRAMS.clear()   # the warning comes with building the programs
    caplog.clear()
    train_lib.Trainer(cfg, _mesh())
    logged = [r.getMessage() for r in caplog.records if "saves no memory" in r.getMessage()]
    assert len(logged) == warned, (remat, scan, logged)
    if warned:
      assert f"model.remat={remat}" in logged[0] and "model.scan_layers=True" in logged[0]


def test_an_explicit_attention_chunk_count_trains_as_one_chunk_does(tmp_path):
  # Init traces a one-row batch, which 2 chunks cannot split: it must use the auto count,
  # while each device's 2 of the 16 rows split in 2 (the suite's host has 8 devices).
  # Chunks are a schedule, so the losses match one chunk's.
  from lmjax.errors import ConfigError
  from lmjax.train import Trainer
  runs = {}
  for chunks in (1, 2):
    cfg = _tiny(steps=4, log_every=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_chunks=chunks),
                              train=dataclasses.replace(cfg.train, global_batch=16))
    train(cfg, str(tmp_path / str(chunks)))
    runs[chunks] = [r["loss"] for r in read_metrics(str(tmp_path / str(chunks))) if "loss" in r]
  assert len(runs[2]) == 4
  np.testing.assert_allclose(runs[2], runs[1], rtol=1e-5)
  # A count that does not divide a CPU piece's rows is one line naming the piece.
  cfg = _tiny(steps=4, cpu_splits=4)
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_chunks=4))
  with pytest.raises(ConfigError, match=r"attention_chunks=4 does not divide the 2 batch rows "
                                        r"per device \(on CPU, per train.cpu_splits piece\)"):
    trainer = Trainer(cfg, _mesh())
    tok = np.zeros((8, 33), np.int32)
    trainer.step(trainer.init_state(), {"inputs": tok[:, :-1], "targets": tok[:, 1:],
                                        "mask": np.ones((8, 32), np.float32)})


def test_runs_of_one_shape_reuse_programs_and_train_as_if_built_afresh(tmp_path):
  # A sweep's runs of one model size differ in lr, warmup, length and seeds only: the second
  # reuses the first's compiled programs, and must train bit for bit as if it had not.
  from lmjax import sharding
  from lmjax import train as train_lib
  from lmjax.compile_clock import CompileClock
  a = _tiny(steps=10, log_every=1, eval_every=5)
  b = dataclasses.replace(
      a, name="b", optim=dataclasses.replace(a.optim, lr=a.optim.lr * 3, warmup_steps=3),
      train=dataclasses.replace(a.train, steps=8, seed=1, eval_every=4),
      data=dataclasses.replace(a.data, seed=2))
  assert train_lib.program_key(a) == train_lib.program_key(b)
  train_lib._PROGRAMS.clear()
  fresh = train(b, str(tmp_path / "fresh"))
  train_lib._PROGRAMS.clear()
  train(a, str(tmp_path / "a"))
  mesh = sharding.make_mesh(a.mesh)
  with CompileClock() as clock:
    assert train_lib.Trainer(b, mesh).train_step is train_lib.Trainer(a, mesh).train_step
    reused = train(b, str(tmp_path / "reused"))
  assert clock.programs == 0  # nothing traced, lowered or compiled again
  assert [r["loss"] for r in read_metrics(str(tmp_path / "reused"))] == \
      [r["loss"] for r in read_metrics(str(tmp_path / "fresh"))]
  assert reused["final_eval_loss"] == fresh["final_eval_loss"]
  # A field the step does read gets programs of its own.
  for other in (dataclasses.replace(a, guard=dataclasses.replace(a.guard, spike_k=3.0)),
                dataclasses.replace(a, train=dataclasses.replace(a.train, z_loss=1e-4)),
                dataclasses.replace(a, optim=dataclasses.replace(a.optim, b2=0.9))):
    assert train_lib.program_key(other) != train_lib.program_key(a)
    assert train_lib.Trainer(other, mesh).train_step is not train_lib.Trainer(a, mesh).train_step


def test_programs_compiled_ahead_leave_the_run_nothing_to_compile(tmp_path):
  # A sweep compiles its next model size in a background thread while a run trains. The
  # run that follows makes no program itself: submit() registers the shape before it
  # returns, so a run arriving mid-compile waits instead of compiling it twice. It trains
  # bit for bit as with programs compiled in the foreground.
  from lmjax import train as train_lib
  from lmjax.compile_clock import CompileClock
  cfg = _tiny(steps=6, log_every=1, eval_every=3)
  train_lib._PROGRAMS.clear()
  fresh = train(cfg, str(tmp_path / "fresh"))
  train_lib._PROGRAMS.clear()
  with train_lib.CompileAhead() as ahead:
    assert ahead.submit(cfg)
    assert not ahead.submit(cfg)  # queued already
    with CompileClock() as clock:
      ahead_run = train(cfg, str(tmp_path / "ahead"))
  assert clock.programs == 0
  assert ahead.compiled == 1 and ahead.seconds > 0
  assert [r["loss"] for r in read_metrics(str(tmp_path / "ahead"))] == \
      [r["loss"] for r in read_metrics(str(tmp_path / "fresh"))]
  assert ahead_run["final_eval_loss"] == fresh["final_eval_loss"]
  with train_lib.CompileAhead() as ahead:
    assert not ahead.submit(cfg)  # built already
    # An unusable config queues nothing; its own run reports the problem.
    assert not ahead.submit(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                               cpu_splits=3)))
  assert ahead.compiled == 0 and not train_lib._AHEAD
