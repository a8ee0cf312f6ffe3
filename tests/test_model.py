"""The transformer against an independent numpy reference, plus its invariants."""
import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.errors import ConfigError
from lmjax.model import ModelConfig, Transformer, init_params
from tests import reference_transformer

BASE = dict(vocab_size=61, d_model=48, n_layers=2, n_heads=4, max_len=12)

# Together these cover every option: positions, MLPs, norms, placements, QK-norm,
# grouped-query and multi-query heads, explicit head size, tied and untied heads.
REFERENCE_CONFIGS = {
    "learned_gelu_layernorm_pre": dict(),
    "sinusoidal_relu_rmsnorm_post": dict(position="sinusoidal", mlp="relu", norm="rmsnorm",
                                         norm_position="post"),
    "rope_swiglu_gqa_qknorm_untied": dict(position="rope", mlp="swiglu", norm="rmsnorm",
                                          n_kv_heads=2, qk_norm=True, tie_embeddings=False),
    "rope_mqa_layernorm_post_qknorm": dict(position="rope", n_kv_heads=1, norm_position="post",
                                           qk_norm=True, n_layers=3),
    "learned_dhead_untied_swiglu": dict(d_head=16, d_ff=40, mlp="swiglu", tie_embeddings=False),
}


def _cfg(**overrides):
  return ModelConfig(**{**BASE, **overrides})


def _params(cfg, seed=0):
  return nn.meta.unbox(init_params(cfg, jax.random.key(seed), 1, cfg.max_len))


def _logits(cfg, params, tokens, **kw):
  return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), **kw))


def _tokens(cfg, batch=2, seed=1):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.max_len))


def _ref_cfg(cfg):
  d = dataclasses.asdict(cfg)
  d.update(n_kv_heads=cfg.kv_heads, d_head=cfg.head_dim)
  return d


@pytest.mark.parametrize("name", sorted(REFERENCE_CONFIGS))
def test_logits_match_numpy_reference(name):
  cfg = _cfg(**REFERENCE_CONFIGS[name])
  params, tokens = _params(cfg), _tokens(cfg)
  ours = _logits(cfg, params, tokens)
  ref = reference_transformer.forward(params, tokens, _ref_cfg(cfg))
  assert ours.shape == (2, cfg.max_len, cfg.vocab_size)
  scale = np.abs(ref).max()
  assert scale > 0.1, "degenerate logits would make the comparison vacuous"
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * scale)


