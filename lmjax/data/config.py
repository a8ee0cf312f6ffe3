"""DataConfig: what data a run trains and evaluates on. Validated on construction."""
from __future__ import annotations

import dataclasses

from lmjax.data import synthetic
from lmjax.data.text import DOC_UNITS
from lmjax.data.tokenizer import TOKENIZERS
from lmjax.errors import ConfigError

KINDS = ("synthetic", "text", "tfds")


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Every field has a default; the defaults give the embedded synthetic language.

  Seeds: `seed` orders the training data only. The evaluation set depends on
  `eval_seed` (synthetic) or on `split_seed`/`validation_fraction` (text), never
  on `seed`, so runs that differ only in seed evaluate on identical data.
  """
  kind: str = "synthetic"             # "synthetic" | "text" | "tfds"
  path: str = ""                      # text: file/dir/glob; tfds: dataset name, e.g. "lm1b"
  tokenizer: str = "byte"             # "byte" | "sentencepiece" (text and tfds only)
  tokenizer_path: str = ""            # sentencepiece: the .model file
  seed: int = 0                       # training order
  segment_ids: bool = False           # also emit segment_ids (packed documents; 0 = padding)

  # Synthetic language (kind="synthetic"); see docs/data.md for the floors.
  synthetic_preset: str = "default"   # noise | hard | default | easy | determined
  synthetic_structure: float | None = None  # 0 = pure noise .. 1 = determined; overrides preset
  synthetic_vocab_size: int = synthetic.DEFAULT_VOCAB_SIZE
  synthetic_num_classes: int = synthetic.DEFAULT_NUM_CLASSES
  synthetic_lags: tuple[int, ...] = synthetic.DEFAULT_LAGS
  synthetic_language_seed: int = 0    # which language; the same for train and eval

  # Local text (kind="text").
  text_field: str = "text"            # .jsonl field holding the document
  text_docs: str = "paragraph"        # .txt documents: paragraph | line | file
  validation_fraction: float = 0.05   # share of documents held out (by content hash)
  split_seed: int = 0                 # keys that hash; changes which documents are held out

  # TFDS (kind="tfds"): a prepared dataset read without TensorFlow.
  tfds_data_dir: str = ""             # local dir or gs:// bucket holding the prepared dataset
  tfds_train_split: str = "train"
  tfds_eval_split: str = "validation"
  tfds_text_key: str = "text"         # feature holding the text

  # Evaluation set.
  eval_batches: int = 8               # default number of global eval batches
  eval_seed: int = 1234               # synthetic eval stream (independent of `seed`)

  def __post_init__(self):
    def need(cond, message):
      if not cond:
        raise ConfigError(message)

    need(self.kind in KINDS, f"data.kind={self.kind!r} is not a known option; choose one of "
         f"{', '.join(map(repr, KINDS))}.")
    need(self.tokenizer in TOKENIZERS, f"data.tokenizer={self.tokenizer!r} is not a known option; "
         f"choose one of {', '.join(map(repr, TOKENIZERS))}.")
    for name in ("seed", "split_seed", "eval_seed", "synthetic_language_seed"):
      need(_is_int(getattr(self, name)), f"data.{name}={getattr(self, name)!r} is invalid; use an "
           "integer.")
    need(_is_int(self.eval_batches) and self.eval_batches >= 0,
         f"data.eval_batches={self.eval_batches!r} is invalid; use an integer >= 0.")
    need(isinstance(self.segment_ids, bool),
         f"data.segment_ids={self.segment_ids!r} is invalid; use true or false.")
    if self.kind in ("text", "tfds"):
      need(isinstance(self.path, str) and self.path,
           f"data.kind={self.kind!r} needs data.path (" +
           ("a .txt/.jsonl file, directory or glob" if self.kind == "text" else
            "a TFDS dataset name such as 'lm1b'") + ").")
    if self.tokenizer == "sentencepiece" and self.kind != "synthetic":
      need(self.tokenizer_path, "data.tokenizer='sentencepiece' needs data.tokenizer_path (a "
           ".model file; train one with lmjax.data.tokenizer.train_sentencepiece).")

    # Synthetic knobs are validated even when unused: a typo should not wait
    # until someone switches kind.
    need(self.synthetic_preset in synthetic.PRESETS,
         f"data.synthetic_preset={self.synthetic_preset!r} is not a known option; choose one of "
         f"{', '.join(map(repr, synthetic.PRESETS))}.")
    s = self.synthetic_structure
    need(s is None or (_is_number(s) and 0.0 <= s <= 1.0),
         f"data.synthetic_structure={s!r} is invalid; use a number in [0, 1] or leave it unset "
         "to use the preset.")
    v, c = self.synthetic_vocab_size, self.synthetic_num_classes
    need(_is_int(v) and 2 <= v <= 1 << 20,
         f"data.synthetic_vocab_size={v!r} is invalid; use an integer in [2, 1048576].")
    need(_is_int(c) and 1 <= c <= v,
         f"data.synthetic_num_classes={c!r} is invalid; use an integer in "
         "[1, synthetic_vocab_size].")
    lags = self.synthetic_lags
    need(isinstance(lags, (tuple, list)) and lags and all(_is_int(l) and l >= 1 for l in lags),
         f"data.synthetic_lags={lags!r} is invalid; use a non-empty list of positive integers "
         "such as [1, 4, 16].")
    object.__setattr__(self, "synthetic_lags", tuple(lags))

    need(self.text_docs in DOC_UNITS, f"data.text_docs={self.text_docs!r} is not a known option; "
         f"choose one of {', '.join(map(repr, DOC_UNITS))}.")
    need(isinstance(self.text_field, str) and self.text_field,
         "data.text_field is empty; set it to the .jsonl field that holds the text.")
    f = self.validation_fraction
    need(_is_number(f) and 0.0 <= f < 1.0,
         f"data.validation_fraction={f!r} is invalid; use a number in [0, 1).")

  def language(self) -> synthetic.SyntheticLanguage:
    """The synthetic language this config names (kind='synthetic')."""
    return synthetic.language_for(self.synthetic_preset, structure=self.synthetic_structure,
                                  vocab_size=self.synthetic_vocab_size,
                                  num_classes=self.synthetic_num_classes,
                                  lags=self.synthetic_lags,
                                  language_seed=self.synthetic_language_seed)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["synthetic_lags"] = list(self.synthetic_lags)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "DataConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f"unknown data config field(s) {', '.join(unknown)}; known fields are "
                        f"{', '.join(sorted(known))}.")
    return cls(**d)
