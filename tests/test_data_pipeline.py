"""The batch pipeline: determinism, resume, process sharding, packing, eval set, errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lmjax.data import (DataConfig, check_vocab, entropy_floor, eval_batches, make_pipeline,
                        padded_vocab_size)
from lmjax.data.pipeline import PackedStream
from lmjax.data.tokenizer import ByteTokenizer
from lmjax.errors import ConfigError, DataError

WORDS = ["alpha", "beta", "gamma", "delta", "ünïcödé", "日本", "x"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  docs = [" ".join(rng.choice(WORDS, rng.integers(1, 60))) for _ in range(120)]
  (root / "a.txt").write_text("\n\n".join(docs[:80]), encoding="utf-8")
  (root / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[80:]) + "\n",
                                encoding="utf-8")
  return str(root), docs


def _configs(corpus_path):
  return [DataConfig(), DataConfig(kind="text", path=corpus_path, segment_ids=True,
                                   validation_fraction=0.2)]


def _equal(a: dict, b: dict) -> bool:
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("which", [0, 1])
def test_batch_layout_and_shift(corpus, which):
  cfg = _configs(corpus[0])[which]
  pipe = make_pipeline(cfg, seq_len=32, global_batch=4)
  batch = pipe.next()
  assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (4, 32)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  assert batch["mask"].dtype == np.float32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  assert batch["targets"].max() < pipe.vocab_size
  assert check_vocab(cfg, padded_vocab_size(pipe.vocab_size)) == pipe.vocab_size


@pytest.mark.parametrize("which", [0, 1])
def test_deterministic_and_resumable_without_replay(corpus, which):
  cfg = _configs(corpus[0])[which]
  a = make_pipeline(cfg, seq_len=64, global_batch=8)
  first = [a.next() for _ in range(40)]
  b = make_pipeline(cfg, seq_len=64, global_batch=8)
  assert all(_equal(x, b.next()) for x in first)
  if which == 1:  # the run above crossed into the second epoch of the text corpus
    assert 8 * 40 > a.stream.windows_per_epoch

  state = json.loads(json.dumps(a.get_state()))  # must survive a JSON checkpoint
  after = [a.next() for _ in range(3)]
  c = make_pipeline(cfg, seq_len=64, global_batch=8)
  c.set_state(state)
  assert all(_equal(x, c.next()) for x in after)
  assert c.get_state()["step"] == 43

  other_seed = make_pipeline(DataConfig(**{**cfg.to_dict(), "seed": 1}), seq_len=64,
                             global_batch=8)
  assert not _equal(first[0], other_seed.next())


@pytest.mark.parametrize("which", [0, 1])
def test_processes_partition_the_global_batch(corpus, which):
  cfg = _configs(corpus[0])[which]
  single = make_pipeline(cfg, seq_len=16, global_batch=6)
  shards = [make_pipeline(cfg, seq_len=16, global_batch=6, process_index=p, process_count=2)
            for p in range(2)]
  for _ in range(4):
    whole = single.next()
    parts = [s.next() for s in shards]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  # A state saved on 2 processes resumes on 1 (rows are global).
  single.set_state(shards[0].get_state())
  np.testing.assert_array_equal(single.next()["inputs"][:3], shards[0].next()["inputs"])


def test_synthetic_blocks_serve_the_rows_of_each_step():
  # The synthetic pipeline samples several steps' rows per call; any access order must give
  # exactly the rows of that step, sampled alone.
  from lmjax.data import pipeline as pipeline_lib
  cfg = DataConfig()
  for process_index, process_count in ((0, 1), (1, 2)):
    pipe = make_pipeline(cfg, seq_len=16, global_batch=6, process_index=process_index,
                         process_count=process_count)
    per_block = pipeline_lib.SYNTHETIC_BLOCK_ROWS // pipe.local_batch
    for step in (5, per_block + 7, 0, per_block + 6, 3 * per_block, 4):
      rows = pipe.local_rows(step)
      seqs = pipe.language.sample(rows, 17, seed=cfg.seed, split="train")
      got = pipe.batch_at(step)
      np.testing.assert_array_equal(got["inputs"], seqs[:, :-1])
      np.testing.assert_array_equal(got["targets"], seqs[:, 1:])
      assert got["inputs"].flags.c_contiguous and got["mask"].shape == (len(rows), 16)


def test_packing_keeps_every_token():
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, 256, rng.integers(1, 40)).astype(np.int32) for _ in range(37)]
  for seq_len in (1, 7, 64, 5000):
    stream = PackedStream(docs, seq_len=seq_len, eos_id=256, pad_id=257, shuffle_seed=3)
    rows = np.arange(stream.windows_per_epoch)
    tokens, valid = stream.windows(rows, wrap=True)
    targets = tokens[:, 1:][valid[:, 1:]]
    # Every token after the leading EOS is a target exactly once, in stream order.
    np.testing.assert_array_equal(targets, stream.epoch_stream(0)[1:])
    assert (targets == 256).sum() == len(docs)
    pieces = np.split(targets, np.flatnonzero(targets == 256) + 1)[:-1]
    assert sorted(map(tuple, (p[:-1] for p in pieces))) == sorted(map(tuple, docs))
    assert np.all(tokens[~valid] == 257)
  # Epochs reshuffle documents but keep the same multiset of tokens.
  assert not np.array_equal(stream.epoch_stream(0), stream.epoch_stream(1))
  assert sorted(stream.epoch_stream(0)) == sorted(stream.epoch_stream(1))


def test_segment_ids_follow_documents(corpus):
  cfg = _configs(corpus[0])[1]
  batch = make_pipeline(cfg, seq_len=64, global_batch=4).next()
  eos = ByteTokenizer.eos_id
  for inp, seg, mask in zip(batch["inputs"], batch["segment_ids"], batch["mask"]):
    starts = np.flatnonzero(np.diff(seg) != 0) + 1
    assert np.all(inp[starts][seg[starts] > 0] == eos)  # a new segment starts at an EOS
    assert np.all(seg[mask > 0] >= 1)


def test_eval_set_fixed_and_independent_of_training_seed(corpus):
  for cfg in _configs(corpus[0]):
    a = eval_batches(cfg, seq_len=32, global_batch=4, num_batches=3)
    b = eval_batches(DataConfig(**{**cfg.to_dict(), "seed": 99}), seq_len=32, global_batch=4,
                     num_batches=3)
    assert len(a) == 3 and all(_equal(x, y) for x, y in zip(a, b))
    train = make_pipeline(cfg, seq_len=32, global_batch=4).next()
    assert not _equal(a[0], train)
    halves = [eval_batches(cfg, seq_len=32, global_batch=4, num_batches=3, process_index=p,
                           process_count=2) for p in range(2)]
    for k in range(3):
      np.testing.assert_array_equal(
          np.concatenate([halves[0][k]["targets"], halves[1][k]["targets"]]), a[k]["targets"])


def test_text_eval_pads_instead_of_repeating(corpus):
  cfg = _configs(corpus[0])[1]
  batches = eval_batches(cfg, seq_len=64, global_batch=8, num_batches=20)
  mask = np.concatenate([b["mask"] for b in batches])
  pipe = make_pipeline(cfg, seq_len=64, global_batch=8, split="validation")
  assert mask.sum() == pipe.stream.num_targets  # each validation token scored exactly once
  assert mask[-1].sum() == 0
  # Whole split covered, so the split's ratio is exact for these batches.
  targets = np.concatenate([b["targets"] for b in batches])
  assert batches.bytes_per_token == pytest.approx(((targets < 256) & (mask > 0)).sum() / mask.sum())


def test_bytes_per_token_is_exact_for_bytes(corpus):
  cfg = _configs(corpus[0])[1]
  pipe = make_pipeline(cfg, seq_len=32, global_batch=2)
  n_docs = int((pipe.stream.epoch_stream(0) == ByteTokenizer.eos_id).sum()) - 1
  assert pipe.bytes_per_token == pytest.approx(pipe.num_bytes / (pipe.num_bytes + n_docs))
  assert make_pipeline(DataConfig(), seq_len=8, global_batch=1).bytes_per_token is None


def test_entropy_floor():
  cfg = DataConfig(synthetic_preset="noise", synthetic_vocab_size=512)
  assert entropy_floor(cfg, 128) == pytest.approx(np.log(512))
  assert entropy_floor(DataConfig(), 64) == pytest.approx(DataConfig().language().entropy_rate(64))
  assert entropy_floor(DataConfig(kind="text", path="x"), 64) is None


def test_state_mismatch_and_layout_errors(corpus):
  cfg = DataConfig()
  state = make_pipeline(cfg, seq_len=16, global_batch=8).get_state()
  for kwargs in (dict(seq_len=32, global_batch=8), dict(seq_len=16, global_batch=4)):
    with pytest.raises(DataError, match="does not match"):
      make_pipeline(cfg, **kwargs).set_state(state)
  with pytest.raises(DataError, match="malformed"):
    make_pipeline(cfg, seq_len=16, global_batch=8).set_state({"step": -1})
  bad = [dict(seq_len=0, global_batch=8), dict(seq_len=8, global_batch=5, process_count=2),
         dict(seq_len=8, global_batch=4, process_index=2, process_count=2),
         dict(seq_len=8, global_batch=4, split="test")]
  for kwargs in bad:
    with pytest.raises(ConfigError) as e:
      make_pipeline(cfg, **kwargs)
    assert "\n" not in str(e.value)


def test_check_vocab_names_the_fix():
  with pytest.raises(ConfigError, match=r"model.vocab_size >= 258 \(padded: 384\)"):
    check_vocab(DataConfig(kind="text", path="x"), 256)
  with pytest.raises(ConfigError, match="512"):
    check_vocab(DataConfig(synthetic_vocab_size=512), 256)
  assert check_vocab(DataConfig(), 256) == 256


@pytest.mark.parametrize("kwargs", [
    dict(kind="csv"), dict(kind="text"), dict(kind="tfds"), dict(tokenizer="gpt2"),
    dict(kind="text", path="x", tokenizer="sentencepiece"), dict(synthetic_preset="medium"),
    dict(synthetic_structure=2.0), dict(synthetic_lags=[0]), dict(validation_fraction=1.0),
    dict(eval_batches=-1), dict(seed=1.5), dict(text_docs="sentence"), dict(text_field=""),
    dict(synthetic_num_classes=1000),
])
def test_config_errors_are_one_line(kwargs):
  with pytest.raises(ConfigError) as e:
    DataConfig(**kwargs)
  assert "\n" not in str(e.value) and "data." in str(e.value)


def test_config_dict_round_trip():
  cfg = DataConfig(synthetic_lags=[2, 8], synthetic_structure=0.6)
  assert cfg.synthetic_lags == (2, 8)
  assert DataConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  with pytest.raises(ConfigError, match="unknown data config field"):
    DataConfig.from_dict({"sed": 1})
