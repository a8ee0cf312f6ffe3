"""A seconds-long IsoFLOP sweep (3 budgets x 3 sizes) for smoke tests of the sweep machinery.

  python -m lmjax.sweep --config=experiments/configs/sweeps/tiny.py --workdir=/tmp/tiny_sweep
"""
from lmjax import config as config_lib
from lmjax.scaling.plan import SweepConfig


def get_config():
  c = config_lib.to_config_dict(SweepConfig())
  c.budgets = (2e9, 4e9, 8e9)
  c.sizes_per_budget = 3
  c.size_span = 6.0
  c.widths = (16, 32, 48)
  c.tokens_per_param = 20.0
  c.evals_per_run = 4
  c.bootstrap = 200
  c.holdout_budgets = 1
  c.base.model.update(vocab_size=256, position="rope", norm="rmsnorm", max_len=32)
  c.base.train.update(global_batch=8, seq_len=32, log_every=10, steps=1)
  c.base.data.update(eval_batches=2)
  c.base.checkpoint.update(every_steps=10, keep=1)
  return c
