"""Accelerator attention kernels: TPU splash attention and cuDNN flash attention.

Both compute the same causal attention as lmjax.model.causal_attention,

  o = softmax(q k^T / sqrt(Dh) + causal mask [+ same-document mask]) v,

with the model's math names for shapes:
  B  batch size             T  sequence length (queries and keys alike)
  H  query heads            K  key/value heads (H % K == 0; K < H is grouped-query)
  G  H // K                 Dh head size

Inputs are q (B, T, H, Dh), k and v (B, T, K, Dh) and optional segment ids (B, T) (packed
documents attend only within themselves); the output is (B, T, H, Dh) in f32, exactly what
the model's own attention returns, so the two are interchangeable.

  * `splash_attention` (model.attention="splash"): the Pallas TPU splash-attention kernel.
    Off-TPU it runs the same kernel in Pallas interpret mode, which is for testing only and
    very slow. Under a mesh it runs per shard inside `jax.shard_map`.
  * `cudnn_attention` (model.attention="cudnn"): jax.nn.dot_product_attention with
    implementation="cudnn"; GPU only, bf16/fp16 only. Untested here (no GPU was available).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lmjax import sharding
from lmjax.errors import require

SPLASH_BLOCKS = (512, 256, 128)  # largest first; the kernel needs multiples of 128 lanes


def splash_block(T: int) -> int:
  """The largest supported splash block dividing T (ConfigError if none does)."""
  require(T % 128 == 0,
          f"model.attention='splash' needs a sequence length that is a multiple of 128, "
          f"got T={T}; pad/choose train.seq_len as a multiple of 128 or use attention='xla'.")
  return next(b for b in SPLASH_BLOCKS if T % b == 0)


def _splash_modules():
  """Pallas's TPU modules, imported on first use: every model import would pay ~0.1 s."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel, splash_attention_mask)
  return splash_attention_kernel, splash_attention_mask


def _splash_kernel(n_heads: int, T: int, block: int, interpret: bool):
  """One example's kernel: q (n_heads, T, Dh), k and v (n_kv, T, Dh) -> (n_heads, T, Dh).

  Built afresh at each trace (its tables become traced values; caching the kernel would
  leak tracers). The numpy block-sparsity analysis behind it is cached by the mask.
  """
  splash_kernel, splash_mask = _splash_modules()
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T))] * n_heads)
  blocks = splash_kernel.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block,
      block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
      block_q_dq=block, block_kv_dq=block)
  # make_splash_mha handles grouped-query heads itself (n_heads % n_kv == 0); the mask is
  # built for the heads this call sees, so under shard_map it is the per-shard count.
  return splash_kernel.make_splash_mha(mask, block_sizes=blocks, head_shards=1,
                                       q_seq_shards=1, interpret=interpret)


def _splash_local(q_BHTd: jax.Array, k_BKTd: jax.Array, v_BKTd: jax.Array,
                  *segment_ids_BT: jax.Array, block: int, interpret: bool) -> jax.Array:
  """Splash over whatever (shard of) batch and heads it is given, vmapped over B.

  segment_ids_BT is empty or one (B, T) array: a variadic tail so shard_map sees no None.
  """
  kernel = _splash_kernel(q_BHTd.shape[1], q_BHTd.shape[2], block, interpret)
  segs = [_splash_modules()[0].SegmentIds(q=s, kv=s) for s in segment_ids_BT]
  return jax.vmap(kernel)(q_BHTd, k_BKTd, v_BKTd, *segs)


def splash_interpret() -> bool:
  """Whether splash runs in Pallas interpret mode: everywhere but on a TPU. (A test that
  lowers the TPU program from a CPU turns it off.)"""
  return jax.default_backend() != "tpu"


