"""Accelerator attention kernels against the model's own XLA attention.

Splash runs here in Pallas interpret mode (CPU): that checks the kernel's maths, masks, head
grouping and sharding wrapper, not its TPU performance. cuDNN cannot run without a GPU;
only its error path is tested.

Compiles dominate this file's time, so the models are tiny (one layer, d_model 64), the
parameters come from numpy rather than a compiled init, and cases share configs.
"""
from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from lmjax import sharding
from lmjax.errors import ConfigError
from lmjax.model import ModelConfig, Transformer, init_params

# d_head fixed so that 4- and 6-head configs both fit d_model 64.
BASE = dict(vocab_size=64, d_model=64, n_layers=1, n_heads=4, d_head=16, max_len=256,
            position="rope")
BATCH = 2


def _cfg(**overrides) -> ModelConfig:
  return ModelConfig(**{**BASE, **overrides})


@functools.lru_cache(maxsize=None)
def _params(cfg: ModelConfig) -> dict:
  """Random parameters of the right shapes, N(0, 1/D) weights and norm scales near 1."""
  boxed = jax.eval_shape(lambda: init_params(dataclasses.replace(cfg, attention="xla"),
                                             jax.random.key(0), 1, 128))
  rng = np.random.default_rng(0)

  def one(path, leaf):
    x = rng.normal(size=leaf.shape).astype(np.float32)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1.0 + 0.1 * x)
    return jnp.asarray(x / np.sqrt(cfg.d_model))
  return jax.tree_util.tree_map_with_path(one, nn.meta.unbox(boxed))


def _tokens(cfg, T):
  return jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (BATCH, T)), jnp.int32)


def _segments(T):
  """Packed rows: two documents in row 0, three in row 1, boundaries off the 128 blocks."""
  seg = np.zeros((BATCH, T), np.int32)
  seg[0, 50:] = 1
  seg[1, 30:] = 1
  seg[1, 100:] = 2
  return jnp.asarray(seg)


def _case(T, n_kv_heads, packed, n_heads=4):
  cfg = _cfg(n_kv_heads=n_kv_heads, n_heads=n_heads)
  return cfg, _params(cfg), _tokens(cfg, T), (_segments(T) if packed else None)


@functools.partial(jax.jit, static_argnums=0)
def _logits(cfg, params, tokens, segment_ids):
  return Transformer(cfg).apply({"params": params}, tokens, segment_ids)


@functools.partial(jax.jit, static_argnums=0)
def _logits_and_grads(cfg, params, tokens, segment_ids):
  def loss(params):
    logits = Transformer(cfg).apply({"params": params}, tokens, segment_ids)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]), logits
  (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return logits, grads


def _splash(cfg):
  return dataclasses.replace(cfg, attention="splash")


@pytest.mark.parametrize("T,n_kv_heads,packed", [
    (128, 0, False),   # multi-head
    (256, 1, True),    # multi-query, packed documents, one 256-row block
])
def test_splash_logits_equal_xla(T, n_kv_heads, packed):
  cfg, params, tokens, seg = _case(T, n_kv_heads, packed)
  xla = np.asarray(_logits(cfg, params, tokens, seg))
  got = np.asarray(_logits(_splash(cfg), params, tokens, seg))
  assert np.abs(xla).max() > 0.1, "degenerate logits would make the comparison vacuous"
  np.testing.assert_allclose(got, xla, rtol=1e-5, atol=1e-5)


def test_splash_logits_and_gradients_equal_xla():
  cfg, params, tokens, seg = _case(128, 2, True)  # grouped-query, packed documents
  ref_logits, ref_grads = _logits_and_grads(cfg, params, tokens, seg)
  logits, grads = _logits_and_grads(_splash(cfg), params, tokens, seg)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
    assert np.linalg.norm(r) > 0, path
    err = np.linalg.norm(g - r) / np.linalg.norm(r)
    assert err <= 1e-4, (jax.tree_util.keystr(path), err)


def _shard_map_specs(jaxpr) -> list:
  """in_specs of every shard_map in a (closed) jaxpr, searched through nested jaxprs."""
  found = []
  for eqn in jaxpr.jaxpr.eqns if hasattr(jaxpr, "jaxpr") else jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      found.append(eqn.params["in_specs"])
    for p in eqn.params.values():
      if hasattr(p, "eqns") or hasattr(p, "jaxpr"):
        found += _shard_map_specs(p)
  return found


@pytest.mark.parametrize("mesh_sizes,n_heads,n_kv_heads,expected_q_spec", [
    ((2, 1, 2), 4, 2, P("data", "tensor", None, None)),   # heads and kv heads divide
    ((1, 2, 4), 4, 2, P("fsdp", "tensor", None, None)),   # kv heads repeated to divide
    ((2, 1, 4), 6, 3, P("data", None, None, None)),       # 6 heads on 4: heads replicated
])
def test_sharded_splash_equals_unsharded_xla(mesh_sizes, n_heads, n_kv_heads, expected_q_spec):
  cfg, params, tokens, seg = _case(128, n_kv_heads, True, n_heads=n_heads)
  xla = np.asarray(_logits(cfg, params, tokens, seg))

  n = int(np.prod(mesh_sizes))
  mesh = jax.make_mesh(mesh_sizes, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=jax.devices()[:n])
  boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), 1, 128))
  params = jax.device_put(params, sharding.tree_shardings(boxed, mesh))
  tokens, seg = jax.device_put((tokens, seg), sharding.batch_sharding(mesh))
  rules = sharding.activation_rules(mesh)

  def fwd(params, tokens, seg):
    with nn.logical_axis_rules(rules):
      return Transformer(_splash(cfg)).apply({"params": params}, tokens, seg)

  step = jax.jit(fwd, out_shardings=NamedSharding(mesh, P()))
  with jax.set_mesh(mesh):
    specs = _shard_map_specs(jax.make_jaxpr(step)(params, tokens, seg))
    got = np.asarray(step(params, tokens, seg))
  assert len(specs) == cfg.n_layers
  assert all(expected_q_spec in s for s in specs), specs  # q's placement in the kernel
  np.testing.assert_allclose(got, xla, rtol=1e-5, atol=1e-5)


