"""Local text sources, the document split, bad inputs, and the byte tokenizer."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lmjax.data import DataConfig, eval_batches, make_pipeline
from lmjax.data import text as text_lib
from lmjax.data.tokenizer import ByteTokenizer, make_tokenizer, padded_vocab_size
from lmjax.errors import ConfigError, DataError


def _write(path, content: str | bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(content.encode("utf-8") if isinstance(content, str) else content)
  return str(path)


def test_sources_file_directory_glob_and_jsonl(tmp_path):
  _write(tmp_path / "d/one.txt", "first para\nstill first\n\n  \nsecond para\n")
  _write(tmp_path / "d/sub/two.jsonl", json.dumps({"body": "from json"}) + "\n\n" +
         json.dumps({"body": "more"}) + "\n")
  _write(tmp_path / "d/ignored.csv", "a,b\n")
  assert text_lib.read_documents(str(tmp_path / "d/one.txt")) == ["first para\nstill first",
                                                                  "second para"]
  assert text_lib.read_documents(str(tmp_path / "d/one.txt"), docs="line") == [
      "first para", "still first", "second para"]
  assert len(text_lib.read_documents(str(tmp_path / "d/one.txt"), docs="file")) == 1
  docs = text_lib.read_documents(str(tmp_path / "d"), text_field="body")
  assert docs == ["first para\nstill first", "second para", "from json", "more"]
  assert text_lib.read_documents(str(tmp_path / "d/**/*.jsonl"), text_field="body") == [
      "from json", "more"]


def test_split_is_deterministic_by_content_and_seed():
  docs = [f"document number {i}" for i in range(400)]
  val = text_lib.split_documents(docs, "validation", validation_fraction=0.25, split_seed=0)
  train = text_lib.split_documents(docs, "train", validation_fraction=0.25, split_seed=0)
  assert sorted(val + train) == sorted(docs) and not set(val) & set(train)
  assert 60 < len(val) < 140
  # Same membership regardless of order; a different split_seed moves documents.
  assert set(text_lib.split_documents(docs[::-1], "validation", validation_fraction=0.25,
                                      split_seed=0)) == set(val)
  assert set(text_lib.split_documents(docs, "validation", validation_fraction=0.25,
                                      split_seed=1)) != set(val)
  # Tiny corpora still get one document on each side.
  two = ["a", "b"]
  assert len(text_lib.split_documents(two, "validation", validation_fraction=0.01,
                                      split_seed=0)) == 1
  assert len(text_lib.split_documents(two, "train", validation_fraction=0.99, split_seed=0)) == 1


def test_pipeline_split_does_not_depend_on_training_seed(tmp_path):
  path = _write(tmp_path / "c.txt", "\n\n".join(f"doc {i} " * 5 for i in range(50)))
  a = DataConfig(kind="text", path=path, validation_fraction=0.3, seed=0)
  b = DataConfig(kind="text", path=path, validation_fraction=0.3, seed=5)
  ea = eval_batches(a, seq_len=16, global_batch=2, num_batches=2)
  eb = eval_batches(b, seq_len=16, global_batch=2, num_batches=2)
  assert all(np.array_equal(x["targets"], y["targets"]) for x, y in zip(ea, eb))


def _message(fn, error=DataError) -> str:
  with pytest.raises(error) as e:
    fn()
  message = str(e.value)
  assert "\n" not in message
  return message


def test_bad_inputs_raise_one_line_data_errors(tmp_path):
  empty = _write(tmp_path / "empty.txt", "")
  blank = _write(tmp_path / "blank.txt", "  \n\n ")
  bad_utf8 = _write(tmp_path / "bad.txt", b"good text\xff\xfe more")
  bad_json = _write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": oops}\n')
  no_field = _write(tmp_path / "nofield.jsonl", '{"body": "ok"}\n')
  bad_utf8_jsonl = _write(tmp_path / "badu.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n')
  os.makedirs(tmp_path / "nothing")
  _write(tmp_path / "nothing/readme.md", "not text data")

  assert "empty.txt is empty" in _message(lambda: text_lib.read_documents(empty))
  assert "blank.txt is empty" in _message(lambda: text_lib.read_documents(blank))
  assert "byte offset 9" in _message(lambda: text_lib.read_documents(bad_utf8))
  assert "badu.jsonl is not valid UTF-8 at byte offset 25" in _message(
      lambda: text_lib.read_documents(bad_utf8_jsonl))
  assert "bad.jsonl:2 is not valid JSON" in _message(lambda: text_lib.read_documents(bad_json))
  assert "no 'text' field" in _message(lambda: text_lib.read_documents(no_field))
  assert "contains no .txt or .jsonl" in _message(
      lambda: text_lib.read_documents(str(tmp_path / "nothing")))
  assert "does not exist" in _message(lambda: text_lib.read_documents(str(tmp_path / "missing")))
  assert "matches no files" in _message(lambda: text_lib.read_documents(str(tmp_path / "*.zip")))
  # Through the pipeline, too, and with an empty validation split.
  assert "does not exist" in _message(lambda: make_pipeline(
      DataConfig(kind="text", path=str(tmp_path / "missing")), seq_len=8, global_batch=1))
  one = _write(tmp_path / "one/x.txt", "only one document")
  assert "validation split" in _message(lambda: eval_batches(
      DataConfig(kind="text", path=one), seq_len=8, global_batch=1, num_batches=1))
  assert "validation_fraction" in _message(
      lambda: text_lib.split_documents(["a"], "train", validation_fraction=1.5, split_seed=0),
      ConfigError)


def test_byte_tokenizer_round_trip_and_padding():
  tok = ByteTokenizer()
  text = "héllo, wörld ✓ 日本"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
  assert tok.decode(np.concatenate([ids, [tok.eos_id, tok.pad_id]])) == text
  assert (tok.eos_id, tok.pad_id, tok.vocab_size, tok.bytes_per_token) == (256, 257, 258, 1.0)
  assert [padded_vocab_size(n) for n in (1, 128, 129, 258)] == [128, 128, 256, 384]
  assert padded_vocab_size(258, multiple=64) == 320
  with pytest.raises(ConfigError):
    padded_vocab_size(0)
  with pytest.raises(ConfigError, match="not a known option"):
    make_tokenizer("gpt2")