def current_mesh() -> Any | None:
  """The mesh set with jax.set_mesh (abstract inside jit), or None outside any mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def active_rules() -> tuple:
  """The logical axis rules the model's constraints use now (lmjax's table if none set)."""
  return tuple(nn.get_logical_axis_rules()) or sharding.LOGICAL_RULES


def splash_attention(q_BTHd: jax.Array, k_BTKd: jax.Array, v_BTKd: jax.Array,
                     segment_ids_BT: jax.Array | None, dtype: Any) -> jax.Array:
  """Causal (and same-document) attention with the TPU splash kernel; (B, T, H, Dh) f32.

  Args:
    q_BTHd: queries (B, T, H, Dh), unscaled.
    k_BTKd: keys (B, T, K, Dh).
    v_BTKd: values (B, T, K, Dh).
    segment_ids_BT: optional document ids (B, T) int; tokens attend within their id only.
    dtype: compute dtype of the kernel's matmul inputs (its softmax is f32 regardless).

  Raises:
    ConfigError: T is not a multiple of 128.
  """
  B, T, H, Dh = q_BTHd.shape
  K = k_BTKd.shape[2]
  block = splash_block(T)
  # The kernel computes q k^T with no scaling of its own: scale q here, in f32, as
  # causal_attention does, so both round the same way before the cast.
  q = (q_BTHd * (1.0 / math.sqrt(Dh))).astype(dtype).transpose(0, 2, 1, 3)   # (B, H, T, Dh)
  k = k_BTKd.astype(dtype).transpose(0, 2, 1, 3)                              # (B, K, T, Dh)
  v = v_BTKd.astype(dtype).transpose(0, 2, 1, 3)
  segs = () if segment_ids_BT is None else (segment_ids_BT.astype(jnp.int32),)
  local = functools.partial(_splash_local, block=block, interpret=splash_interpret())

  mesh = current_mesh()
  if mesh is None:
    o = local(q, k, v, *segs)
  else:
    # Same placement as the model's activations (sharding.logical_to_mesh_spec: batch over
    # data x fsdp, heads over tensor, replicated where a size does not divide). T is never
    # split: the causal mask tables assume each shard holds whole sequences.
    spec = sharding.logical_to_mesh_spec(("batch", None, "act_heads", None), (B, T, H, Dh),
                                         mesh, active_rules())
    batch_axes, head_axes = spec[0], spec[2]
    head_axes_t = (head_axes,) if isinstance(head_axes, str) else tuple(head_axes or ())
    n_head_shards = math.prod(mesh.shape[a] for a in head_axes_t)
    if K % n_head_shards:
      # Each shard must hold the kv heads of its own query heads: repeat kv heads up to
      # lcm(K, shards), which divides H, keeping query head h on kv head h // (H / K).
      r = math.lcm(K, n_head_shards) // K
      k, v = jnp.repeat(k, r, axis=1), jnp.repeat(v, r, axis=1)
    qkv_spec = P(batch_axes, head_axes, None, None)
    seg_specs = (P(batch_axes, None),) * len(segs)
    o = jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec,) * 3 + seg_specs,
                      out_specs=qkv_spec,
                      # Pallas calls carry no varying-axis types; the specs above say it all.
                      check_vma=False)(q, k, v, *segs)
  return o.transpose(0, 2, 1, 3).astype(jnp.float32)


def cudnn_attention(q_BTHd: jax.Array, k_BTKd: jax.Array, v_BTKd: jax.Array,
                    segment_ids_BT: jax.Array | None, dtype: Any) -> jax.Array:
  """Causal (and same-document) cuDNN flash attention; (B, T, H, Dh) f32. GPU only.

  Untested here (no GPU): only the error paths below run in this repository's tests.

  Raises:
    ConfigError: not on a GPU, or dtype is float32 (cuDNN takes bf16/fp16 only).
  """
  backend = jax.default_backend()
  require(backend == "gpu",
          f"model.attention='cudnn' needs a GPU but the backend is {backend!r}; "
          "use model.attention='xla' or 'dot_product_attention' here.")
  require(jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)),
          f"model.attention='cudnn' supports only bf16/fp16 inputs, got {jnp.dtype(dtype).name}; "
          "use model.dtype=bfloat16.")
  mask = None
  if segment_ids_BT is not None:  # a (B, 1, T, T) mask: cuDNN adds it as a bias
    mask = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
  o = jax.nn.dot_product_attention(
      q_BTHd.astype(dtype), k_BTKd.astype(dtype), v_BTKd.astype(dtype), mask=mask,
      scale=1.0 / math.sqrt(q_BTHd.shape[-1]), is_causal=True, implementation="cudnn")
  return o.astype(jnp.float32)