def test_tpu_train_step_lowers_with_the_real_splash_kernels(monkeypatch):
  # No TPU here, but jax lowers for one from a CPU: lmjax's whole sharded train step (bf16,
  # grouped-query splash attention inside shard_map, scanned blocks, remat) must become a
  # TPU program whose attention is the compiled Mosaic kernels, not the interpreter the
  # CPU tests run. Catches what only the TPU path traces: the kernel's own lowering rules,
  # its block shapes and the shard_map around it.
  from lmjax import attention_kernels, sharding
  from lmjax import train as train_lib
  from lmjax.config import Config, OptimConfig, TrainConfig
  cfg = Config(model=_cfg(attention="splash", dtype="bfloat16", n_heads=4, n_kv_heads=2,
                          max_len=256, scan_layers=True, remat="dots"),
               optim=OptimConfig(lr=1e-3), mesh=sharding.MeshConfig(data=2, fsdp=2, tensor=2),
               train=TrainConfig(global_batch=8, seq_len=256, steps=10, progress=False))
  mesh = sharding.make_mesh(cfg.mesh)
  trainer = train_lib.Trainer(cfg, mesh)
  # A train step of its own, outside the shared program cache: jax keeps each jitted
  # function's traces, and this one's (with TPU kernels) must reach no CPU run.
  step = train_lib._build_programs(cfg, mesh, trainer.splits).train_step
  monkeypatch.setattr(attention_kernels, "splash_interpret", lambda: False)
  with jax.set_mesh(mesh):
    lowered = step.trace(trainer.abstract_state, train_lib.abstract_batch(cfg, mesh),
                         trainer.hparams()).lower(lowering_platforms=("tpu",))
  text = lowered.as_text()
  # The scanned block's forward kernel, its remat recompute, and the backward's dq and dkv.
  assert text.count("tpu_custom_call") == 4, text.count("tpu_custom_call")
  assert "mhlo.num_partitions = 8" in text and "sdy.manual_computation" in text  # shard_map


def test_splash_rejects_length_not_multiple_of_128():
  cfg = _cfg(attention="splash")
  with pytest.raises(ConfigError, match="multiple of 128") as e:
    jax.eval_shape(Transformer(cfg).apply, {"params": _params(cfg)}, _tokens(cfg, 100))
  assert "\n" not in str(e.value) and "attention='xla'" in str(e.value)


def test_cudnn_off_gpu_is_a_config_error():
  # Raised while tracing (eval_shape compiles nothing), before any cuDNN call could fail.
  assert jax.default_backend() != "gpu"
  cfg = _cfg(attention="cudnn", dtype="bfloat16")
  with pytest.raises(ConfigError, match="needs a GPU") as e:
    jax.eval_shape(Transformer(cfg).apply, {"params": _params(cfg)}, _tokens(cfg, 128))
  assert "\n" not in str(e.value) and "attention='xla'" in str(e.value)
