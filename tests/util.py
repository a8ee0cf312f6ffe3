"""Small helpers shared by tests."""
import hashlib
from pathlib import Path


def tree_hash(path: Path) -> str:
  """A hash of every file name and byte under `path`: equal hashes mean nothing changed."""
  h = hashlib.sha256()
  for p in sorted(Path(path).rglob("*")):
    h.update(str(p.relative_to(path)).encode())
    if p.is_file():
      h.update(p.read_bytes())
  return h.hexdigest()
