"""SentencePiece trained offline on local text: train, save, load by path, round trip."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sentencepiece")

# pylint: disable=wrong-import-position
from lmjax.data import DataConfig, check_vocab, make_pipeline
from lmjax.data.tokenizer import SentencePieceTokenizer, train_sentencepiece
from lmjax.errors import ConfigError, DataError

WORDS = ["the", "cat", "sat", "on", "mat", "über", "naïve", "日本語", "tokens", "scaling"]


@pytest.fixture(scope="module")
def texts():
  rng = np.random.default_rng(0)
  return [" ".join(rng.choice(WORDS, 25)) for _ in range(200)]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_train_encode_decode_round_trip(texts, tmp_path, model_type):
  path = train_sentencepiece(texts, str(tmp_path / "run" / "spm"), vocab_size=320,
                             model_type=model_type)
  tok = SentencePieceTokenizer(path)
  assert (tok.eos_id, tok.pad_id) == (1, 2) and tok.vocab_size <= 320
  for s in ["the naïve cat sat on 日本語", "unseen ✓ ⌘ fall back to bytes", texts[3]]:
    ids = tok.encode(s)
    assert ids.dtype == np.int32 and tok.decode(ids) == s
  assert len(tok.encode(texts[0])) < len(texts[0].encode("utf-8"))  # it does compress


def test_text_pipeline_with_sentencepiece(texts, tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n\n".join(texts), encoding="utf-8")
  path = train_sentencepiece(texts, str(tmp_path / "spm"), vocab_size=320)
  cfg = DataConfig(kind="text", path=str(corpus), tokenizer="sentencepiece",
                   tokenizer_path=path)
  pipe = make_pipeline(cfg, seq_len=32, global_batch=2)
  batch = pipe.next()
  assert batch["targets"].max() < pipe.vocab_size
  assert pipe.bytes_per_token > 1.5  # exact bytes / targets over the split
  check_vocab(cfg, 384)
  with pytest.raises(ConfigError, match="model.vocab_size"):
    check_vocab(cfg, 128)


def test_missing_or_bad_model_file(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    SentencePieceTokenizer(str(tmp_path / "nope.model"))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(DataError, match="cannot be loaded"):
    SentencePieceTokenizer(str(bad))
  with pytest.raises(DataError, match="no text"):
    train_sentencepiece(["", ""], str(tmp_path / "x"))
