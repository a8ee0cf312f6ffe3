"""Optimizer, learning-rate schedules, weight-decay mask and gradient accumulation.

The optimizer is AdamW built from optax pieces so that each part is explicit:

  clip_by_global_norm(clip_norm)        # optional
  scale_by_adam(b1, b2, eps)
  add_decayed_weights(wd, mask)         # decoupled: update += wd * param
  scale_by_learning_rate(schedule)      # update *= -lr(step)

so one step is `param -= lr * (adam_direction + wd * param)`: the decay is
applied as `lr * wd * param`, i.e. it follows the schedule (as in
`optax.adamw` and PyTorch's AdamW), not a fixed `wd * param`.

Schedules (step t counts optimizer updates from 0, T = total_steps,
W = warmup_steps, f = final_lr_frac). All schedules share a linear warmup from
0 at t=0 to `lr` at t=W, then:

  constant: lr
  linear:   linear from lr at t=W to f*lr at t=T
  cosine:   f*lr + (1-f)*lr * 0.5*(1 + cos(pi * (t-W)/(T-W)))
  wsd:      warmup-stable-decay: lr until t=D, then the "1-sqrt" cooldown
            f*lr + (1-f)*lr * (1 - sqrt((t-D)/(T-D))), where
            T-D = max(1, round(decay_frac*T)) steps (Hagele et al. 2024 found
            1-sqrt matches or beats a linear cooldown).

After T every schedule stays at its end value (f*lr, or lr for constant).
`warmup_steps` is an absolute number of optimizer steps, not a fraction, so it
does not silently change when a sweep varies the run length.

Gradient accumulation (`accumulate_gradients`) works on sums, not means, so that
k microbatches give exactly the gradient of one k-times-larger batch even when a
loss mask leaves the microbatches with different numbers of tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.core.meta
import jax
import jax.numpy as jnp
import optax

from lmjax.errors import check_choice, check_positive, require

OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "linear", "constant", "wsd")

# Leaf names of dense weight matrices in lmjax models (decayed by default).
KERNEL_NAMES = ("kernel", "w_q", "w_k", "w_v", "w_o", "w_up", "w_gate", "w_down",
                "w_head")


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW + schedule + clipping + accumulation settings.

  Attributes:
    name: optimizer; only "adamw".
    lr: peak learning rate.
    b1, b2, eps: Adam moment decay rates and denominator epsilon.
    weight_decay: decoupled weight decay, applied as lr(t) * wd * param.
    decay_norms / decay_biases / decay_embeddings: whether those parameter
      kinds get weight decay (see `decay_mask`).
    schedule: "cosine", "linear", "constant" or "wsd" (see module docstring).
    warmup_steps: linear warmup length in optimizer steps (absolute, not a
      fraction of the run).
    final_lr_frac: end learning rate as a fraction of `lr`.
    decay_frac: WSD only: fraction of the run spent in the final 1-sqrt decay.
    clip_norm: global-norm gradient clipping threshold; None disables it.
    grad_accum: microbatches per optimizer step (see `accumulate_gradients`);
      the optimizer itself does not depend on it.
  """
  name: str = "adamw"
  lr: float = 3e-3
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_norms: bool = False
  decay_biases: bool = False
  decay_embeddings: bool = False
  schedule: str = "cosine"
  warmup_steps: int = 0
  final_lr_frac: float = 0.1
  decay_frac: float = 0.2
  clip_norm: float | None = 1.0
  grad_accum: int = 1

  def __post_init__(self):
    check_choice("optim.name", self.name, OPTIMIZERS)
    check_positive("optim.lr", self.lr)
    for name in ("b1", "b2"):
      value = getattr(self, name)
      require(isinstance(value, (int, float)) and not isinstance(value, bool)
              and 0 <= value < 1,
              f"optim.{name}={value!r} is invalid: it must be in [0, 1).")
    check_positive("optim.eps", self.eps)
    check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
    for name in ("decay_norms", "decay_biases", "decay_embeddings"):
      value = getattr(self, name)
      require(isinstance(value, bool),
              f"optim.{name}={value!r} is invalid: it must be true or false.")
    check_choice("optim.schedule", self.schedule, SCHEDULES)
    require(_is_int(self.warmup_steps) and self.warmup_steps >= 0,
            f"optim.warmup_steps={self.warmup_steps!r} is invalid: it must be an "
            "integer number of steps >= 0.")
    require(isinstance(self.final_lr_frac, (int, float))
            and not isinstance(self.final_lr_frac, bool)
            and 0 <= self.final_lr_frac <= 1,
            f"optim.final_lr_frac={self.final_lr_frac!r} is invalid: it must be "
            "in [0, 1].")
    require(isinstance(self.decay_frac, (int, float))
            and not isinstance(self.decay_frac, bool)
            and 0 < self.decay_frac <= 1,
            f"optim.decay_frac={self.decay_frac!r} is invalid: it must be in "
            "(0, 1].")
    if self.clip_norm is not None:
      check_positive("optim.clip_norm", self.clip_norm)
    require(_is_int(self.grad_accum) and self.grad_accum >= 1,
            f"optim.grad_accum={self.grad_accum!r} is invalid: it must be an "
            "integer >= 1.")


