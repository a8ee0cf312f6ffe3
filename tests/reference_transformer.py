"""An independent float64 numpy forward pass of the transformer described in lmjax/model.py.

It shares no code with lmjax: it reads the parameter tree by name and recomputes everything
from the textbook definitions, one head and one position at a time where that is clearer.
"""
import math

import numpy as np


def _norm(x, p, kind, eps):
  if kind == "rmsnorm":
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * p["scale"]
  mu = x.mean(axis=-1, keepdims=True)
  var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _sinusoid(T, d):
  pe = np.zeros((T, d))
  for t in range(T):
    for j in range(d):
      i = j // 2
      angle = t / 10000 ** (2 * i / d)
      pe[t, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
  return pe


def _rope(x, theta):  # x: (T, Dh) for one head
  T, dh = x.shape
  half = dh // 2
  out = np.empty_like(x)
  for t in range(T):
    for i in range(half):
      ang = t * theta ** (-i / half)
      a, b = x[t, i], x[t, i + half]
      out[t, i] = a * math.cos(ang) - b * math.sin(ang)
      out[t, i + half] = b * math.cos(ang) + a * math.sin(ang)
  return out


def _attention(x, p, cfg, n_heads, n_kv, dh):  # x: (T, D) one sequence
  T = x.shape[0]
  out = np.zeros((T, x.shape[1]))
  group = n_heads // n_kv
  for h in range(n_heads):
    kv = h // group
    q = x @ p["w_q"][:, h, :]
    k = x @ p["w_k"][:, kv, :]
    v = x @ p["w_v"][:, kv, :]
    if cfg["qk_norm"]:
      q = _norm(q, p["q_norm"], cfg["norm"], cfg["norm_eps"])
      k = _norm(k, p["k_norm"], cfg["norm"], cfg["norm_eps"])
    if cfg["position"] == "rope":
      q, k = _rope(q, cfg["rope_theta"]), _rope(k, cfg["rope_theta"])
    scores = q @ k.T / math.sqrt(dh)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    out += (w @ v) @ p["w_o"][h]
  return out


def _mlp(x, p, kind):
  h = x @ p["w_up"]
  if kind == "swiglu":
    g = x @ p["w_gate"]
    h = g / (1.0 + np.exp(-g)) * h
  elif kind == "gelu":
    h = _gelu_tanh(h)
  else:
    h = np.maximum(h, 0.0)
  return h @ p["w_down"]


def forward(params, tokens, cfg):
  """params: unboxed, unscanned tree; tokens (B, T) ints; cfg: dict of ModelConfig fields plus
  derived n_kv_heads / d_head. Returns float64 logits (B, T, V)."""
  params = _to_numpy(params)
  B, T = tokens.shape
  D = params["embedding"].shape[1]
  out = []
  for b in range(B):
    x = params["embedding"][tokens[b]]
    if cfg["position"] == "learned":
      x = x + params["pos_embedding"][:T]
    elif cfg["position"] == "sinusoidal":
      x = x + _sinusoid(T, D) / math.sqrt(D)
    for i in range(cfg["n_layers"]):
      p = params[f"layer_{i}"]
      attn = lambda y: _attention(y, p["attn"], cfg, cfg["n_heads"], cfg["n_kv_heads"],
                                  cfg["d_head"])
      mlp = lambda y: _mlp(y, p["mlp"], cfg["mlp"])
      n1 = lambda y: _norm(y, p["attn_norm"], cfg["norm"], cfg["norm_eps"])
      n2 = lambda y: _norm(y, p["mlp_norm"], cfg["norm"], cfg["norm_eps"])
      if cfg["norm_position"] == "pre":
        x = x + attn(n1(x))
        x = x + mlp(n2(x))
      else:
        x = n1(x + attn(x))
        x = n2(x + mlp(x))
    if cfg["norm_position"] == "pre":
      x = _norm(x, params["final_norm"], cfg["norm"], cfg["norm_eps"])
    head = params["embedding"].T if cfg["tie_embeddings"] else params["w_head"]
    out.append(x @ head)
  return np.stack(out)


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, dtype=np.float64)
