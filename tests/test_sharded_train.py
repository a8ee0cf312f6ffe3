"""One train step is the same computation on every mesh; fsdp really shards the state."""
import dataclasses

import jax
import numpy as np
import pytest

from lmjax.config import Config, TrainConfig
from lmjax.errors import ConfigError
from lmjax.model import ModelConfig
from lmjax.optim import OptimConfig
from lmjax.sharding import (MeshConfig, global_batch_from_local, make_mesh, per_device_bytes)
from lmjax.train import Trainer

# Shapes chosen so every axis divides on every mesh below (8 heads, widths of 8).
CFG = Config(model=ModelConfig(vocab_size=64, d_model=64, n_heads=8, n_layers=2, max_len=32,
                               d_ff=128, position="rope"),
             # eps well above round-off: with eps ~ 0 Adam's first step is lr * sign(g), and
             # a gradient element that cancels to ~0 may flip sign between reduction orders.
             optim=OptimConfig(lr=1e-2, warmup_steps=0, eps=1e-5),
             train=TrainConfig(steps=10, global_batch=16, seq_len=32))


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  toks = rng.integers(0, cfg.model.vocab_size, (cfg.train.global_batch, cfg.train.seq_len + 1))
  mask = np.ones((cfg.train.global_batch, cfg.train.seq_len), np.float32)
  mask[3, 20:] = 0  # a ragged row, so token weighting matters
  return dict(inputs=toks[:, :-1].astype(np.int32), targets=toks[:, 1:].astype(np.int32),
              mask=mask)


def _assert_trees_close(a_tree, b_tree, rtol=1e-5):
  """Per-array relative error ||a - b|| / ||b||: Adam divides by |g|, so single elements
  with near-zero gradients can legitimately differ more than the array as a whole."""
  flat_b = jax.tree_util.tree_leaves_with_path(jax.device_get(b_tree))
  flat_a = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(a_tree)))
  for path, b in flat_b:
    a = np.asarray(flat_a[path], np.float64)
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= rtol, (path, err)


def _one_step(cfg, mesh_sizes, steps=1):
  n = int(np.prod(mesh_sizes))
  mesh = make_mesh(MeshConfig(*mesh_sizes), jax.devices()[:n])
  trainer = Trainer(cfg, mesh)
  state = trainer.init_state()
  losses = []
  for s in range(steps):
    state, metrics = trainer.step(state, global_batch_from_local(_batch(cfg, s), mesh))
    losses += [float(metrics["loss"]), float(metrics["grad_norm"])]
  return losses, state


@pytest.fixture(scope="module")
def single_device():
  return _one_step(CFG, (1, 1, 1), steps=2)


@pytest.mark.parametrize("mesh_sizes", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4)])
def test_train_step_equals_single_device(single_device, mesh_sizes):
  ref_losses, ref_state = single_device
  losses, state = _one_step(CFG, mesh_sizes, steps=2)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _assert_trees_close(state["params"], ref_state["params"])
  _assert_trees_close(state["opt_state"], ref_state["opt_state"])
  w_up = state["params"]["layer_0"]["mlp"]["w_up"]
  expected = {(8, 1, 1): (None, None), (1, 8, 1): ("fsdp", None), (1, 1, 8): (None, "tensor"),
              (2, 2, 2): ("fsdp", "tensor"), (1, 2, 4): ("fsdp", "tensor")}[mesh_sizes]
  assert tuple(w_up.sharding.spec) == expected


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_rematerialised_sharded_step_equals_single_device(single_device, remat):
  # Unrolled blocks under nn.remat recompute in the backward pass: sharded over data, fsdp
  # and tensor it must still be the same step as the single-device one without remat.
  cfg = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, remat=remat))
  ref_losses, ref_state = single_device
  losses, state = _one_step(cfg, (2, 2, 2), steps=2)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _assert_trees_close(state["params"], ref_state["params"])


@pytest.mark.parametrize("copies", [True, False], ids=["transposed_copies", "plain"])
def test_bf16_sharded_step_equals_single_device(copies, monkeypatch):
  # bf16's backward pass reshapes activations into row-major transposed copies on CPUs with
  # bf16 dot instructions (lmjax.model.copy_transposes), also along sharded axes: with and
  # without them, the sharded step must be the single-device one up to bf16 rounding of
  # the cotangents (measured: loss within 6e-4 and 3.8e-3, parameters within 2.2e-3 and
  # 7.4e-3 relative; CPU meshes of 8 devices).
  from lmjax import model as model_lib
  from lmjax import train as train_lib
  monkeypatch.setattr(model_lib, "copy_transposes", lambda: copies)
  monkeypatch.setattr(train_lib, "_PROGRAMS", type(train_lib._PROGRAMS)())
  cfg = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, dtype="bfloat16"))
  ref_losses, ref_state = _one_step(cfg, (1, 1, 1), steps=2)
  for mesh_sizes in [(2, 2, 2), (1, 1, 8)]:
    losses, state = _one_step(cfg, mesh_sizes, steps=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)
    _assert_trees_close(state["params"], ref_state["params"], rtol=3e-2)


def test_per_device_parameter_bytes_fall_as_fsdp_grows():
  sizes = []
  for fsdp in (1, 2, 4, 8):
    mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp), jax.devices()[:fsdp])
    state = Trainer(CFG, mesh).init_state()
    sizes.append(per_device_bytes(state["params"]) + per_device_bytes(state["opt_state"]))
  assert sizes[0] > sizes[1] > sizes[2] > sizes[3]
  assert sizes[3] < sizes[0] / 4  # mostly sharded; only small norm vectors replicate


def test_grad_accumulation_equals_larger_batch():
  accum = dataclasses.replace(CFG, optim=dataclasses.replace(CFG.optim, grad_accum=4))
  ref_losses, ref_state = _one_step(CFG, (1, 1, 1), steps=2)
  losses, state = _one_step(accum, (1, 1, 1), steps=2)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _assert_trees_close(state["params"], ref_state["params"])


def test_mesh_that_does_not_match_devices_is_one_line():
  with pytest.raises(ConfigError, match=r"has 12 devices but 8 are available") as e:
    make_mesh(MeshConfig(data=3, fsdp=4))
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="not a multiple"):
    make_mesh(MeshConfig(data=-1, fsdp=3))
  with pytest.raises(ConfigError, match="more than one -1"):
    MeshConfig(data=-1, fsdp=-1)


def test_batch_not_divisible_by_data_parallel_size_is_one_line():
  cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, global_batch=12))
  with pytest.raises(ConfigError, match="not divisible by the data-parallel size 8") as e:
    Trainer(cfg, make_mesh(MeshConfig(data=8)))
  assert "\n" not in str(e.value)
  # Fewer rows than devices, alone or as a group, set splits or not: the same line (a group
  # once met it as an IndexError from the CPU splits rule, which now checks first).
  from lmjax.multirun import GroupTrainer
  mesh = make_mesh(MeshConfig(data=8))
  for splits in (0, 2):
    tiny = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, global_batch=4,
                                                              cpu_splits=splits))
    for build in (lambda c: Trainer(c, mesh), lambda c: GroupTrainer([c, c], mesh)):
      with pytest.raises(ConfigError, match="global_batch=4 is not divisible by the "
                         "data-parallel size 8"):
        build(tiny)
