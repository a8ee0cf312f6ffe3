"""A decoder-only transformer language model in flax.linen, readable in one sitting.

Math names used throughout (and in tensor-shape suffixes such as `x_ND`):
  B  batch size                 T  sequence length (tokens per row)
  N  B * T, tokens in a batch   D  d_model, width of the residual stream
  H  query heads                K  key/value heads (H % K == 0; K < H is grouped-query)
  G  H // K, queries per kv head
  Dh head size (D // H unless set)   F  MLP hidden width   V  vocabulary size
  L  number of layers

The residual stream is kept 2-D, (N, D), between blocks: on XLA:CPU this avoids slow
fused transposes of (B, T, D) tensors and made a small GPT train step 1.5x faster.
Attention reshapes to (B, T, ...) only where it needs the time axis.

Every parameter carries logical axis names (vocab, embed, heads, kv, mlp, layers); the
main activations carry logical constraints (batch, length, act_*). lmjax/sharding.py maps
both onto mesh axes with one rules table; outside a mesh the constraints do nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmjax import attention_kernels, sharding
from lmjax.errors import check_choice, check_positive, require

POSITIONS = ("sinusoidal", "learned", "rope")
MLPS = ("gelu", "relu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
DTYPES = ("float32", "bfloat16")
# Cache budget of one attention chunk's f32 scores (see ModelConfig.attention_chunks).
# 'small' (T=256, H=6: 1.5 MiB of scores per row) on the 2-core EPYCs (32 MiB L3):
# unsplit (16 rows), 2-row chunks made attention fwd+bwd 1.4x faster (52 vs 75 ms); under
# the default train.cpu_splits the step sees 4-row pieces, and leaving them whole (no
# chunks, no recompute) made the whole train step 1.065-1.085x faster than 2-row chunks
# (benchmarks/step_ab.py; docs/performance.md, seventh pass). 8 MiB allows that.
ATTENTION_CHUNK_BYTES = 8 << 20
ATTENTION_IMPLS = ("xla", "causal_blocks", "dot_product_attention", "splash", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of one model. Validated on construction; every field has a default.

  d_head and d_ff may be left at 0, meaning "derive": d_head = d_model // n_heads;
  d_ff = 4 * d_model for gelu/relu, and 8/3 * d_model rounded up to a multiple of 8
  for swiglu (so that gated and ungated MLPs hold about the same parameters).
  """
  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 0          # 0 means n_heads (plain multi-head attention)
  d_head: int = 0              # 0 means d_model // n_heads
  d_ff: int = 0                # 0 means derive from mlp (see above)
  max_len: int = 128           # longest sequence; sizes the learned position table
  position: str = "learned"    # sinusoidal | learned | rope
  rope_theta: float = 10000.0
  mlp: str = "gelu"            # gelu (tanh approximation, as GPT-2) | relu | swiglu
  norm: str = "layernorm"      # layernorm (scale + bias) | rmsnorm (scale)
  norm_position: str = "pre"   # pre | post
  norm_eps: float = 1e-6
  qk_norm: bool = False        # normalise queries and keys per head before the dot product
  tie_embeddings: bool = True  # logits use the token embedding matrix
  dtype: str = "float32"       # compute dtype; parameters, norms, softmax and accumulation stay f32
  scan_layers: bool = False    # nn.scan over identical blocks (faster compiles for deep models)
  remat: str = "none"          # none | full | dots: activation recomputation in the backward pass
  # causal_blocks (einsum + masked softmax; for T >= 256 query blocks skip key blocks wholly
  # in their future, which lmjax.flops counts, 1.2x faster attention on CPU at T=256) |
  # xla (the same over the full T x T scores) | dot_product_attention (jax.nn's XLA path)
  # | splash (Pallas TPU kernel, T % 128 == 0; interpret mode off-TPU: tests only, slow)
  # | cudnn (cuDNN flash attention, GPU + bfloat16 only). See lmjax/attention_kernels.py.
  attention: str = "causal_blocks"
  # Sequential batch chunks for causal_blocks/xla attention, each rematerialised in the
  # backward pass so its T x T scores stay in cache (flash attention's trade: recompute
  # instead of memory traffic). 0 = auto: on CPU enough chunks that one chunk's f32 scores
  # (a device's rows and heads) fit in ATTENTION_CHUNK_BYTES (8 MiB), 1 on accelerators.
  attention_chunks: int = 0

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len"):
      check_positive(f"model.{name}", getattr(self, name))
      require(isinstance(getattr(self, name), int),
              f"model.{name}={getattr(self, name)!r} must be an integer.")
    for name in ("n_kv_heads", "d_head", "d_ff", "attention_chunks"):
      value = getattr(self, name)
      require(isinstance(value, int) and value >= 0,
              f"model.{name}={value!r} must be a non-negative integer (0 means derive it).")
    check_positive("model.norm_eps", self.norm_eps)
    check_positive("model.rope_theta", self.rope_theta)
    check_choice("model.position", self.position, POSITIONS)
    check_choice("model.mlp", self.mlp, MLPS)
    check_choice("model.norm", self.norm, NORMS)
    check_choice("model.norm_position", self.norm_position, NORM_POSITIONS)
    check_choice("model.dtype", self.dtype, DTYPES)
    check_choice("model.remat", self.remat, ("none", "full", "dots"))
    check_choice("model.attention", self.attention, ATTENTION_IMPLS)
    if not self.d_head:
      require(self.d_model % self.n_heads == 0,
              f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
              "pick n_heads dividing d_model or set model.d_head explicitly.")
    require(self.kv_heads <= self.n_heads and self.n_heads % self.kv_heads == 0,
            f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}; "
            "use a divisor of n_heads (1 = multi-query, n_heads = multi-head).")
    if self.position == "rope":
      require(self.head_dim % 2 == 0,
              f"model.position='rope' needs an even head size, got d_head={self.head_dim}; "
              "change d_model/n_heads or d_head.")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim(self) -> int:
    return self.d_head or self.d_model // self.n_heads

  @property
  def ff_dim(self) -> int:
    if self.d_ff:
      return self.d_ff
    if self.mlp == "swiglu":
      return (math.ceil(8 * self.d_model / 3) + 7) // 8 * 8
    return 4 * self.d_model

  @property
  def compute_dtype(self) -> Any:
    return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32


