"""Tokenizers: byte-level (default, exact bits-per-byte) and SentencePiece.

Both expose the same small interface: `encode(str) -> np.ndarray[int32]`,
`decode(ids) -> str`, `vocab_size`, `eos_id`, `pad_id`, and `bytes_per_token`
(exact for bytes; None where it depends on the text). SentencePiece is imported
only when used, so the byte tokenizer works without it.
"""
from __future__ import annotations

import os
from typing import Iterable, Protocol, Sequence

import numpy as np

from lmjax.errors import ConfigError, DataError

TOKENIZERS = ("byte", "sentencepiece")


def padded_vocab_size(n: int, multiple: int = 128) -> int:
  """n rounded up to a multiple (128 matches TPU MXU tiles and lane widths)."""
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    raise ConfigError(f"vocab size {n!r} is invalid; it must be a positive integer.")
  if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
    raise ConfigError(f"vocab multiple {multiple!r} is invalid; it must be a positive integer.")
  return -(-n // multiple) * multiple


class Tokenizer(Protocol):
  vocab_size: int          # ids are in [0, vocab_size)
  eos_id: int
  pad_id: int
  bytes_per_token: float | None

  def encode(self, text: str) -> np.ndarray: ...
  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
  """ids 0..255 are the UTF-8 bytes; 256 = EOS, 257 = PAD.

  Every non-special token is exactly one byte, so bits-per-byte is
  loss / ln 2 per byte token, with no estimate involved.
  """
  eos_id = 256
  pad_id = 257
  vocab_size = 258
  bytes_per_token = 1.0
  name = "byte"

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_bytes(self, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")

  def token_bytes(self, ids: np.ndarray) -> np.ndarray:
    """UTF-8 bytes each id stands for (0 for EOS/PAD)."""
    return (np.asarray(ids) < 256).astype(np.int64)


class SentencePieceTokenizer:
  """A trained SentencePiece model loaded from `path` (a .model file)."""
  name = "sentencepiece"
  bytes_per_token = None  # varies with the text; the pipeline measures it on its split

  def __init__(self, path: str):
    spm = _import_sentencepiece()
    if not path:
      raise ConfigError("tokenizer='sentencepiece' needs tokenizer_path; set it to a .model file "
                        "(train one with lmjax.data.tokenizer.train_sentencepiece).")
    if not os.path.isfile(path):
      raise DataError(f"SentencePiece model {path!r} does not exist; train one with "
                      "lmjax.data.tokenizer.train_sentencepiece or fix tokenizer_path.")
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise DataError(f"SentencePiece model {path!r} cannot be loaded ({e}); retrain it or fix "
                      "tokenizer_path.") from None
    self.eos_id = int(self._sp.eos_id())
    self.pad_id = int(self._sp.pad_id())
    if self.eos_id < 0 or self.pad_id < 0:
      raise DataError(f"SentencePiece model {path!r} has no EOS or PAD id; train it with "
                      "lmjax.data.tokenizer.train_sentencepiece, which reserves both.")
    self.vocab_size = int(self._sp.GetPieceSize())

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.EncodeAsIds(text), dtype=np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in (self.eos_id, self.pad_id)]
    return self._sp.DecodeIds(ids)


def _import_sentencepiece():
  try:
    import sentencepiece  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError("tokenizer='sentencepiece' needs the sentencepiece package; "
                      "run `pip install sentencepiece`.") from None
  return sentencepiece


def train_sentencepiece(texts: Iterable[str], model_prefix: str, *, vocab_size: int = 1024,
                        model_type: str = "bpe", character_coverage: float = 1.0,
                        byte_fallback: bool = True, num_threads: int = 1,
                        max_sentence_length: int = 1 << 16,
                        seed_sentencepiece_size: int = 100000) -> str:
  """Trains a SentencePiece model offline on `texts`; returns the .model path.

  EOS=1 and PAD=2 are reserved (UNK=0, no BOS) so packing can use them, and byte
  fallback is on by default so no text ever maps to UNK. Save the returned
  file with the run: the model ids mean nothing without it.
  """
  spm = _import_sentencepiece()
  if model_type not in ("bpe", "unigram", "char", "word"):
    raise ConfigError(f"model_type={model_type!r} is not a SentencePiece model type; "
                      "choose 'bpe', 'unigram', 'char' or 'word'.")
  texts = [t for t in texts if t]
  if not texts:
    raise DataError("train_sentencepiece got no text; pass at least one non-empty document.")
  directory = os.path.dirname(os.path.abspath(model_prefix))
  os.makedirs(directory, exist_ok=True)
  try:
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_prefix=model_prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        byte_fallback=byte_fallback, unk_id=0, eos_id=1, pad_id=2, bos_id=-1,
        num_threads=num_threads, max_sentence_length=max_sentence_length,
        seed_sentencepiece_size=seed_sentencepiece_size, minloglevel=2,
        hard_vocab_limit=False)
  except RuntimeError as e:
    raise DataError(f"SentencePiece training failed ({' '.join(str(e).split())}); "
                    "use more text or a smaller vocab_size.") from None
  return model_prefix + ".model"


def make_tokenizer(kind: str = "byte", path: str = "") -> ByteTokenizer | SentencePieceTokenizer:
  if kind == "byte":
    return ByteTokenizer()
  if kind == "sentencepiece":
    return SentencePieceTokenizer(path)
  raise ConfigError(f"tokenizer={kind!r} is not a known option; choose one of "
                    f"{', '.join(map(repr, TOKENIZERS))}.")
