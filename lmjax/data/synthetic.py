"""A synthetic language whose exact entropy rate is known in closed form.

The point of this data is that the irreducible loss E of a scaling-law fit can
be checked against the truth. See docs/data.md for the derivation; in short:

* The vocabulary is cut into `num_classes` contiguous classes whose sizes grow
  geometrically (a few one-token "function word" classes, a few large "content
  word" classes), so token frequencies fall off roughly like a Zipf law.
* The class of each token follows a Markov chain: with probability `structure`
  the class advances along a fixed random cycle, otherwise it is redrawn from
  the class-size distribution (which is what a uniform token would have).
* Inside its class, a token is, with probability `structure`, a fixed random
  function of the token `lag(class)` positions back (lags 1, 4, 16 by default),
  and otherwise uniform over the class. Each entry of those lookup tables is a
  "quantum": a fact worth learning, used with a heavy-tailed frequency.

Every random choice is a function of the visible tokens and of fresh noise, so
the generator's own conditional p(x_t | x_<t) is available (`log_prob`) and its
entropy depends only on the previous token's class, whose marginal is the
chain's stationary distribution at every position. That makes the entropy rate
an exact finite sum (`entropy_rate`), including the first `max(lags)` positions,
which see no source token.

Sampling is counter-based: sequence i of a split is a pure function of
(sampling seed, split, i), so any process can generate any rows in any order.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Sequence

import numpy as np

from lmjax.errors import ConfigError

# structure knob for each named preset (see docs/data.md for their floors).
PRESETS: dict[str, float] = {
    "noise": 0.0,        # iid uniform tokens: floor = log V, nothing to learn
    "hard": 0.5,
    "default": 0.8,
    "easy": 0.95,
    "determined": 1.0,   # stationary entropy rate 0; only the first tokens are random
}
DEFAULT_VOCAB_SIZE = 256
DEFAULT_NUM_CLASSES = 16
DEFAULT_LAGS = (1, 4, 16)

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_TWO_POW_32 = float(1 << 32)


def _splitmix64_int(x: int) -> int:
  z = (x + _GOLDEN) & _MASK64
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
  return z ^ (z >> 31)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  # uint64 arithmetic wraps modulo 2**64, which is exactly what splitmix64 needs.
  z = x + np.uint64(_GOLDEN)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def stream_key(seed: int, split: str) -> int:
  """64-bit key of a (sampling seed, split) stream; stable across processes."""
  # crc32 rather than hash(): Python salts str hashes per process.
  return _splitmix64_int(_splitmix64_int(int(seed) & _MASK64) ^ zlib.crc32(split.encode()))


def _xlogx(p: np.ndarray | float) -> np.ndarray:
  p = np.asarray(p, dtype=np.float64)
  return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)


def _safe_log(p: np.ndarray) -> np.ndarray:
  """log p with log 0 = -inf and no warning (zero-probability events at structure 1)."""
  return np.log(np.where(p > 0, p, 1.0)) + np.where(p > 0, 0.0, -np.inf)


def geometric_class_sizes(vocab_size: int, num_classes: int) -> np.ndarray:
  """Integer class sizes summing to vocab_size, growing geometrically from 1."""
  if num_classes == 1:
    return np.array([vocab_size], dtype=np.int64)
  if vocab_size == num_classes:
    return np.ones(num_classes, dtype=np.int64)
  lo, hi = 1.0, float(vocab_size)
  for _ in range(200):  # ratio r with sum_{c<C} r**c == V
    r = 0.5 * (lo + hi)
    total = sum(r**c for c in range(num_classes))
    lo, hi = (r, hi) if total < vocab_size else (lo, r)
  sizes = np.maximum(1, np.round([r**c for c in range(num_classes)])).astype(np.int64)
  sizes[-1] += vocab_size - sizes.sum()  # rounding slack goes to the largest class
  while sizes[-1] < 1:  # only when V is barely above C: take from the next largest
    j = int(np.argmax(sizes[:-1]))
    sizes[j] -= 1
    sizes[-1] += 1
  return sizes


@dataclasses.dataclass(frozen=True)
class SyntheticLanguage:
  """The language: fixed by (vocab_size, num_classes, lags, structure, language_seed).

  The sampling seed and split are arguments of `sample`, not part of the
  language, so train and eval draw different sequences of the same language.
  """
  vocab_size: int = DEFAULT_VOCAB_SIZE
  structure: float = PRESETS["default"]
  num_classes: int = DEFAULT_NUM_CLASSES
  lags: tuple[int, ...] = DEFAULT_LAGS
  language_seed: int = 0

  def __post_init__(self):
    v, c = self.vocab_size, self.num_classes
    if not isinstance(v, int) or isinstance(v, bool) or not 2 <= v <= 1 << 20:
      raise ConfigError(f"synthetic vocab_size={v!r} is invalid; use an integer in [2, 1048576].")
    if not isinstance(c, int) or isinstance(c, bool) or not 1 <= c <= v:
      raise ConfigError(f"synthetic num_classes={c!r} is invalid; use an integer in "
                        f"[1, vocab_size={v}].")
    s = self.structure
    if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= s <= 1.0:
      raise ConfigError(f"synthetic structure={s!r} is invalid; use a number in [0, 1] or a preset "
                        f"({', '.join(PRESETS)}).")
    lags = tuple(self.lags)
    if not lags or any(not isinstance(l, int) or isinstance(l, bool) or l < 1 for l in lags):
      raise ConfigError(f"synthetic lags={self.lags!r} are invalid; use a non-empty tuple of "
                        "positive integers such as (1, 4, 16).")
    object.__setattr__(self, "lags", lags)
    object.__setattr__(self, "structure", float(s))
    self._build()

  @classmethod
  def from_preset(cls, preset: str, **kwargs) -> "SyntheticLanguage":
    if preset not in PRESETS:
      raise ConfigError(f"synthetic preset {preset!r} is unknown; choose one of "
                        f"{', '.join(map(repr, PRESETS))} or set structure=<0..1>.")
    return cls(structure=PRESETS[preset], **kwargs)

  # -- construction ----------------------------------------------------------

  def _build(self) -> None:
    v, c, s = self.vocab_size, self.num_classes, self.structure
    rng = np.random.default_rng([int(self.language_seed) & _MASK64, 0x5EED])
    sizes = geometric_class_sizes(v, c)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    class_of = np.repeat(np.arange(c), sizes)
    cycle = rng.permutation(c)  # successor of cycle[i] is cycle[i+1]
    cycle_pos = np.empty(c, dtype=np.int64)
    cycle_pos[cycle] = np.arange(c)
    successor = cycle[(cycle_pos + 1) % c]
    # Balanced random lag per class so every range gets a share of the classes.
    lag_of = np.array([self.lags[i % len(self.lags)] for i in rng.permutation(c)], dtype=np.int64)
    # table[k, v]: the token class k emits when the source token is v.
    table = starts[:, None] + (rng.random((c, v)) * sizes[:, None]).astype(np.int64)

    u = sizes / v  # class distribution of a uniform token
    trans = (1.0 - s) * np.broadcast_to(u, (c, c)).copy()
    trans[np.arange(c), successor] += s
    if s < 1.0:
      # pi M = pi with M = s P + (1 - s) 1 u  =>  pi = (1 - s) u (I - s P)^-1.
      perm = np.zeros((c, c))
      perm[np.arange(c), successor] = 1.0
      pi = np.linalg.solve((np.eye(c) - s * perm).T, (1.0 - s) * u)
    else:
      pi = np.full(c, 1.0 / c)  # a single cycle's unique stationary law
    pi = pi / pi.sum()

    # Entropy of the within-class law  rho*delta_target + (1-rho)*Uniform(class).
    p_hit = s + (1.0 - s) / sizes
    p_miss = (1.0 - s) / sizes
    h_within = -_xlogx(p_hit) - (sizes - 1) * _xlogx(p_miss)
    h_rows = -_xlogx(trans).sum(axis=1)

    for name, value in dict(
        sizes=sizes, starts=starts, class_of=class_of, cycle=cycle, cycle_pos=cycle_pos,
        successor=successor, lag_of=lag_of, table=table, table_flat=table.reshape(-1),
        trans=trans, log_trans=_safe_log(trans),
        pi=pi, pi_cdf=np.cumsum(pi), h_within=h_within, h_rows=h_rows,
        log_p_hit=np.log(p_hit), log_p_miss=_safe_log(p_miss),
    ).items():
      if isinstance(value, np.ndarray):
        value.setflags(write=False)
      object.__setattr__(self, "_" + name, value)

  # -- exact entropy ---------------------------------------------------------

  def position_entropies(self, seq_len: int) -> np.ndarray:
    """H(x_t | x_<t) for t = 1..seq_len (the targets of a length-seq_len input)."""
    t = np.arange(1, seq_len + 1)[:, None]
    no_source = t < self._lag_of[None, :]
    within = np.where(no_source, np.log(self._sizes)[None, :], self._h_within[None, :])
    class_part = float(self._pi @ self._h_rows)  # class of x_{t-1} is ~pi at every t
    return class_part + within @ self._pi

  def entropy_rate(self, seq_len: int | None = None) -> float:
    """Exact entropy in nats per token.

    seq_len=None: the stationary rate lim H(x_t | x_<t). seq_len=T: the exact
    expected mean loss of the Bayes-optimal model on targets 1..T given inputs
    0..T-1 of a fresh sequence, i.e. what a model evaluated on every position of
    length-T inputs can at best reach (it is >= the stationary rate because the
    first max(lags)-1 targets have no source token).
    """
    if seq_len is None:
      return float(self._pi @ self._h_rows + self._pi @ self._h_within)
    if seq_len < 1:
      raise ConfigError(f"seq_len={seq_len!r} is invalid; use a positive integer.")
    return float(self.position_entropies(seq_len).mean())

  def token_marginals(self, length: int) -> np.ndarray:
    """Exact P(x_t = v) for t = 0..length-1, float64 [length, V].

    Copies make the marginal non-uniform inside a class, and it depends on t
    near the start. It follows from c_t being independent of x_{t-d} given
    c_{t-d} (the class chain never looks at tokens):
      P(x_t=b) = pi_c [1/n_c]                          if t < d_c,
               = pi_c (1-rho)/n_c + rho sum_{v: g_c(v)=b} P(x_{t-d}=v) (M^d)(class(v), c)  else.
    """
    v, c, rho = self.vocab_size, self.num_classes, self.structure
    uniform_part = np.repeat(self._pi / self._sizes, self._sizes)
    # a[k, u] = (M^{d_k})(class(u), k): the chance class k follows source u's class d_k steps on.
    powers = {d: np.linalg.matrix_power(self._trans, d) for d in set(self.lags)}
    a = np.stack([powers[self._lag_of[k]][self._class_of, k] for k in range(c)])
    out = np.empty((length, v))
    for t in range(length):
      active = t >= self._lag_of
      q = np.where(active[self._class_of], (1.0 - rho) * uniform_part, uniform_part)
      if active.any() and rho > 0:
        src = out[np.where(active, t - self._lag_of, 0)]  # [C, V] marginal of each class's source
        weights = np.where(active[:, None], rho * src * a, 0.0)
        q = q + np.bincount(self._table.reshape(-1), weights=weights.reshape(-1), minlength=v)
      out[t] = q
    return out

  def unigram_entropy(self, seq_len: int = 256) -> float:
    """Exact loss of the best unigram model on targets 1..seq_len (a baseline to beat)."""
    q = self.token_marginals(seq_len + 1)[1:].mean(axis=0)
    return float(-_xlogx(q).sum())

  def describe(self) -> dict:
    return dict(vocab_size=self.vocab_size, structure=self.structure, num_classes=self.num_classes,
                lags=list(self.lags), language_seed=self.language_seed,
                class_sizes=self._sizes.tolist(), entropy_rate=self.entropy_rate(),
                log_vocab=math.log(self.vocab_size))

  # -- sampling --------------------------------------------------------------

  def _uniform_bits(self, indices: np.ndarray, length: int, key: int) -> tuple[np.ndarray, ...]:
    """Four independent 32-bit words per (sequence index, position)."""
    base = _splitmix64(np.asarray(indices, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03)
                       + np.uint64(key))
    t = np.arange(length, dtype=np.uint64) * np.uint64(2 * _GOLDEN & _MASK64)
    h1 = _splitmix64(base[:, None] ^ t[None, :])
    h2 = _splitmix64(h1)
    lo = np.uint64(0xFFFFFFFF)
    s32 = np.uint64(32)
    return h1 >> s32, h1 & lo, h2 >> s32, h2 & lo

  def sample(self, indices: Sequence[int] | np.ndarray, length: int, *, seed: int = 0,
             split: str = "train") -> np.ndarray:
    """int32 [len(indices), length]; row i depends only on (seed, split, indices[i])."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    b, n = indices.shape[0], int(length)
    if n < 1:
      raise ConfigError(f"length={length!r} is invalid; use a positive integer.")
    w_reset, w_fresh, w_copy, w_tok = self._uniform_bits(indices, n, stream_key(seed, split))
    s, v, c = self.structure, self.vocab_size, self.num_classes
    t_idx = np.arange(n)

    # Class chain, vectorised over time: between two resets the class walks the
    # cycle deterministically, so c_t = cycle[pos(fresh class at last reset) + k].
    # P(word < threshold) = threshold / 2**32 = structure, up to 2**-32.
    threshold = np.uint64(round(s * _TWO_POW_32))
    reset = w_reset >= threshold
    reset[:, 0] = True
    fresh = self._class_of[((w_fresh * np.uint64(v)) >> np.uint64(32)).astype(np.int64)]
    first = np.searchsorted(self._pi_cdf, w_fresh[:, 0] / _TWO_POW_32, side="right")
    fresh[:, 0] = np.minimum(first, c - 1)  # c_0 ~ pi, so every c_t ~ pi
    last = np.maximum.accumulate(np.where(reset, t_idx, 0), axis=1)
    start_class = np.take_along_axis(fresh, last, axis=1)
    cls = self._cycle[(self._cycle_pos[start_class] + (t_idx - last)) % c]

    sizes = self._sizes[cls].astype(np.uint64)
    tokens = self._starts[cls] + ((w_tok * sizes) >> np.uint64(32)).astype(np.int64)
    lag = self._lag_of[cls]
    copy = (w_copy < threshold) & (t_idx >= lag)
    if copy.any():
      # Copies chain (a lag-1 copy of a copy ...), so this one loop over time is
      # unavoidable; it is vectorised over the batch and skips copy-free steps.
      xt = np.ascontiguousarray(tokens.T)  # time-major: row t is contiguous
      flat = xt.reshape(-1)
      src = (np.maximum(t_idx - lag, 0) * b + np.arange(b)[:, None]).T  # flat source index
      row = (cls * v).T
      copy_t = np.ascontiguousarray(copy.T)
      table = self._table_flat
      for t in np.flatnonzero(copy_t.any(axis=1)):
        np.copyto(xt[t], table[row[t] + flat[src[t]]], where=copy_t[t])
      tokens = xt.T
    return np.ascontiguousarray(tokens, dtype=np.int32)

  # -- exact likelihood ------------------------------------------------------

  def log_prob(self, tokens: np.ndarray) -> np.ndarray:
    """float64 [B, L]: log p(x_t | x_<t) under the generator (t=0: log p(x_0)).

    The sequence is taken to start at t=0 (as `sample` produces it).
    """
    x = np.asarray(tokens, dtype=np.int64)
    if x.ndim == 1:
      x = x[None]
    if x.min(initial=0) < 0 or x.max(initial=0) >= self.vocab_size:
      raise ConfigError(f"tokens must lie in [0, {self.vocab_size}); got values in "
                        f"[{x.min()}, {x.max()}].")
    cls = self._class_of[x]
    out = np.empty(x.shape, dtype=np.float64)
    out[:, 0] = np.log(self._pi[cls[:, 0]]) - np.log(self._sizes[cls[:, 0]])
    if x.shape[1] > 1:
      cur = cls[:, 1:]
      t = np.arange(1, x.shape[1])[None, :]
      lag = self._lag_of[cur]
      has_src = t >= lag
      src_tok = np.take_along_axis(x, np.maximum(t - lag, 0), axis=1)
      hit = x[:, 1:] == self._table[cur, src_tok]
      within = np.where(has_src, np.where(hit, self._log_p_hit[cur], self._log_p_miss[cur]),
                        -np.log(self._sizes[cur]))
      out[:, 1:] = self._log_trans[cls[:, :-1], cur] + within
    return out


def language_for(preset: str = "default", *, structure: float | None = None,
                 vocab_size: int = DEFAULT_VOCAB_SIZE, num_classes: int = DEFAULT_NUM_CLASSES,
                 lags: Sequence[int] = DEFAULT_LAGS, language_seed: int = 0) -> SyntheticLanguage:
  """The language a config names: `structure` overrides the preset when given."""
  return _cached_language(preset, structure, vocab_size, num_classes, tuple(lags), language_seed)


@functools.lru_cache(maxsize=16)
def _cached_language(preset, structure, vocab_size, num_classes, lags, language_seed):
  # Languages are immutable, and train, eval and entropy_floor all ask for the same one.
  if structure is None:
    if preset not in PRESETS:
      raise ConfigError(f"synthetic preset {preset!r} is unknown; choose one of "
                        f"{', '.join(map(repr, PRESETS))} or set structure=<0..1>.")
    structure = PRESETS[preset]
  return SyntheticLanguage(vocab_size=vocab_size, structure=structure, num_classes=num_classes,
                           lags=tuple(lags), language_seed=language_seed)
