"""The benchmarks' variant syntax: ModelConfig, train. and xla. overrides reach the step."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import train_throughput as tt  # noqa: E402  (a script directory, not a package)

from lmjax import train as train_lib  # noqa: E402


def test_parse_overrides_types_each_kind():
  got = tt.parse_overrides("attention=xla,train.cpu_splits=2,xla.xla_cpu_a=true,"
                           "xla.xla_cpu_b=512,xla.xla_cpu_c=,xla.xla_cpu_d=LIBRARY_X")
  assert got == {"attention": "xla", "train.cpu_splits": 2, "xla.xla_cpu_a": True,
                 "xla.xla_cpu_b": 512, "xla.xla_cpu_c": "", "xla.xla_cpu_d": "LIBRARY_X"}
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