def _fan_in_init(fan_in: int, scale: float = 1.0) -> nn.initializers.Initializer:
  """N(0, scale^2 / fan_in): unit-variance outputs for unit-variance inputs."""
  return nn.initializers.normal(stddev=scale / math.sqrt(fan_in))


def dot_general(x: jax.Array, y: jax.Array, dimension_numbers: tuple, dtype: Any) -> jax.Array:
  """lax.dot_general of x and y in the compute dtype, accumulated and returned in f32.

  In f32 this is plain lax.dot_general. In a lower-precision dtype its backward pass also
  runs in that dtype: autodiff's own transpose would multiply the f32 cotangent with the
  bf16 operands, which XLA does as f32 x f32 dots (measured: all 98 backward dots of a
  'small' bf16 train step), so bf16 sped up only the forward third of the matmuls. Here
  the cotangent is rounded to bf16, as PyTorch's autocast does, while both products still
  accumulate in f32 and the gradients come back in the operands' own dtypes (f32 weight
  gradients are never rounded to bf16). The residuals saved for backward are the bf16
  copies, half the memory of f32 ones.
  """
  dimension_numbers = tuple(tuple(tuple(d) for d in pair) for pair in dimension_numbers)
  if jnp.dtype(dtype) == jnp.float32:
    return jax.lax.dot_general(x.astype(dtype), y.astype(dtype), dimension_numbers,
                               preferred_element_type=jnp.float32)
  return _lowp_dot_general(x, y, dimension_numbers, jnp.dtype(dtype))


