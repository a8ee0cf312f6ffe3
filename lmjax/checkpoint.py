"""Checkpoints: orbax CheckpointManager plus integrity checks and config guards.

Layout (see docs/checkpoints.md): `WORKDIR/checkpoints/<step>/` holds two orbax
items, `state` (the array pytree, StandardSave: OCDBT + zarr) and `meta` (one
JSON document, JsonSave) written in the same atomic commit. `meta` carries the
caller's `extras`, a fingerprint, shape and dtype for every array in `state`,
and a sha256 of itself.

Integrity. Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames
it when complete, so an interrupted save never looks committed; tensorstore
checksums most of what it reads. What neither covers is a step that reads back
cleanly but holds the wrong numbers (a bug, a tool that rewrote files, two runs
sharing a directory...). So each array gets a 64-bit fingerprint computed ON
DEVICE from its exact bits (see `fingerprint`), checked after every restore.
Because it is a function of the global array value only (not of its sharding
or of which process holds which shard) it is computed the same way on save and
on a restore onto a different mesh, and on many hosts no process ever needs a
whole array: each device reduces its shards and XLA sums the results.

A step that fails any check (empty or partial directory, missing or corrupt
`meta`, unreadable arrays, fingerprint mismatch) is logged and the next older
step is tried. Once a good step is found, the newer bad ones are renamed to
`<step>.corrupt` (never deleted) so that later saves and the keep-last-K policy
do not trip over them. If no step is good, a one-line CheckpointError is raised
and nothing on disk is changed.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterable, Sequence

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lmjax.errors import CheckpointError, require

FORMAT_VERSION = 1
CHECKPOINT_SUBDIR = "checkpoints"
STATE_ITEM = "state"
META_ITEM = "meta"
TMP_MARKER = ".orbax-checkpoint-tmp"
CORRUPT_SUFFIX = ".corrupt"
REJECTED_SUFFIX = ".rejected"
_FINAL_KEY = "lmjax_final"

# Config keys that may differ between a checkpoint and the run resuming it:
# where and how often things are written, the run length (extending a run is
# legitimate; note it moves the lr schedule's horizon), the device mesh
# (restore reshards) and grad_accum (token-weighted accumulation is exact).
# Entries are dotted keys or fnmatch patterns; "a.b" also covers "a.b.*".
DEFAULT_KEYS_THAT_MAY_CHANGE: tuple[str, ...] = (
    "workdir", "name", "checkpoint", "mesh", "optim.grad_accum",
    "train.steps", "train.tokens", "train.flops", "train.flops_convention",
    "train.log_every", "train.eval_every", "data.eval_batches", "train.progress",
    "train.cpu_splits", "train.cpu_dots",
)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """When to save and what to keep.

  Attributes:
    every_steps: save when step % every_steps == 0 (step > 0); None disables.
    keep: keep the newest `keep` steps; steps saved with final=True are kept
      in addition, forever.
    async_save: write in a background thread after the device-to-host copy.
    every_seconds: also save when this much wall-clock time has passed since
      the last save (or since start); None disables.
  """
  every_steps: int | None = 1000
  keep: int = 3
  async_save: bool = True
  every_seconds: float | None = None

  def __post_init__(self):
    if self.every_steps is not None:
      require(isinstance(self.every_steps, int) and not isinstance(self.every_steps, bool)
              and self.every_steps >= 1,
              f"checkpoint.every_steps={self.every_steps!r} is invalid: it must be an "
              "integer >= 1, or null to disable step-interval saves.")
    require(isinstance(self.keep, int) and not isinstance(self.keep, bool)
            and self.keep >= 1,
            f"checkpoint.keep={self.keep!r} is invalid: it must be an integer >= 1.")
    require(isinstance(self.async_save, bool),
            f"checkpoint.async_save={self.async_save!r} is invalid: it must be true "
            "or false.")
    if self.every_seconds is not None:
      require(isinstance(self.every_seconds, (int, float))
              and not isinstance(self.every_seconds, bool) and self.every_seconds > 0,
              f"checkpoint.every_seconds={self.every_seconds!r} is invalid: it must be "
              "a number > 0, or null to disable timed saves.")


# ----------------------------------------------------------------------------
# Fingerprints.

_SEED_A = 0x243F6A88
_SEED_B = 0x9E3779B9


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's finaliser: a bijection on uint32 that mixes every input bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _as_words(x: jax.Array) -> jax.Array:
  """The array's exact bits as uint32 words (one or two per element)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(x.dtype, jnp.complexfloating):
    x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
  size = x.dtype.itemsize
  if size == 1:
    return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  if size == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if size in (4, 8):
    # 8-byte elements become a trailing axis of two words.
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  raise CheckpointError(f"cannot fingerprint dtype {x.dtype}; store it as a "
                        "standard 8/16/32/64-bit type.")


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  # Row-major position built from iotas, not arange+reshape, so a sharded
  # array is never reshaped (which could force an all-gather). Wraps mod 2**32.
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
    stride *= shape[d]
  return idx


