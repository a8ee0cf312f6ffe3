"""Local text: read documents from a file, a directory or a glob, and split them.

A path may name a .txt or .jsonl file, a directory (searched recursively for
both), or a glob pattern. In .txt files a document is a blank-line separated
paragraph (default), a line, or the whole file (`docs`); in .jsonl files a
document is the `text_field` of each line's object.

The train/validation split is by document and by content: a document goes to
validation when a keyed hash of its bytes (key = split_seed) falls below
validation_fraction. Membership therefore does not depend on file order, on the
training seed, or on which other files are present, and duplicates never leak
across the split.
"""
from __future__ import annotations

import glob as glob_lib
import hashlib
import json
import os
import re
from typing import Sequence

from lmjax.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".jsonl")
DOC_UNITS = ("paragraph", "line", "file")
SPLITS = ("train", "validation")

_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")


def find_text_files(path: str) -> list[str]:
  """Sorted .txt/.jsonl files that `path` names (file, directory or glob)."""
  if not path:
    raise ConfigError("data.path is empty; set it to a .txt/.jsonl file, a directory or a glob.")
  if glob_lib.has_magic(path):
    matches = sorted(p for p in glob_lib.glob(path, recursive=True) if os.path.isfile(p))
    if not matches:
      raise DataError(f"text glob {path!r} matches no files; fix the pattern or data.path.")
    return matches
  if os.path.isfile(path):
    return [path]
  if os.path.isdir(path):
    found = []
    for root, dirs, files in os.walk(path):
      dirs.sort()  # os.walk order is filesystem-dependent; sort for determinism
      found += [os.path.join(root, f) for f in sorted(files) if f.endswith(TEXT_SUFFIXES)]
    if not found:
      raise DataError(f"text directory {path!r} contains no .txt or .jsonl files; add some or "
                      "point data.path at a file.")
    return found
  raise DataError(f"text path {path!r} does not exist; fix data.path (a file, directory or glob).")


def _decode(data: bytes, filename: str, base_offset: int = 0) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{filename} is not valid UTF-8 at byte offset {base_offset + e.start}; "
                    "re-encode the file as UTF-8 or remove it.") from None


def read_file_documents(filename: str, *, text_field: str = "text",
                        docs: str = "paragraph") -> list[str]:
  """Documents of one file, in file order; empty documents are dropped."""
  try:
    with open(filename, "rb") as f:
      data = f.read()
  except OSError as e:
    raise DataError(f"cannot read {filename} ({e.strerror}); check the path and "
                    "permissions.") from None
  if not data.strip():
    raise DataError(f"{filename} is empty; remove it or add text.")
  if filename.endswith(".jsonl"):
    return _jsonl_documents(data, filename, text_field)
  text = _decode(data, filename)
  if docs == "file":
    pieces = [text]
  elif docs == "line":
    pieces = text.splitlines()
  else:
    pieces = _PARAGRAPH_BREAK.split(text)
  return [p.strip("\n") for p in pieces if p.strip()]


def _jsonl_documents(data: bytes, filename: str, text_field: str) -> list[str]:
  out, offset = [], 0
  for lineno, line in enumerate(data.split(b"\n"), start=1):
    start, offset = offset, offset + len(line) + 1
    if not line.strip():
      continue
    decoded = _decode(line, filename, start)
    try:
      record = json.loads(decoded)
    except json.JSONDecodeError as e:
      raise DataError(f"{filename}:{lineno} is not valid JSON ({e.msg}); fix or remove that "
                      "line.") from None
    if not isinstance(record, dict) or text_field not in record:
      raise DataError(f"{filename}:{lineno} has no {text_field!r} field; set data.text_field to "
                      "the field that holds the text.")
    value = record[text_field]
    if not isinstance(value, str):
      raise DataError(f"{filename}:{lineno} field {text_field!r} is {type(value).__name__}, not "
                      "a string; fix the data or data.text_field.")
    if value.strip():
      out.append(value)
  if not out:
    raise DataError(f"{filename} has no non-empty {text_field!r} values; remove it or fix "
                    "data.text_field.")
  return out


def read_documents(path: str, *, text_field: str = "text", docs: str = "paragraph") -> list[str]:
  """All documents under `path`, files in sorted order."""
  if docs not in DOC_UNITS:
    raise ConfigError(f"data.text_docs={docs!r} is not a known option; choose one of "
                      f"{', '.join(map(repr, DOC_UNITS))}.")
  out = []
  for filename in find_text_files(path):
    out += read_file_documents(filename, text_field=text_field, docs=docs)
  if not out:
    raise DataError(f"text path {path!r} holds no non-empty documents; add text.")
  return out


def document_hash(text: str, split_seed: int) -> float:
  """A uniform number in [0, 1) fixed by (document content, split_seed)."""
  key = int(split_seed).to_bytes(8, "little", signed=True)
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
  return int.from_bytes(digest, "little") / 2.0**64


def split_assignment(documents: Sequence[str], *, validation_fraction: float,
                     split_seed: int) -> list[bool]:
  """True where a document belongs to validation.

  Train always gets a document, and with two or more documents and
  0 < fraction < 1 so does validation (the extreme hash moves), so tiny corpora
  still train and evaluate.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ConfigError(f"data.validation_fraction={validation_fraction!r} is invalid; use a "
                      "number in [0, 1).")
  hashes = [document_hash(d, split_seed) for d in documents]
  is_val = [h < validation_fraction for h in hashes]
  if validation_fraction > 0 and len(documents) >= 2 and not any(is_val):
    is_val[min(range(len(hashes)), key=hashes.__getitem__)] = True
  if is_val and all(is_val):  # training needs data more than evaluation does
    is_val[max(range(len(hashes)), key=hashes.__getitem__)] = False
  return is_val


def split_documents(documents: Sequence[str], split: str, *, validation_fraction: float,
                    split_seed: int) -> list[str]:
  if split not in SPLITS:
    raise ConfigError(f"split={split!r} is not a known option; choose one of "
                      f"{', '.join(map(repr, SPLITS))}.")
  is_val = split_assignment(documents, validation_fraction=validation_fraction,
                            split_seed=split_seed)
  want_val = split == "validation"
  return [d for d, v in zip(documents, is_val) if v == want_val]