def _dot_transpose_dims(dn: tuple, x_ndim: int, y_ndim: int, wrt_x: bool) -> tuple:
  """(dimension numbers, permutation) turning the output cotangent g into d(x) or d(y).

  out = dot_general(x, y) has axes [batch..., x kept..., y kept...]. For d(x), g is
  contracted with y over y's kept axes (batch axes stay batch); the product's axes then
  hold x's batch, x's kept and x's contracted axes (in y's axis order), which the
  permutation puts back in x's order. d(y) is the mirror image.
  """
  (xc, yc), (xb, yb) = dn
  x_kept = [d for d in range(x_ndim) if d not in xc and d not in xb]
  y_kept = [d for d in range(y_ndim) if d not in yc and d not in yb]
  nb, nxk = len(xb), len(x_kept)
  g_batch = tuple(range(nb))
  g_x = tuple(range(nb, nb + nxk))
  g_y = tuple(range(nb + nxk, nb + nxk + len(y_kept)))
  if wrt_x:
    dims = ((g_y, tuple(y_kept)), (g_batch, tuple(yb)))
    labels = list(xb) + x_kept + [xc[list(yc).index(d)] for d in sorted(yc)]
  else:
    dims = ((g_x, tuple(x_kept)), (g_batch, tuple(xb)))
    labels = list(yb) + y_kept + [yc[list(xc).index(d)] for d in sorted(xc)]
  return dims, tuple(labels.index(d) for d in range(len(labels)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lowp_dot_general(x, y, dn, dtype):
  return _lowp_dot_general_fwd(x, y, dn, dtype)[0]


def _lowp_dot_general_fwd(x, y, dn, dtype):
  x_lo, y_lo = x.astype(dtype), y.astype(dtype)
  out = jax.lax.dot_general(x_lo, y_lo, dn, preferred_element_type=jnp.float32)
  # Zero-size arrays carry the operands' dtypes through to the backward pass.
  return out, (x_lo, y_lo, jnp.zeros((0,), x.dtype), jnp.zeros((0,), y.dtype))


def _swap_operands(dims: tuple, perm: tuple, lhs_ndim: int, rhs_ndim: int) -> tuple:
  """(dims, perm) of dot_general(rhs, lhs) for the same product as dot_general(lhs, rhs,
  dims).transpose(perm): the result's free axes come rhs's first."""
  (lc, rc), (lb, rb) = dims
  nb = len(lb)
  n_lhs, n_rhs = lhs_ndim - len(lc) - nb, rhs_ndim - len(rc) - nb
  # Axis j of the swapped result is axis old[j] of the original one.
  old = (list(range(nb)) + list(range(nb + n_lhs, nb + n_lhs + n_rhs)) +
         list(range(nb, nb + n_lhs)))
  return ((rc, lc), (rb, lb)), tuple(old.index(p) for p in perm)


def _lowp_dot_general_bwd(dn, dtype, res, g):
  x_lo, y_lo, x_tag, y_tag = res
  g_lo = g.astype(dtype)
  grads, copies = [], copy_transposes()
  for wrt_x, other in ((True, y_lo), (False, x_lo)):
    # With copies, of the two equal products the one whose result needs no transpose: XLA
    # folds a result transpose by swapping the operands, which would undo the copy's layout.
    dims, perm = _dot_transpose_dims(dn, x_lo.ndim, y_lo.ndim, wrt_x=wrt_x)
    swapped, swapped_perm = _swap_operands(dims, perm, g_lo.ndim, other.ndim)
    identity = tuple(range(len(perm)))
    if copies and perm != identity and swapped_perm == identity:
      grads.append(_row_major_dot(other, g_lo, swapped))
    else:
      grads.append(_row_major_dot(g_lo, other, dims).transpose(perm))
  return grads[0].astype(x_tag.dtype), grads[1].astype(y_tag.dtype)


def _row_major_dot(lhs: jax.Array, rhs: jax.Array, dims: tuple) -> jax.Array:
  """lax.dot_general(lhs, rhs, dims) -> f32, with lhs laid out [batch, free, contracting]
  in memory where copy_transposes() says so.

  XLA:CPU's YNNPACK dots take a left operand only in that order. Any other (a weight
  gradient x^T g contracts x's leading token axis) falls back to an Eigen dot, for which
  XLA converts both bf16 operands to f32. On an AMX CPU the (1024 x 384)^T (1024 x 1536)
  bf16 weight gradient ran at 263 GFLOP/s that way and at 1,200 GFLOP/s from a transposed
  copy (docs/performance.md, twelfth pass). Free axes keep their order, so the result is
  the same dot_general's.
  """
  (lc, rc), (lb, rb) = dims
  free = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
  order = tuple(lb) + tuple(free) + tuple(lc)
  if order != tuple(range(lhs.ndim)) and copy_transposes():
    lhs = _transposed_copy(lhs, order)
    nb, nf = len(lb), len(free)
    dims = ((tuple(range(nb + nf, lhs.ndim)), rc), (tuple(range(nb)), rb))
  return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
  """This CPU's feature flags from /proc/cpuinfo (x86 "flags", aarch64 "Features"); empty
  where there is none."""
  try:
    with open("/proc/cpuinfo") as f:
      return frozenset(w for line in f if line.startswith(("flags", "Features"))
                       for w in line.split())
  except OSError:
    return frozenset()


def cpu_has_bf16_dots() -> bool:
  """Whether this CPU has bf16 dot-product instructions (x86 avx512_bf16 or AMX; aarch64
  bf16)."""
  return bool(cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def copy_transposes() -> bool:
  """Whether _row_major_dot makes transposed copies: on CPUs with bf16 dot instructions.
  Elsewhere YNNPACK's bf16 dots are slower than Eigen's f32 ones (AVX2: a bf16 matmul
  peak of 93-97 GFLOP/s against 126-175 in f32), so the f32 fallback is the faster path."""
  return jax.default_backend() == "cpu" and cpu_has_bf16_dots()


def _transposed_copy(a: jax.Array, perm: tuple) -> jax.Array:
  """jnp.transpose(a, perm), materialised in row-major order.

  XLA turns a plain transpose into a layout change (a column-major operand, which
  YNNPACK refuses) wherever it can. Splitting the axis that moves last into (s / c, c)
  before the transpose and merging it after leaves no such layout, so XLA writes the
  transposed copy. The (1024 x 384)^T (1024 x 1536) bf16 dot with its copy ran at 1,203
  GFLOP/s with c = 16, 1,139 with 8 and 769 with 2 (a short inner run copies slowly).
  """
  i = perm[-1]
  size = a.shape[i]
  c = next((c for c in (16, 8, 4, 2) if size % c == 0 and size > c), 0)
  if not c:
    return jnp.transpose(a, perm)
  split = a.reshape(a.shape[:i] + (size // c, c) + a.shape[i + 1:])
  split_perm = []
  for d in perm:
    split_perm += [i, i + 1] if d == i else [d if d < i else d + 1]
  return jnp.transpose(split, split_perm).reshape(tuple(a.shape[d] for d in perm))


_lowp_dot_general.defvjp(_lowp_dot_general_fwd, _lowp_dot_general_bwd)


def _dot(x: jax.Array, w: jax.Array, dims: tuple, dtype: Any) -> jax.Array:
  """Contracts x with w over `dims` (no batch axes) in the compute dtype; f32 out."""
  return dot_general(x, w, (dims, ((), ())), dtype)


class Norm(nn.Module):
  """LayerNorm or RMSNorm over the last axis, always computed in f32."""
  kind: str
  eps: float
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = x.astype(jnp.float32)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (d,), jnp.float32)
    if self.kind == "rmsnorm":
      return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                      (d,), jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


def sinusoidal_table(length: int, d: int) -> jax.Array:
  """The original transformer's table: PE[t, 2i] = sin(t / 10000^(2i/d)), PE[t, 2i+1] = cos(.)."""
  pos = jnp.arange(length, dtype=jnp.float32)[:, None]
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  angles = pos * inv_freq[None, :]                                   # (T, ceil(d/2))
  table = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)     # interleave sin, cos
  return table.reshape(length, -1)[:, :d]


def apply_rope(x_BTHd: jax.Array, positions_T: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half convention: pairs (i, i + Dh/2) rotate by t * theta^(-2i/Dh)."""
  half = x_BTHd.shape[-1] // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
  angles = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]   # (T, Dh/2)
  sin, cos = jnp.sin(angles)[None, :, None, :], jnp.cos(angles)[None, :, None, :]
  x1, x2 = x_BTHd[..., :half].astype(jnp.float32), x_BTHd[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _query_block(T: int) -> int:
  """Query rows per causal block (T itself: no blocking).

  Blocks of 128+ rows keep the matmuls large; at most 4 blocks bound the unrolled code. Below
  T = 256 the skipped work does not pay for the extra ops (measured on 'baby', T = 64).
  """
  if T < 256:
    return T
  c = max(128, T // 4)
  return c if T % c == 0 else T


def causal_attention(q_BTHd: jax.Array, k_BTKd: jax.Array, v_BTKd: jax.Array,
                     segment_ids_BT: jax.Array | None, dtype: Any,
                     block: int | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(Dh) + causal mask) v, in f32 accumulation; returns (B, T, H, Dh) f32.

  Written for XLA:CPU, where this attention was the slowest part of a small GPT's step:
    * heads-major (B, K, G*T, Dh) operands: the G query heads that share a kv head stack
      along the query axis, so both products are plain batched matmuls over (B, K), keys and
      values are never broadcast, and only the (T, Dh)-sized tensors are transposed, never
      the T x T scores (which the einsum over (b, t, k, g, d) did);
    * 1/sqrt(Dh) scales q (T*Dh elements per head) rather than the T x T scores;
    * an additive mask instead of a select: the backward pass needs no select, and
      exp(finfo.min - max) is exactly 0, so masked keys still contribute exactly nothing;
    * deferred normalisation: (exp(s - max) v) / sum exp(s - max) divides the (T, Dh)
      output instead of the T x T probabilities, which saves a T x T pass forward and a
      T x T row reduction backward (XLA:CPU's reductions are slow);
    * optional causal blocking (`block` query rows at a time, model.attention="causal_blocks"):
      query rows [a, b) only see keys [0, b), so key blocks wholly in the future are never
      computed (25% fewer score/value FLOPs at two blocks). Each row's softmax runs over the
      same non-zero terms as without blocking. lmjax.flops' "matmul" count (the basis of
      MFU) counts only the computed blocks; tests/test_flops.py checks it against XLA.
  Heads-major layout: ~1.15x faster attention forward + backward on 'small' (T=256); with
  two causal blocks ~1.6x, on par with torch's flash-attention CPU kernel. See
  docs/performance.md.
  """
  B, T, H, Dh = q_BTHd.shape
  K = k_BTKd.shape[2]
  G = H // K
  f32 = jnp.float32
  q = (q_BTHd * (1.0 / math.sqrt(Dh))).reshape(B, T, K, G, Dh)
  # In bf16 on a CPU with bf16 dots, row-major copies: a transposed (column-major) operand
  # sends both products to f32 (see _row_major_dot).
  heads_major = (_transposed_copy if jnp.dtype(dtype) != jnp.float32 and copy_transposes()
                 else jnp.transpose)
  q = heads_major(q.astype(dtype), (0, 2, 3, 1, 4))                  # (B, K, G, T, Dh)
  k = heads_major(k_BTKd.astype(dtype), (0, 2, 1, 3))                # (B, K, S, Dh)
  v = heads_major(v_BTKd.astype(dtype), (0, 2, 1, 3))
  block = block or T
  outs = []
  for start in range(0, T, block):
    stop = start + block                   # keys at >= stop are in the future of every row
    q_blk = q[:, :, :, start:stop].reshape(B, K, G * block, Dh)
    # (B, K, G*blk, Dh) x (B, K, S, Dh) -> (B, K, G*blk, S)
    s = dot_general(q_blk, k[:, :, :stop], (((3,), (3,)), ((0, 1), (0, 1))), dtype)
    s = s.reshape(B, K, G, block, stop)
    mask = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
    mask = mask[None, None, None]
    if segment_ids_BT is not None:  # packed documents must not attend across boundaries
      same = segment_ids_BT[:, start:stop, None] == segment_ids_BT[:, None, :stop]
      mask = mask & same[:, None, None]
    s = s + jnp.where(mask, 0.0, jnp.finfo(f32).min)
    # softmax(s) v = (e v) / l with e = exp(s - max s) and l = sum e: the normalisation
    # divides the (T, Dh) output, not the T x T probabilities, and the backward pass
    # needs no T x T row reduction (the max is a constant of the math, so no gradient).
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp(s - m)                                              # (B, K, G, blk, S) f32
    l = jnp.sum(e, axis=-1, keepdims=True)                          # >= 1: the diagonal
    # (B, K, G*blk, S) x (B, K, S, Dh) -> (B, K, G*blk, Dh)
    o = dot_general(e.reshape(B, K, G * block, stop), v[:, :, :stop],
                    (((3,), (2,)), ((0, 1), (0, 1))), dtype)
    outs.append(o.reshape(B, K, G, block, Dh) / l)
  o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
  return o.transpose(0, 3, 1, 2, 4).reshape(B, T, H, Dh)


def attention_chunks(cfg: ModelConfig, B: int, T: int) -> int:
  """How many sequential batch chunks `chunked_attention` uses (1: run unchunked).

  B is the global batch; under a mesh the count applies to each device's rows, so it must
  divide B / (data x fsdp shards). Auto (cfg.attention_chunks = 0) chunks only on CPU: on
  accelerators the fused kernels (splash, cudnn) are the answer to the same problem.

  Raises:
    ConfigError: an explicit count does not divide the rows each device holds.
  """
  b_local = B // _batch_shards(B)
  if cfg.attention_chunks:
    require(b_local % cfg.attention_chunks == 0,
            f"model.attention_chunks={cfg.attention_chunks} does not divide the {b_local} "
            "batch rows per device (on CPU, per train.cpu_splits piece); use a divisor of it, "
            "or 0 (auto).")
    return cfg.attention_chunks
  if jax.default_backend() != "cpu":
    return 1
  # Each device holds its own heads' scores: under tensor parallelism n_heads / tp of them.
  row_bytes = 4 * (cfg.n_heads // _shards("act_heads", cfg.n_heads)) * T * T
  rows = max((c for c in range(1, b_local + 1)
              if b_local % c == 0 and c * row_bytes <= ATTENTION_CHUNK_BYTES), default=1)
  return b_local // rows


def _batch_shards(B: int) -> int:
  """Devices the batch axis is split over under the current mesh (1 outside a mesh)."""
  return _shards("batch", B)


def _shards(logical_axis: str, size: int) -> int:
  """Devices an activation axis of this size is split over under the current mesh and
  rules (1 outside a mesh)."""
  mesh = attention_kernels.current_mesh()
  if mesh is None:
    return 1
  spec = sharding.logical_to_mesh_spec((logical_axis,), (size,), mesh,
                                       attention_kernels.active_rules())
  axes = spec[0]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(mesh.shape[a] for a in axes)


def chunked_attention(q_BTHd: jax.Array, k_BTKd: jax.Array, v_BTKd: jax.Array,
                      segment_ids_BT: jax.Array | None, dtype: Any, block: int,
                      chunks: int) -> jax.Array:
  """causal_attention over `chunks` sequential slices of each device's batch rows.

  Each slice is rematerialised (jax.checkpoint) so its backward pass recomputes its own
  scores while they are in cache instead of reading stored T x T probabilities back from
  memory. Per-row math is causal_attention's, so the result equals it up to rounding.
  Rows are grouped so that every slice takes the same share of every device's rows: the
  batch (sharded over n devices) is viewed as (n, chunks, rows), and lax.map runs over the
  unsharded middle axis.
  """
  B = q_BTHd.shape[0]
  n = _batch_shards(B)
  rows = B // (n * chunks)

  def split(x):   # (B, ...) -> (chunks, n * rows, ...)
    x = x.reshape(n, chunks, rows, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(chunks, n * rows, *x.shape[3:])

  def body(args):
    q, k, v, *seg = args
    return causal_attention(q, k, v, seg[0] if seg else None, dtype, block)

  args = (q_BTHd, k_BTKd, v_BTKd) + (() if segment_ids_BT is None else (segment_ids_BT,))
  o = jax.lax.map(jax.checkpoint(body), tuple(split(x) for x in args))  # (chunks, n*rows, T, H, Dh)
  o = o.reshape(chunks, n, rows, *o.shape[2:]).swapaxes(0, 1)
  return o.reshape(B, *o.shape[3:])


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_ND, positions_T, segment_ids_BT=None):
    cfg = self.cfg
    D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    T = positions_T.shape[0]
    B = x_ND.shape[0] // T
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)  # residual branches sum over 2L blocks
    w_q = self.param("w_q", nn.with_logical_partitioning(_fan_in_init(D), ("embed", "heads", "kv")),
                     (D, H, Dh), jnp.float32)
    w_k = self.param("w_k", nn.with_logical_partitioning(_fan_in_init(D), ("embed", "heads", "kv")),
                     (D, K, Dh), jnp.float32)
    w_v = self.param("w_v", nn.with_logical_partitioning(_fan_in_init(D), ("embed", "heads", "kv")),
                     (D, K, Dh), jnp.float32)
    w_o = self.param("w_o", nn.with_logical_partitioning(_fan_in_init(H * Dh, out_scale),
                                                         ("heads", "kv", "embed")),
                     (H, Dh, D), jnp.float32)
    dt = cfg.compute_dtype
    # Weights enter the products as 2-D matrices (free reshapes): XLA:CPU has no kernel
    # for a bf16 x bf16 -> f32 dot whose right operand keeps two free axes, which the
    # backward pass of a (D, H, Dh) weight would need.
    q = _dot(x_ND, w_q.reshape(D, H * Dh), ((1,), (0,)), dt).reshape(B, T, H, Dh)
    k = _dot(x_ND, w_k.reshape(D, K * Dh), ((1,), (0,)), dt).reshape(B, T, K, Dh)
    v = _dot(x_ND, w_v.reshape(D, K * Dh), ((1,), (0,)), dt).reshape(B, T, K, Dh)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "act_kv"))
    if cfg.qk_norm:
      q = Norm(cfg.norm, cfg.norm_eps, "kv", name="q_norm")(q)
      k = Norm(cfg.norm, cfg.norm_eps, "kv", name="k_norm")(k)
    if cfg.position == "rope":
      q, k = apply_rope(q, positions_T, cfg.rope_theta), apply_rope(k, positions_T, cfg.rope_theta)

    if cfg.attention == "dot_product_attention" and segment_ids_BT is None:
      # jax.nn's reference attention (its XLA path; attention="cudnn" picks cuDNN); it
      # handles grouped-query heads itself.
      o = jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), v.astype(dt), is_causal=True,
                                       scale=1.0 / math.sqrt(Dh))
    elif cfg.attention == "splash":
      o = attention_kernels.splash_attention(q, k, v, segment_ids_BT, dt)
    elif cfg.attention == "cudnn":
      o = attention_kernels.cudnn_attention(q, k, v, segment_ids_BT, dt)
    else:
      block = _query_block(T) if cfg.attention == "causal_blocks" else T
      chunks = attention_chunks(cfg, B, T)
      if chunks > 1:
        o = chunked_attention(q, k, v, segment_ids_BT, dt, block, chunks)
      else:
        o = causal_attention(q, k, v, segment_ids_BT, dt, block)
    o_NHd = o.reshape(B * T, H * Dh)                                      # heads flattened
    return _dot(o_NHd, w_o.reshape(H * Dh, D), ((1,), (0,)), dt)          # (N, D)


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_ND):
    cfg = self.cfg
    D, F, dt = cfg.d_model, cfg.ff_dim, cfg.compute_dtype
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    w_up = self.param("w_up", nn.with_logical_partitioning(_fan_in_init(D), ("embed", "mlp")),
                      (D, F), jnp.float32)
    w_down = self.param("w_down", nn.with_logical_partitioning(_fan_in_init(F, out_scale),
                                                               ("mlp", "embed")), (F, D), jnp.float32)
    h_NF = _dot(x_ND, w_up, ((1,), (0,)), dt)
    if cfg.mlp == "swiglu":
      w_gate = self.param("w_gate", nn.with_logical_partitioning(_fan_in_init(D), ("embed", "mlp")),
                          (D, F), jnp.float32)
      h_NF = jax.nn.silu(_dot(x_ND, w_gate, ((1,), (0,)), dt)) * h_NF
    elif cfg.mlp == "gelu":
      h_NF = jax.nn.gelu(h_NF, approximate=True)
    else:
      h_NF = jax.nn.relu(h_NF)
    h_NF = nn.with_logical_constraint(h_NF, ("batch", "act_mlp"))
    return _dot(h_NF, w_down, ((1,), (0,)), dt)


