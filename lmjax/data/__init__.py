"""The data layer: synthetic language, local text, TFDS, tokenizers and the batch pipeline.

Public entry points (see docs/data.md):
  DataConfig, make_pipeline, eval_batches, entropy_floor, check_vocab,
  SyntheticLanguage, ByteTokenizer, padded_vocab_size.
TFDS and SentencePiece support is imported only when a config asks for it.
"""
from __future__ import annotations

from lmjax.data.config import DataConfig
from lmjax.data.pipeline import (Pipeline, check_vocab, data_vocab_size, entropy_floor,
                                 eval_batches, make_pipeline)
from lmjax.data.synthetic import PRESETS as SYNTHETIC_PRESETS
from lmjax.data.synthetic import SyntheticLanguage
from lmjax.data.tokenizer import ByteTokenizer, padded_vocab_size

__all__ = [
    "ByteTokenizer", "DataConfig", "Pipeline", "SYNTHETIC_PRESETS", "SyntheticLanguage",
    "check_vocab", "data_vocab_size", "entropy_floor", "eval_batches", "make_pipeline",
    "padded_vocab_size",
]
