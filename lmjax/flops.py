"""Parameter and FLOP accounting from a ModelConfig alone (nothing is initialised).

A scaling law is only as good as its N and C, so every convention is named and written out
once here; docs/flops.md has the table. Shapes follow lmjax/model.py: T is the training
sequence length, which the attention terms depend on.

Conventions for training FLOPs per token (forward + backward = 3 x forward):
  "6N"         6 * (non-embedding params + V*D head), the head counted even when tied, as
               Porian et al. 2024 recommend (Kaplan's N omits it, which biases small models).
  "kaplan"     6 * non-embedding params + 6 * L * T * d_attn   (Kaplan et al. 2020, Table 1).
  "chinchilla" Hoffmann et al. 2022, Appendix F, term by term (embeddings as a one-hot matmul,
               QKV, QK^T, softmax at 3 FLOPs per score, attention-weighted sum, output
               projection, MLP, logits); backward = 2 x forward. Generalised to grouped-query
               heads and gated MLPs.
  "matmul"     3 x the matrix-multiply FLOPs this implementation really executes (no
               embedding matmul; the full T x T score matrix, or with
               model.attention="causal_blocks" only the blocks it computes): the count
               behind the logged MFU, so skipped work never inflates it.
`causal=True` halves the T x T terms (QK^T, softmax, weighted sum), counting only the
unmasked half as useful work.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time

import numpy as np

from lmjax.errors import ConfigError, check_choice, check_positive
from lmjax.model import ModelConfig, _query_block

CONVENTIONS = ("6N", "kaplan", "chinchilla", "matmul")


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  total: int           # every trainable scalar (a tied matrix once)
  embedding: int       # token embedding + learned position table
  non_embedding: int   # Kaplan's N: total - embedding - untied head
  head: int            # the untied unembedding matrix (0 when tied)


def _norm_params(cfg: ModelConfig, width: int) -> int:
  return 2 * width if cfg.norm == "layernorm" else width


def _mlp_mats(cfg: ModelConfig) -> int:
  return 3 if cfg.mlp == "swiglu" else 2


def param_counts(cfg: ModelConfig) -> ParamCounts:
  D, V, H, K, Dh, F = (cfg.d_model, cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_dim,
                       cfg.ff_dim)
  attn = D * H * Dh + 2 * D * K * Dh + H * Dh * D
  if cfg.qk_norm:
    attn += 2 * _norm_params(cfg, Dh)
  layer = attn + _mlp_mats(cfg) * D * F + 2 * _norm_params(cfg, D)
  final_norm = _norm_params(cfg, D) if cfg.norm_position == "pre" else 0
  embedding = V * D + (cfg.max_len * D if cfg.position == "learned" else 0)
  head = 0 if cfg.tie_embeddings else D * V
  non_embedding = cfg.n_layers * layer + final_norm
  return ParamCounts(total=embedding + non_embedding + head, embedding=embedding,
                     non_embedding=non_embedding, head=head)


def forward_flops_breakdown(cfg: ModelConfig, seq_len: int, *, causal: bool = False,
                            convention: str = "chinchilla") -> dict[str, float]:
  """Forward FLOPs of one sequence of `seq_len` tokens, term by term (Hoffmann et al. App. F).

  convention="matmul" drops the embedding lookup (a gather, no FLOPs) and the softmax (not a
  matmul), and ignores `causal`: it counts the score blocks the implementation computes
  (`executed_score_fraction`).
  """
  check_positive("seq_len", seq_len)
  T, D, V, H, K, Dh, F, L = (seq_len, cfg.d_model, cfg.vocab_size, cfg.n_heads, cfg.kv_heads,
                             cfg.head_dim, cfg.ff_dim, cfg.n_layers)
  if convention == "matmul":
    tt = executed_score_fraction(cfg, T)
  else:
    tt = 0.5 if causal else 1.0
  terms = {
      "embeddings": 2.0 * T * V * D,
      "qkv": L * 2.0 * T * D * (H + 2 * K) * Dh,
      "scores": L * tt * 2.0 * T * T * H * Dh,
      "softmax": L * tt * 3.0 * H * T * T,
      "weighted_sum": L * tt * 2.0 * T * T * H * Dh,
      "out_proj": L * 2.0 * T * H * Dh * D,
      "mlp": L * 2.0 * T * _mlp_mats(cfg) * D * F,
      "logits": 2.0 * T * D * V,
  }
  if convention == "matmul":
    terms["embeddings"] = 0.0
    terms["softmax"] = 0.0
  return terms


def executed_score_fraction(cfg: ModelConfig, seq_len: int) -> float:
  """Fraction of the T x T score (and weighted-sum) products the attention computes.

  1 for the implementations that compute every score. model.attention="causal_blocks"
  splits the queries into n blocks and skips key blocks wholly in their future: block i
  computes i + 1 of n key blocks, (n + 1) / (2n) of the square in all.
  """
  if cfg.attention != "causal_blocks":
    return 1.0
  n = seq_len // _query_block(seq_len)
  return (n + 1) / (2 * n)


@functools.lru_cache(maxsize=4096)
def flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "6N",
                    causal: bool = False) -> float:
  """Training (forward + backward) FLOPs per token under a named convention."""
  check_choice("flops convention", convention, CONVENTIONS)
  check_positive("seq_len", seq_len)
  counts = param_counts(cfg)
  if convention == "6N":
    return 6.0 * (counts.non_embedding + cfg.vocab_size * cfg.d_model)
  if convention == "kaplan":
    context = 6.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return 6.0 * counts.non_embedding + (0.5 if causal else 1.0) * context
  terms = forward_flops_breakdown(cfg, seq_len, causal=causal, convention=convention)
  return 3.0 * sum(terms.values()) / seq_len


def run_flops(cfg: ModelConfig, seq_len: int, tokens: float, convention: str = "6N",
              causal: bool = False) -> float:
  """Training FLOPs of a run that sees `tokens` tokens."""
  return flops_per_token(cfg, seq_len, convention, causal) * tokens


def tokens_for_budget(cfg: ModelConfig, seq_len: int, flops: float, convention: str = "6N",
                      causal: bool = False) -> float:
  """Tokens a FLOP budget buys (the inverse of run_flops)."""
  check_positive("flop budget", flops)
  return flops / flops_per_token(cfg, seq_len, convention, causal)


# Dense peak FLOP/s per chip, from the vendors' data sheets (no structured sparsity).
# "float32" is the peak an f32 program can reach at JAX's default matmul precision, which
# computes f32 dots in bf16 passes on TPU and in TF32 on NVIDIA Ampere and newer: so TPU f32
# lists the bf16 figure and NVIDIA f32 the TF32 figure (otherwise MFU could exceed 1).
# "fp32_ieee" is the true-f32 rate, for runs with jax_default_matmul_precision="highest".
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "tpu_v4": {"bfloat16": 275e12, "float32": 275e12},
    "tpu_v5e": {"bfloat16": 197e12, "float32": 197e12},
    "tpu_v5p": {"bfloat16": 459e12, "float32": 459e12},
    "tpu_v6e": {"bfloat16": 918e12, "float32": 918e12},
    "a100": {"bfloat16": 312e12, "float32": 156e12, "fp32_ieee": 19.5e12},
    "h100": {"bfloat16": 989e12, "float32": 494.5e12, "fp32_ieee": 67e12},   # SXM
    "h200": {"bfloat16": 989e12, "float32": 494.5e12, "fp32_ieee": 67e12},
}

_KIND_PATTERNS = (  # jax Device.device_kind strings -> PEAK_FLOPS keys
    (r"TPU v4", "tpu_v4"), (r"TPU v5 ?lite|TPU v5e", "tpu_v5e"), (r"TPU v5p|TPU v5$", "tpu_v5p"),
    (r"TPU v6", "tpu_v6e"), (r"A100", "a100"), (r"H100", "h100"), (r"H200", "h200"),
)


def device_peak_key(device_kind: str) -> str | None:
  for pattern, key in _KIND_PATTERNS:
    if re.search(pattern, device_kind):
      return key
  return None


@functools.lru_cache(maxsize=8)
def measure_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 10) -> float:
  """Achieved FLOP/s of a large square matmul on the default backend: the CPU's practical
  peak, measured in the same process as the figure it normalises."""
  import jax
  import jax.numpy as jnp
  check_choice("dtype", dtype, ("float32", "bfloat16"))
  dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
  rng = np.random.default_rng(0)  # host operands: no RNG program to compile (0.3 s)
  a = jnp.asarray(rng.standard_normal((n, n), np.float32), dt)
  b = jnp.asarray(rng.standard_normal((n, n), np.float32), dt)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def peak_flops(device_kind: str, dtype: str = "float32") -> float:
  """Peak FLOP/s of one device: the table for accelerators, a measurement on CPU."""
  key = device_peak_key(device_kind)
  if key is None:
    if "cpu" in device_kind.lower():
      return measure_matmul_peak(dtype)
    raise ConfigError(f"no peak FLOP/s known for device kind {device_kind!r}; "
                      "pass peak_flops explicitly or add it to lmjax.flops.PEAK_FLOPS.")
  return PEAK_FLOPS[key][dtype]


def mfu(achieved_flops_per_s: float, peak_flops_per_s: float) -> float:
  """Model FLOPs utilisation: achieved / peak (both per device, or both summed)."""
  check_positive("peak FLOP/s", peak_flops_per_s)
  return achieved_flops_per_s / peak_flops_per_s


# Shapes for the conventions table in docs/flops.md: a GPT-style ladder (d_ff = 4D, head size
# D/H, vocab 32000, sequence 2048, untied head as in Chinchilla) up to Chinchilla 70B itself.
TABLE_MODELS = (
    ("1M", dict(n_layers=2, d_model=128, n_heads=2)),
    ("10M", dict(n_layers=4, d_model=384, n_heads=6)),
    ("100M", dict(n_layers=12, d_model=768, n_heads=12)),
    ("400M", dict(n_layers=24, d_model=1152, n_heads=18)),
    ("1B", dict(n_layers=24, d_model=2048, n_heads=16)),
    ("7B", dict(n_layers=32, d_model=4096, n_heads=32)),
    ("Chinchilla 70B", dict(n_layers=80, d_model=8192, n_heads=64, d_ff=32768)),
)


def conventions_table(seq_len: int = 2048, vocab: int = 32000) -> str:
  """Markdown: each convention's FLOPs per token and its ratio to 6N, across model sizes."""
  rows = ["| model | non-emb N | 6N FLOPs/token | kaplan/6N | chinchilla/6N | "
          "chinchilla causal/6N | matmul/6N |", "|---|---|---|---|---|---|---|"]
  for name, shape in TABLE_MODELS:
    cfg = ModelConfig(vocab_size=vocab, max_len=seq_len, tie_embeddings=False,
                      position="rope", **shape)
    six_n = flops_per_token(cfg, seq_len, "6N")
    ratio = lambda conv, causal=False: flops_per_token(cfg, seq_len, conv, causal) / six_n
    rows.append(f"| {name} | {param_counts(cfg).non_embedding:.3g} | {six_n:.3g} | "
                f"{ratio('kaplan'):.3f} | {ratio('chinchilla'):.3f} | "
                f"{ratio('chinchilla', True):.3f} | {ratio('matmul'):.3f} |")
  return "\n".join(rows)


if __name__ == "__main__":
  print(conventions_table())