class Block(nn.Module):
  """One transformer layer. Pre-norm: x + f(norm(x)). Post-norm: norm(x + f(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_ND, positions_T, segment_ids_BT=None):
    cfg = self.cfg
    attn, mlp = Attention(cfg, name="attn"), Mlp(cfg, name="mlp")
    norm1 = Norm(cfg.norm, cfg.norm_eps, name="attn_norm")
    norm2 = Norm(cfg.norm, cfg.norm_eps, name="mlp_norm")
    if cfg.norm_position == "pre":
      x_ND = x_ND + attn(norm1(x_ND), positions_T, segment_ids_BT)
      x_ND = x_ND + mlp(norm2(x_ND))
    else:
      x_ND = norm1(x_ND + attn(x_ND, positions_T, segment_ids_BT))
      x_ND = norm2(x_ND + mlp(x_ND))
    return nn.with_logical_constraint(x_ND, ("batch", "act_embed"))


class ScanBlock(nn.Module):
  """Block with the (carry, out) signature nn.scan needs."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_ND, positions_T, segment_ids_BT):
    return Block(self.cfg, name="block")(x_ND, positions_T, segment_ids_BT), None


def _remat(module_cls, cfg: ModelConfig):
  if cfg.remat == "none":
    return module_cls
  # "dots" keeps matmul outputs and recomputes the cheap elementwise work in the backward pass.
  policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots"
            else None)
  return nn.remat(module_cls, policy=policy, prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
  """tokens (B, T) int -> logits (B, T, V) f32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BT, segment_ids_BT=None):
    cfg = self.cfg
    B, T = tokens_BT.shape
    D, V = cfg.d_model, cfg.vocab_size
    require(T <= cfg.max_len, f"sequence length {T} exceeds model.max_len={cfg.max_len}; "
            "raise model.max_len or shorten the data's sequences.")
    # Embeddings ~ N(0, 1/D): unit-norm rows, so tied logits start at unit scale.
    embedding = self.param("embedding", nn.with_logical_partitioning(_fan_in_init(D),
                                                                     ("vocab", "embed")),
                           (V, D), jnp.float32)
    x_ND = jnp.take(embedding, tokens_BT.reshape(-1), axis=0)
    positions_T = jnp.arange(T)
    if cfg.position == "learned":
      pos = self.param("pos_embedding", nn.with_logical_partitioning(_fan_in_init(D),
                                                                     ("length", "embed")),
                       (cfg.max_len, D), jnp.float32)
      x_ND = (x_ND.reshape(B, T, D) + pos[None, :T]).reshape(B * T, D)
    elif cfg.position == "sinusoidal":
      # Scaled by 1/sqrt(D) to match the token embedding's per-coordinate scale: the same
      # balance as the original transformer's sqrt(D) * embedding, up to a global factor.
      table = sinusoidal_table(T, D) / math.sqrt(D)
      x_ND = (x_ND.reshape(B, T, D) + table[None]).reshape(B * T, D)
    x_ND = nn.with_logical_constraint(x_ND, ("batch", "act_embed"))

    if cfg.scan_layers:
      stack = nn.scan(_remat(ScanBlock, cfg), variable_axes={"params": 0},
                      split_rngs={"params": True}, in_axes=(nn.broadcast, nn.broadcast),
                      length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x_ND, _ = stack(cfg, name="layers")(x_ND, positions_T, segment_ids_BT)
    else:
      block_cls = _remat(Block, cfg)
      for i in range(cfg.n_layers):
        x_ND = block_cls(cfg, name=f"layer_{i}")(x_ND, positions_T, segment_ids_BT)

    if cfg.norm_position == "pre":  # post-norm blocks already end normalised
      x_ND = Norm(cfg.norm, cfg.norm_eps, name="final_norm")(x_ND)
    if cfg.tie_embeddings:
      logits_NV = _dot(x_ND, embedding, ((1,), (1,)), cfg.compute_dtype)
    else:
      w_head = self.param("w_head", nn.with_logical_partitioning(_fan_in_init(D),
                                                                 ("embed", "vocab")),
                          (D, V), jnp.float32)
      logits_NV = _dot(x_ND, w_head, ((1,), (0,)), cfg.compute_dtype)
    logits_NV = nn.with_logical_constraint(logits_NV, ("batch", "act_vocab"))
    return logits_NV.reshape(B, T, V)


def init_params(cfg: ModelConfig, rng: jax.Array, batch: int = 1, seq_len: int | None = None):
  """Boxed (logically partitioned) parameters. Use flax.linen.meta.unbox for raw arrays.

  Both layouts take their parameters from the scanned init (nn.scan traces one block, and
  the unrolled layout gets its layers sliced out as layer_0 .. layer_{L-1}). So
  scan_layers changes how a step runs and compiles, not what a run trains: one seed gives
  one model and one loss curve in either layout. Tracing one block also keeps a deep
  model's init cheap to compile: an unrolled 24-layer init took 1.9 s instead of 12 s."""
  tokens = jnp.zeros((batch, seq_len or cfg.max_len), jnp.int32)
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True, remat="none")
  params = Transformer(scanned_cfg).init(rng, tokens)["params"]
  if cfg.scan_layers:
    return params
  params = dict(params)
  stacked = params.pop("layers")["block"]

  def layer(i):  # drops the leading "layers" axis nn.scan(metadata_params=...) adds
    def take(box):
      if not isinstance(box, nn.Partitioned):
        return box[i]
      return box.replace(value=box.value[i], names=tuple(box.names[1:]))
    return jax.tree.map(take, stacked, is_leaf=lambda x: isinstance(x, nn.Partitioned))

  params.update({f"layer_{i}": layer(i) for i in range(cfg.n_layers)})
  return params