@jax.jit
def _fingerprint_words(x: jax.Array) -> jax.Array:
  w = _as_words(x)
  if w.ndim == 0:
    w = w[None]
  idx = _flat_index(w.shape)
  # Lane a: sum of word * (odd weight). Lane b: sum of a keyed bijection of the
  # word. Changing any single word changes each lane by a nonzero amount mod
  # 2**32 (odd numbers are invertible mod 2**32; bijections move their output),
  # so one flipped bit - or any change confined to one word - is always caught.
  # Integer sums are exact and order-free, hence sharding-independent.
  weight = _fmix32(idx ^ jnp.uint32(_SEED_A)) | jnp.uint32(1)
  a = jnp.sum(w * weight, dtype=jnp.uint32)
  b = jnp.sum(_fmix32(w ^ _fmix32(idx + jnp.uint32(_SEED_B))), dtype=jnp.uint32)
  return jnp.stack([a, b])


# Small arrays are fingerprinted on the host: same words, same sums (numpy's uint32
# arithmetic wraps as XLA's does), but no program to compile for each new shape, which cost
# a tiny sweep run ~0.5 s of its ~3 s. Large ones stay on device, where the work is.
HOST_FINGERPRINT_MAX_ELEMENTS = 1 << 18


def _fmix32_host(h: np.ndarray) -> np.ndarray:
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def _fingerprint_words_host(x: np.ndarray) -> np.ndarray:
  """`_fingerprint_words` in numpy, bit for bit."""
  if x.dtype == np.bool_:
    w = x.astype(np.uint32)
  else:
    if np.issubdtype(x.dtype, np.complexfloating):
      x = np.stack([x.real, x.imag], axis=-1)
    size = x.dtype.itemsize
    if size not in (1, 2, 4, 8):
      raise CheckpointError(f"cannot fingerprint dtype {x.dtype}; store it as a "
                            "standard 8/16/32/64-bit type.")
    x = np.ascontiguousarray(x)
    if size == 8:  # two words per element, low word first, as XLA's bitcast gives them
      w = x.view(np.uint32).reshape(x.shape + (2,))
    else:
      w = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[size]).astype(np.uint32)
  w = w.reshape(-1)
  idx = (np.arange(w.size, dtype=np.uint64) % (1 << 32)).astype(np.uint32)
  with np.errstate(over="ignore"):
    weight = _fmix32_host(idx ^ np.uint32(_SEED_A)) | np.uint32(1)
    a = np.sum(w * weight, dtype=np.uint32)
    b = np.sum(_fmix32_host(w ^ _fmix32_host(idx + np.uint32(_SEED_B))), dtype=np.uint32)
  return np.array([a, b], np.uint32)