def _check_total_steps(cfg: OptimConfig, total_steps: Any) -> None:
  require(_is_int(total_steps) and total_steps >= 1,
          f"total_steps={total_steps!r} is invalid: it must be an integer >= 1.")
  require(cfg.warmup_steps <= total_steps,
          f"optim.warmup_steps={cfg.warmup_steps} exceeds the run length "
          f"total_steps={total_steps}; lower warmup_steps or train longer.")


def wsd_decay_steps(cfg: OptimConfig, total_steps: int) -> int:
  """Length of the WSD cooldown in steps (at least 1)."""
  return max(1, int(round(cfg.decay_frac * total_steps)))


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Returns lr(step) for `total_steps` optimizer updates (see module doc)."""
  _check_total_steps(cfg, total_steps)
  peak = float(cfg.lr)
  warmup, total = cfg.warmup_steps, total_steps
  if cfg.schedule == "wsd":
    decay_steps = wsd_decay_steps(cfg, total)
    decay_start = total - decay_steps
    require(decay_start >= warmup,
            f"optim.warmup_steps={warmup} overlaps the WSD decay, which starts "
            f"at step {decay_start} (decay_frac={cfg.decay_frac}); lower "
            "warmup_steps or decay_frac.")

  return lambda count: schedule_value(cfg, count, total, warmup, peak)


def schedule_value(cfg: OptimConfig, count: Any, total_steps: Any, warmup_steps: Any,
                   peak_lr: Any) -> jax.Array:
  """lr at optimizer step `count`. Run length, warmup and peak may be traced arrays, so one
  compiled train step serves every run of the same shape (sweeps vary only these)."""
  t = jnp.asarray(count, jnp.float32)
  total = jnp.asarray(total_steps, jnp.float32)
  warmup = jnp.asarray(warmup_steps, jnp.float32)
  peak, f = jnp.asarray(peak_lr, jnp.float32), float(cfg.final_lr_frac)
  if cfg.schedule == "constant":
    after = peak
  elif cfg.schedule in ("cosine", "linear"):
    # max(.., 1) keeps warmup_steps == total_steps from dividing by zero.
    p = jnp.clip((t - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    shape = (0.5 * (1.0 + jnp.cos(jnp.pi * p)) if cfg.schedule == "cosine" else 1.0 - p)
    after = peak * (f + (1.0 - f) * shape)
  else:  # wsd
    decay_steps = jnp.maximum(1.0, jnp.round(cfg.decay_frac * total))
    q = jnp.clip((t - (total - decay_steps)) / decay_steps, 0.0, 1.0)
    after = peak * (f + (1.0 - f) * (1.0 - jnp.sqrt(q)))
  return jnp.where(t < warmup, peak * t / jnp.maximum(warmup, 1.0), after)


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_box(x: Any) -> bool:
  return isinstance(x, flax.core.meta.AxisMetadata)


def param_kind(path: tuple[str, ...], ndim: int) -> str:
  """Classifies a parameter as "embedding", "norm", "bias", "kernel" or "other".

  Decided by names, most specific first: a leaf named like `*embedding*` is an
  embedding; anything under a module named `*norm*` (or a leaf named `*norm*`)
  is a norm parameter, including its `bias`; other leaves named `bias`/`*_bias`
  are biases; `KERNEL_NAMES` and any other >=2-d leaf are kernels. Leftover 0-d
  and 1-d leaves ("other", e.g. a learned scalar gate) are not decayed: decaying
  them pulls scales towards 0, which is rarely what anyone wants.
  """
  leaf = path[-1].lower() if path else ""
  modules = [p.lower() for p in path[:-1]]
  if "embedding" in leaf:
    return "embedding"
  if "norm" in leaf or any("norm" in m for m in modules):
    return "norm"
  if leaf == "bias" or leaf.endswith("_bias"):
    return "bias"
  if leaf in KERNEL_NAMES or ndim >= 2:
    return "kernel"
  return "other"


def decay_mask(params: Any, cfg: OptimConfig | None = None) -> Any:
  """Pytree of bools, True where weight decay applies.

  Works on plain, abstract (`jax.ShapeDtypeStruct`) and boxed
  (`flax.linen.Partitioned`) trees: a box is treated as one leaf, so the mask
  has the unboxed structure, which is a prefix of the boxed one and therefore
  valid for optax on either form.
  """
  cfg = cfg or OptimConfig()
  allowed = {"kernel": True, "other": False, "embedding": cfg.decay_embeddings,
             "norm": cfg.decay_norms, "bias": cfg.decay_biases}

  def leaf_mask(path, x):
    value = x.unbox() if _is_box(x) else x
    ndim = len(getattr(value, "shape", ()))
    return allowed[param_kind(tuple(_key_name(k) for k in path), ndim)]

  return jax.tree_util.tree_map_with_path(leaf_mask, params, is_leaf=_is_box)


def make_optimizer(cfg: OptimConfig, total_steps: int, params_or_abstract_params: Any, *,
                   scale_by_lr: bool = True) -> optax.GradientTransformation:
  """AdamW with the configured schedule, clipping and weight-decay mask.

  `params_or_abstract_params` is only used to build the decay mask (names and
  ranks), so `jax.eval_shape` output is enough; boxed trees are fine.
  scale_by_lr=False leaves out the final `-lr(step) *` so the caller can apply a learning
  rate computed from traced hyperparameters (see schedule_value); the math is the same.
  """
  schedule = make_schedule(cfg, total_steps)
  parts = []
  if cfg.clip_norm is not None:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  if cfg.weight_decay > 0:
    parts.append(optax.add_decayed_weights(
        cfg.weight_decay, mask=decay_mask(params_or_abstract_params, cfg)))
  if scale_by_lr:
    parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)


class Accumulated(NamedTuple):
  """Result of `accumulate_gradients`.

  loss: total loss sum / total tokens (token-weighted mean over the batch).
  grads: gradient of that mean (total grad sum / total tokens).
  num_tokens: total weight (tokens) over all microbatches.
  aux: aux pytree summed over microbatches.
  """
  loss: jax.Array
  grads: Any
  num_tokens: jax.Array
  aux: Any


def _acc_dtype(dtype: Any) -> Any:
  # Summing k bf16 gradients loses bits fast; accumulate floats in >= f32.
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.promote_types(dtype, jnp.float32)
  return dtype


def accumulate_gradients(
    loss_and_grad_fn: Callable[[Any, Any], Any], params: Any, batch: Any,
    k: int) -> Accumulated:
  """Token-weighted gradient accumulation over k microbatches with lax.scan.

  Contract: `loss_and_grad_fn(params, microbatch)` returns
  `((loss_sum, (num_tokens, aux)), grads)` where `loss_sum` is the SUM of the
  per-token losses of that microbatch (not the mean), `num_tokens` the number
  (or total weight) of tokens it covers, and `grads` the gradient of
  `loss_sum`. That is exactly `jax.value_and_grad(fn, has_aux=True)` of

      def fn(params, mb):
        per_token, mask = ...
        return (per_token * mask).sum(), (mask.sum(), aux)

  The result normalises once at the end, loss = sum(loss_sum) / sum(tokens),
  grads = sum(grads) / sum(tokens), so k microbatches equal the big batch even
  when masks leave them with different token counts (averaging per-microbatch
  means would overweight sparse microbatches). `aux` leaves are summed, so
  return additive quantities (sums, counts) and normalise outside. A loss that
  is a plain mean over n equal-weight examples can return (mean * n, (n, aux)).

  Microbatch i takes rows i, i+k, i+2k, ... of the batch's leading axis, so a
  batch sharded over devices along that axis gives every device an equal share
  of every microbatch without moving data. Only one microbatch's activations
  are alive at a time (scan), and accumulation runs in float32 or wider.

  Args:
    loss_and_grad_fn: see above.
    params: parameters, passed through unchanged.
    batch: pytree of arrays sharing a leading batch axis divisible by k.
    k: number of microbatches (>= 1).

  Returns:
    Accumulated(loss, grads, num_tokens, aux).
  """
  require(_is_int(k) and k >= 1,
          f"grad_accum={k!r} is invalid: it must be an integer >= 1.")
  leaves = jax.tree.leaves(batch)
  require(leaves, "accumulate_gradients got an empty batch; pass at least one array.")
  sizes = {x.shape[0] if x.ndim else None for x in leaves}
  require(len(sizes) == 1 and None not in sizes,
          f"batch arrays disagree on the leading (batch) axis: {sorted(map(str, sizes))}; "
          "give every array the same batch size.")
  size = sizes.pop()
  require(size % k == 0,
          f"batch size {size} is not divisible by grad_accum={k}; choose a batch "
          "size that is a multiple of grad_accum.")

  def finish(loss_sum, num_tokens, grads, aux, grad_dtypes):
    denom = jnp.asarray(num_tokens, jnp.float32)
    # An all-masked batch has zero loss and zero grads; avoid 0/0 = NaN.
    denom = jnp.where(denom > 0, denom, 1.0)
    loss = jnp.asarray(loss_sum, jnp.float32) / denom
    grads = jax.tree.map(lambda g, dt: (g / denom).astype(dt), grads, grad_dtypes)
    return Accumulated(loss, grads, num_tokens, aux)

  if k == 1:
    (loss_sum, (num_tokens, aux)), grads = loss_and_grad_fn(params, batch)
    dtypes = jax.tree.map(lambda g: g.dtype, grads)
    return finish(loss_sum, num_tokens, grads, aux, dtypes)

  micro = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(size // k, k, *x.shape[1:]), 0, 1), batch)
  first = jax.tree.map(lambda x: x[0], micro)
  out_shape = jax.eval_shape(loss_and_grad_fn, params, first)
  grad_dtypes = jax.tree.map(lambda s: s.dtype, out_shape[1])
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, _acc_dtype(s.dtype)), out_shape)

  def body(carry, mb):
    out = loss_and_grad_fn(params, mb)
    return jax.tree.map(lambda c, o: c + o.astype(c.dtype), carry, out), None

  ((loss_sum, (num_tokens, aux)), grads), _ = jax.lax.scan(body, init, micro)
  return finish(loss_sum, num_tokens, grads, aux, grad_dtypes)


__all__ = [
    "Accumulated", "KERNEL_NAMES", "OPTIMIZERS", "OptimConfig", "SCHEDULES",
    "accumulate_gradients", "decay_mask", "make_optimizer", "make_schedule",
    "param_kind", "wsd_decay_steps",
]
