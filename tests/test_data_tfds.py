"""TFDS array_record round trip and the grain-backed pipeline, with TensorFlow absent."""
from __future__ import annotations

import collections
import importlib.util
import json
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")

# pylint: disable=wrong-import-position
from lmjax.data import DataConfig, eval_batches, make_pipeline
from lmjax.data import text as text_lib
from lmjax.data import tfds_source
from lmjax.errors import DataError

EOS = 256


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  docs = [f"doc {i}: " + "wörd " * (i % 23) for i in range(200)]
  (root / "src").mkdir()
  (root / "src" / "corpus.txt").write_text("\n\n".join(docs), encoding="utf-8")
  name = tfds_source.build_local_text_dataset(str(root / "src"), str(root / "data"),
                                              config_name="toy", validation_fraction=0.2)
  return name, str(root / "data"), docs


def _cfg(prepared, **kwargs):
  name, data_dir, _ = prepared
  return DataConfig(kind="tfds", path=name, tfds_data_dir=data_dir, **kwargs)


def test_tensorflow_is_never_imported(prepared):
  assert "tensorflow" not in sys.modules
  if importlib.util.find_spec("tensorflow") is None:
    with pytest.raises(ImportError):
      import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import


def test_array_record_round_trip(prepared):
  name, data_dir, docs = prepared
  assert "tensorflow" not in sys.modules
  source = tfds.data_source(name, data_dir=data_dir, download=False, try_gcs=False)
  assert set(source) == {"train", "validation"}
  got = {s: sorted(r["text"].decode("utf-8") for r in source[s]) for s in source}
  for split in ("train", "validation"):
    want = text_lib.split_documents(docs, split, validation_fraction=0.2, split_seed=0)
    assert got[split] == sorted(want)
  assert "tensorflow" not in sys.modules


def test_eval_scores_every_validation_token_once(prepared):
  _, _, docs = prepared
  cfg = _cfg(prepared)
  batches = eval_batches(cfg, seq_len=32, global_batch=4, num_batches=80)
  rows = collections.defaultdict(list)
  for batch in batches:
    for r in range(4):
      rows[r].append(batch["targets"][r][batch["mask"][r] > 0])
  seen = []
  for r in range(4):
    stream = np.concatenate(rows[r])
    # Row streams are EOS d EOS d ...: the targets are the documents each with the next EOS.
    pieces = np.split(stream, np.flatnonzero(stream == EOS))
    seen += [bytes(p[p != EOS].astype(np.uint8)).decode("utf-8") for p in pieces]
  want = text_lib.split_documents(docs, "validation", validation_fraction=0.2, split_seed=0)
  assert sorted(seen) == sorted(want)
  assert batches[-1]["mask"].sum() == 0  # exhausted: padding, not repetition


def test_resume_and_process_union(prepared):
  cfg = _cfg(prepared, segment_ids=True)
  a = make_pipeline(cfg, seq_len=32, global_batch=4)
  for _ in range(5):
    a.next()
  state = json.loads(json.dumps(a.get_state()))
  after = [a.next() for _ in range(130)]
  # Long enough that every row wrapped into the next, reshuffled, epoch.
  assert min(k for k, _ in a.get_state()["rows"].values()) * 4 > a.num_documents
  b = make_pipeline(cfg, seq_len=32, global_batch=4)
  b.set_state(state)
  for x in after:
    y = b.next()
    assert all(np.array_equal(x[k], y[k]) for k in x)

  shards = [make_pipeline(cfg, seq_len=32, global_batch=4, process_index=p, process_count=2)
            for p in range(2)]
  whole = make_pipeline(cfg, seq_len=32, global_batch=4)
  for _ in range(3):
    w, parts = whole.next(), [s.next() for s in shards]
    for key in w:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), w[key])
  # Per-process states merge into one that a single process can resume from.
  merged = tfds_source.merge_states([s.get_state() for s in shards])
  whole.set_state(merged)
  np.testing.assert_array_equal(whole.next()["inputs"][2:], shards[1].next()["inputs"])
  with pytest.raises(DataError, match="another process layout"):
    shards[0].set_state(shards[1].get_state())


def test_seed_changes_order_not_content(prepared):
  one = make_pipeline(_cfg(prepared), seq_len=64, global_batch=2).next()
  two = make_pipeline(_cfg(prepared, seed=3), seq_len=64, global_batch=2).next()
  assert not np.array_equal(one["inputs"], two["inputs"])


def test_unprepared_datasets_say_how_to_prepare(prepared, tmp_path):
  _, data_dir, _ = prepared
  for cfg, match in [
      (DataConfig(kind="tfds", path="lm1b", tfds_data_dir=data_dir), "tfds build lm1b"),
      (DataConfig(kind="tfds", path="lm1b", tfds_data_dir=str(tmp_path / "none")),
       "does not exist"),
      (DataConfig(kind="tfds", path="lmjax_local_text/other", tfds_data_dir=data_dir),
       "build_local_text_dataset"),
      (_cfg(prepared, tfds_train_split="test"), "has no split 'test'"),
      (_cfg(prepared, tfds_text_key="body"), "tfds_text_key"),
  ]:
    with pytest.raises(DataError, match=match) as e:
      make_pipeline(cfg, seq_len=8, global_batch=1).next()
    assert "\n" not in str(e.value)
  assert "tensorflow" not in sys.modules
