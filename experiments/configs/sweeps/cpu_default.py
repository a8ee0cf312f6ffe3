"""The main job: an IsoFLOP sweep on the embedded synthetic language, sized for a 2-core CPU.

  python -m lmjax.sweep --config=experiments/configs/sweeps/cpu_default.py --workdir=runs/default

4 compute budgets x 4 model sizes; the largest budget is held out of the fit and predicted.
"""
from lmjax import config as config_lib
from lmjax.scaling.plan import SweepConfig


def get_config():
  c = config_lib.to_config_dict(SweepConfig())
  c.budgets = (7.5e10, 1.5e11, 3e11, 6e11)
  c.sizes_per_budget = 4
  c.size_span = 8.0
  c.tokens_per_param = 40.0   # small models are compute-optimal at more tokens per parameter
  c.head_dim = 16
  c.aspect_ratio = 32.0
  c.lr_base = 1e-2
  c.lr_base_width = 64
  c.evals_per_run = 8
  c.holdout_budgets = 1
  c.bootstrap = 1000
  # Two worker processes drain the manifest: these models are too small to keep two cores
  # busy from one process. 1.23-1.35x the runs per hour of one process on a 2-core CPU, with
  # the same losses (docs/performance.md, eighteenth pass).
  c.workers = 2
  c.base.model.update(vocab_size=256, position="rope", norm="rmsnorm", mlp="gelu", max_len=64)
  c.base.train.update(global_batch=16, seq_len=64, log_every=25, steps=1)
  c.base.data.update(eval_batches=8)
  # Runs of seconds: a stop (Ctrl-C, SIGTERM) saves where it is, and a hard kill loses one
  # short run, so interval saves would only cost time (10% of a seeds=3 sweep's groups).
  # A run that goes on for minutes still saves once a minute.
  c.base.checkpoint.update(every_steps=None, every_seconds=60.0, keep=1)
  return c
