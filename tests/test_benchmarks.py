"""The benchmarks' variant syntax: ModelConfig, train. and xla. overrides reach the step."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import train_throughput as tt  # noqa: E402  (a script directory, not a package)

from lmjax import train as train_lib  # noqa: E402


def test_parse_overrides_types_each_kind():
  got = tt.parse_overrides("attention=xla,train.cpu_splits=2,xla.xla_cpu_a=true,"
                           "xla.xla_cpu_b=512,xla.xla_cpu_c=,xla.xla_cpu_d=LIBRARY_X,"
                           "xla.xla_cpu_e=LIBRARY_X+LIBRARY_Y,train.cpu_dots=xla")
  assert got == {"attention": "xla", "train.cpu_splits": 2, "xla.xla_cpu_a": True,
                 "xla.xla_cpu_b": 512, "xla.xla_cpu_c": "", "xla.xla_cpu_d": "LIBRARY_X",
                 "xla.xla_cpu_e": "LIBRARY_X,LIBRARY_Y", "train.cpu_dots": "xla"}
  with pytest.raises(SystemExit, match="unknown ModelConfig"):
    tt.parse_overrides("no_such_field=1")


def test_xla_variant_compiles_with_its_option_and_restores_the_defaults():
  # Eigen dots instead of YNNPACK (ynn_fusion_type="") must show in the compiled step, and
  # the shared option table must be as before once the runner is built.
  shape = dict(tt.CONFIGS["baby"], n_layers=1, batch=4)
  batches = tt.make_batches(shape, n=1)
  before = dict(train_lib.CPU_STEP_COMPILER_OPTIONS)

  def compiled_text(variant):
    runner = tt.LmjaxRunner(shape, "float32", tt.parse_overrides(variant), batches)
    trainer = runner.trainer
    return trainer.train_step.lower(runner.state, runner.batches[0],
                                    trainer.hparams()).compile().as_text()

  assert "__ynn_fusion" in compiled_text("default")
  assert "__ynn_fusion" not in compiled_text("xla.xla_cpu_experimental_ynn_fusion_type=")
  assert train_lib.CPU_STEP_COMPILER_OPTIONS == before


def test_isolated_worker_trains_lmjax_under_the_interpreter_it_is_given(tmp_path):
  # --lmjax_python runs the lmjax worker under another venv's interpreter. CI has one
  # Python, so the "other" interpreter is a wrapper that leaves a mark and execs this one:
  # the mark shows the given path started the worker, the loss that it trained lmjax.
  shape = dict(tt.CONFIGS["baby"], n_layers=1, batch=4)
  batches = tt.make_batches(shape, n=2)
  here = tt.LmjaxRunner(shape, "float32", {}, batches)
  here.run(3)
  mark = tmp_path / "mark"
  python = tmp_path / "python"
  python.write_text(f'#!/bin/sh\necho "$@" >> {mark}\nexec {sys.executable} "$@"\n')
  python.chmod(0o755)
  worker = tt.IsolatedRunner("lmjax", shape, "float32", {}, batches, python=str(python))
  try:
    worker.run(3)
    assert worker.last_loss == pytest.approx(here.last_loss, rel=1e-6)
    assert worker.versions() == tt.versions()
    # What ran the dots is reported, and is what this jaxlib and CPU give an f32 model.
    assert worker.cpu_dots() == here.cpu_dots() == (
        "onednn" if train_lib.uses_onednn(here.cfg, here.trainer.mesh) else "xla")
  finally:
    worker.close()
  assert worker.proc.returncode == 0
  assert "--_worker_fd=" in mark.read_text()


def test_a_worker_that_dies_is_one_error_not_a_hang(tmp_path):
  dies = tmp_path / "python"
  dies.write_text("#!/bin/sh\nexit 3\n")
  dies.chmod(0o755)
  shape = dict(tt.CONFIGS["baby"], n_layers=1, batch=4)
  with pytest.raises(RuntimeError, match="exited with code 3 before answering"):
    tt.IsolatedRunner("lmjax", shape, "float32", {}, tt.make_batches(shape, n=1),
                      python=str(dies))
  with pytest.raises(SystemExit, match="'/no/such/python' is not an executable file"):
    tt.main(["--lmjax_python=/no/such/python"])
  with pytest.raises(SystemExit, match="names an interpreter twice"):
    tt.main([f"--lmjax_python={sys.executable},{sys.executable}"])
  with pytest.raises(SystemExit, match="needs --isolation=process"):
    tt.main([f"--lmjax_python={sys.executable}", "--isolation=none"])


def test_accelerator_mfu_figures_follow_from_the_step_time_and_lmjax_flops():
  # The H100 script's CPU smoke run: every simulated device on the data axis, one row each;
  # its MFU must be lmjax.flops' count x tokens/s over the peak, all from the same step time.
  import math

  import jax

  import accelerator_mfu as am
  from lmjax import flops as flops_lib
  from lmjax.model import ModelConfig
  report = am.main(["--configs=tiny", "--steps=2", "--rounds=2", "--warmup=1", "--batch=1",
                    "--batch_per_device=1"])
  (r,) = report["results"]
  n = jax.device_count()
  assert r["devices"] == n > 1 and r["global_batch"] == n
  cfg = ModelConfig(**r["model"])
  assert (cfg.dtype, cfg.attention, cfg.scan_layers) == ("bfloat16", "causal_blocks", True)
  assert r["params"] == flops_lib.param_counts(cfg).total
  tokens_per_s = n * r["seq_len"] / (r["step_ms"] / 1e3)
  assert r["tokens_per_s"] == pytest.approx(tokens_per_s, rel=1e-3)
  for conv in ("matmul", "6N"):
    per_token = flops_lib.flops_per_token(cfg, r["seq_len"], conv)
    assert r["flops_per_token"][conv] == per_token
    assert r["achieved_flops_per_s"][conv] == pytest.approx(tokens_per_s * per_token, rel=1e-3)
  assert r["spec_peak_flops"] == flops_lib.peak_flops("cpu", "bfloat16") * n
  assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"]["matmul"] / r["spec_peak_flops"],
                                   abs=1e-4)
  assert r["mfu_6n"] < r["mfu"]   # 6N leaves out attention
  assert abs(r["final_loss"] - math.log(cfg.vocab_size)) < 1.0   # random tokens: ~ln V
  with pytest.raises(SystemExit, match="unknown --configs"):
    am.main(["--configs=7b"])


TINY = ["--configs=tiny", "--steps=1", "--rounds=1", "--warmup=0", "--batch=8"]


def test_accelerator_mfu_runs_on_the_gpu_image_without_lmjax_installed():
  # The lent GPU machine has jax, flax, optax and orbax but none of lmjax's data, config or
  # logging dependencies, and no network to install them: the script must not import them.
  import subprocess
  root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
  # The command docs/performance.md gives for that machine, with Python's import log.
  proc = subprocess.run([sys.executable, "-X", "importtime", "benchmarks/accelerator_mfu.py",
                         "--help"], cwd=root, capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=root), timeout=300)
  assert proc.returncode == 0 and "--configs" in proc.stdout, proc.stderr[-2000:]
  imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
              for line in proc.stderr.splitlines() if line.startswith("import time:")}
  assert {"jax", "flax", "optax", "orbax", "lmjax"} <= imported   # the log is read right
  absent = {"tensorflow_datasets", "grain", "ml_collections", "tensorboardX", "tensorflow",
            "torch"}
  assert not imported & absent, sorted(imported & absent)


def test_accelerator_mfu_falls_back_to_xla_attention_when_the_kernel_fails(tmp_path):
  # A real failure: cuDNN attention does not exist on CPU. The row comes from the retry
  # with jax.nn's XLA attention and says what failed first.
  import json

  import accelerator_mfu as am
  out = tmp_path / "mfu.json"
  report = am.main(TINY + ["--attention=cudnn", f"--out={out}"])
  (r,) = report["results"]
  assert r["model"]["attention"] == am.XLA_ATTENTION and r["tokens_per_s"] > 0
  (failed,) = r["failed_attempts"]
  assert failed["overrides"] == {} and "cudnn" in failed["error"].lower()
  assert r["peak_memory_is_this_runs_alone"] is False   # the failed attempt ran first
  assert json.loads(out.read_text())["results"] == json.loads(json.dumps(report["results"]))
  with pytest.raises(Exception, match="(?i)cudnn"):
    am.main(TINY + ["--attention=cudnn", "--fallback=0"])


def test_accelerator_mfu_adds_remat_when_out_of_memory_and_reports_total_failure(monkeypatch):
  # Fault injection: device memory runs out unless the whole block is rematerialised.
  import accelerator_mfu as am
  real = am.bench

  def tight_memory(name, args, peak, overrides=None):
    if (overrides or {}).get("remat") != "full":
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.9GiB")
    return real(name, args, peak, overrides)
  monkeypatch.setattr(am, "bench", tight_memory)
  (r,) = am.main(TINY)["results"]
  assert r["model"]["remat"] == "full"
  assert [f["overrides"] for f in r["failed_attempts"]] == [{}, {"remat": "dots"}]

  def broken(name, args, peak, overrides=None):
    raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
  monkeypatch.setattr(am, "bench", broken)
  rows = am.main(["--configs=tiny,tiny"] + TINY[1:])["results"]
  assert len(rows) == 2   # the second config still ran after the first failed every way
  for row in rows:   # more remat, then XLA attention, then nothing is left to try
    assert "out of memory" in row["error"] and "tokens_per_s" not in row
    assert [f["overrides"] for f in row["failed_attempts"]] == [
        {}, {"remat": "dots"}, {"remat": "full"},
        {"remat": "full", "attention": am.XLA_ATTENTION}]


def test_accelerator_mfu_tells_device_memory_from_a_kernels_own():
  import accelerator_mfu as am
  splash = {"remat": "none", "attention": "splash"}
  device = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12GiB")
  vmem = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem")
  assert am.next_variant(splash, device) == {"remat": "dots"}
  assert am.next_variant(splash, vmem) == {"attention": am.XLA_ATTENTION}   # the kernel's
  assert am.next_variant(splash, FloatingPointError("the loss is nan")) == {
      "attention": am.XLA_ATTENTION}
  assert am.next_variant({"remat": "full", "attention": "splash"}, device) == {
      "attention": am.XLA_ATTENTION}
  assert am.next_variant({"remat": "full", "attention": am.XLA_ATTENTION}, device) is None