def test_fused_attention_matches_einsum_attention():
  cfg = _cfg(position="rope", n_kv_heads=2)
  fused = dataclasses.replace(cfg, attention="dot_product_attention")
  params, tokens = _params(cfg), _tokens(cfg)
  np.testing.assert_allclose(_logits(fused, params, tokens), _logits(cfg, params, tokens),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope"])
def test_causality(position):
  cfg = _cfg(position=position)
  params, tokens = _params(cfg), _tokens(cfg, batch=1)
  base = _logits(cfg, params, tokens)
  rng = np.random.default_rng(7)
  for t in range(cfg.max_len - 1):
    changed = tokens.copy()
    changed[:, t + 1:] = rng.integers(0, cfg.vocab_size, changed[:, t + 1:].shape)
    after = _logits(cfg, params, changed)
    np.testing.assert_allclose(after[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-6)
    if (changed[:, t + 1] != tokens[:, t + 1]).any():
      assert np.abs(after[:, t + 1] - base[:, t + 1]).max() > 1e-4  # later positions do see it


def test_segment_ids_block_attention_across_documents():
  cfg = _cfg(position="rope")
  params, tokens = _params(cfg), _tokens(cfg, batch=1)
  seg = np.zeros_like(tokens)
  seg[:, 5:] = 1  # two packed documents
  base = _logits(cfg, params, tokens, segment_ids_BT=jnp.asarray(seg))
  changed = tokens.copy()
  changed[:, :5] = (changed[:, :5] + 1) % cfg.vocab_size  # rewrite document 0 only
  after = _logits(cfg, params, changed, segment_ids_BT=jnp.asarray(seg))
  np.testing.assert_allclose(after[:, 5:], base[:, 5:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("overrides", [dict(), dict(position="rope", mlp="swiglu", qk_norm=True,
                                                     norm_position="post", remat="full")])
def test_scanned_equals_unrolled(overrides):
  cfg = _cfg(n_layers=3, **overrides)
  scanned_cfg = dataclasses.replace(cfg, scan_layers=True)
  params, tokens = _params(cfg), _tokens(cfg)
  layers = [params.pop(f"layer_{i}") for i in range(cfg.n_layers)]
  stacked = dict(params, layers={"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)})
  params.update({f"layer_{i}": p for i, p in enumerate(layers)})
  np.testing.assert_allclose(_logits(scanned_cfg, stacked, tokens), _logits(cfg, params, tokens),
                             rtol=1e-5, atol=1e-5)
  # The scanned init draws exactly those parameters from the same key (scan_layers is a
  # layout, not another model). Each layout is boxed as flax's own init of it boxes it:
  # scanned with a leading "layers" logical axis.
  boxed = init_params(scanned_cfg, jax.random.key(0), 1, cfg.max_len)
  for ours, want in zip(jax.tree.leaves(nn.meta.unbox(boxed)), jax.tree.leaves(stacked),
                        strict=True):
    np.testing.assert_array_equal(ours, want)
  tokens_init = jnp.zeros((1, cfg.max_len), jnp.int32)
  for c, ours in ((scanned_cfg, boxed), (cfg, init_params(cfg, jax.random.key(0), 1, cfg.max_len))):
    own = jax.eval_shape(lambda c=c: Transformer(c).init(jax.random.key(0), tokens_init)["params"])
    assert jax.tree.structure(jax.eval_shape(lambda o=ours: o)) == jax.tree.structure(own)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(own)) == jax.tree.map(jnp.shape,
                                                                       nn.meta.unbox(ours))
  assert boxed["layers"]["block"]["attn"]["w_q"].names == ("layers", "embed", "heads", "kv")


def _grad_and_temp_bytes(cfg, params, tokens):
  """d(mean logits^2)/d params, and the temporaries XLA assigns that gradient program."""
  def loss(p):
    return jnp.mean(Transformer(cfg).apply({"params": p}, jnp.asarray(tokens)) ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  return compiled(params), compiled.memory_analysis().temp_size_in_bytes


def test_remat_of_scanned_layers_recomputes_instead_of_storing():
  # remat trades recomputation for memory. With scanned layers the backward loop must keep
  # only each block's input (L x N x D floats) instead of every activation, and still
  # produce the same gradients. (Unrolled layers save nothing on XLA:CPU, which the Trainer
  # warns about; see docs/performance.md.)
  cfg = _cfg(n_layers=4, d_model=64, max_len=64, scan_layers=True)
  params, tokens = _params(cfg), _tokens(cfg, batch=8)
  grads, temp = _grad_and_temp_bytes(cfg, params, tokens)
  for remat, most in (("full", 0.5), ("dots", 0.8)):
    remat_grads, remat_temp = _grad_and_temp_bytes(dataclasses.replace(cfg, remat=remat),
                                                   params, tokens)
    assert remat_temp < most * temp, (remat, remat_temp, temp)
    for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_compute_close_to_f32():
  # Stated tolerance: bf16 matmul inputs (8-bit mantissa) with f32 accumulation keep the
  # logits within 3 % relative RMS error of the f32 model for this small model.
  cfg = _cfg(position="rope", mlp="swiglu")
  params, tokens = _params(cfg), _tokens(cfg)
  f32 = _logits(cfg, params, tokens)
  bf16 = _logits(dataclasses.replace(cfg, dtype="bfloat16"), params, tokens)
  assert bf16.dtype == np.float32  # logits come back in f32 for the loss
  rel = np.sqrt(np.mean((bf16 - f32) ** 2) / np.mean(f32 ** 2))
  assert 0 < rel < 0.03, rel


DOT_CASES = [  # (x shape, y shape, dimension numbers): every pattern the model uses, and more
    ((6, 5), (5, 3, 4), (((1,), (0,)), ((), ()))),                 # q/k/v projections
    ((6, 3, 4), (3, 4, 5), (((1, 2), (0, 1)), ((), ()))),           # output projection
    ((6, 5), (7, 5), (((1,), (1,)), ((), ()))),                     # tied logits
    ((2, 3, 4, 5), (2, 3, 6, 5), (((3,), (3,)), ((0, 1), (0, 1)))),  # attention scores
    ((2, 3, 4, 6), (2, 3, 6, 5), (((3,), (2,)), ((0, 1), (0, 1)))),  # attention values
    ((4, 2, 3, 5), (3, 7, 4, 2), (((2, 0, 1), (0, 2, 3)), ((), ()))),  # unsorted contraction
    ((3, 4, 2, 5), (5, 2, 4, 3), (((1,), (2,)), ((3, 0), (0, 3)))),    # batch axes not leading
]


@pytest.mark.parametrize("copies", [False, True], ids=["plain", "transposed_copies"])
@pytest.mark.parametrize("xs,ys,dn", DOT_CASES)
def test_low_precision_dot_backward_transposes_like_autodiff(xs, ys, dn, copies, monkeypatch):
  # The hand-written backward of model.dot_general, run in f32, must equal autodiff's, with
  # and without the row-major copies it makes on CPUs with bf16 dot instructions.
  from lmjax import model as model_lib
  monkeypatch.setattr(model_lib, "copy_transposes", lambda: copies)
  kx, ky, kg = jax.random.split(jax.random.key(0), 3)
  x, y = jax.random.normal(kx, xs), jax.random.normal(ky, ys)
  out_shape = jax.eval_shape(lambda a, b: jax.lax.dot_general(a, b, dn), x, y).shape
  g = jax.random.normal(kg, out_shape)
  ref = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dn), x, y)[1](g)
  mine = jax.vjp(lambda a, b: model_lib._lowp_dot_general(a, b, dn, jnp.dtype(jnp.float32)),
                 x, y)[1](g)
  for r, m in zip(ref, mine):
    assert m.shape == r.shape and m.dtype == r.dtype
    np.testing.assert_allclose(m, r, rtol=1e-5, atol=1e-5)


def test_bf16_backward_runs_bf16_dots_with_f32_gradients():
  # bf16 compute: every dot of the train step's backward pass takes bf16 operands (autodiff
  # alone would upcast them to f32), and the parameter gradients stay f32 and close to f32's.
  cfg = _cfg(position="rope", mlp="swiglu", n_kv_heads=2)
  params, tokens = _params(cfg), _tokens(cfg)

  def loss(cfg_, p):
    return jnp.mean(Transformer(cfg_).apply({"params": p}, tokens) ** 2)

  bf16 = dataclasses.replace(cfg, dtype="bfloat16")
  hlo = jax.jit(jax.grad(lambda p: loss(bf16, p))).lower(params).as_text()
  dots = [l for l in hlo.splitlines() if "stablehlo.dot_general" in l]
  assert dots and all("bf16>, tensor<" in l for l in dots), [l for l in dots
                                                           if "bf16>, tensor<" not in l][:2]
  g32 = jax.grad(lambda p: loss(cfg, p))(params)
  g16 = jax.grad(lambda p: loss(bf16, p))(params)
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
    assert b.dtype == jnp.float32
    rel = np.sqrt(np.sum((np.asarray(a) - np.asarray(b)) ** 2) / np.sum(np.asarray(a) ** 2))
    assert rel < 0.05, rel


@pytest.mark.parametrize("shape,perm", [((6, 32), (1, 0)), ((2, 3, 32, 5), (0, 1, 3, 2)),
                                        ((4, 6, 10), (2, 0, 1)), ((3, 5), (1, 0))])
def test_transposed_copy_is_the_transpose(shape, perm):
  from lmjax import model as model_lib
  a = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  np.testing.assert_array_equal(jax.jit(model_lib._transposed_copy, static_argnums=1)(a, perm),
                                jnp.transpose(a, perm))


def _compiled_dot_operand_types(hlo: str) -> list[tuple[str, str, int]]:
  """(lhs type, rhs type, result rank) of every dot in an optimised HLO module's text."""
  types, out, params = {}, [], {}
  for line in hlo.splitlines():
    if not line.startswith(" ") and line.rstrip().endswith("{"):
      params = dict(re.findall(r"([\w.\-]+): (\w+)\[", line))
      continue
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[", line)
    if m:
      types[m.group(1)] = m.group(2)
    d = re.search(r" = \w+\[([\d,]*)\]\S* dot\(%(\S+), %(\S+)\)", line)
    if d:
      out.append(tuple(types.get(o, params.get(o, "?")) for o in d.groups()[1:])
                 + (len(d.group(1).split(",")),))
  return out


def test_bf16_dots_stay_bf16_in_compiled_code(monkeypatch):
  # XLA:CPU gives YNNPACK only dots whose left operand is laid out [batch, free,
  # contracting] in memory; for the others it converts bf16 operands to f32 (a weight
  # gradient x^T g contracts x's leading axis; attention's heads-major q, k, v are
  # transposes). With the row-major copies every compiled dot of a bf16 gradient keeps
  # bf16 operands; without them the weight gradients and attention products are f32.
  from lmjax import model as model_lib
  cfg = _cfg(d_model=64, d_ff=128, max_len=32, dtype="bfloat16")
  params, tokens = _params(cfg), _tokens(cfg, batch=4)

  def grad_dot_types(copies):
    monkeypatch.setattr(model_lib, "copy_transposes", lambda: copies)
    fn = jax.jit(jax.grad(lambda p: jnp.mean(
        Transformer(cfg).apply({"params": p}, tokens) ** 2)))
    return _compiled_dot_operand_types(fn.lower(params).compile().as_text())

  with_copies = grad_dot_types(True)
  # Per layer: q, k, v, o and 2 MLP products x (forward, input grad, weight grad), 2
  # attention products x 3; then the tied logits x 3.
  assert sorted(r for _, _, r in with_copies) == [2] * 39 + [4] * 12, with_copies
  assert all(t[:2] == ("bf16", "bf16") for t in with_copies), with_copies
  without = grad_dot_types(False)
  f32_ranks = {r for a, b, r in without if (a, b) == ("f32", "f32")}
  assert f32_ranks == {2, 4}, without   # what the copies are for, on this XLA


def _loss_and_grads(cfg, params, tokens, seg):
  def loss(p):
    return jnp.mean(Transformer(cfg).apply({"params": p}, tokens, seg) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("packed", [False, True])
def test_chunked_attention_equals_unchunked(packed):
  # attention_chunks runs attention over sequential slices of the batch, each recomputed in
  # the backward pass: a schedule, not new math, so loss and gradients must not move.
  cfg = _cfg(position="rope", n_kv_heads=2, attention_chunks=1)
  params, tokens = _params(cfg), jnp.asarray(_tokens(cfg, batch=4))
  seg = jnp.asarray(np.cumsum(np.random.default_rng(3).random(tokens.shape) < 0.2, axis=1)
                    ) if packed else None
  ref_loss, ref_g = _loss_and_grads(cfg, params, tokens, seg)
  chunked = dataclasses.replace(cfg, attention_chunks=4)
  jaxpr = str(jax.make_jaxpr(lambda p: Transformer(chunked).apply({"params": p}, tokens, seg))(
      params))
  assert jaxpr.count("scan[") == cfg.n_layers and "remat" in jaxpr  # it really chunked
  got_loss, got_g = _loss_and_grads(chunked, params, tokens, seg)
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_auto_attention_chunks_follow_the_cache_budget():
  from lmjax import model as model_lib
  small = ModelConfig(vocab_size=65, d_model=384, n_layers=6, n_heads=6, max_len=256)
  row = 4 * 6 * 256 * 256   # one row's f32 scores: 1.5 MiB; five fit the 8 MiB budget
  assert 5 * row <= model_lib.ATTENTION_CHUNK_BYTES < 6 * row
  assert model_lib.attention_chunks(small, 16, 256) == 4       # 4 rows per chunk
  assert model_lib.attention_chunks(small, 4, 256) == 1        # a cpu_splits piece: whole
  assert model_lib.attention_chunks(small, 6, 256) == 2        # 3 rows: the most that fit
  assert model_lib.attention_chunks(small, 7, 256) == 7        # rows must divide the batch
  assert model_lib.attention_chunks(_cfg(), 12, 12) == 1       # tiny scores: no chunking
  assert model_lib.attention_chunks(dataclasses.replace(small, attention_chunks=2), 16, 256) == 2
  with pytest.raises(ConfigError, match="attention_chunks=3 does not divide the 16") as e:
    model_lib.attention_chunks(dataclasses.replace(small, attention_chunks=3), 16, 256)
  assert "\n" not in str(e.value)


def test_auto_attention_chunks_count_each_devices_heads_and_rows():
  # Under a mesh each device holds B / (data shards) rows and H / (tensor shards) heads of
  # scores, and the cache budget applies to those: 'small' with 16 rows takes 4 chunks on
  # one device; over tensor=2 a row's scores halve (3 heads: 0.75 MiB), 10 rows fit, so
  # 2 chunks of 8; over data=2 each device has 8 rows, 2 chunks of 4.
  from jax.sharding import AxisType
  from lmjax import model as model_lib
  from lmjax import sharding
  small = ModelConfig(vocab_size=65, d_model=384, n_layers=6, n_heads=6, max_len=256)

  def chunks(data, tensor):
    mesh = jax.make_mesh((data, 1, tensor), sharding.MESH_AXES,
                         axis_types=(AxisType.Auto,) * 3, devices=jax.devices()[:data * tensor])
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.activation_rules(mesh)):
      return model_lib.attention_chunks(small, 16, 256)

  assert chunks(1, 1) == 4
  assert chunks(1, 2) == 2
  assert chunks(2, 1) == 2
  assert chunks(2, 2) == 1    # 8 rows of 3 heads: 6 MiB, whole


def test_sharded_chunked_attention_equals_unsharded():
  # Under a (data=2, tensor=2) mesh each device holds 2 of the 4 rows; 2 chunks take one row
  # of each device per step, so chunking adds no collectives and changes no number.
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from lmjax import sharding
  cfg = _cfg(position="rope", attention_chunks=1)
  params, tokens = _params(cfg), jnp.asarray(_tokens(cfg, batch=4))
  ref_loss, ref_g = _loss_and_grads(cfg, params, tokens, None)
  mesh = jax.make_mesh((2, 1, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=jax.devices()[:4])
  boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), 1, cfg.max_len))
  sharded_params = jax.device_put(params, sharding.tree_shardings(boxed, mesh))
  sharded_tokens = jax.device_put(tokens, sharding.batch_sharding(mesh))
  rules = sharding.activation_rules(mesh)

  def step(c):
    def loss(p, t):
      with nn.logical_axis_rules(rules):
        return jnp.mean(Transformer(c).apply({"params": p}, t) ** 2)
    return jax.jit(jax.value_and_grad(loss), out_shardings=NamedSharding(mesh, P()))

  chunked = dataclasses.replace(cfg, attention_chunks=2)
  with jax.set_mesh(mesh):
    hlo = {c.attention_chunks: step(c).lower(sharded_params, sharded_tokens).compile().as_text()
           for c in (cfg, chunked)}
    got_loss, got_g = step(chunked)(sharded_params, sharded_tokens)
  collectives = ("all-gather", "all-to-all", "collective-permute")
  assert [hlo[2].count(c) for c in collectives] == [hlo[1].count(c) for c in collectives]
  np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-5)  # sharded sums round differently
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_every_parameter_has_logical_axes():
  cfg = _cfg(position="learned", tie_embeddings=False, qk_norm=True, mlp="swiglu")
  boxed = init_params(cfg, jax.random.key(0), 1, cfg.max_len)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  known = {"vocab", "embed", "heads", "kv", "mlp", "length", "layers"}
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned)
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= known, leaf.names


def test_residual_output_projections_scaled_with_depth():
  cfg = _cfg(n_layers=8, d_model=128, vocab_size=512)
  p = _params(cfg)["layer_0"]
  depth = 1 / np.sqrt(2 * cfg.n_layers)
  np.testing.assert_allclose(np.std(p["attn"]["w_o"]), depth / np.sqrt(cfg.d_model), rtol=0.05)
  np.testing.assert_allclose(np.std(p["mlp"]["w_down"]), depth / np.sqrt(cfg.ff_dim), rtol=0.05)
  np.testing.assert_allclose(np.std(p["mlp"]["w_up"]), 1 / np.sqrt(cfg.d_model), rtol=0.05)


BAD_CONFIGS = [
    (dict(d_model=50, n_heads=4), "not divisible by model.n_heads"),
    (dict(n_kv_heads=3), "does not divide model.n_heads"),
    (dict(position="rope", d_model=36, n_heads=4), "even head size"),
    (dict(position="alibi"), "model.position"),
    (dict(mlp="geglu"), "model.mlp"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(norm_position="sandwich"), "model.norm_position"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(d_model=0), "model.d_model"),
    (dict(n_layers=-2), "model.n_layers"),
    (dict(vocab_size=0), "model.vocab_size"),
    (dict(d_ff=-1), "model.d_ff"),
    (dict(attention_chunks=-1), "model.attention_chunks"),
    (dict(n_heads=2.5), "model.n_heads"),
]


@pytest.mark.parametrize("overrides,fragment", BAD_CONFIGS)
def test_bad_config_fails_with_one_clear_line(overrides, fragment):
  with pytest.raises(ConfigError) as err:
    _cfg(**overrides)
  msg = str(err.value)
  assert fragment in msg and "\n" not in msg, msg


def test_sequence_longer_than_max_len_is_rejected():
  cfg = _cfg()
  with pytest.raises(ConfigError, match="max_len"):
    init_params(cfg, jax.random.key(0), 1, cfg.max_len + 1)
