"""TensorFlow Datasets without TensorFlow: array_record datasets read through grain.

Two jobs, both TensorFlow-free (tfds writes and reads array_record with numpy):

* `build_local_text_dataset` turns local text (the same sources and document
  split as kind="text") into a prepared TFDS dataset in array_record format.
* `make_tfds_pipeline` reads any prepared dataset (`tfds.data_source`, local
  directory or gs://) and packs it into batches. Nothing is ever downloaded or
  generated at read time: an unprepared dataset is a one-line DataError saying
  how to prepare it.

Reading: grain shuffles documents (a fresh permutation per epoch, seeded by
cfg.seed) and each global batch row r reads its own document stream, the
documents at shuffled positions r, r+B, r+2B, ... Process p therefore reads only
the documents of its rows (its share), and the union of the processes' batches
is the single-process batch. Each row packs its stream as EOS doc EOS doc ...
into windows of seq_len+1 tokens overlapping by one, so every token is a target
once. The state is, per row, (document number, offset) - small and exact.

This module imports tensorflow_datasets and grain at import time; import it
only when a config asks for kind="tfds" (lmjax.data.pipeline does so lazily).
"""
from __future__ import annotations

import os
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from lmjax.data import text as text_lib
from lmjax.data.config import DataConfig
from lmjax.data.pipeline import Pipeline
from lmjax.data.tokenizer import ByteTokenizer, make_tokenizer
from lmjax.errors import DataError

LOCAL_TEXT_NAME = "lmjax_local_text"
_SPLIT_NAMES = {"train": "tfds_train_split", "validation": "tfds_eval_split"}


class LmjaxLocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local text as a TFDS dataset; configs name corpora, kwargs say where they are.

  Not registered with tfds, so reading a prepared copy never needs this class:
  `tfds.data_source("lmjax_local_text/<config>", data_dir=...)` reads the files.
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Local text documents with a content-hash train/validation split."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds looks next to the builder's code for checksums; there are none to
    # find, and its lookup needs the importlib_resources backport otherwise.
    return None

  def __init__(self, *, source_path: str = "", text_field: str = "text",
               text_docs: str = "paragraph", validation_fraction: float = 0.05,
               split_seed: int = 0, **kwargs):
    self._source = dict(path=source_path, text_field=text_field, docs=text_docs)
    self._split = dict(validation_fraction=validation_fraction, split_seed=split_seed)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Local text documents prepared by lmjax.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    docs = text_lib.read_documents(self._source["path"], text_field=self._source["text_field"],
                                   docs=self._source["docs"])
    is_val = text_lib.split_assignment(docs, **self._split)
    return {
        "train": self._generate_examples([d for d, v in zip(docs, is_val) if not v]),
        "validation": self._generate_examples([d for d, v in zip(docs, is_val) if v]),
    }

  def _generate_examples(self, docs):
    for i, doc in enumerate(docs):
      yield i, {"text": doc}


