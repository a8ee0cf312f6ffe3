"""Tests for lmjax.optim: schedules, decay mask, AdamW, clipping, accumulation."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import optim
from lmjax.errors import ConfigError

T, W, F = 100, 10, 0.1
LR = 2e-3


def _ref_lr(kind: str, t: int, decay_frac: float = 0.2, *, warmup: int = W,
            total: int = T) -> float:
  """Schedules written out longhand, independently of lmjax.optim."""
  W, T = warmup, total  # pylint: disable=invalid-name,redefined-outer-name
  if t < W:
    return LR * t / W
  if kind == "constant":
    return LR
  if kind == "cosine":
    p = min(1.0, (t - W) / (T - W))
    return LR * F + (LR - LR * F) * (1 + math.cos(math.pi * p)) / 2
  if kind == "linear":
    p = min(1.0, (t - W) / (T - W))
    return LR * F + (LR - LR * F) * (1 - p)
  assert kind == "wsd"
  decay_len = round(decay_frac * T)
  start = T - decay_len
  if t <= start:
    return LR
  q = min(1.0, (t - start) / decay_len)
  return LR * F + (LR - LR * F) * (1 - math.sqrt(q))


@pytest.mark.parametrize("kind", optim.SCHEDULES)
def test_schedule_values(kind):
  cfg = optim.OptimConfig(lr=LR, schedule=kind, warmup_steps=W, final_lr_frac=F)
  sched = optim.make_schedule(cfg, T)
  for t in (0, 1, 5, 9, 10, 11, 37, 55, 80, 81, 90, 99, 100, 250):
    np.testing.assert_allclose(float(sched(t)), _ref_lr(kind, t), rtol=1e-5,
                               atol=1e-12, err_msg=f"{kind} step {t}")


def test_schedule_landmarks():
  cfg = optim.OptimConfig(lr=1.0, schedule="wsd", warmup_steps=0, decay_frac=0.5)
  sched = optim.make_schedule(cfg, 10)
  assert float(sched(0)) == 1.0 and float(sched(5)) == 1.0
  np.testing.assert_allclose(float(sched(10)), 0.1, rtol=1e-6)
  # Warmup covering the whole run must not divide by zero.
  cfg = optim.OptimConfig(lr=1.0, warmup_steps=10)
  assert np.isfinite(float(optim.make_schedule(cfg, 10)(10)))


@pytest.mark.parametrize("field,value", [
    ("name", "sgdx"), ("lr", 0.0), ("b2", 1.0), ("eps", -1.0),
    ("weight_decay", -0.1), ("schedule", "step"), ("warmup_steps", 1.5),
    ("final_lr_frac", 2.0), ("decay_frac", 0.0), ("clip_norm", 0.0),
    ("grad_accum", 0), ("decay_norms", "yes"),
])
def test_config_rejects_bad_fields(field, value):
  with pytest.raises(ConfigError) as e:
    optim.OptimConfig(**{field: value})
  assert field in str(e.value) and "\n" not in str(e.value)


def test_schedule_rejects_inconsistent_lengths():
  with pytest.raises(ConfigError, match="warmup_steps"):
    optim.make_schedule(optim.OptimConfig(warmup_steps=20), 10)
  with pytest.raises(ConfigError, match="WSD"):
    optim.make_schedule(
        optim.OptimConfig(schedule="wsd", warmup_steps=90, decay_frac=0.2), 100)


def _fake_params(box: bool = False):
  d, v = 4, 8

  def p(*shape):
    x = jnp.ones(shape)
    return nn.Partitioned(x, names=(None,) * len(shape)) if box else x

  return {"params": {
      "embed": {"embedding": p(v, d)},
      "pos_embed": {"pos_embedding": p(6, d)},
      "block_0": {
          "attn_norm": {"scale": p(d), "bias": p(d)},
          "attn": {"w_q": p(d, d), "w_k": p(d, d), "w_v": p(d, d), "w_o": p(d, d)},
          "mlp_norm": {"scale": p(d)},
          "mlp": {"w_up": p(d, 2 * d), "w_gate": p(d, 2 * d),
                  "w_down": p(2 * d, d), "bias": p(d)},
      },
      "final_norm": {"scale": p(d)},
      "head": {"w_head": p(d, v), "bias": p(v)},
  }}


def _expected_mask(norms=False, biases=False, embeddings=False):
  kernels = dict.fromkeys(("w_q", "w_k", "w_v", "w_o"), True)
  return {"params": {
      "embed": {"embedding": embeddings},
      "pos_embed": {"pos_embedding": embeddings},
      "block_0": {
          "attn_norm": {"scale": norms, "bias": norms},
          "attn": kernels,
          "mlp_norm": {"scale": norms},
          "mlp": {"w_up": True, "w_gate": True, "w_down": True, "bias": biases},
      },
      "final_norm": {"scale": norms},
      "head": {"w_head": True, "bias": biases},
  }}


@pytest.mark.parametrize("box", [False, True])
def test_decay_mask(box):
  params = _fake_params(box)
  assert optim.decay_mask(params) == _expected_mask()
  cfg = optim.OptimConfig(decay_norms=True, decay_biases=True, decay_embeddings=True)
  assert optim.decay_mask(params, cfg) == _expected_mask(True, True, True)
  abstract = jax.eval_shape(lambda: params)
  assert optim.decay_mask(abstract) == _expected_mask()


def _np_adamw(cfg, params, grads_seq, mask, lr_fn):
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, g in enumerate(grads_seq, start=1):
    lr = lr_fn(t - 1)  # the schedule sees the 0-based update count
    for k in p:
      gk = np.asarray(g[k], np.float64)
      m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * gk
      v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * gk * gk
      mhat = m[k] / (1 - cfg.b1 ** t)
      vhat = v[k] / (1 - cfg.b2 ** t)
      step = mhat / (np.sqrt(vhat) + cfg.eps)
      if mask[k]:
        step = step + cfg.weight_decay * p[k]
      p[k] = p[k] - lr * step
  return p


def _run(tx, params, grads_seq):
  @jax.jit  # one compiled step instead of hundreds of eager op dispatches
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return jax.tree.map(lambda a, u: a + u, params, updates), state

  state = tx.init(params)
  for g in grads_seq:
    params, state = step(params, state, g)
  return params


def test_adamw_matches_numpy():
  cfg = optim.OptimConfig(lr=LR, warmup_steps=2, final_lr_frac=F, clip_norm=None,
                          weight_decay=0.3)
  rng = np.random.default_rng(0)
  params = {"w_q": rng.normal(size=(3, 4)).astype(np.float32),
            "bias": rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: rng.normal(size=x.shape).astype(np.float32) for k, x in params.items()}
           for _ in range(4)]
  # 4 steps of a 6-step run with 2 warmup steps cover warmup and cosine.
  tx = optim.make_optimizer(cfg, 6, params)
  got = _run(tx, jax.tree.map(jnp.asarray, params), grads)
  lr_fn = lambda t: _ref_lr("cosine", t, warmup=2, total=6)
  want = _np_adamw(cfg, params, grads, {"w_q": True, "bias": False}, lr_fn)
  for k in params:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5, atol=1e-7)


def test_boxed_params_update_like_unboxed():
  cfg = optim.OptimConfig(warmup_steps=0)
  boxed = _fake_params(box=True)
  plain = nn.unbox(boxed)
  grads = jax.tree.map(lambda x: 0.1 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape),
                       plain)
  tx = optim.make_optimizer(cfg, 10, boxed)
  got = _run(tx, plain, [grads, grads])
  tx_boxed = optim.make_optimizer(cfg, 10, boxed)
  boxed_grads = jax.tree.map(lambda b, g: b.replace_boxed(g), boxed, grads,
                             is_leaf=lambda x: isinstance(x, nn.Partitioned))
  got_boxed = nn.unbox(_run(tx_boxed, boxed, [boxed_grads, boxed_grads]))
  jax.tree.map(np.testing.assert_allclose, got, got_boxed)
  # Norm scale (not decayed) and a kernel (decayed) must move differently.
  assert not np.allclose(got["params"]["final_norm"]["scale"],
                         got["params"]["block_0"]["attn"]["w_q"][0])


def test_clipping():
  # A large eps makes Adam sensitive to gradient scale even on step one, and
  # two steps of different norms make the per-step clip factor matter.
  kw = dict(lr=0.1, eps=1.0, weight_decay=0.0, schedule="constant")
  params = {"w": jnp.zeros((2, 2))}
  g_big = {"w": jnp.full((2, 2), 5.0)}    # global norm 10 -> scaled to norm 1
  g_small = {"w": jnp.full((2, 2), 0.2)}  # global norm 0.4 -> unchanged
  clipped = _run(optim.make_optimizer(optim.OptimConfig(clip_norm=1.0, **kw), 10, params),
                 params, [g_big, g_small])
  manual = _run(optim.make_optimizer(optim.OptimConfig(clip_norm=None, **kw), 10, params),
                params, [{"w": g_big["w"] / 10.0}, g_small])
  unclipped = _run(optim.make_optimizer(optim.OptimConfig(clip_norm=None, **kw), 10, params),
                   params, [g_big, g_small])
  np.testing.assert_allclose(clipped["w"], manual["w"], rtol=1e-6)
  assert not np.allclose(clipped["w"], unclipped["w"], rtol=1e-3)


def _mlp_loss(params, mb):
  h = jnp.tanh(mb["x"] @ params["w1"] + params["b1"])
  pred = h @ params["w2"]
  per_example = jnp.sum((pred - mb["y"]) ** 2, axis=-1)
  mask = mb["mask"]
  return jnp.sum(per_example * mask), (jnp.sum(mask), {"sq": jnp.sum(per_example * mask)})


def test_accumulation_matches_big_batch():
  rng = np.random.default_rng(1)
  params = {"w1": jnp.asarray(rng.normal(size=(5, 16)), jnp.float32),
            "b1": jnp.zeros((16,)),
            "w2": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}
  n = 32
  mask = (rng.random(n) < 0.6).astype(np.float32)
  mask[:4] = 1.0  # rows 0..3 land in different microbatches: uneven counts
  batch = {"x": jnp.asarray(rng.normal(size=(n, 5)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(n, 3)), jnp.float32),
           "mask": jnp.asarray(mask)}
  grad_fn = jax.value_and_grad(_mlp_loss, has_aux=True)
  acc = jax.jit(optim.accumulate_gradients, static_argnums=(0, 3))
  big = acc(grad_fn, params, batch, 1)
  small = acc(grad_fn, params, batch, 4)
  np.testing.assert_allclose(small.loss, big.loss, rtol=1e-5)
  assert float(small.num_tokens) == float(mask.sum())
  np.testing.assert_allclose(small.aux["sq"], big.aux["sq"], rtol=1e-5)
  for k in params:
    np.testing.assert_allclose(small.grads[k], big.grads[k], rtol=1e-5, atol=1e-6)
  if jax.device_count() >= 8:  # batch sharded over data-parallel devices
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded = jax.device_put(batch, data)
    dp = acc(grad_fn, params, sharded, 4)
    np.testing.assert_allclose(dp.loss, big.loss, rtol=1e-5)
    for k in params:
      np.testing.assert_allclose(dp.grads[k], big.grads[k], rtol=1e-5, atol=1e-6)
  # Reference: the plain token-mean loss of the whole batch.
  s, (cnt, _) = _mlp_loss(params, batch)
  np.testing.assert_allclose(big.loss, s / cnt, rtol=1e-6)
  # The uneven masks make the naive mean-of-means differ; proves the test bites.
  loss_fn = jax.jit(_mlp_loss)
  per_mb = []
  for i in range(4):
    si, (ci, _) = loss_fn(params, jax.tree.map(lambda x: x[i::4], batch))
    per_mb.append(si / ci)
  assert abs(float(np.mean(per_mb)) - float(big.loss)) > 1e-4


def test_accumulation_rejects_bad_split():
  batch = {"x": jnp.zeros((6, 2))}
  fn = lambda p, b: ((jnp.sum(b["x"]), (6, ())), p)
  with pytest.raises(ConfigError, match="divisible"):
    optim.accumulate_gradients(fn, {}, batch, 4)
  with pytest.raises(ConfigError, match="grad_accum"):
    optim.accumulate_gradients(fn, {}, batch, 0)