def _on_host(x: Any) -> bool:
  return (isinstance(x, jax.Array) and x.is_fully_addressable
          and x.size <= HOST_FINGERPRINT_MAX_ELEMENTS
          and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def fingerprint(x: Any) -> str:
  """64-bit fingerprint (16 hex digits) of an array's exact bits.

  Computed on device and independent of sharding and process layout. It
  provably detects any change confined to one 32-bit word (every single
  flipped bit); random wider corruption slips through with probability about
  2**-64. It is an integrity check, not a cryptographic hash.
  """
  return _format_fp(_fingerprint_words(jnp.asarray(x)))


def _format_fp(words: Any) -> str:
  a, b = (int(v) for v in np.asarray(words))
  return f"{a:08x}{b:08x}"


def fingerprint_tree(tree: Any) -> dict[str, dict[str, Any]]:
  """{keystr(path): {"shape", "dtype", "fingerprint"}} for every array leaf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  local = [_on_host(x) for _, x in flat]
  arrays = [x if h else jnp.asarray(x) for (_, x), h in zip(flat, local)]
  # Dispatch every device fingerprint first, then fetch once (one host sync, not one per
  # leaf): the words of device leaves and the values of host leaves.
  fetched = jax.device_get([x if h else _fingerprint_words(x) for x, h in zip(arrays, local)])
  words = [_fingerprint_words_host(np.asarray(f)) if h else f for f, h in zip(fetched, local)]
  return {
      jax.tree_util.keystr(path): {"shape": list(x.shape), "dtype": str(x.dtype),
                                   "fingerprint": _format_fp(w)}
      for (path, _), x, w in zip(flat, arrays, words)
  }


# ----------------------------------------------------------------------------
# Step metadata document.


def _canonical(obj: Any) -> str:
  return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _seal(payload: dict[str, Any]) -> dict[str, Any]:
  return {**payload, "sha256": hashlib.sha256(_canonical(payload).encode()).hexdigest()}


class _BadStep(Exception):
  """A step that cannot be trusted; the reason is the message."""


def _unseal(meta: Any, step: int) -> dict[str, Any]:
  if not isinstance(meta, dict) or "sha256" not in meta:
    raise _BadStep("metadata is not an lmjax checkpoint record")
  payload = {k: v for k, v in meta.items() if k != "sha256"}
  if hashlib.sha256(_canonical(payload).encode()).hexdigest() != meta["sha256"]:
    raise _BadStep("metadata checksum mismatch")
  if payload.get("format") != FORMAT_VERSION:
    raise _BadStep(f"unknown metadata format {payload.get('format')!r}")
  if payload.get("step") != step:
    raise _BadStep(f"metadata says step {payload.get('step')!r}")
  if not isinstance(payload.get("arrays"), dict):
    raise _BadStep("metadata lists no arrays")
  return payload


# ----------------------------------------------------------------------------
# Config compatibility.


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out: dict[str, Any] = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: d}


def _may_change(key: str, patterns: Iterable[str]) -> bool:
  return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p)
             for p in patterns)


def config_diff(saved_config: dict[str, Any], current_config: dict[str, Any],
                keys_that_may_change: Sequence[str] = DEFAULT_KEYS_THAT_MAY_CHANGE,
                ) -> list[tuple[str, Any, Any]]:
  """(dotted key, saved, current) for every key that differs and may not."""
  missing = "<missing>"
  # Compare in JSON form: the saved side has been through JSON (tuples->lists).
  saved = _flatten(json.loads(json.dumps(saved_config)))
  current = _flatten(json.loads(json.dumps(current_config)))
  diffs = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key, missing), current.get(key, missing)
    if a != b and not _may_change(key, keys_that_may_change):
      diffs.append((key, a, b))
  return diffs


def check_compatible(saved_config: dict[str, Any], current_config: dict[str, Any],
                     keys_that_may_change: Sequence[str] = DEFAULT_KEYS_THAT_MAY_CHANGE,
                     *, workdir: Any = None) -> None:
  """Raises CheckpointError naming every key that differs and may not change."""
  diffs = config_diff(saved_config, current_config, keys_that_may_change)
  if not diffs:
    return
  what = ("a different model" if all(k.startswith("model.") for k, _, _ in diffs)
          else "a different config")
  where = (f"workdir {workdir} holds a checkpoint" if workdir is not None
           else "the checkpoint is that")
  listed = ", ".join(f"{k} {json.dumps(a)} != {json.dumps(b)}" for k, a, b in diffs)
  raise CheckpointError(f"{where} of {what}: {listed}; use a new --workdir or restore "
                        "the old config.")


# ----------------------------------------------------------------------------
# Checkpointer.


@dataclasses.dataclass
class _KeepLatestAndFinal:
  """orbax preservation policy: newest n steps, plus every final step."""
  n: int
  final_steps: set[int]

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    newest = set(sorted(c.step for c in checkpoints)[-self.n:])
    return [c.step in newest or c.step in self.final_steps for c in checkpoints]


def _abstract_of(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  x = jnp.asarray(x)
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  msg = text[0] if text else type(e).__name__
  return msg if len(msg) <= 200 else msg[:200] + "..."


class Checkpointer:
  """Saves and restores (state, extras) under WORKDIR/checkpoints.

  `state` is a pytree of jax arrays (params, opt_state, step, rng...), possibly
  sharded; `extras` a JSON-serialisable dict (data position, the resolved
  config under extras["config"], ...). Call save/restore from every process.
  """

  def __init__(self, workdir: Any, cfg: CheckpointConfig | None = None, *,
               keys_that_may_change: Sequence[str] = DEFAULT_KEYS_THAT_MAY_CHANGE):
    # orbax needs absolute paths; a user's relative --workdir is resolved against the cwd
    # (URLs such as gs://bucket/run are absolute already).
    workdir = str(workdir)
    self.workdir = epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))
    self.directory = self.workdir / CHECKPOINT_SUBDIR
    self.cfg = cfg or CheckpointConfig()
    self.keys_that_may_change = tuple(keys_that_may_change)
    self.restored_step: int | None = None
    self._config_checked = False
    self._last_save_time = time.monotonic()
    self._final_steps: set[int] = set()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add(STATE_ITEM, ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add(META_ITEM, ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add(META_ITEM, ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=self.cfg.async_save,
        preservation_policy=_KeepLatestAndFinal(self.cfg.keep, self._final_steps),
        # Never delete leftovers behind the user's back; they are reported.
        cleanup_tmp_directories=False,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    for step in self._manager.all_steps():
      try:
        if (self._manager.metadata(step).custom_metadata or {}).get(_FINAL_KEY):
          self._final_steps.add(step)
      except Exception:  # pylint: disable=broad-except
        pass  # an unreadable step is dealt with by restore()
    self._report_uncommitted()

  # -- queries --------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed steps, oldest first (not yet verified)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest committed step, or None. restore() may still fall back from it."""
    return self._manager.latest_step()

  # -- saving ---------------------------------------------------------------

  def due(self, step: int) -> bool:
    """Whether a save is due at `step` (every_steps or every_seconds); cheap, no I/O."""
    due = bool(self.cfg.every_steps and step > 0 and step % self.cfg.every_steps == 0)
    if self.cfg.every_seconds is not None:
      timed = time.monotonic() - self._last_save_time >= self.cfg.every_seconds
      if jax.process_count() > 1:
        # Clocks differ between hosts; all must agree or the save deadlocks.
        timed = bool(multihost_utils.broadcast_one_to_all(np.int32(timed)))
      due = due or timed
    return due

  def save(self, step: int, state: Any, extras: dict[str, Any] | None = None, *,
           force: bool = False, final: bool = False) -> bool:
    """Saves if due (every_steps / every_seconds), forced, or final.

    Args:
      step: training step (int >= 0); steps must increase.
      state: pytree of arrays.
      extras: JSON-serialisable dict restored alongside the state. Put the
        resolved config under "config" to enable the compatibility guard.
      force: save now regardless of the intervals.
      final: save now and keep this step forever (exempt from `keep`).

    Returns:
      Whether a save was started. An existing step is never overwritten.
    """
    require(isinstance(step, (int, np.integer)) and not isinstance(step, bool)
            and step >= 0, f"checkpoint step {step!r} is invalid: it must be an "
            "integer >= 0.", CheckpointError)
    step = int(step)
    # Called every step by the training loop: decide first, validate only
    # when actually saving.
    if not (force or final or self.due(step)):
      return False
    extras = {} if extras is None else extras
    require(isinstance(extras, dict), "checkpoint extras must be a dict; wrap the "
            "value in one.", CheckpointError)
    try:
      _canonical(extras)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f"checkpoint extras are not JSON-serialisable ({e}); "
                            "convert them to dicts, lists, str and numbers.") from e
    existing = self._manager.all_steps()
    if step in existing:
      logging.info("checkpoint step %d already exists in %s; not overwriting it.",
                   step, self.directory)
      return False
    if existing and step < max(existing):
      raise CheckpointError(
          f"refusing to save step {step}: {self.directory} already holds newer step "
          f"{max(existing)}, which keep-last-K would then favour; use a new --workdir "
          "or move the newer steps away.")
    if isinstance(extras.get("config"), dict):
      self._check_workdir_config(extras["config"])
    payload = {"format": FORMAT_VERSION, "step": step, "final": bool(final),
               "time": time.time(), "arrays": fingerprint_tree(state),
               "extras": extras}
    if final:
      self._final_steps.add(step)
    self._manager.save(
        step,
        args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state),
                                   META_ITEM: ocp.args.JsonSave(_seal(payload))}),
        force=True,
        custom_metadata={_FINAL_KEY: bool(final)})
    self._last_save_time = time.monotonic()
    return True

  def _check_workdir_config(self, config: dict[str, Any]) -> None:
    """Before the first save: refuse to mix runs of different configs."""
    if self._config_checked:
      return
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        payload = self._read_meta(step)
      except _BadStep:
        continue
      saved = payload.get("extras", {}).get("config")
      if isinstance(saved, dict):
        check_compatible(saved, config, self.keys_that_may_change,
                         workdir=self.workdir)
      break
    self._config_checked = True

  # -- restoring ------------------------------------------------------------

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def _read_meta(self, step: int) -> dict[str, Any]:
    step_dir = self._step_dir(step)
    if not step_dir.is_dir() or not any(step_dir.iterdir()):
      raise _BadStep("empty step directory")
    for item in (STATE_ITEM, META_ITEM):
      if not (step_dir / item).is_dir():
        raise _BadStep(f"item '{item}' is missing")
    try:
      meta = self._manager.restore(
          step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))[META_ITEM]
    except Exception as e:  # pylint: disable=broad-except
      raise _BadStep(f"metadata unreadable: {_first_line(e)}") from e
    return _unseal(meta, step)

  def _restore_step(self, step: int, abstract_state: Any,
                    current_config: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    payload = self._read_meta(step)
    extras = payload.get("extras", {})
    if current_config is not None and isinstance(extras.get("config"), dict):
      check_compatible(extras["config"], current_config, self.keys_that_may_change,
                       workdir=self.workdir)
    saved = payload["arrays"]
    if abstract_state is not None:
      abstract_state = jax.tree.map(_abstract_of, abstract_state)
      wanted = {jax.tree_util.keystr(p): x
                for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
      if set(wanted) != set(saved):
        extra, lacking = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
        raise CheckpointError(
            f"checkpoint step {step} in {self.directory} does not match the state "
            f"structure (not in checkpoint: {extra[:3]}, only in checkpoint: "
            f"{lacking[:3]}); restore with the config it was saved with.")
      for key, x in wanted.items():
        if list(x.shape) != saved[key]["shape"] or str(x.dtype) != saved[key]["dtype"]:
          raise CheckpointError(
              f"checkpoint step {step} in {self.directory} has {key} as "
              f"{saved[key]['dtype']}{saved[key]['shape']}, but the state wants "
              f"{x.dtype}{list(x.shape)}; restore with the config it was saved with.")
    try:
      state = self._manager.restore(
          step, args=ocp.args.Composite(
              **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))[STATE_ITEM]
    except Exception as e:  # pylint: disable=broad-except
      raise _BadStep(f"arrays unreadable: {_first_line(e)}") from e
    got = fingerprint_tree(state)
    bad = sorted(k for k in saved if got.get(k) != saved[k])
    if bad or set(got) != set(saved):
      raise _BadStep(f"fingerprint mismatch in {len(bad)} array(s), e.g. {bad[:3]}")
    return state, extras

  def restore(self, step: int | None = None, abstract_state: Any = None, *,
              current_config: dict[str, Any] | None = None,
              accept: Callable[[dict[str, Any]], bool] | None = None,
              ) -> tuple[Any, dict[str, Any]] | None:
    """Restores (state, extras) from `step`, or from the newest good step.

    Args:
      step: a specific step (no fallback: if it is bad, CheckpointError), or
        None for the newest step that passes every check.
      abstract_state: pytree of jax.ShapeDtypeStruct(shape, dtype, sharding=...)
        (or arrays) giving the target shardings; a different mesh than the
        one saved from is fine. None restores with the saved shardings, which
        only works on the same devices.
      current_config: if given, compared with extras["config"] of the step
        (check_compatible) before any array is read.
      accept: if given, steps whose extras it rejects are passed over (only their
        metadata is read) and, once an older step has restored, renamed to
        `<step>.rejected` (not deleted), so that later saves and resumes go on
        from the restored step. If it rejects every step, all are renamed and
        None is returned.

    Returns:
      (state, extras); `self.restored_step` says which step it was.
    """
    self.wait()
    self._manager.reload()
    self._report_uncommitted()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f"no committed checkpoint for step {step} in "
                              f"{self.directory} (have {sorted(steps)}); pick one of those.")
      candidates = [step]
    else:
      candidates = steps
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.directory}; train from scratch or "
                            "point --workdir at a run that saved one.")
    bad: list[tuple[int, str]] = []
    rejected: list[int] = []
    for s in candidates:
      try:
        if accept is not None and not accept(self._read_meta(s).get("extras", {})):
          rejected.append(s)
          continue
        state, extras = self._restore_step(s, abstract_state, current_config)
      except _BadStep as e:
        logging.error("checkpoint step %d in %s is unusable (%s); trying an older step.",
                      s, self.directory, e)
        bad.append((s, str(e)))
        continue
      if bad:
        self._quarantine([b for b, _ in bad])
        logging.warning("restored step %d from %s after skipping bad step(s) %s.",
                        s, self.directory, [b for b, _ in bad])
      self._set_aside(rejected, REJECTED_SUFFIX, "rejected")
      self.restored_step = s
      self._config_checked = self._config_checked or current_config is not None
      return state, extras
    if rejected and not bad:
      self._set_aside(rejected, REJECTED_SUFFIX, "rejected")
      return None
    if step is not None:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is unusable "
                            f"({bad[0][1]}); restore another step or omit the step.")
    raise CheckpointError(
        f"no usable checkpoint in {self.directory}: all {len(bad)} step(s) failed checks "
        f"(newest, step {bad[0][0]}: {bad[0][1]}); nothing was changed - inspect the "
        "directory or start a new --workdir.")

  def _quarantine(self, steps: Sequence[int]) -> None:
    """Renames bad steps to <step>.corrupt[.n] so orbax stops listing them."""
    self._set_aside(steps, CORRUPT_SUFFIX, "bad")

  def _set_aside(self, steps: Sequence[int], suffix: str, why: str) -> None:
    """Renames steps to <step><suffix>[.n]: orbax stops listing them, nothing is deleted."""
    if not steps:
      return
    if jax.process_index() == 0:
      for s in steps:
        src = self._step_dir(s)
        dst = self.directory / f"{s}{suffix}"
        n = 1
        while dst.exists():
          dst = self.directory / f"{s}{suffix}.{n}"
          n += 1
        src.rename(dst)
        logging.warning("moved %s checkpoint %s to %s (not deleted).", why, src, dst)
    self._final_steps.difference_update(steps)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("lmjax_checkpoint_set_aside")
    self._manager.reload()

  def _report_uncommitted(self) -> None:
    if not self.directory.exists():
      return
    for p in sorted(self.directory.iterdir()):
      if TMP_MARKER in p.name:
        logging.warning("ignoring uncommitted checkpoint %s (an interrupted save); it is "
                        "never restored.", p)

  # -- lifecycle ------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until any async save has been committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


__all__ = [
    "CHECKPOINT_SUBDIR", "CheckpointConfig", "Checkpointer",
    "DEFAULT_KEYS_THAT_MAY_CHANGE", "check_compatible", "config_diff", "fingerprint",
    "fingerprint_tree",
]
