"""Parameter and FLOP accounting against the initialised tree, XLA, and hand derivations."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import flops
from lmjax.errors import ConfigError
from lmjax.model import ModelConfig, Transformer, init_params

COUNT_CONFIGS = [
    dict(),
    dict(position="sinusoidal", norm="rmsnorm", norm_position="post"),
    dict(position="rope", mlp="swiglu", n_kv_heads=2, qk_norm=True, tie_embeddings=False),
    dict(position="rope", n_kv_heads=1, qk_norm=True, norm="layernorm"),
    dict(d_head=24, d_ff=100, mlp="relu", tie_embeddings=False),
    dict(scan_layers=True, n_layers=3, mlp="swiglu", norm="rmsnorm"),
    dict(vocab_size=1000, d_model=96, n_heads=3, n_layers=5, max_len=64),
]


def _leaf_sizes(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_leaf_sizes(v, prefix + k + "/"))
    else:
      out[prefix + k] = int(np.prod(v.shape))
  return out


@pytest.mark.parametrize("overrides", COUNT_CONFIGS)
def test_param_counts_equal_initialised_tree(overrides):
  cfg = ModelConfig(**{**dict(vocab_size=77, d_model=64, n_heads=4, n_layers=2, max_len=16),
                       **overrides})
  shapes = jax.eval_shape(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0), 1, 8)))
  sizes = _leaf_sizes(shapes)
  counts = flops.param_counts(cfg)
  assert counts.total == sum(sizes.values())
  assert counts.embedding == sizes["embedding"] + sizes.get("pos_embedding", 0)
  assert counts.head == sizes.get("w_head", 0)
  assert counts.non_embedding == counts.total - counts.embedding - counts.head


XLA_CONFIGS = [
    dict(d_model=256, n_heads=4, n_layers=2, max_len=128),
    dict(d_model=256, n_heads=8, n_kv_heads=2, mlp="swiglu", position="rope", norm="rmsnorm",
         max_len=128, tie_embeddings=False),
    dict(d_model=192, n_heads=4, n_layers=3, max_len=256, vocab_size=512, norm_position="post",
         position="sinusoidal", mlp="relu"),
    # The default causal_blocks computes (n + 1) / 2n of the T x T products (n = 2 above at
    # T = 256, 4 below at T = 512); "xla" computes all of them.
    dict(d_model=128, n_heads=2, n_layers=2, max_len=256, attention="xla"),
    dict(d_model=128, n_heads=4, n_kv_heads=2, n_layers=1, max_len=512),
]


@pytest.mark.parametrize("overrides", XLA_CONFIGS)
def test_forward_flops_agree_with_xla_cost_analysis(overrides):
  # One attention chunk: XLA's cost analysis counts a loop body once, not once per trip.
  cfg = ModelConfig(**{"attention_chunks": 1, **overrides})
  batch, T = 2, cfg.max_len
  params = init_params(cfg, jax.random.key(0), 1, T)
  fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))
  cost = fwd.lower(params, jnp.zeros((batch, T), jnp.int32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = batch * sum(flops.forward_flops_breakdown(cfg, T, convention="matmul").values())
  # XLA also counts elementwise work (norms, GELU, softmax, masking, residual adds) that the
  # matmul count leaves out; it is a few percent at these widths and shrinks with width.
  ratio = cost["flops"] / analytic
  assert 1.0 <= ratio < 1.05, ratio


def _chinchilla_by_hand(L, D, H, dh, F, V, T):
  """Hoffmann et al. 2022, Appendix F, per sequence forward, written out independently."""
  embeddings = 2 * T * V * D
  attention = (2 * 3 * T * D * (dh * H) + 2 * T * T * (dh * H) + 3 * H * T * T +
               2 * T * T * (dh * H) + 2 * T * (dh * H) * D)
  dense = 2 * T * (D * F + D * F)
  logits = 2 * T * D * V
  return embeddings + L * (attention + dense) + logits


def test_chinchilla_convention_matches_appendix_f_and_70b():
  # Chinchilla 70B: 80 layers, d_model 8192, 64 heads of 128, d_ff 32768, vocab 32000, T 2048.
  cfg = ModelConfig(n_layers=80, d_model=8192, n_heads=64, d_ff=32768, vocab_size=32000,
                    max_len=2048, position="rope", tie_embeddings=False)
  fwd = _chinchilla_by_hand(80, 8192, 64, 128, 32768, 32000, 2048)
  assert flops.flops_per_token(cfg, 2048, "chinchilla") == pytest.approx(3 * fwd / 2048, rel=1e-12)
  n = flops.param_counts(cfg)
  assert n.non_embedding == 80 * (4 * 8192 ** 2 + 2 * 8192 * 32768 + 2 * 2 * 8192) + 2 * 8192
  six_n = flops.flops_per_token(cfg, 2048, "6N")
  assert six_n == 6 * (n.non_embedding + 32000 * 8192)
  # At 70B the attention and embedding terms are small: chinchilla / 6N is a few percent over 1.
  assert 1.0 < flops.flops_per_token(cfg, 2048, "chinchilla") / six_n < 1.06


def test_kaplan_and_causal_conventions():
  cfg = ModelConfig(n_layers=4, d_model=128, n_heads=4, vocab_size=100, max_len=64)
  n = flops.param_counts(cfg).non_embedding
  assert flops.flops_per_token(cfg, 64, "kaplan") == 6 * n + 6 * 4 * 64 * 128
  assert flops.flops_per_token(cfg, 64, "kaplan", causal=True) == 6 * n + 3 * 4 * 64 * 128
  full = flops.forward_flops_breakdown(cfg, 64)
  half = flops.forward_flops_breakdown(cfg, 64, causal=True)
  for term in ("scores", "softmax", "weighted_sum"):
    assert half[term] == full[term] / 2
  for term in ("qkv", "out_proj", "mlp", "logits", "embeddings"):
    assert half[term] == full[term]


def test_budget_round_trip_and_mfu():
  cfg = ModelConfig(n_layers=2, d_model=64, n_heads=2, vocab_size=256, max_len=32)
  for conv in flops.CONVENTIONS:
    d = flops.tokens_for_budget(cfg, 32, 1e12, conv)
    assert flops.run_flops(cfg, 32, d, conv) == pytest.approx(1e12)
  assert flops.mfu(50e12, flops.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")) == \
      pytest.approx(50 / 989)
  assert flops.device_peak_key("TPU v5 lite") == "tpu_v5e"
  assert flops.device_peak_key("TPU v4") == "tpu_v4"
  assert flops.device_peak_key("NVIDIA H200") == "h200"
  with pytest.raises(ConfigError, match="no peak FLOP/s known"):
    flops.peak_flops("Quantum Abacus 9000")
  with pytest.raises(ConfigError, match="flops convention"):
    flops.flops_per_token(cfg, 32, "7N")


def test_measured_cpu_peak_is_plausible():
  peak = flops.measure_matmul_peak("float32", n=256, repeats=3)
  assert 1e9 < peak < 1e14  # a CPU does between a GFLOP/s and a hundred TFLOP/s
