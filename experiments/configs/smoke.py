"""A tiny model on the embedded synthetic language: trains in well under a minute on a CPU.

  python -m lmjax.train --config=experiments/configs/smoke.py --workdir=/tmp/lmjax_smoke
"""
from lmjax import config as config_lib


def get_config():
  c = config_lib.to_config_dict()
  c.model.update(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_len=64,
                 position="rope", mlp="gelu", norm="rmsnorm")
  c.train.update(steps=150, global_batch=16, seq_len=64, eval_every=50, log_every=10)
  c.data.update(eval_batches=4)
  c.optim.update(lr=1e-2, warmup_steps=15, b2=0.99, schedule="cosine")
  c.checkpoint.update(every_steps=50, keep=2)
  return c
