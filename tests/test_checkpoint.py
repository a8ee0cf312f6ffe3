"""Tests for lmjax.checkpoint: round trips, resharding, retention, fault injection.

Needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8 (conftest).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding
import numpy as np
import pytest

from lmjax import checkpoint as ck
from lmjax.errors import CheckpointError, ConfigError

pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8,
                       reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8"),
    # A failed tensorstore read leaves orbax futures that asyncio reports at
    # garbage collection ("Event loop is closed"); harmless, not ours to fix.
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

SYNC = ck.CheckpointConfig(every_steps=1, keep=5, async_save=False)
CONFIG = {"model": {"d_model": 64, "n_layers": 2}, "optim": {"lr": 1e-3},
          "train": {"steps": 100}, "workdir": "/somewhere"}


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _state(step: int, mesh=None):
  mesh = mesh or _mesh((8,), ("fsdp",))
  fsdp = NamedSharding(mesh, P("fsdp"))
  rep = NamedSharding(mesh, P())
  w = jnp.arange(16 * 8, dtype=jnp.float32).reshape(16, 8) / 7.0 + step
  return {
      "params": {"w": jax.device_put(w, fsdp),
                 "emb": jax.device_put(jnp.full((8, 4), step, jnp.bfloat16), fsdp)},
      "opt_state": {"mu": jax.device_put(w * 0.5, fsdp)},
      "step": jax.device_put(jnp.int32(step), rep),
      "rng": jax.device_put(jax.random.key(step), rep),
  }


def _abstract(state, sharding_for):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(x)), state)


def _same_sharding_abstract(state):
  return _abstract(state, lambda x: x.sharding)


def _assert_state_equal(got, want):
  def eq(a, b):
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(eq, got, want)


def _dir_hash(root) -> str:
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in sorted(os.walk(root)):
    dirnames.sort()
    h.update(os.path.relpath(dirpath, root).encode())
    for name in sorted(filenames):
      h.update(name.encode())
      h.update(pathlib.Path(dirpath, name).read_bytes())
  return h.hexdigest()


def _two_steps(workdir, config=CONFIG):
  """Workdir with good steps 1 and 2; returns the states saved."""
  states = {s: _state(s) for s in (1, 2)}
  with ck.Checkpointer(workdir, SYNC) as c:
    for s, st in states.items():
      assert c.save(s, st, {"data_pos": s * 10, "config": config})
  return states


# -- fingerprints -------------------------------------------------------------


def test_fingerprint_catches_every_single_bit_flip():
  x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  base = ck.fingerprint(x)
  bits = x.view(np.uint32)
  for elem in (0, 7, 11):
    for bit in range(32):
      flipped = bits.copy()
      flipped.flat[elem] ^= np.uint32(1 << bit)
      assert ck.fingerprint(flipped.view(np.float32)) != base, (elem, bit)
  swapped = x.copy()
  swapped.flat[0], swapped.flat[1] = x.flat[1], x.flat[0]
  assert ck.fingerprint(swapped) != base
  bf = jnp.asarray(x, jnp.bfloat16)
  assert ck.fingerprint(bf) != ck.fingerprint(bf.at[2, 1].set(
      jax.lax.bitcast_convert_type(
          jax.lax.bitcast_convert_type(bf[2, 1], jnp.uint16) ^ jnp.uint16(1),
          jnp.bfloat16)))


def test_fingerprint_is_sharding_independent():
  x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8) * 0.37
  fps = {ck.fingerprint(x)}
  fps.add(ck.fingerprint(jax.device_put(x, NamedSharding(_mesh((8,), ("d",)), P("d")))))
  fps.add(ck.fingerprint(jax.device_put(
      x, NamedSharding(_mesh((2, 4), ("a", "b")), P("b", "a")))))
  assert len(fps) == 1


def test_host_fingerprints_equal_device_fingerprints_bit_for_bit():
  # fingerprint_tree takes small arrays on the host: a checkpoint saved that way must verify
  # on restore where the same array may be large enough, or sharded, to go on device.
  rng = np.random.default_rng(1)
  cases = {
      "f32": rng.normal(size=(5, 7)).astype(np.float32),
      "bf16": rng.normal(size=(3, 9)).astype(jnp.bfloat16),
      "f16": rng.normal(size=(11,)).astype(np.float16),
      "i8": rng.integers(-128, 127, size=(4, 4, 3), dtype=np.int8),
      "u32": rng.integers(0, 2**32, size=(6, 2), dtype=np.uint32),
      "i32_scalar": np.int32(-5),
      "bool": rng.random(size=(13,)) < 0.5,
      "c64": (rng.normal(size=(2, 3)) + 1j * rng.normal(size=(2, 3))).astype(np.complex64),
  }
  for name, x in cases.items():
    device = np.asarray(ck._fingerprint_words(jnp.asarray(x)))
    host = ck._fingerprint_words_host(np.asarray(jnp.asarray(x)))
    np.testing.assert_array_equal(host, device, err_msg=name)
  x = jnp.asarray(cases["f32"])
  assert ck._on_host(x) and not ck._on_host(x.reshape(-1).repeat(8000))
  sharded = jax.device_put(jnp.tile(x, (8, 1)), NamedSharding(_mesh((8,), ("d",)), P("d")))
  assert ck._on_host(sharded)  # fully addressable: gathered to the host
  tree = {"small": x, "sharded": sharded,
          "big": jnp.arange(ck.HOST_FINGERPRINT_MAX_ELEMENTS + 3, dtype=jnp.float32)}
  got = ck.fingerprint_tree(tree)
  for key, leaf in (("['small']", x), ("['sharded']", sharded), ("['big']", tree["big"])):
    assert got[key]["fingerprint"] == ck.fingerprint(leaf), key  # device path throughout
  # 8-byte elements (only with x64, so in a process of its own): two words, low word first.
  code = ("import jax, jax.numpy as jnp, numpy as np; from lmjax import checkpoint as ck\n"
          "for x in (np.linspace(-3, 7, 12).reshape(3, 4), np.arange(-5, 6, dtype=np.int64)):\n"
          "  x = jnp.asarray(x); assert x.dtype.itemsize == 8\n"
          "  np.testing.assert_array_equal(ck._fingerprint_words_host(np.asarray(x)),\n"
          "                                np.asarray(ck._fingerprint_words(x)))\n"
          "print('ok')")
  env = dict(os.environ, JAX_ENABLE_X64="1", PYTHONPATH=str(pathlib.Path(__file__).parents[1]))
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.stdout.strip() == "ok", proc.stderr[-2000:]


# -- round trips and resharding -----------------------------------------------


def test_round_trip_sharded_async(tmp_path):
  state = _state(5)
  with ck.Checkpointer(tmp_path, ck.CheckpointConfig(every_steps=5)) as c:
    assert not c.save(3, state, {"x": 1})  # not due
    assert c.save(5, state, {"data_pos": [1, 2], "config": CONFIG})
    c.wait()
    assert c.latest_step() == 5
  with ck.Checkpointer(tmp_path) as c:
    got, extras = c.restore(abstract_state=_same_sharding_abstract(state))
  assert c.restored_step == 5
  assert extras == {"data_pos": [1, 2], "config": CONFIG}
  _assert_state_equal(got, state)
  for g, s in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    assert g.sharding.is_equivalent_to(s.sharding, g.ndim)


def test_restore_onto_other_meshes(tmp_path):
  state = _state(7)
  with ck.Checkpointer(tmp_path, SYNC) as c:
    c.save(7, state, {})
  mesh = _mesh((2, 4), ("data", "model"))
  targets = {
      "2x4": lambda x: NamedSharding(mesh, P("model", "data") if x.ndim == 2 else P()),
      "1dev": lambda x: SingleDeviceSharding(jax.devices()[3]),
  }
  for name, fn in targets.items():
    abstract = _abstract(state, fn)
    with ck.Checkpointer(tmp_path, SYNC) as c:
      got, _ = c.restore(abstract_state=abstract)
    _assert_state_equal(got, state)
    for g, a in zip(jax.tree.leaves(got), jax.tree.leaves(abstract)):
      assert g.sharding.is_equivalent_to(a.sharding, g.ndim), name


def test_keep_last_k_plus_final_and_intervals(tmp_path):
  cfg = ck.CheckpointConfig(every_steps=2, keep=2, async_save=False)
  small = {"w": jnp.zeros((2,))}
  with ck.Checkpointer(tmp_path, cfg) as c:
    saved = [s for s in range(1, 9) if c.save(s, small, {}, final=(s == 3))]
    assert saved == [2, 3, 4, 6, 8]
    assert c.all_steps() == [3, 6, 8]
  # The final marker survives a restart.
  with ck.Checkpointer(tmp_path, cfg) as c:
    for s in (10, 12):
      c.save(s, small, {})
    assert c.all_steps() == [3, 10, 12]
    assert not c.save(12, small, {}, force=True)  # never overwritten
    with pytest.raises(CheckpointError, match="newer step 12"):
      c.save(11, small, {}, force=True)
  timed = ck.CheckpointConfig(every_steps=None, every_seconds=1e-9, async_save=False)
  with ck.Checkpointer(tmp_path / "timed", timed) as c:
    assert c.save(1, small, {}) and c.save(2, small, {})


# -- fault injection -----------------------------------------------------------


def _largest_data_file(step_dir: pathlib.Path) -> pathlib.Path:
  # Top-level state/d/ holds the OCDBT data restore reads (see docs).
  files = [p for p in (step_dir / "state" / "d").iterdir() if p.is_file()]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(ckdir):
  f = _largest_data_file(ckdir / "2")
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])


def _flip_bit(ckdir):
  f = _largest_data_file(ckdir / "2")
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x04
  f.write_bytes(bytes(data))


def _partial(ckdir):
  # As if the array data never reached the disk: manifests but no data files.
  shutil.rmtree(ckdir / "2" / "state" / "d")


def _empty(ckdir):
  shutil.rmtree(ckdir / "2")
  (ckdir / "2").mkdir()


def _missing_meta(ckdir):
  shutil.rmtree(ckdir / "2" / "meta")


def _tampered_meta(ckdir):
  f = ckdir / "2" / "meta" / "metadata"
  meta = json.loads(f.read_text())
  meta["extras"]["data_pos"] = 999
  f.write_text(json.dumps(meta))


def _silent_swap(ckdir):
  # Internally consistent files holding step 1's numbers: only the
  # fingerprints can tell.
  shutil.rmtree(ckdir / "2" / "state")
  shutil.copytree(ckdir / "1" / "state", ckdir / "2" / "state")


# fault -> (injector, the reason lmjax must log). Truncation and bit flips in
# array files are caught when tensorstore reads them (OCDBT CRC-32C / sizes);
# a readable-but-wrong state only by the fingerprints.
FAULTS = {
    "truncated": (_truncate, "arrays unreadable"),
    "bitflip": (_flip_bit, "arrays unreadable"),
    "partial": (_partial, "arrays unreadable"),
    "empty": (_empty, "empty step directory"),
    "missing_meta": (_missing_meta, "item 'meta' is missing"),
    "tampered_meta": (_tampered_meta, "metadata checksum mismatch"),
    "silent_swap": (_silent_swap, "fingerprint mismatch"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_fault_falls_back_to_previous_good_step(tmp_path, fault, caplog):
  states = _two_steps(tmp_path)
  ckdir = tmp_path / "checkpoints"
  inject, reason = FAULTS[fault]
  inject(ckdir)
  caplog.set_level(logging.WARNING)
  with ck.Checkpointer(tmp_path, SYNC) as c:
    got, extras = c.restore(abstract_state=_same_sharding_abstract(states[1]))
    assert c.restored_step == 1 and extras["data_pos"] == 10
    _assert_state_equal(got, states[1])
    logged = [r.getMessage() for r in caplog.records]
    assert any("step 2" in m and "unusable" in m and reason in m for m in logged), logged
    # The bad step is kept for inspection but no longer counts as a step.
    assert (ckdir / "2.corrupt").is_dir() and c.latest_step() == 1
    assert c.save(2, states[2], {"data_pos": 20, "config": CONFIG})
    assert c.restore(abstract_state=_same_sharding_abstract(states[2]))[1]["data_pos"] == 20


def test_leftover_tmp_dir_is_never_restored(tmp_path, caplog):
  states = _two_steps(tmp_path)
  ckdir = tmp_path / "checkpoints"
  shutil.copytree(ckdir / "1", ckdir / "3.orbax-checkpoint-tmp")  # interrupted save
  caplog.set_level(logging.WARNING)
  with ck.Checkpointer(tmp_path, SYNC) as c:
    assert c.latest_step() == 2
    got, _ = c.restore(abstract_state=_same_sharding_abstract(states[2]))
  assert c.restored_step == 2
  _assert_state_equal(got, states[2])
  assert any("3.orbax-checkpoint-tmp" in r.getMessage() for r in caplog.records)
  assert (ckdir / "3.orbax-checkpoint-tmp").is_dir()  # reported, not deleted


def test_no_good_step_is_one_line_error_and_changes_nothing(tmp_path):
  states = _two_steps(tmp_path)
  ckdir = tmp_path / "checkpoints"
  _truncate(ckdir)
  _missing_meta_1 = ckdir / "1" / "meta"
  shutil.rmtree(_missing_meta_1)
  before = _dir_hash(ckdir)
  with ck.Checkpointer(tmp_path, SYNC) as c:
    with pytest.raises(CheckpointError, match="no usable checkpoint") as e:
      c.restore(abstract_state=_same_sharding_abstract(states[1]))
    with pytest.raises(CheckpointError, match="step 1 .* unusable"):
      c.restore(step=1, abstract_state=_same_sharding_abstract(states[1]))
  assert "\n" not in str(e.value)
  assert _dir_hash(ckdir) == before


def test_restore_with_accept_passes_over_rejected_steps_and_sets_them_aside(tmp_path):
  states = _two_steps(tmp_path)
  ckdir = tmp_path / "checkpoints"
  with ck.Checkpointer(tmp_path, SYNC) as c:
    got, extras = c.restore(abstract_state=_same_sharding_abstract(states[1]),
                            accept=lambda extras: extras["data_pos"] < 20)
    assert c.restored_step == 1 and extras["data_pos"] == 10
    _assert_state_equal(got, states[1])
    # Renamed, not deleted; step 2 can be saved again.
    assert (ckdir / "2.rejected").is_dir() and c.latest_step() == 1
    assert c.save(2, states[2], {"data_pos": 20, "config": CONFIG})
    assert c.all_steps() == [1, 2]
    # Rejecting every step sets them all aside and returns None: the caller starts afresh.
    assert c.restore(abstract_state=_same_sharding_abstract(states[1]),
                     accept=lambda extras: False) is None
    assert c.latest_step() is None
  assert sorted(p.name for p in ckdir.iterdir()) == ["1.rejected", "2.rejected", "2.rejected.1"]


def test_incompatible_config_is_refused_and_files_untouched(tmp_path):
  states = _two_steps(tmp_path)
  ckdir = tmp_path / "checkpoints"
  before = _dir_hash(ckdir)
  other = json.loads(json.dumps(CONFIG))
  other["model"]["d_model"] = 128
  other["train"]["steps"] = 500  # allowed to change
  with ck.Checkpointer(tmp_path, SYNC) as c:
    with pytest.raises(CheckpointError) as e:
      c.restore(abstract_state=_same_sharding_abstract(states[1]), current_config=other)
    msg = str(e.value)
    assert "\n" not in msg and "model.d_model 64 != 128" in msg and "train.steps" not in msg
    assert "different model" in msg and "--workdir" in msg
    with pytest.raises(CheckpointError, match="model.d_model"):
      c.save(3, states[2], {"config": other})
  assert _dir_hash(ckdir) == before
  # The allowed change alone is fine.
  other["model"]["d_model"] = 64
  with ck.Checkpointer(tmp_path, SYNC) as c:
    c.restore(abstract_state=_same_sharding_abstract(states[1]), current_config=other)
    assert c.restored_step == 2


def test_structure_mismatch_is_a_user_error(tmp_path):
  states = _two_steps(tmp_path)
  abstract = _same_sharding_abstract(states[2])
  abstract["params"]["w"] = jax.ShapeDtypeStruct((16, 4), jnp.float32,
                                                 sharding=abstract["params"]["w"].sharding)
  with ck.Checkpointer(tmp_path, SYNC) as c:
    with pytest.raises(CheckpointError, match=r"\['params'\]\['w'\]"):
      c.restore(abstract_state=abstract)
    with pytest.raises(CheckpointError, match="no committed checkpoint for step 9"):
      c.restore(step=9)


def test_check_compatible_and_config_validation(tmp_path):
  ck.check_compatible(CONFIG, {**CONFIG, "workdir": "/elsewhere",
                               "checkpoint": {"keep": 9}})
  with pytest.raises(CheckpointError,
                     match=r'model.n_layers 2 != "<missing>", optim.lr 0.001 != 0.01'):
    ck.check_compatible(CONFIG, {**CONFIG, "optim": {"lr": 1e-2}, "model": {"d_model": 64}})
  ck.check_compatible(CONFIG, {**CONFIG, "optim": {"lr": 1e-2}}, ["optim.*"])
  with pytest.raises(ConfigError, match="keep"):
    ck.CheckpointConfig(keep=0)
  with pytest.raises(ConfigError, match="every_seconds"):
    ck.CheckpointConfig(every_seconds=-1)
  with ck.Checkpointer(tmp_path, SYNC) as c:
    with pytest.raises(CheckpointError, match="JSON"):
      c.save(1, {"w": jnp.zeros(2)}, {"bad": object()}, force=True)