def build_local_text_dataset(path: str, data_dir: str, *, config_name: str = "default",
                             text_field: str = "text", text_docs: str = "paragraph",
                             validation_fraction: float = 0.05, split_seed: int = 0) -> str:
  """Prepares local text as array_record under data_dir; returns the TFDS name to read.

  Use the result as DataConfig(kind="tfds", path=<name>, tfds_data_dir=data_dir).
  Rebuilding an existing config is a no-op (tfds reuses prepared data).
  """
  builder = LmjaxLocalText(
      source_path=path, text_field=text_field, text_docs=text_docs,
      validation_fraction=validation_fraction, split_seed=split_seed,
      config=tfds.core.BuilderConfig(name=config_name, version=LmjaxLocalText.VERSION),
      data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return f"{LOCAL_TEXT_NAME}/{config_name}"


def _prepare_hint(name: str, data_dir: str) -> str:
  where = data_dir or "~/tensorflow_datasets"
  if name.split("/")[0] == LOCAL_TEXT_NAME:
    return (f"prepare it with lmjax.data.tfds_source.build_local_text_dataset(<text path>, "
            f"{where!r})")
  return (f"prepare it once where TensorFlow and the network are available with `tfds build "
          f"{name} --data_dir={where} --file_format=array_record`, then set data.tfds_data_dir")


def _version_key(name: str) -> tuple[int, ...] | None:
  parts = name.split(".")
  if len(parts) != 3 or not all(p.isdigit() for p in parts):
    return None
  return tuple(int(p) for p in parts)


def find_prepared_dir(name: str, data_dir: str) -> Any:
  """data_dir/name[/config]/version holding dataset_info.json (latest version if unnamed)."""
  from etils import epath  # pylint: disable=import-outside-toplevel

  root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
  base, _, version = name.partition(":")
  directory = epath.Path(root).joinpath(*base.split("/"))
  if version:
    candidates = [directory / version]
  else:
    found = [p for p in directory.iterdir() if _version_key(p.name)] if directory.is_dir() else []
    candidates = sorted(found, key=lambda p: _version_key(p.name), reverse=True)
  for candidate in candidates:
    if (candidate / "dataset_info.json").exists():
      return candidate
  raise DataError(f"TFDS dataset {name!r} is not prepared in {root} (no {directory}/<version>/"
                  f"dataset_info.json); {_prepare_hint(name, data_dir)}.")


def open_source(name: str, data_dir: str, split: str) -> Any:
  """A random-access source of a prepared split. Reads files only: never downloads,
  never generates, and never needs the dataset's builder code."""
  if not name:
    raise DataError("data.path is empty; set it to a prepared TFDS dataset name such as 'lm1b'.")
  if data_dir and "://" not in data_dir and not os.path.isdir(data_dir):
    raise DataError(f"data.tfds_data_dir {data_dir!r} does not exist; "
                    f"{_prepare_hint(name, data_dir)}.")
  builder = tfds.builder_from_directory(find_prepared_dir(name, data_dir))
  fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if fmt not in ("array_record", "parquet"):
    raise DataError(f"TFDS dataset {name!r} is prepared as {fmt}, which needs TensorFlow to "
                    f"read; {_prepare_hint(name, data_dir)}.")
  if split not in builder.info.splits:
    raise DataError(f"TFDS dataset {name!r} has no split {split!r} (it has "
                    f"{', '.join(sorted(builder.info.splits))}); set data.tfds_train_split / "
                    "data.tfds_eval_split.")
  return builder.as_data_source(split=split)


class TfdsPipeline(Pipeline):
  """Packs per-row document streams from a grain MapDataset over a TFDS source."""

  def __init__(self, cfg: DataConfig, *, wrap: bool = True, **kwargs):
    super().__init__(cfg, **kwargs)
    self.tokenizer = make_tokenizer(cfg.tokenizer, cfg.tokenizer_path)
    self.vocab_size = self.tokenizer.vocab_size
    self.eos_id, self.pad_id = self.tokenizer.eos_id, self.tokenizer.pad_id
    self.bytes_per_token = None  # depends on the documents; not known without a full pass
    split_name = getattr(cfg, _SPLIT_NAMES[self.split])
    source = open_source(cfg.path, cfg.tfds_data_dir, split_name)
    self.num_documents = len(source)
    if self.num_documents == 0:
      raise DataError(f"split {split_name!r} of TFDS dataset {cfg.path!r} is empty; choose "
                      "another split.")
    ds = grain.MapDataset.source(source)
    if self.split == "train":
      # index_shuffle is a bijection per epoch; repeat() reseeds it every epoch.
      ds = ds.shuffle(seed=cfg.seed % 2**32)
    self.wrap = wrap
    self._docs = ds.repeat() if wrap else ds
    self._text_key = cfg.tfds_text_key
    # Per local row: [document number k in the row's stream, offset in piece k].
    self._pos = {int(r): [0, 0] for r in range(self.process_index * self.local_batch,
                                                (self.process_index + 1) * self.local_batch)}
    self._piece_cache: dict[int, tuple[int, np.ndarray | None]] = {}

  def _piece(self, row: int, k: int) -> np.ndarray | None:
    """EOS + tokens of document k of this row's stream (None past the end)."""
    cached = self._piece_cache.get(row)
    if cached is not None and cached[0] == k:
      return cached[1]
    index = row + k * self.global_batch
    if not self.wrap and index >= self.num_documents:
      piece = None
    else:
      record = self._docs[index]
      if not isinstance(record, dict) or self._text_key not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"TFDS dataset {self.cfg.path!r} has no {self._text_key!r} feature "
                        f"(it has {keys}); set data.tfds_text_key.")
      value = record[self._text_key]
      if isinstance(self.tokenizer, ByteTokenizer):
        tokens = np.frombuffer(value if isinstance(value, bytes) else str(value).encode(),
                               np.uint8).astype(np.int32)
      else:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        tokens = self.tokenizer.encode(text)
      piece = np.concatenate([[self.eos_id], tokens]).astype(np.int32)
    self._piece_cache[row] = (k, piece)
    return piece

  def _window(self, row: int, k: int, off: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """T+1 tokens from (k, off), their validity, and where the next window starts."""
    t1 = self.seq_len + 1
    out = np.full(t1, self.pad_id, np.int32)
    valid = np.zeros(t1, bool)
    filled, next_pos = 0, None
    while filled < t1:
      piece = self._piece(row, k)
      if piece is None:
        break
      take = min(t1 - filled, len(piece) - off)
      if next_pos is None and filled + take > self.seq_len:
        next_pos = (k, off + self.seq_len - filled)  # token T of this window starts the next
      out[filled:filled + take] = piece[off:off + take]
      valid[filled:filled + take] = True
      filled += take
      off += take
      if off == len(piece):
        k, off = k + 1, 0
    if next_pos is None:
      next_pos = (k, off)  # stream exhausted: stay there (only without wrap)
    return out, valid, next_pos[0], next_pos[1]

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    raise DataError(f"TFDS pipelines read their document streams sequentially, so step {step} "
                    "cannot be fetched out of order; use next(), or set_state() with a state "
                    "saved at that step.")

  def next(self) -> dict[str, np.ndarray]:
    batch = self._rows(self.local_rows(self._step))
    self._step += 1
    return batch

  __next__ = next

  def _rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    tokens, valid = [], []
    for g in rows:
      row = int(g % self.global_batch)
      k, off = self._pos[row]
      out, ok, k, off = self._window(row, k, off)
      self._pos[row] = [k, off]
      tokens.append(out)
      valid.append(ok)
    tokens, valid = np.stack(tokens), np.stack(valid)
    inputs = tokens[:, :-1]
    batch = dict(inputs=inputs, targets=tokens[:, 1:], mask=valid[:, 1:].astype(np.float32))
    if self.cfg.segment_ids:
      is_eos = inputs == self.eos_id
      seg = np.cumsum(is_eos, axis=1) + (~is_eos[:, :1])
      batch["segment_ids"] = np.where(valid[:, :-1], seg, 0).astype(np.int32)
    return batch

  def _fingerprint(self) -> dict:
    return dict(super()._fingerprint(), dataset=self.cfg.path,
                documents=self.num_documents)

  def get_state(self) -> dict:
    state = super().get_state()
    state["rows"] = {str(r): list(p) for r, p in sorted(self._pos.items())}
    return state

  def set_state(self, state: dict) -> None:
    rows = state.get("rows") if isinstance(state, dict) else None
    if not isinstance(rows, dict):
      raise DataError("TFDS data state has no 'rows'; pass a dict saved by get_state() of a "
                      "kind='tfds' pipeline.")
    missing = [r for r in self._pos if str(r) not in rows]
    if missing:
      raise DataError(f"TFDS data state lacks rows {missing[:4]}...; it was saved by another "
                      "process layout: restore each process's own state or merge_states() "
                      "of all processes.")
    super().set_state(state)
    self._pos = {r: [int(v) for v in rows[str(r)]] for r in self._pos}
    self._piece_cache.clear()


def merge_states(states: list[dict]) -> dict:
  """One state holding every row, from the states of all processes at one step."""
  steps = {s.get("step") for s in states}
  if len(steps) != 1:
    raise DataError(f"cannot merge data states from different steps {sorted(steps)}; save all "
                    "processes at the same step.")
  merged = dict(states[0])
  merged["rows"] = {r: p for s in states for r, p in s["rows"].items()}
  return merged


def make_tfds_pipeline(cfg: DataConfig, *, seq_len: int, global_batch: int, split: str,
                       process_index: int = 0, process_count: int = 1,
                       wrap: bool = True) -> TfdsPipeline:
  return TfdsPipeline(cfg, seq_len=seq_len, global_batch=global_batch, split=split,
                      process_index=process_index, process_count=process_count, wrap=wrap)
